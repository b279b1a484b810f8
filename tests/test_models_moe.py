"""Mixture-of-experts architectures on tiny random models (``tests/tiny_models.py``):
cholla against transformers from SafeTensors, against itself from llama.cpp's GGUF
conversion (f32 and requantized), and through the engine."""

from __future__ import annotations

import struct

import pytest
import torch

transformers = pytest.importorskip("transformers")

from cholla import LLM, SamplingParams  # noqa: E402
from cholla.engine.runner import forward_once  # noqa: E402
from cholla.errors import ModelFormatError  # noqa: E402
from cholla.models.fused_decode import _covered  # noqa: E402
from cholla.models.loader import load_model  # noqa: E402
from tests import tiny_models  # noqa: E402

NAMES = list(tiny_models.configs())
PROMPT = [(i * 37 + 11) % tiny_models.VOCAB for i in range(40)]


@pytest.mark.parametrize("name", NAMES)
def test_safetensors_match_transformers(tiny, name):
    entry = tiny(name)
    loaded = load_model(entry["folder"], "float32")
    assert loaded.config.architecture == name and loaded.config.moe is not None
    # the fused C++ decode step has no MoE, sinks or latent attention: it must decline these layers
    assert not any(_covered(layer) for layer in loaded.model.layers if not hasattr(layer.mlp, "gate_proj"))
    assert not all(_covered(layer) for layer in loaded.model.layers)
    tiny_models.assert_close(forward_once(loaded.model, PROMPT, block_size=8), tiny_models.reference_logits(entry["model"], PROMPT))

    greedy = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    llm = LLM(entry["folder"], dtype="float32", max_model_len=128)
    ours = llm.generate({"prompt_token_ids": PROMPT[:12]}, greedy, use_tqdm=False)[0].outputs[0].token_ids
    with torch.no_grad():
        ref = entry["model"].generate(torch.tensor([PROMPT[:12]]), max_new_tokens=32, do_sample=False,
                                      min_new_tokens=32)[0, 12:].tolist()
    assert list(ours) == ref


@pytest.mark.parametrize("name", NAMES)
def test_gguf_f32_matches_transformers(tiny, gguf_of, name):
    loaded = load_model(gguf_of(name), "float32")
    same_file_type = {"glm4_moe_lite": "deepseek_v3"}  # GGUF has one "deepseek2" for both
    assert loaded.config.architecture == same_file_type.get(name, name) and loaded.config.moe is not None
    tiny_models.assert_close(forward_once(loaded.model, PROMPT, block_size=8), tiny_models.reference_logits(tiny(name)["model"], PROMPT))


QUANTS = [("qwen3_moe", "Q8_0"), ("qwen3_moe", "Q4_0"), ("mixtral", "Q4_0"), ("olmoe", "Q8_0"),
          ("gpt_oss", "MXFP4"), ("gpt_oss", "Q4_0"), ("deepseek_v3", "Q4_0"), ("glm4_moe_lite", "Q8_0")]


@pytest.mark.parametrize("name,qtype", QUANTS)
def test_gguf_quantized_experts(tiny, gguf_of, name, qtype):
    """Read from their blocks, quantized experts give what their dequantized values
    (``gguf.quants``' round trip, stored as f32) give, and stay near the float model."""
    quantized = load_model(gguf_of(name, qtype), "float32")
    experts = quantized.model.layers[-1].mlp.experts[0].gate_proj.weight
    assert experts.qtype.name == qtype  # still in its blocks, one expert's slice of the stack
    ours = forward_once(quantized.model, PROMPT, block_size=8)
    exact = forward_once(load_model(gguf_of(name, qtype, dequantized=True), "float32").model, PROMPT, block_size=8)
    tiny_models.assert_close(ours, exact)
    ref = tiny_models.reference_logits(tiny(name)["model"], PROMPT)
    relative_rms = ((ours - ref).pow(2).mean() / ref.pow(2).mean()).sqrt().item()
    assert relative_rms <= {"Q8_0": 0.05, "Q4_0": 0.3, "MXFP4": 0.35}[qtype]


def _engine(folder, **kwargs) -> LLM:
    kwargs.setdefault("max_model_len", 128)
    kwargs.setdefault("max_num_batched_tokens", 16)  # longer prompts are prefilled in chunks
    return LLM(folder, dtype="float32", **kwargs)


def _prompts() -> list[dict]:
    lengths = [5, 23, 9, 40, 17]
    return [{"prompt_token_ids": [(i * 7 + n * 13) % tiny_models.VOCAB for i in range(n)]} for n in lengths]


@pytest.mark.parametrize("name", [*NAMES, "gemma4", "gemma4_moe"])  # gemma4: KV-shared layers read others' blocks
def test_engine_batched_chunked_preempted_equal_alone(tiny, name):
    folder = tiny(name)["folder"]
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompts = _prompts()
    single = _engine(folder, enable_prefix_caching=False)
    alone = [single.generate(p, greedy, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]

    llm = _engine(folder, block_size=8)
    outs = llm.generate(prompts + prompts, greedy, use_tqdm=False)  # repeats hit the prefix cache
    assert [o.outputs[0].token_ids for o in outs] == alone + alone
    assert llm.engine.block_manager.prefix_hits > 0 and tiny_models.all_free(llm)

    from cholla.kv.paged_cache import bytes_per_block

    block = bytes_per_block(llm.engine.model_config, 8, torch.float32)
    small = _engine(folder, block_size=8, kv_cache_memory=9 * block, max_model_len=64, enable_prefix_caching=False)
    outs = small.generate(prompts, greedy, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == alone
    assert small.engine.metrics.preemptions > 0 and tiny_models.all_free(small)

    tiny_models.abort_in_prefill_and_decode(llm.engine, prompts[3], prompts[0])
    assert not llm.engine.has_unfinished_requests() and tiny_models.all_free(llm)


@pytest.mark.parametrize("kv_type, atol", [("f32", 1e-5), ("bf16", 3e-3), ("f16", 3e-4), ("fp8", 0.03)])
def test_latent_cache_float_types(tiny, kv_type, atol):
    """Later prefill chunks read the latent cache back (K and its V view) in each float type:
    their prompt logprobs against transformers; the cache is the size ``plan_layout`` counts."""
    entry = tiny("deepseek_v3")
    llm = _engine(entry["folder"], kv_cache_dtype=kv_type)
    scored = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True, prompt_logprobs=0)
    out = llm.generate({"prompt_token_ids": PROMPT}, scored, use_tqdm=False)[0]
    reference = tiny_models.reference_logits(entry["model"], PROMPT)[:-1].float().log_softmax(-1)
    got = torch.tensor([e.logprob for e in out.prompt_logprobs[1:]])
    want = reference[torch.arange(len(PROMPT) - 1), torch.tensor(PROMPT[1:])]
    assert (got - want).abs().max().item() < atol
    engine = llm.engine
    assert engine.kv_cache.nbytes == engine.kv_layout.nbytes  # what cholla plan shows is what is allocated
    assert engine.kv_layout.block_bytes == engine.kv_layout.block_size * 3 * (32 + 8) * engine.kv_cache.k_type.bytes_per_head(1)
    assert kv_type != "fp8" or engine.kv_cache.k_type.name == "fp8_e4m3_plain"  # no per-head keys to center


def test_plan_counts_the_latent(tiny):
    """``cholla plan`` sizes a latent cache as the engine does: three layers of 32 + 8 numbers per token."""
    from cholla.errors import InvalidRequestError
    from cholla.kv.kv_types import kv_cache_type
    from cholla.plan import PlanRequest, make_plan, read_model_facts

    facts = read_model_facts(tiny("deepseek_v3")["folder"])
    bf16 = kv_cache_type("bf16")
    plan = make_plan(facts, PlanRequest(context=128, kv_cache_memory=2**20), bf16, bf16, None)
    assert plan.kv["bytes_per_token"] == 3 * (32 + 8) * 2
    assert plan.layout["num_blocks"] == 2**20 // (16 * 3 * (32 + 8) * 2)
    fp8 = kv_cache_type("fp8")  # fp8_e4m3_centered elsewhere: one plain byte a number in a latent cache
    assert make_plan(facts, PlanRequest(context=128, kv_cache_memory=2**20), fp8, fp8, None).kv["bytes_per_token"] == 3 * (32 + 8)
    with pytest.raises(InvalidRequestError, match="kv cache type q4_0 is not supported for multi-head latent"):
        make_plan(facts, PlanRequest(context=128), kv_cache_type("q4_0"), kv_cache_type("q4_0"), None)


@pytest.mark.parametrize("spec", [{"kv_cache_dtype": "q8_0"}, {"kv_cache_dtype": "int8"},
                                  {"cache_type_k": "bf16", "cache_type_v": "f32"}])
def test_latent_cache_refuses_other_types(tiny, spec):
    from cholla.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="latent") as error:
        _engine(tiny("deepseek_v3")["folder"], **spec)
    assert "\n" not in str(error.value)


def test_deepseek2_gguf_with_unsplit_kv_b(tiny, gguf_of, tmp_path):
    """Older conversions store ``attn_kv_b`` whole; it is split per head as HF's ``kv_b_proj`` is."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(gguf_of("deepseek_v3"))
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    extra = {}
    for layer in range(3):
        k_b, v_b = tensors[f"blk.{layer}.attn_k_b.weight"], tensors[f"blk.{layer}.attn_v_b.weight"]  # [H, L, nope], [H, v, L]
        kv_b = np.concatenate((k_b.transpose(0, 2, 1), v_b), axis=1)  # [H, nope + v, L]
        extra[f"blk.{layer}.attn_kv_b.weight"] = np.ascontiguousarray(kv_b.reshape(-1, kv_b.shape[-1]))
    path = tiny_models.requantize(gguf_of("deepseek_v3"), tmp_path / "kv_b.gguf", "F32", extra=extra,
                                  drop=("attn_k_b", "attn_v_b"))
    loaded = load_model(path, "float32")
    tiny_models.assert_close(forward_once(loaded.model, PROMPT, block_size=8), tiny_models.reference_logits(tiny("deepseek_v3")["model"], PROMPT))


def test_safetensors_experts_contradicting_config_is_an_error(tiny, tmp_path):
    import json
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny("qwen3_moe")["folder"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["num_experts"] = 6  # the weights hold 8
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFormatError, match=r"tensor layers\.0\.mlp\.gate\.weight: weight shape \(8, 64\) != \(6, 64\)"):
        load_model(folder, "float32")


def _with_metadata(src, dst, key: str, value: int):
    """A copy of a GGUF file with one uint32 metadata value changed in place."""
    data = bytearray(src.read_bytes())
    name = key.encode()
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    assert struct.unpack_from("<I", data, at)[0] == 4  # GGUF's uint32 type
    struct.pack_into("<I", data, at + 4, value)
    dst.write_bytes(bytes(data))
    return dst


@pytest.mark.parametrize("change, needle", [
    ({"kv_lora_rank": 40}, "kv_lora_rank = 40 with the other dimensions needs kv_a_proj_with_mqa of layer 0"),
    ({"v_head_dim": 12}, "num_attention_heads = 4 with the other dimensions needs o_proj of layer 0"),
    ({"qk_rope_head_dim": 0}, "qk_rope_head_dim = 0 must be a whole number"),
    ({"moe_intermediate_size": 0}, "moe_intermediate_size = 0 must be a whole number"),
    ({"n_group": 3}, "must divide the 8 experts"),
    ({"first_k_dense_replace": 5}, "dense_layers = [0, 1, 2, 3, 4] must be layers of the 3"),
])
def test_latent_moe_config_contradictions_name_the_key(tiny, tmp_path, change, needle):
    """config_checks' CHECKS cover the latent widths and the expert counts, before anything is allocated."""
    import re

    folder = tiny_models.with_config(tiny("deepseek_v3")["folder"], tmp_path / "model", change)
    with pytest.raises(ModelFormatError, match=re.escape(needle)):
        load_model(folder, "float32")


def test_gguf_expert_count_contradicting_tensors_is_one_line_error(gguf_of, tmp_path):
    path = _with_metadata(gguf_of("qwen3_moe"), tmp_path / "bad.gguf", "qwen3moe.expert_count", 6)
    with pytest.raises(ModelFormatError, match=r"tensor blk\.0\.ffn_\w+_exps\.weight has shape \[8, .*6 experts") as e:
        load_model(path, "float32")
    assert "\n" not in str(e.value)


def test_gguf_expert_size_contradicting_tensors_names_the_tensor(gguf_of, tmp_path):
    path = _with_metadata(gguf_of("gpt_oss"), tmp_path / "bad.gguf", "gpt-oss.expert_feed_forward_length", 48)
    with pytest.raises(ModelFormatError, match=r"tensor blk\.0\.ffn_(gate|up|down)_exps\.weight: weight shape"):
        load_model(path, "float32")


def test_gguf_top_k_beyond_expert_count_is_an_error(gguf_of, tmp_path):
    path = _with_metadata(gguf_of("olmoe"), tmp_path / "bad.gguf", "olmoe.expert_used_count", 9)
    with pytest.raises(ModelFormatError, match="routes each token to 9 of 8 experts"):
        load_model(path, "float32")


@pytest.mark.parametrize("extra", ["blk.1.ffn_gate_shexp.weight", "blk.0.mystery.weight"])
def test_gguf_leftover_tensor_is_an_error(gguf_of, tmp_path, extra):
    """A tensor no module takes (a shared expert the metadata does not declare, an
    unknown name) is an error, not silently dropped."""
    import numpy as np

    path = tiny_models.requantize(gguf_of("qwen3_moe"), tmp_path / "extra.gguf", "F32",
                                  extra={extra: np.zeros((32, 64), dtype=np.float32)})
    with pytest.raises(ModelFormatError, match=f"tensor {extra} has no place") as e:
        load_model(path, "float32")
    assert "\n" not in str(e.value)


def _hf_mxfp4(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[experts, out, in] float -> HF's mxfp4 (blocks [experts, out, in/32, 16], scales
    [experts, out, in/32]), quantized by gguf.quants and repacked to HF's nibble order
    (byte j: weights 2j low, 2j + 1 high)."""
    import gguf

    ggml = torch.from_numpy(gguf.quants.quantize(rows.numpy(), gguf.GGMLQuantizationType.MXFP4))
    ggml = ggml.view(*rows.shape[:2], -1, 17)
    qs = ggml[..., 1:]
    weights = torch.cat((qs & 0x0F, qs >> 4), dim=-1)  # ggml: byte j holds weights j and j + 16
    return weights[..., 0::2] | (weights[..., 1::2] << 4), ggml[..., 0].contiguous()


def test_gpt_oss_hf_mxfp4_checkpoint(tiny, tmp_path):
    """The HF ``mxfp4`` layout (``*_blocks``, ``*_scales``) runs from its blocks and gives
    what transformers' own dequantization of those blocks gives."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    entry = tiny("gpt_oss")
    folder = entry["folder"]
    state = load_file(folder / "model.safetensors")
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for name in [n for n in state if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        blocks, scales = _hf_mxfp4(state.pop(name).transpose(1, 2).contiguous())
        state[f"{name}_blocks"], state[f"{name}_scales"] = blocks, scales
        reference.get_parameter(name).data = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    for f in folder.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, tmp_path / f.name)
    save_file(state, tmp_path / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": None}
    (tmp_path / "config.json").write_text(json.dumps(config))

    loaded = load_model(tmp_path, "float32")
    assert loaded.model.layers[1].mlp.experts[2].down_proj.weight.qtype.name == "MXFP4"
    tiny_models.assert_close(forward_once(loaded.model, PROMPT, block_size=8), tiny_models.reference_logits(reference, PROMPT))


def test_info_shows_experts_active_parameters_and_kv_geometry(tiny, gguf_of):
    from cholla.info import format_info, model_info

    for path in (tiny("deepseek_v3")["folder"], gguf_of("deepseek_v3")):
        info = model_info(path)
        assert info["experts"] == {"count": 8, "active": 3, "shared_size": 32}
        # three layers of one latent (32) + rope key (8) per token, not heads x (K + V)
        assert info["kv_bytes_per_token"]["float32"] == 3 * (32 + 8) * 4
        assert info["attention"].startswith("latent")
        routed = 2 * 8 * 3 * 32 * 64  # two MoE layers, eight experts of three 32x64 matrices
        assert info["parameters"] - info["active_parameters"] == routed - routed * 3 // 8
    info = model_info(gguf_of("gpt_oss"))
    assert info["kv_bytes_per_token"]["float32"] == 3 * 2 * 2 * 16 * 4
    assert "sinks" in info["attention"] and "sliding window 8 in 2 of 3 layers" in format_info(info)


@pytest.mark.parametrize("template", ["openai-gpt-oss-120b.jinja", "GLM-4.7-Flash.jinja",
                                      "deepseek-ai-DeepSeek-V3.1.jinja", "Qwen-Qwen3-0.6B.jinja",
                                      "google-gemma-4-31B-it.jinja"])
def test_chat_templates_of_these_models_render_like_transformers(template):
    """The models' own templates (GPT-OSS's harmony format among them), as llama.cpp ships
    them, rendered by cholla exactly as transformers' apply_chat_template renders them."""
    from cholla.tokenizer.chat_template import ChatTemplate

    converter = tiny_models.find_converter()
    if converter is None:
        pytest.skip("llama.cpp's sources are not available")
    source = (converter.parent / "models" / "templates" / template).read_text()
    hf = tiny_models.tiny_tokenizer()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 2+2?"}]
    ours = ChatTemplate(source, hf.bos_token, hf.eos_token).render(messages, add_generation_prompt=True)
    assert ours == hf.apply_chat_template(messages, chat_template=source, tokenize=False, add_generation_prompt=True)


def test_moe_layer_reads_only_the_routed_experts():
    """Tokens grouped by expert give the per-token sum of weighted expert outputs, and an
    expert no token chose is never read (its weights are NaN here)."""
    from cholla.layers.moe import SparseMoE, softmax_topk

    torch.manual_seed(0)
    hidden, width, experts, top_k = 32, 16, 8, 2
    moe = SparseMoE(hidden, width, experts, softmax_topk(top_k, normalize=True))
    moe.gate.load(torch.randn(experts, hidden))
    for expert in moe.experts:
        for proj, shape in (("gate_proj", (width, hidden)), ("up_proj", (width, hidden)), ("down_proj", (hidden, width))):
            getattr(expert, proj).load(torch.randn(shape) * 0.1)
    x = torch.randn(5, hidden)
    weights, ids = moe.route(moe.gate(x))
    unused = set(range(experts)) - set(ids.flatten().tolist())
    assert unused  # 5 tokens x 2 choices leave some of the 8 experts idle
    expected = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for w, e in zip(weights[t], ids[t]):
            expert = moe.experts[int(e)]
            y = expert.down_proj(torch.nn.functional.silu(expert.gate_proj(x[t:t + 1])) * expert.up_proj(x[t:t + 1]))
            expected[t] += w * y[0]
    for e in unused:
        for proj in ("gate_proj", "up_proj", "down_proj"):
            linear = getattr(moe.experts[e], proj)
            linear.load(torch.full_like(linear.weight, float("nan")))
    torch.testing.assert_close(moe(x), expected, rtol=1e-5, atol=1e-6)
