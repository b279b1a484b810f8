"""The hybrid layers' one-call decode kernels (``kernels/hybrid_decode.cpp``) against the
PyTorch layers they replace: ``moe_decode`` against ``SparseMoE``'s grouped experts for
each router flavour (softmax then top-k, top-k then softmax, sigmoid with a correction
bias and grouped top-k), gated and ungated experts, with and without a shared expert, in
GGUF Q8_0 / Q4_0 blocks and float32; ``mamba2_decode`` against ``MixerLayer`` run op by
op, its output and both state slots. The layers themselves are checked against
transformers in tests/test_models_moe.py, test_models_hybrid.py and test_mamba2_layer.py
(whose tiny models now take these kernels for their decode steps)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cholla.formats.gguf import GGUFTensor
from cholla.kernels import cpu_kernels
from cholla.layers import moe as moe_module
from cholla.layers.attention import AttentionMetadata
from cholla.layers.linear import DenseTensor, decode_step
from cholla.layers.mamba2 import Mamba2Mixer
from cholla.layers.moe import SparseMoE, sigmoid_group_topk, softmax_topk, split_experts, topk_softmax
from cholla.layers.norm import RMSNorm
from cholla.models.config import Mamba2Shape

pytestmark = pytest.mark.skipif(cpu_kernels() is None, reason="needs a CPU with AVX512-BF16 and a C++ compiler")


def _blocks(w: torch.Tensor, qtype: str) -> GGUFTensor:
    """``w`` [..., rows, cols] as GGUF blocks of ``qtype`` (gguf's own quantizer)."""
    import gguf

    kind = gguf.GGMLQuantizationType[qtype]
    data = torch.from_numpy(np.ascontiguousarray(gguf.quants.quantize(w.numpy(), kind)))
    return GGUFTensor("w", kind, tuple(w.shape), data, 0)


def _moe(router: str, gated: bool, shared: bool, qtype: str | None, dtype: torch.dtype) -> SparseMoE:
    torch.manual_seed(0)
    hidden, width, experts, top_k = 64, 96, 8, 2
    bias = DenseTensor(experts)
    route = {"softmax_topk": softmax_topk(top_k, normalize=True), "topk_softmax": topk_softmax(top_k),
             "sigmoid_group_topk": sigmoid_group_topk(top_k, bias, 4, 2, True, 2.5)}[router]
    layer = SparseMoE(hidden, width, experts, route, "silu" if gated else "relu2", gated=gated,
                      shared_intermediate_size=128 if shared else 0,
                      correction_bias=bias if router == "sigmoid_group_topk" else None)
    bias.load(torch.rand(experts) * 0.2)
    stacked = {"mlp.experts.up_proj.weight": torch.randn(experts, width, hidden) * 0.1,
               "mlp.experts.down_proj.weight": torch.randn(experts, hidden, width) * 0.1}
    if gated:
        stacked["mlp.experts.gate_proj.weight"] = torch.randn(experts, width, hidden) * 0.1
    if qtype is not None:
        stacked = {name: _blocks(w, qtype) for name, w in stacked.items()}
    for name, w in split_experts(stacked, experts).items():
        _, _, e, proj, _ = name.split(".")
        getattr(layer.experts[int(e)], proj).load(w)
    layer.gate.load(torch.randn(experts, hidden))
    if shared:
        for proj in ("gate_proj", "up_proj", "down_proj") if gated else ("up_proj", "down_proj"):
            linear = getattr(layer.shared_expert, proj)
            w = torch.randn(linear.out_features, linear.in_features) * 0.1
            linear.load(_blocks(w, qtype) if qtype is not None else w)
    for module in layer.modules():
        if hasattr(module, "compute_dtype"):
            module.compute_dtype = dtype
    return layer


def _assert_one_call_matches_forward(layer, norm: RMSNorm, x: torch.Tensor, states: tuple[torch.Tensor, torch.Tensor],
                                     meta: AttentionMetadata) -> None:
    """A recurrent layer's one-call decode against ``x + layer(norm(x))`` run op by op on copies of
    the states: the output, the conv state exactly and the recurrent state as stepped."""
    conv, recurrent = states
    conv_ref, recurrent_ref = conv.clone(), recurrent.clone()
    with decode_step():
        got = layer.decode_layer(x, norm, states, meta)
        expected = x + layer(norm(x), (conv_ref, recurrent_ref), meta)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(conv, conv_ref, rtol=0, atol=0)
    torch.testing.assert_close(recurrent, recurrent_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("router", ["softmax_topk", "topk_softmax", "sigmoid_group_topk"])
@pytest.mark.parametrize("gated, shared, qtype", [(True, False, "Q8_0"), (False, True, "Q4_0"), (True, True, None)])
@pytest.mark.parametrize("dtype, rows", [(torch.bfloat16, 1), (torch.bfloat16, 32), (torch.float32, 5)])
def test_moe_decode_matches_the_layer(router, gated, shared, qtype, dtype, rows):
    layer = _moe(router, gated, shared, qtype, dtype)
    assert moe_module._plan_kernel(layer) is not None  # stacked experts: the kernel serves
    x = torch.randn(rows, 64)
    with decode_step():
        got = layer(x)
        moe_module._kernel_plans[layer] = ()  # the PyTorch path from here on
        expected = layer(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_moe_decode_declines_what_it_does_not_cover():
    layer = _moe("softmax_topk", True, False, "Q8_0", torch.bfloat16)
    layer.route = lambda logits: softmax_topk(2, True)(logits)  # a router without a spec
    assert moe_module._plan_kernel(layer) is None
    separate = _moe("softmax_topk", True, False, None, torch.float32)
    separate.experts[3].up_proj.load(torch.randn(96, 64))  # one expert outside the stack
    assert moe_module._plan_kernel(separate) is None
    rows = torch.randn(9, 64)  # float32 steps over 8 rows are not our kernels' products
    assert _moe("softmax_topk", True, False, None, torch.float32)._kernel_forward(rows) is None


@pytest.mark.parametrize("dtype, rows, qtype, groups", [(torch.bfloat16, 1, "Q4_0", 1), (torch.bfloat16, 12, "Q8_0", 2),
                                                        (torch.float32, 3, None, 2)])
def test_mamba2_decode_matches_the_layer(dtype, rows, qtype, groups):

    torch.manual_seed(0)
    shape = Mamba2Shape(hidden_size=64, num_heads=8, head_dim=16, state_size=16, n_groups=groups, conv_kernel=4,
                        chunk_size=8, norm_eps=1e-5, dt_limit=(0.0, 0.2))
    mixer = Mamba2Mixer(shape)
    in_w = torch.randn(shape.inner_size + shape.conv_channels + shape.num_heads, 64) * 0.1
    out_w = torch.randn(64, shape.inner_size) * 0.1
    mixer.in_proj.load(_blocks(in_w, qtype) if qtype else in_w)
    mixer.out_proj.load(_blocks(out_w, qtype) if qtype else out_w)
    mixer.conv1d.weight.load(torch.randn(shape.conv_channels, 4) * 0.5)
    mixer.conv1d.bias.load(torch.randn(shape.conv_channels) * 0.1)
    mixer.dt_bias.load(torch.rand(8) - 2)
    mixer.A_log.load(torch.rand(8))
    mixer.D.load(torch.randn(8))
    mixer.norm.load(torch.rand(shape.inner_size) + 0.5)
    for linear in (mixer.in_proj, mixer.out_proj):
        linear.compute_dtype = dtype
    norm = RMSNorm(64, 1e-6)
    norm.load(torch.rand(64) + 0.5)
    slots = torch.randperm(rows + 3)[:rows]
    meta = AttentionMetadata(slot_mapping=torch.zeros(0), query_start_loc=list(range(rows + 1)), context_lens=[],
                             block_tables=torch.zeros(0), num_prefills=0, state_slots=slots)
    conv = torch.randn(rows + 3, *shape.state_shapes[0])
    ssm = torch.randn(rows + 3, *shape.state_shapes[1])
    x = torch.randn(rows, 64)
    _assert_one_call_matches_forward(mixer, norm, x, (conv, ssm), meta)


def test_mamba2_decode_refuses_a_slot_given_twice():
    shape = Mamba2Shape(hidden_size=32, num_heads=4, head_dim=16, state_size=16)
    with pytest.raises(RuntimeError, match="given twice"):
        cpu_kernels().mamba2_decode(
            torch.randn(2, 32), torch.ones(32), 1e-5, torch.zeros(64 + 96 + 4, 32).view(torch.uint8), 0,
            torch.zeros(shape.conv_channels, 4), None, torch.zeros(4), torch.zeros(4), torch.zeros(4), None, 1, 1e-5,
            False, torch.zeros(32, 64).view(torch.uint8), 0, torch.zeros(3, *shape.state_shapes[0]),
            torch.zeros(3, *shape.state_shapes[1]), torch.tensor([1, 1]), 0.0, float("inf"), False, 8, 0, 0)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0"])
def test_embedding_rows_equal_gguf_dequantizer(qtype):
    """The decode step's embedding lookup (``kernels/embedding.cpp``) gives gguf's own values."""
    import gguf

    from cholla.layers.linear import Embedding

    table = torch.randn(50, 96)
    embedding = Embedding(50, 96)
    embedding.load(_blocks(table, qtype))
    ids = torch.tensor([7, 0, 49, 7])
    expected = torch.from_numpy(gguf.quants.dequantize(embedding.weight.data.numpy(), gguf.GGMLQuantizationType[qtype]))
    torch.testing.assert_close(embedding(ids), expected[ids], rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="outside the table"):
        embedding(torch.tensor([50]))


@pytest.mark.parametrize("dtype, rows, qtype, tiled", [(torch.bfloat16, 1, "Q4_0", False), (torch.bfloat16, 9, "Q8_0", True),
                                                       (torch.float32, 2, None, False)])
def test_deltanet_decode_matches_the_layer(dtype, rows, qtype, tiled):
    from cholla.layers.gated_deltanet import GatedDeltaNet
    from cholla.models.config import DeltaNetConfig

    torch.manual_seed(0)
    config = DeltaNetConfig(num_k_heads=2, num_v_heads=4, k_head_dim=32, v_head_dim=32, conv_kernel=4, v_heads_tiled=tiled)
    layer = GatedDeltaNet(64, config, 1e-6)
    for linear in (layer.in_proj_qkv, layer.in_proj_z, layer.in_proj_b, layer.in_proj_a, layer.out_proj):
        w = torch.randn(linear.out_features, linear.in_features) * 0.2
        linear.load(_blocks(w, qtype) if qtype else w)
        linear.compute_dtype = dtype
    layer.conv1d.weight.load(torch.randn(config.conv_channels, 4) * 0.5)
    layer.A.load(-torch.rand(4) - 0.1)
    layer.dt_bias.load(torch.randn(4))
    layer.norm.load(torch.rand(32) + 0.5)
    norm = RMSNorm(64, 1e-6)
    norm.load(torch.rand(64) + 0.5)
    slots = torch.randperm(rows + 2)[:rows]
    meta = AttentionMetadata(slot_mapping=torch.zeros(0), query_start_loc=list(range(rows + 1)), context_lens=[],
                             block_tables=torch.zeros(0), num_prefills=0, state_slots=slots)
    conv = torch.randn(rows + 2, *config.state_shapes()[0])
    recurrent = torch.randn(rows + 2, *config.state_shapes()[1]) * 0.1
    x = torch.randn(rows, 64)
    _assert_one_call_matches_forward(layer, norm, x, (conv, recurrent), meta)
