"""A decode step's decoder layers in one kernel call (``cholla/kernels/decode_layers.cpp``).

Driven from Python, a small model's decode step spends more time between its
kernels than in them (docs/benchmarks.md). For the pre-norm layers of the
Llama family and Gemma 3 (``models/llama.py``, ``models/gemma3.py``),
``run_layers`` hands every layer's weights, norms and caches to one C++ call
that chains the kernels the Python layers call, in the same order. Whatever
it does not cover (prefill chunks longer than a speculated span, steps larger than our matmul kernels take,
biases, other MLPs, mixtures of experts, latent attention, attention sinks, no
kernels) runs layer by layer in Python. Every KV cache type runs fused.
"""

from __future__ import annotations

import functools
import operator
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from cholla.kernels import cpu_kernels
from cholla.kv.kv_types import ScaledKV, open_for_write
from cholla.layers.attention import Attention, AttentionMetadata, kernel_reads
from cholla.layers.linear import (
    AMX_MAX_ROWS,
    GEMV_MAX_ROWS,
    INT8_MAX_ROWS,
    Linear,
    int8_batch_max_rows,
    int8_batch_types,
    type_mask,
)
from cholla.layers.mlp import ACTIVATION_IDS, GatedMLP
from cholla.layers.norm import RMSNorm
from cholla.layers.rotary import RotaryEmbedding


@dataclass
class DecodePlan:
    """Everything of the model the kernel reads, flattened layer after layer in its order."""

    weights: list[torch.Tensor]  # q, k, v, o, gate, up, down per layer (GGUF rows)
    types: list[int]
    norms: list[torch.Tensor]  # attention in, MLP in, [attention out, MLP out], [q, k] per layer
    ropes: list[RotaryEmbedding]  # distinct tables; rope_of_layer indexes them
    rope_of_layer: list[int]
    windows: list[int]  # 0: no sliding window
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    softcap: float  # 0: none
    eps: float
    interleaved: bool
    activation: int
    post_norms: bool
    qk_norm: bool
    first_linear: Linear  # its compute_dtype picks the GEMV (the loader may set it after planning)
    # weights, types and norms handed to the kernel once (decode_layers.cpp's DecodeLayers): as
    # lists, the dispatcher converted each of their tensors on every step (~40-70 us for SmolLM2)
    bound: object = None
    head: Linear | None = None  # the output head bound to `bound` (bind_head), once a step asked for logits
    embedding: nn.Module | None = None  # the embedding fused_logits last looked at, and whether it is bound
    embeds: bool = False
    # The KV caches last handed to the kernel (decode_layers.cpp's DecodeCaches), by the list they came in
    # and its items; and those of their key sides that need open_for_write (q4_kivi keys).
    caches: tuple | None = None

    def __post_init__(self):
        if self.bound is None:
            self.bound = torch.classes.cholla.DecodeLayers(self.weights, self.types, self.norms)


_plans: weakref.WeakKeyDictionary[nn.Module, DecodePlan | None] = weakref.WeakKeyDictionary()


def _linears(layer: nn.Module) -> list[Linear]:
    attn, mlp = layer.self_attn, layer.mlp
    return [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]


def _layer_norms(layer: nn.Module, post_norms: bool, qk_norm: bool) -> list:
    if post_norms:  # Gemma 3: post_attention_layernorm normalises the attention's output
        norms = [layer.input_layernorm, layer.pre_feedforward_layernorm, layer.post_attention_layernorm,
                 layer.post_feedforward_layernorm]
    else:  # Llama: post_attention_layernorm is the MLP's input norm
        norms = [layer.input_layernorm, layer.post_attention_layernorm]
    if qk_norm:
        norms += [layer.self_attn.q_norm, layer.self_attn.k_norm]
    return norms


def _covered(layer: nn.Module) -> bool:
    """The kernel's layer: plain attention (no sinks, per-head QK-norm at most) and a dense gated MLP;
    mixtures of experts, latent attention and sinks run in Python."""
    attn = getattr(layer, "self_attn", None)
    return (type(attn) is Attention and attn.sinks is None and not attn.qk_norm_full and not attn.output_gate
            and getattr(attn.rotary, "head_dim", attn.head_dim) == attn.head_dim  # no partial rope
            and type(getattr(layer, "mlp", None)) is GatedMLP)


def plan_decode(model: nn.Module) -> DecodePlan | None:
    """The model's layers as the kernel takes them, or None where it cannot run them all."""
    if cpu_kernels() is None or not len(model.layers) or not all(_covered(layer) for layer in model.layers):
        return None
    first = model.layers[0]
    post_norms = hasattr(first, "post_feedforward_layernorm")
    qk_norm = first.self_attn.q_norm is not None
    attn0 = first.self_attn
    weights, types, norms, ropes, rope_of_layer, windows = [], [], [], [], [], []
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if not isinstance(mlp, GatedMLP):  # its constructor admits only activations the kernel has
            return None
        if hasattr(layer, "post_feedforward_layernorm") != post_norms or (attn.q_norm is not None) != qk_norm:
            return None
        shape = (attn.num_heads, attn.num_kv_heads, attn.head_dim, attn.scale, attn.softcap, mlp.activation)
        if shape != (attn0.num_heads, attn0.num_kv_heads, attn0.head_dim, attn0.scale, attn0.softcap,
                     first.mlp.activation) or attn.rotary.interleaved != attn0.rotary.interleaved:
            return None
        for linear in _linears(layer):
            if linear.kernel_weight is None or linear.bias is not None:
                return None
            weights.append(linear.kernel_weight[0])
            types.append(linear.kernel_weight[1])
        layer_norms = _layer_norms(layer, post_norms, qk_norm)
        if any(norm.eps != first.input_layernorm.eps for norm in layer_norms):  # the kernel takes one eps
            return None
        norms += [norm.weight for norm in layer_norms]
        if not any(attn.rotary is rope for rope in ropes):
            ropes.append(attn.rotary)
        rope_of_layer.append(next(i for i, rope in enumerate(ropes) if rope is attn.rotary))
        windows.append(attn.window or 0)
    return DecodePlan(
        weights, types, norms, ropes, rope_of_layer, windows, attn0.num_heads, attn0.num_kv_heads, attn0.head_dim,
        attn0.scale, attn0.softcap or 0.0, first.input_layernorm.eps, attn0.rotary.interleaved,
        ACTIVATION_IDS[first.mlp.activation], post_norms, qk_norm, first.self_attn.q_proj,
    )


def fused_layers(plan: DecodePlan, x, positions, kv_caches, meta: AttentionMetadata,
                 logits: torch.Tensor | None = None, tokens: torch.Tensor | None = None) -> torch.Tensor | None:
    """Every layer in one call, or None where this step is not one of decodes and short spans
    (speculating sequences' verification rows: ``AttentionMetadata.span_starts``) that our
    kernels multiply (the rows ``linear_group`` gives to the GEMVs or the AMX tiles).
    x: fp32 ``[rows, hidden]``, or int64 token ids ``[rows]`` where an embedding is bound.
    ``logits`` (fp32 ``[rows, vocab]``, a head bound by ``bind_head``): the step goes on through
    the final norm and the head, writes the logits there (and with ``tokens``, int64 ``[rows]``,
    each row's argmax) and returns the final hidden states."""
    integer = plan.first_linear.compute_dtype == torch.bfloat16
    spans = meta.span_starts if meta.num_prefills else None
    if (meta.num_prefills and spans is None) or x.shape[0] > (AMX_MAX_ROWS if integer else GEMV_MAX_ROWS):
        return None
    if x.dtype not in (torch.float32, torch.long) or x.device.type != "cpu":
        return None
    caches, opened = _bound_caches(plan, kv_caches)
    if caches is None:
        return None
    for k in opened:  # q4_kivi keys: the blocks' open slots (the kernel writes and closes them)
        open_for_write(k, meta.slot_mapping)
    # every position is below its sequence's context length
    tables = [rope.covering(max(meta.context_lens)) for rope in plan.ropes]
    context_lens = meta.span_context_lens if spans is not None else meta.decode_context_lens
    # (.op: the C++ call itself; the op's Python packet would first walk every argument for
    # tracing's fake objects, since one argument is a class: ~25 us a step)
    return cpu_kernels().decode_layers.op(
        x, positions, plan.bound, caches,
        [cos for cos, _ in tables], [sin for _, sin in tables], plan.rope_of_layer, plan.windows, meta.slot_mapping,
        meta.block_tables, context_lens, spans, plan.num_heads, plan.num_kv_heads, plan.head_dim, plan.scale,
        plan.softcap, plan.eps, plan.interleaved, plan.activation, plan.post_norms, plan.qk_norm, integer,
        *_decode_products(integer), logits, tokens,
    )


@functools.cache
def _decode_products(integer: bool) -> tuple[int, int, int]:
    """The GEMVs' rows at most, the batched int8 product's rows at most and its types' bit mask, as
    ``linear_group`` takes them in ``decode_step()`` (fixed once the kernels are built: made once).
    Spans are verification rows (the runner sets them only where every sequence with more than
    one row is speculating), never prompt rows."""
    if not integer:
        return GEMV_MAX_ROWS, 0, 0
    return INT8_MAX_ROWS, int8_batch_max_rows(), type_mask(int8_batch_types(True))


def _bound_caches(plan: DecodePlan, kv_caches) -> tuple[object, list]:
    """The caches as the kernel takes them (None where it cannot read them: ``kernel_reads``),
    bound once per cache list (the runner's lives as long as its engine; a list of other tensors,
    or the same list changed, is bound anew), and the key sides that need ``open_for_write``
    before each write."""
    if plan.caches is not None:
        listed, items, bound, opened = plan.caches
        if listed is kv_caches and len(items) == len(kv_caches) and all(map(operator.is_, items, kv_caches)):
            return bound, opened
    bound, opened = None, []
    if kernel_reads(*kv_caches[0]):
        bound = torch.classes.cholla.DecodeCaches(*_cache_args(kv_caches))
        opened = [k for k, _ in kv_caches if isinstance(k, ScaledKV) and k.open_blocks is not None]
    plan.caches = (kv_caches, tuple(kv_caches), bound, opened)
    return bound, opened


def _cache_args(kv_caches) -> tuple:
    """The caches as the kernel takes them (``kv_types.kernel_parts``, without its checks: every
    layer is allocated as the first, which ``kernel_reads`` checked): K and V values per layer,
    each side's scales (and statistics) flattened layer after layer, whether each side is rotated."""
    k_values, v_values, k_quant, v_quant = [], [], [], []
    for k, v in kv_caches:
        for side, values, quant in ((k, k_values, k_quant), (v, v_values, v_quant)):
            if isinstance(side, ScaledKV):
                values.append(side.values)
                quant.append(side.scales)
                if side.shift is not None:
                    quant += (side.shift, side.spread)
                if side.open_blocks is not None:
                    quant += (side.open_blocks.rows, side.open_blocks.slot_of)
            else:
                values.append(side)
    first_k, first_v = kv_caches[0]
    return (k_values, v_values, k_quant, v_quant, isinstance(first_k, ScaledKV) and first_k.rotated,
            isinstance(first_v, ScaledKV) and first_v.rotated)


def model_plan(model: nn.Module) -> DecodePlan | None:
    """The model's plan, made on its first decode step (after loading has set its linears up)."""
    if model not in _plans:
        _plans[model] = plan_decode(model)
    return _plans[model]


def run_layers(model: nn.Module, x, positions, kv_caches, meta: AttentionMetadata) -> torch.Tensor:
    """x through every decoder layer: in one kernel call where it serves, else layer by layer."""
    plan = model_plan(model)
    fused = fused_layers(plan, x, positions, kv_caches, meta) if plan is not None else None
    if fused is not None:
        return fused
    for layer, kv_cache in zip(model.layers, kv_caches):
        x = layer(x, positions, kv_cache, meta)
    return x


def fused_logits(model: nn.Module, input_ids, positions, kv_caches, meta: AttentionMetadata,
                 greedy: bool = False, embed: Callable[[torch.Tensor], torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """A decode step's logits ``[rows, vocab]`` (the head's kept buffer, ``Linear.kept_output``) from
    the token ids through the embedding (or the model's own lookup ``embed``: Gemma's scaled one), every
    layer, ``model.norm`` and ``model.lm_head`` in one kernel call, with ``greedy`` each row's argmax
    (int64 ``[rows]``) too; or None where that does not serve: what ``fused_layers`` takes, one row
    per sequence (as ``compute_logits`` then multiplies them, ``reuse_output``: the same products,
    so the same logits bit for bit), and a head the kernel runs (its weight in GGUF rows, no bias,
    the layers' dtype, the final norm an RMSNorm with the layers' eps). With ``greedy``, where the
    head's product is the batched int8 one (more than ``INT8_MAX_ROWS`` rows), its jobs give the
    tokens (those of ``Linear.greedy_tokens``) and the logits are not written; where another
    product serves more rows (AMX tiles), the tokens are None (the caller takes the logits' argmax).
    An embedding the kernel does not read (``Embedding.kernel_rows``), or ``embed``, is looked up
    first, in Python. The caller has checked that the model's forward and logits are the shell's
    but for ``embed`` (``DecoderModel.decode_logits``)."""
    plan = model_plan(model)
    head, norm, embed_tokens = model.lm_head, model.norm, model.embed_tokens
    rows = input_ids.shape[0]
    if (plan is None or meta.num_prefills or head.kernel_weight is None
            or head.bias is not None or head.compute_dtype != plan.first_linear.compute_dtype
            or type(norm) is not RMSNorm or norm.eps != plan.eps):
        return None
    if plan.head is not head:
        plan.bound.bind_head(norm.weight, head.kernel_weight[0], head.kernel_weight[1])
        plan.head = head
    if plan.embedding is not embed_tokens:
        kernel_rows = embed_tokens.kernel_rows()
        if kernel_rows is not None:
            plan.bound.bind_embedding(*kernel_rows)
        plan.embedding, plan.embeds = embed_tokens, kernel_rows is not None
    if embed is not None:
        x = embed(input_ids)
    else:
        x = input_ids if plan.embeds else embed_tokens(input_ids)
    logits = head.kept_output(rows)
    greedy_in_kernel = greedy and _greedy_in_kernel(head, plan.first_linear.compute_dtype == torch.bfloat16, rows)
    tokens = torch.empty(rows, dtype=torch.long) if greedy_in_kernel else None
    if fused_layers(plan, x, positions, kv_caches, meta, logits, tokens) is None:
        return None
    return logits, tokens


def _greedy_in_kernel(head: Linear, integer: bool, rows: int) -> bool:
    """Whether the kernel gives a greedy step's tokens, by the products' rule it is given
    (``_decode_products``): the rows the GEMVs multiply (an argmax over the written logits after
    the head), or the batched int8 product's (its jobs' own argmax, as ``Linear.greedy_tokens``
    takes it); not the AMX tiles' rows (an argmax on one thread there would cost ~1 ms for 32
    rows of a 262k vocabulary: the sampler's runs on the team)."""
    gemv_max_rows, batch_max_rows, batch_types = _decode_products(integer)
    return rows <= gemv_max_rows or (rows <= batch_max_rows and (batch_types >> int(head.kernel_weight[1])) & 1 == 1)
