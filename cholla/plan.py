"""``cholla plan``: memory and speed arithmetic for serving a model, from its metadata alone.

No weights are loaded: the GGUF header (or ``config.json`` and the SafeTensors
headers) gives the tensors' types and sizes and the attention shape. From them:

- weight bytes by type, and what one decode step reads (the tied output head
  reads the whole embedding; an untied embedding only its rows);
- KV bytes per token per layer kind, as the engine allocates them
  (``cholla/kv/paged_cache.py``: every attention layer holds every token,
  sliding-window layers included) and what a window-aware allocation would
  need instead; for a hybrid model, the recurrent state bytes per sequence
  (``cholla/kv/state_cache.py``), whose slots share the budget;
- the engine's block layout for a KV budget (the same ``plan_layout`` the
  engine sizes its cache with, so the numbers are the ones it logs): maximum
  concurrency at a context length, and the memory a target concurrency needs;
- a roofline for a machine (``cholla/hardware.py``): a decode step takes the
  longer of reading its weights and KV blocks at the memory bandwidth and its
  FLOPs at the matmul rate. For this machine measured (``--hardware local``),
  the path that runs instead: where cholla's kernels run, the model's weights
  at their one-row int8 GEMV's measured pace per type plus each attention
  layer's measured work besides them (a prompt: its products' measured rate);
  where they do not, the time the reference path takes to dequantize every weight;
- Little's law: with ``B`` requests in flight, each of ``P`` prompt and ``N``
  output tokens, a saturated engine finishes ``λ = 1 / (t_prefill(P) + N t_step(B) / B)``
  requests/s, and each spends ``W = B / λ`` in the system.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cholla.hardware import GB, TFLOP, Hardware, LayerShape, hardware_preset, kernels_run_here, measure
from cholla.errors import InvalidRequestError
from cholla.kv.kv_types import KVCacheType, kv_cache_type
from cholla.kv.state_cache import state_bytes_per_sequence
from cholla.kv.paged_cache import (DEFAULT_BLOCK_SIZE, DEFAULT_MAX_NUM_SEQS, KVCacheLayout, check_kv_types,
                                   fit_kv_types, layer_bytes_per_token, open_block_bytes, plan_layout)
from cholla.models.config import ATTENTION_TYPES, SLIDING_ATTENTION, ModelConfig, config_from_gguf, config_from_hf

# Names of the token embedding and the output head, GGUF and Hugging Face.
EMBEDDING_NAMES = ("token_embd.weight", "model.embed_tokens.weight")
HEAD_NAMES = ("output.weight", "lm_head.weight")
GPU_MEMORY_UTILIZATION = 0.9  # of a preset's device memory, as vLLM's default


@dataclass
class WeightFacts:
    """Tensors by type: bytes and the matmul weights a step multiplies (for FLOPs and the reference path)."""

    bytes_by_type: dict[str, int]
    tensors_by_type: dict[str, int]
    matmul_params_by_type: dict[str, int]  # 2-D weights a decode step multiplies, head included
    decode_bytes: int  # what one decode step reads: all but the embedding, which counts once if tied
    head_params_by_type: dict[str, int] = field(default_factory=dict)  # the output head's (a prompt's last row only)

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_by_type.values())

    @property
    def matmul_params(self) -> int:
        return sum(self.matmul_params_by_type.values())


@dataclass
class ModelFacts:
    path: str
    config: ModelConfig
    weights: WeightFacts


def _weight_facts(tensors: list[tuple[str, str, tuple[int, ...], int]]) -> WeightFacts:
    """tensors: (name, type, shape, bytes) of every tensor."""
    names = {name for name, *_ in tensors}
    tied = not any(name in names for name in HEAD_NAMES)
    bytes_by_type: Counter[str] = Counter()
    count: Counter[str] = Counter()
    matmul: Counter[str] = Counter()
    head: Counter[str] = Counter()
    decode_bytes = 0
    for name, kind, shape, nbytes in tensors:
        bytes_by_type[kind] += nbytes
        count[kind] += 1
        is_embedding = name in EMBEDDING_NAMES
        if is_embedding and not tied:
            continue  # looked up row by row, never read whole
        decode_bytes += nbytes
        if len(shape) == 2:
            matmul[kind] += shape[0] * shape[1]
            if name in HEAD_NAMES or is_embedding:
                head[kind] += shape[0] * shape[1]
    return WeightFacts(dict(sorted(bytes_by_type.items())), dict(sorted(count.items())), dict(sorted(matmul.items())),
                       decode_bytes, dict(head))


def read_model_facts(path: Path) -> ModelFacts:
    """The config and tensor sizes from the file's headers; no tensor data is read."""
    if path.is_dir():
        from safetensors import safe_open

        from cholla.formats.safetensors import read_hf_folder

        folder = read_hf_folder(path)
        config = config_from_hf(folder.config)
        tensors = []
        for shard in folder.shards:
            with safe_open(shard, framework="pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    shape, kind = tuple(sl.get_shape()), sl.get_dtype()
                    itemsize = {"F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1}.get(kind, 4)
                    tensors.append((name, kind, shape, math.prod(shape) * itemsize))
    else:
        from cholla.formats.gguf import read_gguf

        gguf = read_gguf(path)
        config = config_from_gguf(gguf.metadata, set(gguf.tensors))
        tensors = [(t.name, t.qtype.name, t.shape, t.num_bytes) for t in gguf.tensors.values()]
    return ModelFacts(str(path), config, _weight_facts(tensors))


# -- the KV cache ---------------------------------------------------------------


def layer_windows(config: ModelConfig) -> list[int | None]:
    """Each attention layer's sliding window, None for global attention (recurrent and MLP-only layers are left out)."""
    return [config.sliding_window if kind == SLIDING_ATTENTION else None for kind in config.layer_types
            if kind in ATTENTION_TYPES]


def attention_layer_bytes(config: ModelConfig, k_type: KVCacheType, v_type: KVCacheType,
                          block_size: int = DEFAULT_BLOCK_SIZE) -> list[tuple[int, int]]:
    """Per attention layer (as ``layer_windows`` lists them), the bytes per token it stores and the
    bytes per token it reads: the same, except for Gemma 4's KV-shared layers, which store none and
    read their producer's."""
    stored = layer_bytes_per_token(config, k_type, v_type, block_size)
    return [(stored[i], stored[config.kv_producer(i)]) for i, kind in enumerate(config.layer_types)
            if kind in ATTENTION_TYPES]


@dataclass
class LayerKind:
    kind: str
    layers: int
    window: int | None
    bytes_per_token: int  # all layers of this kind, as the engine allocates


def layer_kinds(config: ModelConfig, k_type: KVCacheType, v_type: KVCacheType,
                block_size: int = DEFAULT_BLOCK_SIZE) -> list[LayerKind]:
    """Layers by kind; a recurrent or MLP-only kind has no KV (its state is counted per sequence)."""
    kinds: Counter[tuple[str, int | None]] = Counter()
    per_token: Counter[tuple[str, int | None]] = Counter()  # layers of one kind may differ (Gemma 4's KV sharing)
    for kind, nbytes in zip(config.layer_types, layer_bytes_per_token(config, k_type, v_type, block_size)):
        key = (kind, config.sliding_window if kind == SLIDING_ATTENTION else None)
        kinds[key] += 1
        per_token[key] += nbytes
    return [LayerKind(kind, n, window, per_token[kind, window]) for (kind, window), n in kinds.items()]


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


def window_aware_bytes(config: ModelConfig, k_type: KVCacheType, v_type: KVCacheType, context: int,
                       block_size: int) -> int:
    """KV bytes one ``context``-token sequence would need if sliding layers kept only the blocks
    their window can reach (at most ``ceil(window / block_size) + 1``, the window rarely aligned)."""
    full = blocks_for(context, block_size)
    return sum(stored * block_size * (full if w is None else min(full, blocks_for(w, block_size) + 1))
               for w, (stored, _) in zip(layer_windows(config),
                                         attention_layer_bytes(config, k_type, v_type, block_size)))


# -- the roofline ---------------------------------------------------------------


def attention_tokens(config: ModelConfig, context: int) -> int:
    """Keys one new token attends to, summed over layers (a window caps them)."""
    return sum(context if w is None else min(context, w) for w in layer_windows(config))


@dataclass
class StepEstimate:
    seconds: float
    bound: str  # "memory", "compute" or "dequantize" (cholla's reference path)


def decode_step(facts: ModelFacts, hw: Hardware, k_type: KVCacheType, v_type: KVCacheType, batch: int,
                context: int) -> StepEstimate:
    """One decode step of ``batch`` sequences at ``context`` tokens each."""
    config = facts.config
    keys = attention_tokens(config, context)
    read = sum((context if w is None else min(context, w)) * nbytes
               for w, (_, nbytes) in zip(layer_windows(config), attention_layer_bytes(config, k_type, v_type)))
    # A recurrent layer reads and writes its state once a step, whatever the context.
    kv_bytes = batch * (read + 2 * state_bytes_per_sequence(config))
    flops = batch * (2 * facts.weights.matmul_params + 4 * config.num_heads * config.head_dim * keys)
    if hw.reference_path:
        dequant = _dequant_seconds(facts.weights, hw)
        compute = flops / hw.fp32_flops if batch > 1 else 0.0  # one row: counted in the measured rate
        memory = kv_bytes / hw.bandwidth
        return StepEstimate(dequant + compute + memory, "dequantize")
    if hw.kernel_path:  # the first row at the GEMV's measured pace, each further one at the batched products';
        # each sequence's attention layers their measured work besides the products (over their keys)
        extra = (batch - 1) * _prompt_seconds(facts.weights.matmul_params_by_type, hw, 1)
        layers = batch * (len(layer_windows(config)) * hw.layer_seconds + keys * hw.key_seconds)
        state = batch * 2 * state_bytes_per_sequence(config) / hw.bandwidth
        return StepEstimate(_gemv_seconds(facts.weights.matmul_params_by_type, hw) + extra + layers + state, "GEMV")
    memory = (facts.weights.decode_bytes + kv_bytes) / hw.bandwidth
    compute = flops / hw.flops
    return StepEstimate(max(memory, compute), "memory" if memory >= compute else "compute")


def prefill(facts: ModelFacts, hw: Hardware, prompt: int) -> StepEstimate:
    """A ``prompt``-token prefill in one step: matmuls plus causal attention (window-capped)."""
    config = facts.config
    attention_pairs = sum(_causal_pairs(prompt, prompt if w is None else w) for w in layer_windows(config))
    flops = 2 * facts.weights.matmul_params * prompt + 4 * config.num_heads * config.head_dim * attention_pairs
    if hw.reference_path:  # each weight dequantized once, then an fp32 matmul
        return StepEstimate(_dequant_seconds(facts.weights, hw) + flops / hw.fp32_flops, "compute")
    if hw.kernel_path:  # the prompt's rows through the measured products; the head multiplies the last row only
        head = facts.weights.head_params_by_type
        body = {kind: params - head.get(kind, 0) for kind, params in facts.weights.matmul_params_by_type.items()}
        attention = 4 * config.num_heads * config.head_dim * attention_pairs / hw.flops
        return StepEstimate(_prompt_seconds(body, hw, prompt) + _gemv_seconds(head, hw) + attention, "compute")
    memory = facts.weights.decode_bytes / hw.bandwidth
    compute = flops / hw.flops
    return StepEstimate(max(memory, compute), "memory" if memory >= compute else "compute")


def _causal_pairs(prompt: int, window: int) -> int:
    """(query, key) pairs of causal attention over ``prompt`` tokens, each seeing at most ``window`` keys."""
    if prompt <= window:
        return prompt * (prompt + 1) // 2
    return window * (window + 1) // 2 + (prompt - window) * window


def _dequant_seconds(weights: WeightFacts, hw: Hardware) -> float:
    """The reference path's dequantization of every matmul weight; a type not measured takes the slowest rate."""
    slowest = min(hw.dequant_rates.values())
    return sum(params / hw.dequant_rates.get(kind, slowest) for kind, params in weights.matmul_params_by_type.items())


def _gemv_seconds(params_by_type: dict[str, int], hw: Hardware) -> float:
    """One row through these weights at the kernel path's measured rates: the int8 GEMV's, or for a
    type the kernels cannot read, its dequantization's (as the engine multiplies it)."""
    return sum(params / _rate(hw.gemv_rates, hw.dequant_rates, kind) for kind, params in params_by_type.items())


def _prompt_seconds(params_by_type: dict[str, int], hw: Hardware, rows: int) -> float:
    """``rows`` rows through these weights at the measured prompt products' rates (weight-rows/s);
    a type the kernels cannot read is dequantized once, then multiplied at the bf16 matmul rate."""
    seconds = 0.0
    for kind, params in params_by_type.items():
        if kind in hw.prompt_rates or kind not in hw.dequant_rates:
            seconds += rows * params / _rate(hw.prompt_rates, {}, kind)
        else:
            seconds += params / hw.dequant_rates[kind] + 2 * rows * params / hw.flops
    return seconds


def _rate(rates: dict[str, float], fallback: dict[str, float], kind: str) -> float:
    """A type's measured rate; one not measured (a model other than the one measured) takes the slowest."""
    if kind in rates:
        return rates[kind]
    if kind in fallback:
        return fallback[kind]
    return min(rates.values())


@dataclass
class LittlesLaw:
    concurrency: int
    latency_s: float  # W: a request's time in the system
    requests_per_s: float  # λ = B / W
    output_tokens_per_s: float


def littles_law(facts: ModelFacts, hw: Hardware, k_type: KVCacheType, v_type: KVCacheType, prompt: int, output: int,
                concurrency: int) -> LittlesLaw:
    """A saturated engine with ``concurrency`` requests in flight (prefills interleaved with decoding)."""
    step = decode_step(facts, hw, k_type, v_type, concurrency, prompt + output // 2).seconds
    rate = 1 / (prefill(facts, hw, prompt).seconds + output * step / concurrency)
    return LittlesLaw(concurrency, concurrency / rate, rate, rate * output)


def best_for_latency(facts, hw, k_type, v_type, prompt: int, output: int, latency: float,
                     most: int) -> LittlesLaw | None:
    """The most requests in flight (up to ``most``) whose latency stays within ``latency`` seconds.
    Latency grows with the requests in flight, so a bisection finds it."""
    def law(concurrency: int) -> LittlesLaw:
        return littles_law(facts, hw, k_type, v_type, prompt, output, concurrency)

    if most < 1 or law(1).latency_s > latency:
        return None
    low, high = 1, most  # law(low) meets the target
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if law(middle).latency_s <= latency else (low, middle - 1)
    return law(low)


# -- the whole plan ---------------------------------------------------------------


def resolve_kv_types(kv_cache_dtype: str, cache_type_k: str | None, cache_type_v: str | None,
                     dtype: str) -> tuple[KVCacheType, KVCacheType]:
    """As the engine resolves them; ``auto`` follows the matmuls' dtype, which for ``--dtype auto``
    is bfloat16 where cholla's kernels can run (judged from the CPU's flags, nothing is built)."""
    if dtype == "auto":
        dtype = "bfloat16" if kernels_run_here() else "float32"
    return (kv_cache_type(cache_type_k or kv_cache_dtype, dtype), kv_cache_type(cache_type_v or kv_cache_dtype, dtype))


def resolve_hardware(name: str | None, bandwidth_gbs: float | None, tflops: float | None,
                     path: Path, facts: ModelFacts, prompt_tokens: int = 512) -> Hardware:
    """A preset, figures given outright (GB/s, TFLOP/s), or ``local``: this machine measured now,
    running the path the engine takes here (cholla's kernels, or where they do not run its
    reference path) over the model's own weights of each type (``path``, whose ``facts`` the
    caller has read); ``prompt_tokens``: the rows its
    prompt products are measured with (a prompt step takes at most the engine's default
    ``max_num_batched_tokens``)."""
    if bandwidth_gbs is not None or tflops is not None:
        if not (bandwidth_gbs and tflops and bandwidth_gbs > 0 and tflops > 0):
            raise InvalidRequestError("give both --bandwidth GB/s and --flops TFLOP/s, positive")
        return Hardware("given", bandwidth_gbs * GB, tflops * TFLOP, None, "--bandwidth and --flops")
    if name not in (None, "local"):
        return hardware_preset(name)
    from cholla.engine.engine import EngineConfig

    weights, head = _weights_by_type(path, facts)
    config = facts.config
    shape = LayerShape(config.hidden_size, config.intermediate_size, config.num_heads, config.num_kv_heads,
                       config.head_dim)
    return measure(weights, min(prompt_tokens, EngineConfig().max_num_batched_tokens), head, shape)


def _weights_by_type(path: Path, facts: ModelFacts) -> tuple[dict[str, list], object]:
    """The model's 2-D weights a decode step multiplies, by type (memory-mapped, only read): the
    tied embedding as the head, an untied one not (it is looked up row by row); and the head."""
    import torch

    if path.is_dir():  # plain tensors: converting them is what the reference path does per step
        shape = (facts.config.intermediate_size, facts.config.hidden_size)
        dtypes = {"BF16": torch.bfloat16, "F16": torch.float16}
        return {kind: [torch.randn(shape).to(dtypes.get(kind, torch.float32))] for kind in facts.weights.matmul_params_by_type}, None
    from cholla.formats.gguf import read_gguf

    tensors = read_gguf(path).tensors
    tied = not any(name in tensors for name in HEAD_NAMES)
    found: dict[str, list] = {}
    for name, tensor in tensors.items():
        if len(tensor.shape) == 2 and (tied or name not in EMBEDDING_NAMES):
            found.setdefault(tensor.qtype.name, []).append(tensor)
    head = next((tensors[name] for name in (*HEAD_NAMES, *EMBEDDING_NAMES) if name in tensors), None)
    return found, head


@dataclass
class PlanRequest:
    context: int | None = None  # max_model_len; default the model's, capped by the KV cache (as the engine)
    concurrency: int = 1  # target requests in flight
    kv_cache_memory: int | None = None  # bytes, as the engine's --kv-cache-memory
    memory: int | None = None  # total bytes: the KV cache gets what the weights leave
    block_size: int = 16
    prompt_tokens: int = 512
    output_tokens: int = 128
    latency: float | None = None  # seconds, for Little's law
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS  # as the engine's: caps the state slots of a model with state


@dataclass
class Plan:
    model: dict
    weights: dict
    kv: dict
    layout: dict
    target: dict
    speed: dict | None = field(default=None)


def kv_budget(facts: ModelFacts, request: PlanRequest, hw: Hardware | None) -> tuple[int, str]:
    """Bytes for the KV cache, and where the figure comes from."""
    if request.kv_cache_memory:
        return request.kv_cache_memory, "--kv-cache-memory"
    if request.memory:
        return max(0, request.memory - facts.weights.total_bytes), "--memory less the weights"
    if hw is not None and hw.memory_bytes:
        usable = int(hw.memory_bytes * GPU_MEMORY_UTILIZATION)
        return max(0, usable - facts.weights.total_bytes), f"{GPU_MEMORY_UTILIZATION:.0%} of {hw.name}'s memory less the weights"
    from cholla.engine.engine import EngineConfig, _kv_cache_budget

    return _kv_cache_budget(EngineConfig()), "the engine's default: the smaller of 2 GiB and 1/4 of free memory"


def make_plan(facts: ModelFacts, request: PlanRequest, k_type: KVCacheType, v_type: KVCacheType,
              hw: Hardware | None) -> Plan:
    config, weights = facts.config, facts.weights
    k_type, v_type = fit_kv_types(config, k_type, v_type)
    check_kv_types(config, k_type, v_type)
    budget, budget_source = kv_budget(facts, request, hw)
    layout: KVCacheLayout = plan_layout(config, budget, request.block_size, k_type, v_type, request.context,
                                        request.max_num_seqs)
    context = layout.max_model_len
    per_seq_blocks = blocks_for(context, request.block_size)
    per_seq = per_seq_blocks * layout.block_bytes
    window_seq = window_aware_bytes(config, k_type, v_type, context, request.block_size)
    per_token = layout.block_bytes // request.block_size
    state = layout.slot_bytes
    # q4_kivi's keys of blocks still filling, kept in bf16: two open blocks per request, as the engine keeps
    open_blocks = open_block_bytes(config, request.block_size, k_type, 2 * request.concurrency)
    whole = layout.num_blocks // per_seq_blocks if per_seq_blocks else 0
    if state:
        whole = min(whole, layout.num_slots)
    plan = Plan(
        model={"path": facts.path, "architecture": config.architecture, "layers": config.num_layers,
               "heads": config.num_heads, "kv_heads": config.num_kv_heads, "head_dim": config.head_dim,
               "context_length": config.max_position_embeddings, "sliding_window": config.sliding_window},
        weights={"bytes": weights.total_bytes, "bytes_by_type": weights.bytes_by_type,
                 "tensors_by_type": weights.tensors_by_type, "decode_bytes": weights.decode_bytes,
                 "matmul_params": weights.matmul_params},
        kv={"k_type": k_type.name, "v_type": v_type.name, "bytes_per_token": per_token,
            "tokens_per_gib": layout.tokens_per_gib if layout.block_bytes else None,  # None: no attention
            "layer_kinds": [asdict(kind) for kind in layer_kinds(config, k_type, v_type, request.block_size)],
            "bytes_per_sequence": per_seq, "window_aware_bytes_per_sequence": window_seq,
            "state_bytes_per_sequence": layout.slot_bytes},
        layout={"budget_bytes": budget, "budget_source": budget_source, "block_size": layout.block_size,
                "block_bytes": layout.block_bytes, "num_blocks": layout.num_blocks, "num_tokens": layout.num_tokens,
                "bytes": layout.nbytes, "state_slots": layout.num_slots, "state_bytes": layout.state_nbytes,
                "state_snapshots": layout.num_snapshots, "snapshot_bytes": layout.snapshot_nbytes,
                "context": context, "max_concurrency": layout.max_concurrency,
                "max_whole_requests": whole,
                "fits": layout.num_blocks > 0 and layout.num_tokens >= context and (layout.num_slots > 0 or not state)},
        target={"concurrency": request.concurrency, "kv_bytes": request.concurrency * per_seq + open_blocks,
                "state_bytes": request.concurrency * state,
                "total_bytes": request.concurrency * (per_seq + state) + open_blocks + weights.total_bytes,
                "window_aware_kv_bytes": request.concurrency * window_seq},
    )
    if hw is not None:
        plan.speed = _speed(facts, request, k_type, v_type, hw, context, plan.layout["max_whole_requests"])
    return plan


def _speed(facts, request: PlanRequest, k_type, v_type, hw: Hardware, context: int, most: int) -> dict:
    prompt = min(request.prompt_tokens, context - 1)
    output = max(1, min(request.output_tokens, context - prompt))
    average_context = prompt + output // 2
    one = decode_step(facts, hw, k_type, v_type, 1, average_context)
    target = decode_step(facts, hw, k_type, v_type, request.concurrency, average_context)
    pf = prefill(facts, hw, prompt)
    speed = {
        "hardware": asdict(hw), "estimate": hw.estimate,
        "prompt_tokens": prompt, "output_tokens": output, "decode_context": average_context,
        "prefill_tokens_per_s": prompt / pf.seconds, "prefill_bound": pf.bound,
        "decode_tokens_per_s": 1 / one.seconds, "decode_bound": one.bound,
        "decode_at_concurrency": {"concurrency": request.concurrency,
                                  "tokens_per_s": request.concurrency / target.seconds, "bound": target.bound},
        "littles_law": asdict(littles_law(facts, hw, k_type, v_type, prompt, output, request.concurrency)),
    }
    if request.latency is not None:
        best = best_for_latency(facts, hw, k_type, v_type, prompt, output, request.latency, most)
        speed["within_latency"] = {"latency_s": request.latency, "best": asdict(best) if best else None}
    return speed


# -- text -------------------------------------------------------------------------


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return ""


def format_plan(plan: Plan) -> str:
    m, w, kv, lay, tgt = plan.model, plan.weights, plan.kv, plan.layout, plan.target
    by_type = ", ".join(f"{k} {_size(v)} ({w['tensors_by_type'][k]})" for k, v in w["bytes_by_type"].items())
    lines = [
        f"model        {m['path']}",
        f"             {m['architecture']}, {m['layers']} layers, {m['heads']} heads, {m['kv_heads']} KV heads x "
        f"{m['head_dim']}, context {m['context_length']}" + (f", sliding window {m['sliding_window']}" if m["sliding_window"] else ""),
        f"weights      {_size(w['bytes'])}: {by_type}",
        f"             read per decode step: {_size(w['decode_bytes'])}; {w['matmul_params'] / 1e6:.1f}M matmul weights",
        f"KV cache     K {kv['k_type']}, V {kv['v_type']}: {kv['bytes_per_token']} B per token"
        + (f", {kv['tokens_per_gib']:.0f} tokens per GiB" if kv["tokens_per_gib"] else " (no attention layers)"),
    ]
    for kind in kv["layer_kinds"]:
        if kind["kind"] not in ATTENTION_TYPES:
            lines.append(f"             {kind['layers']:>3} {kind['kind']} layers: no KV")
            continue
        window = f"window {kind['window']}" if kind["window"] else "global"
        lines.append(f"             {kind['layers']:>3} {kind['kind']} layers ({window}): {kind['bytes_per_token']} B per token")
    if kv["state_bytes_per_sequence"]:
        lines.append(f"state        {_size(kv['state_bytes_per_sequence'])} per sequence (float32 recurrent states)")
    lines += [
        f"budget       {_size(lay['budget_bytes'])} ({lay['budget_source']})",
        f"             {lay['num_blocks']} blocks of {lay['block_size']} tokens ({_size(lay['bytes'])}), {lay['num_tokens']} tokens",
    ]
    if kv["state_bytes_per_sequence"]:
        lines.append(f"             {lay['state_slots']} state slots ({_size(lay['state_bytes'])}), "
                     f"{lay['state_snapshots']} snapshots for prefix caching ({_size(lay['snapshot_bytes'])})")
    if not lay["fits"]:
        lines.append(f"             does not hold one {lay['context']}-token request: raise the budget or lower --context")
    lines += [
        f"concurrency  at {lay['context']} tokens: {lay['max_concurrency']:.2f}x (the engine's figure), "
        f"{lay['max_whole_requests']} whole requests",
        f"target       {tgt['concurrency']} x {lay['context']} tokens: KV {_size(tgt['kv_bytes'])} + "
        + (f"state {_size(tgt['state_bytes'])} + " if tgt["state_bytes"] else "")
        + f"weights {_size(w['bytes'])} = {_size(tgt['total_bytes'])}",
    ]
    if tgt["window_aware_kv_bytes"] < tgt["kv_bytes"]:
        saved = 1 - tgt["window_aware_kv_bytes"] / tgt["kv_bytes"]
        lines.append(f"             cholla gives sliding-window layers every token; a window-aware allocation would "
                     f"need KV {_size(tgt['window_aware_kv_bytes'])} ({saved:.0%} less)")
    if plan.speed:
        s = plan.speed
        hw = s["hardware"]
        lines += [
            f"hardware     {hw['name']}: {hw['bandwidth'] / GB:.1f} GB/s, bf16 {hw['flops'] / TFLOP:.3g} TFLOP/s"
            + (f", fp32 {hw['fp32_flops'] / TFLOP:.3g} TFLOP/s" if hw["reference_path"] else "")
            + (f", {hw['threads']} threads" if hw["threads"] else ""),
            f"estimate     {s['estimate']}",
        ]
        if hw["kernel_path"]:
            lines += [
                "             one-row int8 GEMV (G weights/s): "
                + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in hw["gemv_rates"].items()),
                f"             {hw['prompt_rows']}-row prompt products (G weight-rows/s): "
                + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in hw["prompt_rates"].items()),
                (f"             an attention layer besides its products: {hw['layer_seconds'] * 1e6:.1f} us "
                 f"+ {hw['key_seconds'] * 1e9:.1f} ns per key"),
            ]
        if hw["dequant_rates"]:
            lines.append("             dequantized and multiplied (G weights/s): "
                         + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in hw["dequant_rates"].items()))
        lines += [
            f"prefill      {s['prompt_tokens']} tokens: {s['prefill_tokens_per_s']:.1f} tokens/s ({s['prefill_bound']}-bound)",
            f"decode       1 sequence at {s['decode_context']} tokens: {s['decode_tokens_per_s']:.1f} tokens/s "
            f"({s['decode_bound']}-bound)",
        ]
        at = s["decode_at_concurrency"]
        if at["concurrency"] > 1:
            lines.append(f"             {at['concurrency']} sequences: {at['tokens_per_s']:.1f} tokens/s in all ({at['bound']}-bound)")
        law = s["littles_law"]
        lines.append(f"Little's law {law['concurrency']} in flight, {s['prompt_tokens']}+{s['output_tokens']} tokens each: "
                     f"{law['requests_per_s']:.3g} requests/s, {law['output_tokens_per_s']:.1f} output tokens/s, "
                     f"latency {law['latency_s']:.2f} s")
        if "within_latency" in s:
            best = s["within_latency"]["best"]
            lines.append(f"             within {s['within_latency']['latency_s']:g} s: " + (
                f"{best['concurrency']} in flight, {best['requests_per_s']:.3g} requests/s, "
                f"{best['output_tokens_per_s']:.1f} output tokens/s (latency {best['latency_s']:.2f} s)"
                if best else "not even one request"))
    return "\n".join(lines)
