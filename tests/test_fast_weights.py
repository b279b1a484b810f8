"""The ``bfloat16`` path: our kernels on real tensors and the whole model on them.

Each real tensor type and shape of both models goes through each kernel path
(the int8 GEMV of steps of a few rows, the batched int8 product of decode
steps, AMX bf16 tiles, bf16 dequantization + oneDNN) and is
checked against ``F.linear`` on gguf's fp32 dequantization. The kernels
themselves are checked bit-for-bit-ish in tests/test_kernels.py; what is left
here is bfloat16 (or int8) rounding of the activations and weights.

The models against transformers' fp32 reference (same GGUF files), measured on
the three ``PROMPTS``: final logits (magnitude 20-80) differ by at most 0.20-0.26
(SmolLM2) and 0.09-0.16 (Gemma 3); greedy decoding follows the reference for
all 32 tokens except one SmolLM2 prompt, where the reference's own top-2 margin
at the first token is 0.023. For scale, transformers itself in bf16 (dense bf16
weights) differs from its fp32 by 0.25-0.42 (SmolLM2) and 0.22-0.30 (Gemma 3).
(The PyTorch int4/int8 packing used before our kernels differed by 0.46-0.56
and 0.81-1.12: it re-quantized Gemma's Q5_0, Q6_K and Q8_0 weights to int8.)
Decode steps round activations to int8 per block of 32 (as llama.cpp does): a
decoded token's log-probability differs from the reference's by at most 0.18
(SmolLM2) and 0.083 (Gemma 3), against 0.038 and 0.015 with the exact GEMV;
Gemma's 0.116 since its Q6_K down projections take the int8 GEMV too (0.108
just before, on the same three prompts).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType

from cholla import LLM, SamplingParams
from cholla.engine.runner import forward_once
from cholla.formats.gguf import read_gguf
from cholla.kernels import cpu_kernels
from cholla.layers.linear import AMX_MAX_ROWS, GEMV_MAX_ROWS, INT8_MAX_ROWS, INT8_PROMPT_TYPES, Linear, linear_group
from cholla.quant import dequantize

pytestmark = pytest.mark.skipif(cpu_kernels() is None, reason="needs a CPU with AVX512-BF16 and a C++ compiler")

# bf16 rounding of weights and activations, fp32 sums, relative to the largest
# output: measured up to 1.1% (Gemma's Q6_K ffn_down, one random row).
BF16_RTOL = 0.02
# Largest final-logit difference allowed vs the fp32 reference: about 2x the measured (SmolLM2's
# Q4_1 and Gemma 3's K-quant prompts keep bf16 activations: INT8_PROMPT_TYPES in layers/linear.py).
LOGIT_ATOL = {"smollm2_path": 0.5, "gemma3_path": 0.35}
# Largest difference in a decoded token's log-probability (int8 activations in
# one-row steps, see cholla/kernels/qgemv.cpp): about 2x the measured 0.18
# (SmolLM2) and 0.083 (Gemma 3); the exact fp32 GEMV gave 0.038 and 0.015.
DECODE_LOGPROB_ATOL = {"smollm2_path": 0.4, "gemma3_path": 0.15}
# A greedy divergence (or a different top token) is accepted only where the
# reference's top-2 margin is below this: 2x the largest margin we saw flip.
TIE_GAP = 0.25
NUM_TOKENS = 32
PROMPTS = [
    "The quick brown fox jumps over the lazy dog because",
    "The history of the printing press begins",
    "Name three uses of copper and explain one.",
]
# Step sizes at each path's edges: the GEMVs (fp32 and int8), the batched int8 product
# (tiles of 16 rows: 33 ends one early) or AMX tiles, dequantize + oneDNN.
ROWS = [1, 2, INT8_MAX_ROWS, INT8_MAX_ROWS + 1, GEMV_MAX_ROWS, GEMV_MAX_ROWS + 1, 33, AMX_MAX_ROWS, AMX_MAX_ROWS + 1]


def _tensors_by_type(path):
    """One 2-D tensor per (type, shape) in the file."""
    chosen = {}
    for tensor in read_gguf(path).tensors.values():
        if len(tensor.shape) == 2:
            chosen.setdefault((tensor.qtype, tensor.shape), tensor)
    return list(chosen.values())


@pytest.fixture(scope="module", params=["smollm2_path", "gemma3_path"])
def real_tensors(request):
    return _tensors_by_type(request.getfixturevalue(request.param))


def _linear(tensor, dtype) -> Linear:
    linear = Linear(tensor.shape[1], tensor.shape[0])
    linear.load(tensor)
    linear.compute_dtype = dtype
    return linear


@pytest.mark.parametrize("rows", ROWS)
def test_every_path_matches_the_dequantized_matmul(real_tensors, rows):
    """Each real tensor type and shape of both models, through each kernel path."""
    generator = torch.Generator().manual_seed(rows)
    for tensor in real_tensors:
        x = torch.randn(rows, tensor.shape[1], generator=generator)
        reference = F.linear(x.double(), dequantize(tensor.data, tensor.qtype).reshape(tensor.shape).double())
        for dtype, rtol in ((torch.float32, 1e-5), (torch.bfloat16, BF16_RTOL)):
            layer = _linear(tensor, dtype)
            # bf16 decode steps (7-64 rows: the batched int8 product where the type has one)
            for decode in (False, True) if dtype == torch.bfloat16 else (False,):
                out = linear_group((layer,), x, decode=decode)[0]
                assert out.dtype == torch.float32 and out.shape == reference.shape
                error = (out - reference).abs().max().item() / reference.abs().max().item()
                assert error < rtol, (f"{tensor.name} ({tensor.qtype.name}, {rows} rows, {dtype}, decode {decode}): "
                                      f"relative error {error:.2e}")


def test_grouped_projections_equal_separate_ones(real_tensors):
    generator = torch.Generator().manual_seed(0)
    by_width: dict[tuple, list] = {}
    for tensor in real_tensors:  # a group of weights whose prompt products are int8 and others takes bf16 alone
        by_width.setdefault((tensor.shape[1], tensor.qtype in INT8_PROMPT_TYPES), []).append(tensor)
    for tensors in by_width.values():
        layers = [_linear(t, torch.bfloat16) for t in tensors[:3]]
        for rows in (1, 20, AMX_MAX_ROWS + 1):  # one path each
            x = torch.randn(rows, tensors[0].shape[1], generator=generator)
            rtol = 2**-7 if rows > AMX_MAX_ROWS else 0  # oneDNN rounds its output to bf16: one ulp may flip
            for grouped, layer in zip(linear_group(layers, x), layers):
                torch.testing.assert_close(grouped, layer(x), rtol=rtol, atol=float(grouped.abs().max()) * 1e-5)


def test_reused_output_is_the_same_product_in_one_kept_buffer(real_tensors):
    """forward(..., reuse_output=True), as the engine computes its logits: steps
    the batched kernels serve (int8 or AMX tiles) write into one buffer the layer keeps; others are fresh."""
    tensor = real_tensors[0]
    layer = _linear(tensor, torch.bfloat16)
    generator = torch.Generator().manual_seed(5)
    pointers = set()
    for rows in (20, INT8_MAX_ROWS + 1, AMX_MAX_ROWS):
        x = torch.randn(rows, tensor.shape[1], generator=generator)
        out = layer(x, reuse_output=True)  # a decode step's logits
        torch.testing.assert_close(out, linear_group((layer,), x, decode=True)[0], rtol=0, atol=0)
        pointers.add(out.data_ptr())
    assert pointers == {layer.reused_output.data_ptr()}
    for rows in (1, AMX_MAX_ROWS + 1):  # the GEMV's and oneDNN's steps: a fresh tensor
        out = layer(torch.randn(rows, tensor.shape[1], generator=generator), reuse_output=True)
        assert out.data_ptr() != layer.reused_output.data_ptr()


@pytest.mark.parametrize("rows", [1, AMX_MAX_ROWS + 1])
def test_float_weights_of_a_safetensors_model(tmp_path, rows):
    """An HF folder's fp32 weights go through the same kernels; logits stay within
    1% of the largest logit of the fp32 path (measured 0.1-0.3% on this random tiny Llama)."""
    transformers = pytest.importorskip("transformers")
    from cholla.models.loader import load_model

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(tmp_path)
    reference, fast = load_model(tmp_path, "float32"), load_model(tmp_path, "bfloat16")
    assert fast.model.layers[0].mlp.up_proj.kernel_weight is not None
    ids = torch.randint(0, config.vocab_size, (rows,)).tolist()
    expected = forward_once(reference.model, ids)
    assert (forward_once(fast.model, ids) - expected).abs().max() < 0.01 * expected.abs().max()


def test_auto_is_bfloat16_where_the_kernels_run(smollm2_path):
    from cholla.models.loader import load_model

    assert load_model(smollm2_path).dtype == "bfloat16"


@pytest.fixture(scope="module", params=["smollm2_path", "gemma3_path"])
def bf16_and_reference(request):
    pytest.importorskip("transformers")
    from tests.conftest import hf_gguf_model

    path = request.getfixturevalue(request.param)
    llm = LLM(path, max_model_len=1024, kv_cache_memory=64 * 2**20, dtype="bfloat16")
    return request.param, llm, hf_gguf_model(path)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_bf16_model_logits_and_greedy_follow_the_fp32_reference(bf16_and_reference, prompt):
    from tests.test_models_real import hf_greedy

    model_name, llm, reference = bf16_and_reference
    ids = llm.tokenizer.encode(prompt)
    ours = forward_once(llm.engine.loaded.model, ids)[-1]
    with torch.inference_mode():
        ref = reference(torch.tensor([ids])).logits[0, -1].float()
    assert (ours - ref).abs().max().item() < LOGIT_ATOL[model_name]
    top2 = ref.topk(2).values
    assert ours.argmax() == ref.argmax() or top2[0] - top2[1] < TIE_GAP

    params = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=0)
    output = llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)[0].outputs[0]
    tokens = output.token_ids
    # Decode steps (one row: the int8 GEMV) against the reference on our own tokens.
    with torch.inference_mode():
        ref_logprobs = reference(torch.tensor([ids + tokens])).logits[0, len(ids) : -1].float().log_softmax(-1)
    decoded = torch.tensor([logprob for logprob, _ in output.logprobs[1:]])
    ref_decoded = ref_logprobs.gather(1, torch.tensor(tokens[1:])[:, None])[:, 0]
    assert (decoded - ref_decoded).abs().max().item() < DECODE_LOGPROB_ATOL[model_name]
    ref_tokens, gaps = hf_greedy(reference, ids, NUM_TOKENS)
    for i, (a, b) in enumerate(zip(tokens, ref_tokens)):
        if a != b:
            assert gaps[i] < TIE_GAP, f"diverged at token {i} where the reference's margin was {gaps[i]:.3f}"
            break


def test_greedy_tokens_from_the_head_equal_the_sampler_on_its_logits(gemma3_path, monkeypatch):
    """Decode steps of all-greedy rows take their tokens from the head's fused argmax in the layers'
    team (``decode_logits``, no logits written): the same tokens as the sampler's argmax over the
    logits, which a logprobs request still gets. Nine sequences (the batched int8 product's rows),
    Gemma 3's 262k vocabulary."""
    llm = LLM(gemma3_path, max_model_len=256, kv_cache_memory=64 * 2**20, dtype="bfloat16")
    prompts = [{"prompt_token_ids": llm.tokenizer.encode(p)} for p in PROMPTS * 3]
    fused = []  # each decode step's tokens from the kernel (None: the logits were written instead)
    model_class = type(llm.engine.runner.model)
    decode_logits = model_class.decode_logits

    def spy(self, *args, **kwargs):
        out = decode_logits(self, *args, **kwargs)
        fused.append(None if out is None else out[1])
        return out

    monkeypatch.setattr(model_class, "decode_logits", spy)
    plain = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, plain, use_tqdm=False)]
    assert sum(tokens is not None for tokens in fused) >= 10  # the decode steps' (9 rows each)
    fused.clear()
    with_logits = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=0)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, with_logits, use_tqdm=False)] == got
    assert fused and all(tokens is None for tokens in fused)  # logprobs read the logits: written
