"""Tiny random models of new architectures, built by transformers at test time, and
their GGUF conversions by llama.cpp's own ``convert_hf_to_gguf.py``.

Nothing here is checked in: each model is a few hundred KB, made from its
transformers config class with a 300-token byte-level BPE vocabulary trained on
the spot, saved as SafeTensors, then converted (f32) and requantized with
``gguf.quants`` (Q8_0, Q4_0, MXFP4).
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

VOCAB = 300
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def configs() -> dict:
    import transformers

    return {
        "qwen3_moe": transformers.Qwen3MoeConfig(
            **_COMMON, head_dim=16, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32,
            norm_topk_prob=True, tie_word_embeddings=False),
        "mixtral": transformers.MixtralConfig(**_COMMON, num_local_experts=6, num_experts_per_tok=2),
        "olmoe": transformers.OlmoeConfig(**_COMMON, num_experts=8, num_experts_per_tok=3, eos_token_id=None),
        "gpt_oss": transformers.GptOssConfig(
            **{**_COMMON, "intermediate_size": 64}, head_dim=16, num_local_experts=6, num_experts_per_tok=4,
            sliding_window=8, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 8.0, "beta_fast": 32.0,
                             "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 64}),
        "deepseek_v3": transformers.DeepseekV3Config(
            **{**_COMMON, "num_key_value_heads": 4}, n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=32,
            n_shared_experts=1,
            first_k_dense_replace=1, n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
            q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=24,
            rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "beta_fast": 32.0,
                             "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                             "original_max_position_embeddings": 128}),
        "glm4_moe_lite": transformers.Glm4MoeLiteConfig(
            **{**_COMMON, "num_key_value_heads": 4}, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
            n_shared_experts=1,
            q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
            routed_scaling_factor=1.8),
    }


# Gated DeltaNet hybrids (Qwen3-Next, Qwen 3.5): linear-attention layers around every third full-attention
# one; 4 value heads over 2 key heads, so queries and keys are shared across value heads.
_DELTANET = dict(**{**_COMMON, "num_hidden_layers": 4}, head_dim=16, linear_conv_kernel_dim=4, linear_key_head_dim=16,
                 linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                 layer_types=["linear_attention", "linear_attention", "full_attention", "linear_attention"],
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
                 tie_word_embeddings=False)
_DELTANET_MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48)


def deltanet_configs() -> dict:
    """The Gated DeltaNet families, each converted with ``--no-mtp`` (``convert_to_gguf``'s ``extra_args``)."""
    import transformers

    return {
        "qwen3_next": transformers.Qwen3NextConfig(**_DELTANET, **_DELTANET_MOE, norm_topk_prob=True, decoder_sparse_step=1),
        "qwen3_5": transformers.Qwen3_5TextConfig(**_DELTANET),
        "qwen3_5_moe": transformers.Qwen3_5MoeTextConfig(**_DELTANET, **_DELTANET_MOE),
    }


def gemma4_configs() -> dict:
    """Gemma 4's two text variants, every window-crossing feature on: the dense one as the E2B/E4B
    models (per-layer embeddings, the last two layers sharing KV with double-wide MLPs), the MoE
    one as 26B-A4B (global layers with one KV head and V = K, experts beside the dense MLP)."""
    import transformers

    gemma = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, global_head_dim=32, max_position_embeddings=512, sliding_window=8,
                 final_logit_softcapping=30.0)
    return {
        "gemma4": transformers.Gemma4TextConfig(
            **gemma, num_hidden_layers=5, hidden_size_per_layer_input=8, vocab_size_per_layer_input=VOCAB,
            layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention",
                         "full_attention"], num_kv_shared_layers=2, use_double_wide_mlp=True),
        "gemma4_moe": transformers.Gemma4TextConfig(
            **gemma, num_hidden_layers=3, hidden_size_per_layer_input=0, attention_k_eq_v=True,
            num_global_key_value_heads=1, layer_types=["sliding_attention", "full_attention", "full_attention"],
            enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=32),
    }


def gemma_tokenizer():
    """A ``VOCAB``-token BPE with byte fallback laid out as Gemma's (pad, eos, bos, unk first; spaces
    as "▁"), the kind llama.cpp's Gemma 4 converter reads."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)]
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog, " * 20,
                             "hello world, this is a tiny model that says little"], trainer)
    assert tok.get_vocab_size() == VOCAB
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                                pad_token="<pad>", unk_token="<unk>")


def tokenizer_for(name: str):
    """Gemma 4's converter reads only Gemma-style vocabularies; the others take the byte-level BPE."""
    return gemma_tokenizer() if name.startswith("gemma") else tiny_tokenizer()


def hybrid_configs() -> dict:
    """Models with recurrent layers (a state per sequence), their layer kinds mixed."""
    import transformers

    return {
        "lfm2": transformers.Lfm2Config(
            **{k: v for k, v in _COMMON.items() if k != "intermediate_size"}, intermediate_size=96,
            block_multiple_of=32, layer_types=["conv", "full_attention", "conv"], conv_L_cache=3,
            tie_word_embeddings=True, eos_token_id=None),
        "lfm2_moe": transformers.Lfm2MoeConfig(
            **_COMMON, moe_intermediate_size=32, num_dense_layers=1, num_experts=8, num_experts_per_tok=3,
            layer_types=["conv", "full_attention", "conv"], conv_L_cache=3,
            tie_word_embeddings=True, eos_token_id=None),
    }


# Weights the 0.02-std init leaves too small to matter (a short convolution's output is a product of
# three of them): scaled up so a mistake in those layers shows in the logits.
_SCALED = {"lfm2": {"conv.in_proj": 15.0, "conv.conv": 30.0}, "lfm2_moe": {"conv.in_proj": 15.0, "conv.conv": 30.0,
                                                                        "feed_forward.gate": 10.0, "experts": 3.0},
           # Mamba-2: time steps of ~0.5 instead of ~0.01, and inputs, B and C large enough that the SSM
           # state (not only the D skip) moves the logits (Nemotron-H initialises with std 0.02, Mamba-2 0.1).
           "mamba2": {"mixer.dt_bias": 0.1, "mixer.in_proj": 3.0},
           **{name: {"mixer.dt_bias": 0.1, "mixer.in_proj": 15.0} for name in ("nemotron_h", "nemotron_h_moe")}}
# Mamba-2 mixers: a larger in_proj, and time steps near softplus(-4) instead of softplus(1), so a head's
# state decays over tens of tokens, not two or three, and losing it between prefill chunks shows.
_MAMBA_SCALED = {"mamba.in_proj": 15.0, "mamba.dt_bias": -4.0}
_SCALED.update({name: _MAMBA_SCALED for name in ("falcon_h1", "falcon_h1_rms_norm", "granitemoehybrid", "granite_dense")})


def mamba_configs() -> dict:
    """Mamba-2 and its hybrids (Nemotron-H dense and MoE): chunk_size 16, so a 40-token
    prompt crosses the SSD's chunks as well as the engine's prefill chunks. Their vocabularies
    are padded to a multiple of 16 (llama.cpp's converter pads these families' token lists)."""
    import transformers

    mamba = dict(vocab_size=VOCAB + 4, hidden_size=64, n_groups=2, conv_kernel=4, chunk_size=16, tie_word_embeddings=False)
    hybrid = dict(**mamba, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=96,
                  mamba_num_heads=8, mamba_head_dim=8, ssm_state_size=8, max_position_embeddings=512)
    return {
        "mamba2": transformers.Mamba2Config(**mamba, num_heads=8, head_dim=16, expand=2, state_size=16,
                                            num_hidden_layers=2),
        "nemotron_h": transformers.NemotronHConfig(**hybrid, layers_block_type=[
            "linear_attention", "full_attention", "mlp", "linear_attention"]),
        "nemotron_h_moe": transformers.NemotronHConfig(**hybrid, layers_block_type=[
            "linear_attention", "moe", "full_attention", "mlp", "linear_attention"], n_routed_experts=8,
            num_experts_per_tok=2, moe_intermediate_size=32, moe_shared_expert_intermediate_size=48,
            routed_scaling_factor=2.5, norm_topk_prob=True),
    }


def falcon_granite_configs() -> dict:
    """Falcon-H1 and Granite 4 hybrid: Mamba-2 mixers with chunks of 8 tokens, so a 40-token
    prompt's scan crosses chunks inside one prefill chunk as well as between them."""
    import transformers

    mamba = dict(mamba_d_state=16, mamba_d_conv=4, mamba_chunk_size=8)
    return {
        # muP multipliers all unlike 1 and each other, so folding one into the wrong weight shows
        "falcon_h1": transformers.FalconH1Config(
            **_COMMON, head_dim=16, mamba_d_ssm=64, mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=2, **mamba,
            embedding_multiplier=1.5, lm_head_multiplier=0.8, mlp_multipliers=[1.2, 0.9], key_multiplier=0.7,
            attention_in_multiplier=1.1, attention_out_multiplier=0.6, ssm_in_multiplier=1.3, ssm_out_multiplier=0.5,
            ssm_multipliers=[0.9, 1.1, 0.8, 1.2, 1.4], tie_word_embeddings=False),
        # the mixer's optional grouped RMSNorm, taken before the gate (HF's default order when it is on)
        "falcon_h1_rms_norm": transformers.FalconH1Config(
            **{**_COMMON, "num_hidden_layers": 2}, head_dim=16, mamba_d_ssm=64, mamba_n_heads=8, mamba_d_head=8,
            mamba_n_groups=2, **mamba, mamba_rms_norm=True, mamba_norm_before_gate=True, key_multiplier=0.7,
            embedding_multiplier=1.5, lm_head_multiplier=0.8,  # tied: one tensor, two factors
            ssm_multipliers=[0.9, 1.1, 0.8, 1.2, 1.4], tie_word_embeddings=True),
        # vocab padded to a multiple of 8, as llama.cpp's converter pads a Mamba-2 vocabulary
        "granitemoehybrid": transformers.GraniteMoeHybridConfig(
            **{**_COMMON, "vocab_size": VOCAB + 4}, layer_types=["mamba", "attention", "mamba"],
            num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=48, mamba_n_heads=8, mamba_d_head=16,
            **mamba, embedding_multiplier=2.0, logits_scaling=3.0, residual_multiplier=0.4, attention_multiplier=0.05,
            position_embedding_type="nope", tie_word_embeddings=True),
        # dense (Granite 4.0-H-Micro's layout) and with rope, which only config.json can say: llama.cpp's
        # converter runs a hybrid Granite without it
        "granite_dense": transformers.GraniteMoeHybridConfig(
            **{**_COMMON, "vocab_size": VOCAB + 4, "num_hidden_layers": 2}, layer_types=["attention", "mamba"],
            num_local_experts=0, shared_intermediate_size=80, mamba_n_heads=8, mamba_d_head=16, **mamba,
            embedding_multiplier=3.0, logits_scaling=0.5, residual_multiplier=0.7, attention_multiplier=0.1,
            position_embedding_type="rope", tie_word_embeddings=False),
    }


# The tiny models that go through llama.cpp's converter (the shared ``gguf_of`` fixture converts them
# all in one process): of the Mamba-2 families two, which between them have every kind of layer and
# tensor; of the Falcon-H1 / Granite ones three (the RMSNorm-mixer variant is checked from SafeTensors).
MAMBA_GGUF = ["mamba2", "nemotron_h_moe"]
FALCON_GRANITE_GGUF = ["falcon_h1", "granitemoehybrid", "granite_dense"]


def gguf_jobs() -> dict[str, tuple[str, ...]]:
    """name -> its own converter arguments, for every tiny model converted to GGUF (the
    Gated DeltaNet ones without their multi-token-prediction layers)."""
    plain = [*configs(), *gemma4_configs(), *hybrid_configs(), *MAMBA_GGUF, *FALCON_GRANITE_GGUF]
    return {**{name: () for name in plain}, **{name: ("--no-mtp",) for name in deltanet_configs()}}


def _released_spelling(folder: Path) -> None:
    """transformers 5 saves Granite 4 hybrid's layer kinds as linear_attention/full_attention; the released
    checkpoints (and llama.cpp's converter, which finds no attention layer otherwise) say mamba/attention."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    if config.get("model_type") == "granitemoehybrid":
        config["layer_types"] = ["mamba" if kind == "linear_attention" else "attention" for kind in config["layer_types"]]
        path.write_text(json.dumps(config, indent=2))


def tiny_tokenizer():
    """A byte-level BPE of exactly ``VOCAB`` tokens (256 bytes, merges, a few specials)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # GLM's converter looks its special tokens up by name
    specials = ["<|endoftext|>", "[gMASK]", "<|user|>", "<|observation|>"]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog, " * 20,
                             "hello world, this is a tiny model that says little"], trainer)
    assert tok.get_vocab_size() == VOCAB
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                                additional_special_tokens=specials[1:])


def build_model(name: str, folder: Path, tokenizer, config=None):
    """The reference model (from ``configs()``, ``gemma4_configs()`` or ``hybrid_configs()`` unless ``config``
    is given), saved with its tokenizer into ``folder``; returns the model."""
    import transformers

    torch.manual_seed(0)
    config = config or {**configs(), **gemma4_configs(), **hybrid_configs(), **mamba_configs(), **falcon_granite_configs(),
                       **deltanet_configs()}[name]
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # random init leaves norms, scales at 1 and biases, sinks at 0: make them matter
        for pname, p in model.named_parameters():
            if "norm" in pname or "bias" in pname or "sinks" in pname or "scale" in pname:
                p.add_(torch.randn_like(p) * 0.1)
            for part, factor in _SCALED.get(name, {}).items():
                if part in pname:
                    p.mul_(factor)
        # buffers left at zero or one: a router's selection bias, Gemma 4's learned output scalar
        for bname, b in model.named_buffers():
            if bname.endswith(("expert_bias", "layer_scalar")):
                b.add_(torch.randn_like(b) * 0.1)
    model.generation_config.eos_token_id = None
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    _released_spelling(folder)
    return model


def find_converter() -> Path | None:
    """llama.cpp's ``convert_hf_to_gguf.py``: $CHOLLA_CONVERT_HF_TO_GGUF, or the llama-cpp-python
    sdist's copy, fetched from PyPI into ~/.cache/cholla once."""
    if os.environ.get("CHOLLA_CONVERT_HF_TO_GGUF"):
        return Path(os.environ["CHOLLA_CONVERT_HF_TO_GGUF"])
    cache = Path.home() / ".cache" / "cholla" / "llama-cpp-src"
    found = sorted(glob.glob(f"{cache}/llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    if found:
        return Path(found[-1])
    cache.mkdir(parents=True, exist_ok=True)
    fetched = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                              "llama-cpp-python==0.3.36", "-d", str(cache)], capture_output=True)
    sdists = glob.glob(f"{cache}/llama_cpp_python-*.tar.gz")
    if fetched.returncode or not sdists:
        return None
    subprocess.run(["tar", "-xzf", sdists[0], "-C", str(cache)], check=True)
    found = sorted(glob.glob(f"{cache}/llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    return Path(found[-1]) if found else None


_CONVERT = """
import json, runpy, sys
converter, jobs = sys.argv[1], json.loads(sys.argv[2])
root = converter.rsplit("/", 1)[0]
sys.path[:0] = [root + "/gguf-py", root]  # the converter's own gguf package, newer than ours
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"  # tiny vocabularies have no known hash
for folder, out, extra in jobs:
    sys.argv = [converter, folder, "--outtype", "f32", "--outfile", out, *extra]
    runpy.run_path(converter, run_name="__main__")
"""


def convert_to_gguf(converter: Path, jobs: list[tuple], extra_args: tuple[str, ...] = ()) -> None:
    """f32 GGUFs of HF folders, all in one interpreter: its imports cost more than a tiny
    model's conversion. Each job is ``(folder, out)`` or ``(folder, out, its_own_args)``;
    ``extra_args`` go to every conversion."""
    spec = [[str(job[0]), str(job[1]), [*extra_args, *(job[2] if len(job) > 2 else ())]] for job in jobs]
    done = subprocess.run([sys.executable, "-c", _CONVERT, str(converter), json.dumps(spec)],
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"convert_hf_to_gguf.py failed:\n{done.stderr[-3000:]}")


def requantize(src: Path, dst: Path, qtype_name: str, dequantized: bool = False,
               extra: dict[str, np.ndarray] | None = None, drop: tuple[str, ...] = ()) -> Path:
    """A copy of the f32 GGUF ``src`` whose expert tensors are ``qtype_name`` (other
    matrices Q8_0 where the type is MXFP4, which llama.cpp uses for experts only).
    ``dequantized``: store the quantize-dequantize round trip in f32 instead, the
    exact reference for reading the quantized file. ``qtype_name`` F32 copies the
    tensors as they are; ``extra`` adds tensors and ``drop`` leaves out those whose
    names contain one of its strings (to make other layouts and broken files)."""
    import gguf

    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(dst, arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), value_type, sub_type=sub_type)
    expert_type = gguf.GGMLQuantizationType[qtype_name]
    for tensor in reader.tensors:
        if any(part in tensor.name for part in drop):
            continue
        data = np.array(tensor.data)
        qtype = expert_type if "_exps." in tensor.name else (
            gguf.GGMLQuantizationType.Q8_0 if qtype_name == "MXFP4" else expert_type)
        if (qtype_name == "F32" or data.ndim < 2 or data.shape[-1] % 32 or not tensor.name.endswith(".weight")
                or tensor.name.endswith("norm.weight")):  # as llama-quantize: norms (Mamba-2's are 2-D) stay f32
            writer.add_tensor(tensor.name, data)
            continue
        packed = gguf.quants.quantize(data, qtype)
        if dequantized:
            writer.add_tensor(tensor.name, gguf.quants.dequantize(packed, qtype).astype(np.float32))
        else:
            writer.add_tensor(tensor.name, packed, raw_dtype=qtype)
    for name, data in (extra or {}).items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def reference_logits(model, ids: list[int]) -> torch.Tensor:
    """transformers' logits ``[len(ids), vocab]`` for one prompt."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def assert_close(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4) -> None:
    """Within ``rel`` of the logits' magnitude, at every position."""
    err = (ours - ref).abs().max().item()
    assert err <= rel * ref.abs().max().item(), f"max error {err:.3g} vs logits up to {ref.abs().max().item():.3g}"


def with_config(folder: Path, dst: Path, change: dict) -> Path:
    """A copy of the HF folder ``folder`` at ``dst`` whose config.json has the keys of ``change`` set:
    a contradictory model, for the config checks' errors."""
    import json
    import shutil

    shutil.copytree(folder, dst)
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, **change}))
    return dst


def all_free(llm) -> bool:
    """Every KV block free and unreferenced, and (models with recurrent layers) every state slot free;
    ``llm`` an ``LLM`` or an ``LLMEngine``."""
    engine = getattr(llm, "engine", llm)
    manager, slots = engine.block_manager, engine.scheduler.state_slots
    blocks_free = manager.num_free_blocks == manager.num_blocks and not any(manager.allocator.ref_counts)
    return blocks_free and (slots is None or slots.num_free == slots.num_slots)


def generate(engine, prompts: list, params) -> list[list[int]]:
    """Each prompt's output tokens, all run together on ``engine`` (``params``: one for all, or one each)."""
    params = params if isinstance(params, list) else [params] * len(prompts)
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(str(i), prompt, p)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return [done[str(i)] for i in range(len(prompts))]


def abort_in_prefill_and_decode(engine, long_prompt, short_prompt) -> None:
    """Two greedy requests: the long one aborted while still in prefill, the short one while decoding."""
    from cholla.sampling.params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=20)
    engine.add_request("long", long_prompt, params)
    engine.add_request("short", short_prompt, params)
    engine.step()
    engine.abort("long")
    for _ in range(3):
        engine.step()
    engine.abort("short")


# The Gated DeltaNet head shapes the kernel tests cover: (k_heads, v_heads, dk, dv, tiled).
DELTANET_SHAPES = [
    (2, 2, 128, 128, False),  # Qwen 3.5's head shape
    (2, 4, 20, 24, False),  # value heads grouped over key heads; dims that end mid-vector
    (2, 6, 32, 80, True),  # tiled (llama.cpp's qwen35 order); a column strip with a tail
]


def random_deltanet(k_heads: int, v_heads: int, dk: int, dv: int, tiled: bool):
    """A 32-wide Gated DeltaNet layer with random decay, dt bias and norm weight (seed first)."""
    from cholla.layers.gated_deltanet import GatedDeltaNet
    from cholla.models.config import DeltaNetConfig
    config = DeltaNetConfig(num_k_heads=k_heads, num_v_heads=v_heads, k_head_dim=dk, v_head_dim=dv, conv_kernel=4,
                            v_heads_tiled=tiled)
    layer = GatedDeltaNet(32, config, 1e-6)
    layer.A.value = -torch.rand(v_heads) * 2
    layer.dt_bias.value = torch.randn(v_heads)
    layer.norm.weight = torch.rand(dv) + 0.5
    return layer
