"""Tiny random models of new architectures, built by transformers at test time, and
their GGUF conversions by llama.cpp's own ``convert_hf_to_gguf.py``.

Nothing here is checked in: each model is a few hundred KB, made from its
transformers config class with a 300-token byte-level BPE vocabulary trained on
the spot, saved as SafeTensors, then converted (f32) and requantized with
``gguf.quants`` (Q8_0, Q4_0, MXFP4).
"""

from __future__ import annotations

import glob
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


def hybrid_configs() -> dict:
    """Models with recurrent layers (a state per sequence), their layer kinds mixed."""
    import transformers

    return {
        "lfm2": transformers.Lfm2Config(
            **{k: v for k, v in _COMMON.items() if k != "intermediate_size"}, intermediate_size=96,
            block_multiple_of=32, layer_types=["conv", "full_attention", "conv"], conv_L_cache=3,
            tie_word_embeddings=True, eos_token_id=None),
    }


# Weights the 0.02-std init leaves too small to matter (a short convolution's output is a product of
# three of them): scaled up so a mistake in those layers shows in the logits.
_SCALED = {"lfm2": {"conv.in_proj": 15.0, "conv.conv": 30.0}}


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


def build_model(name: str, folder: Path, tokenizer):
    """The reference model, saved with its tokenizer into ``folder``; returns the model."""
    import transformers

    torch.manual_seed(0)
    config = {**configs(), **hybrid_configs(), **deltanet_configs()}[name]
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # random init leaves norms at 1 and biases, sinks at 0: make them matter
        for pname, p in model.named_parameters():
            if "norm" in pname or "bias" in pname or "sinks" in pname:
                p.add_(torch.randn_like(p) * 0.1)
            for part, factor in _SCALED.get(name, {}).items():
                if part in pname:
                    p.mul_(factor)
    model.generation_config.eos_token_id = None
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
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
import runpy, sys
converter, pairs = sys.argv[1], sys.argv[2:]
root = converter.rsplit("/", 1)[0]
sys.path[:0] = [root + "/gguf-py", root]  # the converter's own gguf package, newer than ours
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"  # tiny vocabularies have no known hash
extra = sys.argv[sys.argv.index("--") + 1:] if "--" in pairs else []
pairs = pairs[:pairs.index("--")] if "--" in pairs else pairs
for folder, out in zip(pairs[::2], pairs[1::2]):
    sys.argv = [converter, folder, "--outtype", "f32", "--outfile", out, *extra]
    runpy.run_path(converter, run_name="__main__")
"""


def convert_to_gguf(converter: Path, jobs: list[tuple[Path, Path]], extra_args: tuple[str, ...] = ()) -> None:
    """f32 GGUFs of HF folders (``(folder, out)`` pairs), all in one interpreter: its
    imports cost more than a tiny model's conversion. ``extra_args`` go to every conversion."""
    args = [str(p) for pair in jobs for p in pair] + (["--", *extra_args] if extra_args else [])
    done = subprocess.run([sys.executable, "-c", _CONVERT, str(converter), *args], capture_output=True, text=True)
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
        if qtype_name == "F32" or data.ndim < 2 or data.shape[-1] % 32 or not tensor.name.endswith(".weight"):
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
