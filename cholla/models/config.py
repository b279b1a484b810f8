"""One config dataclass for every decoder-only architecture we run.

Built either from GGUF metadata (``{arch}.block_count`` ...) or from a Hugging
Face ``config.json``. Fields that only some architectures use default to "off",
so a model file reads the flags it cares about and ignores the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from cholla.errors import ModelFormatError

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"
ATTENTION_TYPES = (FULL_ATTENTION, SLIDING_ATTENTION)  # the layer types that keep paged K and V
# Recurrent layer types (hybrid models): a fixed-size state per sequence (``kv/state_cache.py``), no KV.
LINEAR_ATTENTION = "linear_attention"  # Gated DeltaNet (Qwen3-Next, Qwen 3.5)
MAMBA = "mamba"  # Mamba-2 mixer (Mamba-2, Nemotron-H, Granite 4 hybrid)
SHORT_CONV = "conv"  # gated short convolution (LFM2)
MLP_ONLY = "mlp"  # a layer with no token mixing at all (Nemotron-H's MLP and MoE layers)
LAYER_TYPES = (*ATTENTION_TYPES, LINEAR_ATTENTION, MAMBA, SHORT_CONV, MLP_ONLY)


@dataclass
class RopeConfig:
    """Rotary embedding for one kind of layer.

    ``scaling`` follows HF's ``rope_parameters`` (``rope_type`` of ``default``,
    ``linear``, ``llama3``, ``yarn`` or ``proportional`` with its factors). ``freq_factors`` is llama.cpp's
    ``rope_freqs.weight`` (per-frequency divisors), the GGUF form of Llama 3 scaling.
    """

    theta: float = 10000.0
    scaling: dict[str, Any] | None = None
    freq_factors: list[float] | None = None


@dataclass
class MoEConfig:
    """A mixture-of-experts MLP (``layers/moe.py``). ``router``: ``softmax_topk``
    (Mixtral, Qwen-MoE, OLMoE), ``topk_softmax`` (GPT-OSS), ``sigmoid_group_topk``
    (DeepSeek-V3) or ``softmax_topk_scaled`` (Gemma 4). ``dense_layers`` keep a plain MLP
    of ``ModelConfig.intermediate_size``."""

    num_experts: int
    top_k: int
    intermediate_size: int
    router: str = "softmax_topk"
    normalize: bool = True
    shared_intermediate_size: int = 0
    shared_expert_gate: bool = False  # Qwen2/3-MoE family: the shared expert scaled by sigmoid(a learned row . x)
    gated: bool = True  # False: each expert is down(act(up(x))) (Nemotron-H), not down(act(gate(x)) * up(x))
    dense_layers: list[int] = field(default_factory=list)
    swiglu_alpha: float | None = None  # GPT-OSS's clamped SwiGLU
    swiglu_limit: float | None = None
    num_groups: int = 1
    groups_used: int = 1
    routed_scale: float = 1.0


@dataclass
class DeltaNetConfig:
    """Gated DeltaNet linear attention (Qwen3-Next, Qwen 3.5; ``layers/gated_deltanet.py``): each
    query/key head serves ``num_v_heads // num_k_heads`` value heads, grouped (value head ``h`` reads
    key head ``h // ratio``, HF's order) or tiled (``h % num_k_heads``: llama.cpp's qwen35 files)."""

    num_k_heads: int
    num_v_heads: int
    k_head_dim: int
    v_head_dim: int
    conv_kernel: int
    v_heads_tiled: bool = False

    @property
    def conv_channels(self) -> int:
        return 2 * self.num_k_heads * self.k_head_dim + self.num_v_heads * self.v_head_dim

    def state_shapes(self) -> tuple[tuple[int, ...], ...]:
        """One sequence's conv state (the last ``kernel - 1`` inputs) and delta-rule state."""
        return ((self.conv_channels, self.conv_kernel - 1), (self.num_v_heads, self.k_head_dim, self.v_head_dim))


@dataclass
class Mamba2Shape:
    """The dimensions of one Mamba-2 mixer (``layers/mamba2.py``) and variants (HF's Mamba2Config names in comments)."""

    hidden_size: int
    num_heads: int  # num_heads / mamba_num_heads
    head_dim: int  # head_dim / mamba_head_dim
    state_size: int  # state_size / ssm_state_size
    n_groups: int = 1  # heads share B and C per group
    conv_kernel: int = 4
    chunk_size: int = 256
    norm_eps: float = 1e-5
    dt_limit: tuple[float, float] = (0.0, float("inf"))  # dt is clamped to this after softplus
    norm_before_gate: bool = False  # False: norm(y * silu(z)) (Mamba-2, Nemotron-H); True: norm(y) * silu(z)
    gated_norm: bool = True  # False: y * silu(z), no norm (Falcon-H1 without mamba_rms_norm)
    bias: bool = False  # in_proj / out_proj biases
    conv_bias: bool = True

    @property
    def inner_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def conv_channels(self) -> int:
        return self.inner_size + 2 * self.n_groups * self.state_size

    @property
    def state_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The conv state and the SSM state one sequence keeps (``ModelConfig.state_shapes``)."""
        return (self.conv_channels, self.conv_kernel - 1), (self.num_heads, self.head_dim, self.state_size)


@dataclass
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2/V3, GLM-4 MoE Lite): the cache holds a
    ``kv_lora_rank`` latent and one shared ``qk_rope_head_dim`` rope key per token."""

    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None


@dataclass
class ModelConfig:
    architecture: str  # registry key: HF model_type (llama, mistral, qwen2, qwen3, gemma3)
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig = field(default_factory=RopeConfig)
    # GGUF's llama-arch Q/K are permuted for llama.cpp's interleaved rope;
    # HF checkpoints (and GGUF qwen/gemma) pair dimension i with i + head_dim/2.
    rope_interleaved: bool = False
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    hidden_act: str = "silu"
    # Gemma 3
    layer_types: list[str] = field(default_factory=list)
    sliding_window: int | None = None
    local_rope: RopeConfig | None = None
    query_pre_attn_scalar: float | None = None
    embed_scale: float | None = None
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    moe: MoEConfig | None = None
    mla: MLAConfig | None = None
    qk_norm_full: bool = False  # OLMoE: one norm over all heads' q (and k)
    attention_sinks: bool = False  # GPT-OSS
    # Qwen3-Next, Qwen 3.5: rope on the leading rotary_dim of each head only (None: all of it), the
    # attention output gated by sigmoid of a second half of q_proj, Gated DeltaNet layers.
    rotary_dim: int | None = None
    attn_output_gate: bool = False
    deltanet: DeltaNetConfig | None = None
    # Gemma 4: full-attention layers with their own head size and KV heads (None: as the others),
    # whose V may be K's projection; the last ``kv_shared_layers`` layers attend to the cache of the
    # last earlier layer of their kind (``kv_producer``), and their MLPs may be twice as wide;
    # per-layer embeddings of ``per_layer_input_size`` numbers per layer (0: none).
    global_head_dim: int | None = None
    global_kv_heads: int | None = None
    attention_k_eq_v: bool = False
    kv_shared_layers: int = 0
    double_wide_mlp: bool = False
    per_layer_input_size: int = 0
    per_layer_vocab_size: int | None = None
    # Hybrid models: per layer, the float32 state tensors one sequence keeps (conv state, recurrent
    # state), each given by its shape without the slot axis; () for a layer without state. Empty: none.
    # A layer may have both (Falcon-H1 runs attention and Mamba-2 side by side).
    state_shapes: list[tuple[tuple[int, ...], ...]] = field(default_factory=list)
    mamba: Mamba2Shape | None = None  # the Mamba-2 mixers' shape (Mamba-2, Nemotron-H, Falcon-H1, Granite 4 hybrid)
    # Granite: residual branches, logits (1 / logits_scaling) and embeddings (``embed_scale``) are scaled;
    # attention without rotary embeddings (Granite 4 hybrid's "nope").
    residual_multiplier: float = 1.0
    logit_scale: float = 1.0
    no_rope: bool = False
    # Falcon-H1 from config.json: its muP multipliers by HF name, folded into the weights at load
    # (llama.cpp's converter folds them into a GGUF's weights, so GGUF files have none).
    multipliers: dict[str, Any] = field(default_factory=dict)
    short_conv_kernel: int = 0  # LFM2: the taps of its short convolutions (conv_L_cache)

    def __post_init__(self):
        if not self.layer_types:  # (the config's consistency is checked in config_checks.py)
            self.layer_types = [FULL_ATTENTION] * self.num_layers

    @property
    def has_state(self) -> bool:
        """Whether some layer keeps a recurrent state per sequence (a hybrid or pure recurrent model)."""
        return any(self.state_shapes)

    @property
    def attn_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def layer_attention(self, layer: int) -> tuple[int, int]:
        """(KV heads, head dim) of layer ``layer``: Gemma 4's full-attention layers may differ."""
        if self.layer_types[layer] == FULL_ATTENTION:
            return self.global_kv_heads or self.num_kv_heads, self.global_head_dim or self.head_dim
        return self.num_kv_heads, self.head_dim

    def kv_producer(self, layer: int) -> int:
        """The layer whose KV cache layer ``layer`` attends to: itself, or for Gemma 4's KV-shared
        last layers the last earlier unshared layer of the same kind (-1 when there is none)."""
        first_shared = self.num_layers - self.kv_shared_layers
        if layer < first_shared:
            return layer
        kind = self.layer_types[layer]
        return next((i for i in range(first_shared - 1, -1, -1) if self.layer_types[i] == kind), -1)

    def layer_intermediate_size(self, layer: int) -> int:
        """The dense MLP's width in layer ``layer`` (Gemma 4's KV-shared layers may double it)."""
        wide = self.double_wide_mlp and self.kv_producer(layer) != layer
        return self.intermediate_size * (2 if wide else 1)


def _gemma3_layer_types(num_layers: int, pattern: int = 6) -> list[str]:
    return [SLIDING_ATTENTION if (i + 1) % pattern else FULL_ATTENTION for i in range(num_layers)]


# llama.cpp folds these HF model types into the "llama" GGUF architecture.
GGUF_ARCH_TO_MODEL_TYPE = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3",
                           "lfm2": "lfm2", "lfm2moe": "lfm2_moe", "qwen3moe": "qwen3_moe", "olmoe": "olmoe", "gpt-oss": "gpt_oss",
                           "deepseek2": "deepseek_v3", "gemma4": "gemma4", "mamba2": "mamba2", "nemotron_h": "nemotron_h",
                           "nemotron_h_moe": "nemotron_h", "falcon-h1": "falcon_h1", "granitehybrid": "granitemoehybrid",
                           "qwen3next": "qwen3_next", "qwen35": "qwen3_5", "qwen35moe": "qwen3_5_moe"}
DELTANET_GGUF_ARCHS = ("qwen3next", "qwen35", "qwen35moe")
# HF model types of the Gated DeltaNet hybrids -> our architecture name (Qwen 3.5's text towers).
DELTANET_MODEL_TYPES = {"qwen3_next": "qwen3_next", "qwen3_5": "qwen3_5", "qwen3_5_text": "qwen3_5",
                        "qwen3_5_moe": "qwen3_5_moe", "qwen3_5_moe_text": "qwen3_5_moe"}


def config_from_gguf(metadata: dict[str, Any], tensor_names: set[str],
                     tensor_shapes: dict[str, tuple[int, ...]] | None = None) -> ModelConfig:
    """``tensor_shapes`` (GGUF names, torch order): sizes some metadata lacks (Nemotron-H's dense MLP)."""
    arch = str(metadata.get("general.architecture", ""))
    from cholla.errors import UnsupportedArchitectureError

    if arch not in GGUF_ARCH_TO_MODEL_TYPE:
        raise UnsupportedArchitectureError(
            f"GGUF architecture {arch!r} is not supported; cholla runs: {', '.join(sorted(GGUF_ARCH_TO_MODEL_TYPE))}"
        )

    def get(key: str, default: Any = None, required: bool = False) -> Any:
        value = metadata.get(f"{arch}.{key}", default)
        if required and value is None:
            raise ModelFormatError(f"GGUF metadata lacks {arch}.{key}; the file is incomplete")
        return value

    if GGUF_ARCH_TO_MODEL_TYPE[arch] in ("mamba2", "nemotron_h"):
        return _gguf_mamba(metadata, arch, get, tensor_names, tensor_shapes or {})
    hidden = int(get("embedding_length", required=True))
    num_heads = int(get("attention.head_count", required=True))
    num_kv_heads = get("attention.head_count_kv", num_heads)
    if isinstance(num_kv_heads, list):
        num_kv_heads = max(num_kv_heads)
    head_dim = int(get("attention.key_length", hidden // num_heads))
    vocab = get("vocab_size") or len(metadata.get("tokenizer.ggml.tokens", []))
    if not vocab:
        raise ModelFormatError("GGUF metadata has neither a vocab size nor a token list")
    rope = RopeConfig(theta=float(get("rope.freq_base", 10000.0)))
    scaling_type = get("rope.scaling.type")
    if scaling_type == "linear":
        rope.scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor", 1.0))}
    elif scaling_type == "yarn":
        rope.scaling = _gguf_yarn(arch, get)
    elif scaling_type not in (None, "none"):
        raise ModelFormatError(f"rope scaling {scaling_type!r} in this GGUF is not supported yet")
    name = str(metadata.get("general.name", "")).lower()
    model_type = "mistral" if arch == "llama" and "mistral" in name else GGUF_ARCH_TO_MODEL_TYPE[arch]
    eos = metadata.get("tokenizer.ggml.eos_token_id")
    feed_forward = get("feed_forward_length", required=True)  # per layer in Gemma 4 files
    cfg = ModelConfig(
        architecture=model_type,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(min(feed_forward) if isinstance(feed_forward, list) else feed_forward),
        num_layers=int(get("block_count", required=True)),
        num_heads=num_heads,
        num_kv_heads=int(num_kv_heads),
        head_dim=head_dim,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        max_position_embeddings=int(get("context_length", 2048)),
        rope=rope,
        rope_interleaved=arch == "llama",
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
        bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=[int(eos)] if eos is not None else [],
    )
    if arch == "gemma3":
        # llama.cpp hard-codes what GGUF does not store: every 6th layer is global,
        # local layers use rope base 10000, queries are scaled by head_dim.
        cfg.hidden_act = "gelu_pytorch_tanh"
        cfg.layer_types = _gemma3_layer_types(cfg.num_layers)
        cfg.sliding_window = int(get("attention.sliding_window", 512))
        cfg.local_rope = RopeConfig(theta=10000.0)
        cfg.query_pre_attn_scalar = float(head_dim)
        cfg.embed_scale = math.sqrt(hidden)
        cfg.final_logit_softcapping = get("final_logit_softcapping")
        cfg.attn_logit_softcapping = get("attn_logit_softcapping")
    if arch == "gemma4":
        _gguf_gemma4(cfg, get, metadata.get(f"{arch}.attention.head_count_kv", num_kv_heads), feed_forward, tensor_names)
    if arch in ("lfm2", "lfm2moe"):
        # The converter writes each layer's KV heads, 0 for a convolution layer.
        kv_heads = get("attention.head_count_kv", num_heads)
        kinds = kv_heads if isinstance(kv_heads, list) else [kv_heads] * cfg.num_layers
        cfg.qk_norm = True
        _lfm2_layers(cfg, [FULL_ATTENTION if n else SHORT_CONV for n in kinds], int(get("shortconv.l_cache", required=True)))
    if arch in DELTANET_GGUF_ARCHS:
        _gguf_deltanet(cfg, arch, get)
    if get("expert_count"):
        _gguf_moe(cfg, arch, get, tensor_names)
    elif arch == "deepseek2":
        raise ModelFormatError("this deepseek2 GGUF has no experts; cholla runs the MoE models of that family")
    if arch in ("falcon-h1", "granitehybrid"):
        _gguf_hybrid(cfg, arch, get, metadata, tensor_names)
    return cfg


ROPE_TYPES = ("default", "linear", "llama3", "yarn", "proportional")


def _hf_rope(params: dict[str, Any] | None, theta: float | None, default_theta: float) -> RopeConfig:
    params = dict(params or {})
    theta = float(params.pop("rope_theta", theta if theta is not None else default_theta))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ModelFormatError(f"rope_type {rope_type!r} is not supported yet ({', '.join(ROPE_TYPES)} are)")
    params["rope_type"] = rope_type
    return RopeConfig(theta=theta, scaling=None if rope_type == "default" else params)


def config_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    """Map a Hugging Face ``config.json`` (transformers 4.x or 5.x spelling)."""
    model_type = cfg.get("model_type", "")
    if model_type in ("qwen3_5", "qwen3_5_moe") and "text_config" in cfg:  # multimodal wrapper: the text tower
        text = cfg["text_config"]
        cfg = {**text, "tie_word_embeddings": cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))}
    model_type = DELTANET_MODEL_TYPES.get(model_type, model_type)
    if model_type in ("lfm2", "lfm2_moe") and "intermediate_size" not in cfg:  # its older spelling
        cfg = {**cfg, "intermediate_size": cfg.get("block_ff_dim")}
    if model_type == "mamba2":
        return _hf_mamba2(cfg)
    if model_type == "nemotron_h":
        cfg = {**cfg, "num_hidden_layers": len(_nemotron_h_kinds(cfg))}
    if model_type in ("gemma3", "gemma4") and "text_config" in cfg:  # multimodal wrapper: take the text tower
        cfg = {**cfg["text_config"], "model_type": model_type}
    model_type = {"gemma3_text": "gemma3", "gemma4_text": "gemma4"}.get(model_type, model_type)
    try:
        hidden = int(cfg["hidden_size"])
        num_heads = int(cfg["num_attention_heads"])
        num_layers = int(cfg["num_hidden_layers"])
        intermediate = int(cfg["intermediate_size"])
        vocab = int(cfg["vocab_size"])
    except KeyError as e:
        raise ModelFormatError(f"config.json lacks {e.args[0]!r}") from None
    head_dim = cfg.get("head_dim") or hidden // num_heads
    eos = cfg.get("eos_token_id")
    eos_ids = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
    rope_params = cfg.get("rope_parameters") or cfg.get("rope_scaling")
    is_gemma = model_type in ("gemma3", "gemma4")  # Gemma 4 starts from Gemma 3's fields
    if is_gemma and rope_params and "full_attention" in rope_params:
        global_params, local_params = rope_params.get("full_attention"), rope_params.get("sliding_attention")
    else:
        global_params, local_params = rope_params, None
    out = ModelConfig(
        architecture=model_type,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        rope=_hf_rope(global_params, cfg.get("rope_theta"), 1_000_000.0 if is_gemma else 10000.0),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", is_gemma)),
        attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
        qk_norm=model_type in ("qwen3", "gemma3", "gemma4"),
        hidden_act=cfg.get("hidden_act") or cfg.get("hidden_activation") or "silu",
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=[int(e) for e in eos_ids],
    )
    if model_type in ("mistral", "qwen2", "qwen3") and cfg.get("sliding_window") and cfg.get("use_sliding_window", model_type == "mistral"):
        out.sliding_window = int(cfg["sliding_window"])
        out.layer_types = [SLIDING_ATTENTION] * num_layers
    if is_gemma:
        out.hidden_act = cfg.get("hidden_activation") or "gelu_pytorch_tanh"
        out.layer_types = cfg.get("layer_types") or _gemma3_layer_types(num_layers, cfg.get("sliding_window_pattern", 6))
        out.sliding_window = int(cfg.get("sliding_window") or 4096)
        out.local_rope = _hf_rope(local_params, cfg.get("rope_local_base_freq"), 10000.0)
        out.query_pre_attn_scalar = float(cfg.get("query_pre_attn_scalar", 256))
        out.embed_scale = math.sqrt(hidden)
        out.final_logit_softcapping = cfg.get("final_logit_softcapping")
        out.attn_logit_softcapping = cfg.get("attn_logit_softcapping")
    for types, read in _HF_FAMILY_PARTS:
        if model_type in types:
            try:
                read(out, cfg, model_type)
            except (KeyError, TypeError, ValueError) as e:  # a missing or malformed key: the file's fault
                what = f"lacks {e.args[0]!r}" if isinstance(e, KeyError) else f"has a malformed field ({e})"
                raise ModelFormatError(f"config.json {what}, which {model_type} needs") from None
    return out


# Each family's own fields of a config.json, read over the common ones by ``config_from_hf``.
_HF_FAMILY_PARTS = [
    (DELTANET_MODEL_TYPES.values(), lambda out, cfg, model_type: _hf_deltanet(out, cfg, model_type)),
    (("gemma4",), lambda out, cfg, model_type: _hf_gemma4(out, cfg)),
    (("lfm2", "lfm2_moe"), lambda out, cfg, model_type: _hf_lfm2(out, cfg, model_type)),
    (("qwen3_moe", "mixtral", "olmoe", "gpt_oss", "deepseek_v3", "glm4_moe_lite", "lfm2_moe"),
     lambda out, cfg, model_type: _hf_moe(out, cfg, model_type)),
    (("nemotron_h",), lambda out, cfg, model_type: _hf_nemotron_h(out, cfg)),
    (("falcon_h1", "granitemoehybrid"), lambda out, cfg, model_type: _hf_hybrid(out, cfg, model_type)),
]


# -- Gemma 4 ------------------------------------------------------------------------------

# transformers' Gemma4TextConfig defaults, for keys a config.json leaves out
_GEMMA4_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0}}


def _hf_gemma4(out: ModelConfig, cfg: dict[str, Any]) -> None:
    """Gemma 4's fields of a (text) ``config.json``, over the Gemma 3 ones already read."""
    if cfg.get("use_bidirectional_attention") == "all":
        raise ModelFormatError("Gemma 4 with use_bidirectional_attention='all' is an encoder; cholla runs causal models")
    types = list(cfg.get("layer_types") or _gemma3_layer_types(out.num_layers))
    types[-1] = FULL_ATTENTION  # as transformers forces it
    out.layer_types = types
    out.sliding_window = int(cfg.get("sliding_window") or 512)
    rope = cfg.get("rope_parameters") or _GEMMA4_ROPE
    out.rope = _hf_rope(rope.get("full_attention") or _GEMMA4_ROPE["full_attention"], None, 1_000_000.0)
    out.local_rope = _hf_rope(rope.get("sliding_attention") or _GEMMA4_ROPE["sliding_attention"], None, 10_000.0)
    out.query_pre_attn_scalar = 1.0  # q and k are RMS-normalised; scores are not scaled
    out.attn_logit_softcapping = None
    out.attention_k_eq_v = bool(cfg.get("attention_k_eq_v", False))
    out.global_head_dim, out.global_kv_heads = _gemma4_global_attention(cfg, types, out.attention_k_eq_v)
    out.kv_shared_layers = int(cfg.get("num_kv_shared_layers") or 0)
    out.double_wide_mlp = bool(cfg.get("use_double_wide_mlp", False))
    out.per_layer_input_size = int(cfg.get("hidden_size_per_layer_input") or 0)
    out.per_layer_vocab_size = int(cfg.get("vocab_size_per_layer_input") or out.vocab_size)
    if cfg.get("enable_moe_block"):
        out.moe = MoEConfig(int(cfg["num_experts"]), int(cfg["top_k_experts"]), int(cfg["moe_intermediate_size"]),
                            router="softmax_topk_scaled")


def _gemma4_global_attention(cfg: dict[str, Any], types: list[str], k_eq_v: bool) -> tuple[int, int | None]:
    """(head dim, KV heads) of the full-attention layers: from ``per_layer_config`` (transformers 5.24's
    spelling), else ``global_head_dim`` / ``num_global_key_value_heads`` (the latter only with K = V)."""
    per_layer = cfg.get("per_layer_config")
    if per_layer is None:
        return int(cfg.get("global_head_dim") or 512), (cfg.get("num_global_key_value_heads") if k_eq_v else None)
    overrides = {}
    for index, kind in enumerate(types):
        layer = per_layer.get(str(index), per_layer.get(index, {}))
        if kind == FULL_ATTENTION:
            overrides[index] = (layer.get("head_dim"), layer.get("num_key_value_heads"))
        elif set(layer) & {"head_dim", "num_key_value_heads"}:
            raise ModelFormatError(f"config.json's per_layer_config gives sliding layer {index} its own attention "
                                   "geometry; cholla supports one per layer kind")
    if len(set(overrides.values())) > 1:
        raise ModelFormatError("config.json's per_layer_config gives full-attention layers different head sizes; "
                               "cholla supports one per layer kind")
    head_dim, kv_heads = next(iter(overrides.values()), (None, None))
    return int(head_dim or cfg.get("head_dim") or 256), kv_heads


def _gguf_gemma4(cfg: ModelConfig, get, kv_heads: int | list[int], feed_forward: int | list[int],
                 tensor_names: set[str]) -> None:
    """gemma4 GGUF metadata: a sliding-window pattern, per-kind head sizes and KV heads, and the
    per-layer feed-forward widths (double-wide KV-shared layers). The full layers' partial rope
    comes as ``rope_freqs.weight`` (huge divisors on the unrotated pairs), which the loader reads."""
    pattern = get("attention.sliding_window_pattern", required=True)
    if not isinstance(pattern, list) or len(pattern) != cfg.num_layers:
        raise ModelFormatError(f"gemma4.attention.sliding_window_pattern must list all {cfg.num_layers} layers")
    cfg.layer_types = [SLIDING_ATTENTION if sliding else FULL_ATTENTION for sliding in pattern]
    cfg.hidden_act = "gelu_pytorch_tanh"
    cfg.sliding_window = int(get("attention.sliding_window", required=True))
    cfg.global_head_dim = cfg.head_dim
    cfg.head_dim = int(get("attention.key_length_swa", cfg.head_dim))
    if int(get("rope.dimension_count_swa", cfg.head_dim)) != cfg.head_dim:
        raise ModelFormatError("gemma4 GGUF with partial rope on sliding layers is not supported")
    if isinstance(kv_heads, list):
        cfg.num_kv_heads = int(kv_heads[pattern.index(True)] if True in pattern else kv_heads[0])
        cfg.global_kv_heads = int(kv_heads[pattern.index(False)] if False in pattern else kv_heads[0])
    cfg.local_rope = RopeConfig(theta=float(get("rope.freq_base_swa", 10_000.0)))
    cfg.query_pre_attn_scalar = 1.0
    cfg.embed_scale = math.sqrt(cfg.hidden_size)
    cfg.final_logit_softcapping = get("final_logit_softcapping")
    cfg.qk_norm = True
    cfg.kv_shared_layers = int(get("attention.shared_kv_layers", 0))
    full = [i for i, kind in enumerate(cfg.layer_types) if kind == FULL_ATTENTION and cfg.kv_producer(i) == i]
    cfg.attention_k_eq_v = bool(full) and f"blk.{full[0]}.attn_v.weight" not in tensor_names
    cfg.double_wide_mlp = isinstance(feed_forward, list) and max(feed_forward) > min(feed_forward)
    cfg.per_layer_input_size = int(get("embedding_length_per_layer_input", 0))
# -- hybrid models ----------------------------------------------------------------------------


def _lfm2_layers(out: ModelConfig, layer_types: list[str], kernel: int) -> None:
    """LFM2's layer kinds; a convolution layer keeps its last ``kernel - 1`` inputs per sequence."""
    if not 2 <= kernel <= 64:
        raise ModelFormatError(f"LFM2's short convolution has {kernel} taps; a model has 2 to 64 (conv_L_cache)")
    out.layer_types = layer_types
    out.short_conv_kernel = kernel
    out.state_shapes = [((out.hidden_size, kernel - 1),) if kind == SHORT_CONV else () for kind in layer_types]


def _hf_lfm2(out: ModelConfig, cfg: dict[str, Any], model_type: str) -> None:
    """LFM2's config.json: its own norm and tie keys, and (the dense LFM2) the MLP width it derives from
    ``block_ff_dim``: two thirds, times the multiplier, rounded up to ``block_multiple_of``, as transformers does."""
    if cfg.get("conv_bias"):
        raise ModelFormatError("LFM2 with conv_bias is not supported (no released LFM2 model uses it)")
    out.rms_norm_eps = float(cfg.get("norm_eps", 1e-5))
    out.tie_word_embeddings = bool(cfg.get("tie_word_embeddings", cfg.get("tie_embedding", True)))
    out.qk_norm = True
    if "rope_theta" not in cfg and not (cfg.get("rope_parameters") or {}).get("rope_theta"):
        out.rope.theta = 1_000_000.0
    if model_type == "lfm2" and cfg.get("block_auto_adjust_ff_dim", True):
        size = int(2 * out.intermediate_size / 3)
        if cfg.get("block_ffn_dim_multiplier") is not None:
            size = int(float(cfg["block_ffn_dim_multiplier"]) * size)
        multiple = int(cfg.get("block_multiple_of", 256))
        out.intermediate_size = multiple * -(-size // multiple)
    types = cfg.get("layer_types")
    if types is None:
        full = cfg.get("full_attn_idxs")
        full = range(out.num_layers) if full is None else full
        types = [FULL_ATTENTION if i in full else SHORT_CONV for i in range(out.num_layers)]
    _lfm2_layers(out, list(types), int(cfg.get("conv_L_cache", 3)))


# -- mixtures of experts ------------------------------------------------------------------


def _hf_moe(out: ModelConfig, cfg: dict[str, Any], model_type: str) -> None:
    """The MoE architectures' fields of a ``config.json``."""
    top_k = int(cfg.get("num_experts_per_tok", 0))
    num_experts = int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0)
    if model_type == "qwen3_moe":
        out.qk_norm = True
        step = int(cfg.get("decoder_sparse_step") or 1)
        only_mlp = set(cfg.get("mlp_only_layers") or [])
        dense = [i for i in range(out.num_layers) if i in only_mlp or (i + 1) % step]
        out.moe = MoEConfig(num_experts, top_k, int(cfg["moe_intermediate_size"]),
                            normalize=bool(cfg.get("norm_topk_prob", False)), dense_layers=dense)
    elif model_type == "mixtral":
        if cfg.get("sliding_window"):
            out.sliding_window = int(cfg["sliding_window"])
            out.layer_types = [SLIDING_ATTENTION] * out.num_layers
        out.moe = MoEConfig(num_experts, top_k, out.intermediate_size)
    elif model_type == "olmoe":
        if cfg.get("clip_qkv") is not None:
            raise ModelFormatError("OLMoE with clip_qkv is not supported")
        out.qk_norm = out.qk_norm_full = True
        out.moe = MoEConfig(num_experts, top_k, out.intermediate_size, normalize=bool(cfg.get("norm_topk_prob", False)))
    elif model_type == "gpt_oss":
        out.attention_sinks = True
        out.sliding_window = int(cfg.get("sliding_window") or 128)
        out.layer_types = list(cfg.get("layer_types") or _alternating_layer_types(out.num_layers))
        out.moe = MoEConfig(num_experts, top_k, out.intermediate_size, router="topk_softmax", normalize=False,
                            swiglu_alpha=float(cfg.get("swiglu_alpha", 1.702)),
                            swiglu_limit=float(cfg.get("swiglu_limit", 7.0)))
    elif model_type == "lfm2_moe":
        if not cfg.get("use_expert_bias", True):
            raise ModelFormatError("LFM2-MoE without use_expert_bias is not supported (no released model has it)")
        out.moe = MoEConfig(num_experts, top_k, int(cfg["moe_intermediate_size"]), router="sigmoid_group_topk",
                            normalize=bool(cfg.get("norm_topk_prob", True)),
                            dense_layers=list(range(int(cfg.get("num_dense_layers") or 0))),
                            routed_scale=float(cfg.get("routed_scaling_factor") or 1.0))
    elif model_type in ("deepseek_v3", "glm4_moe_lite"):
        _hf_mla(out, cfg, model_type)
        num_experts = int(cfg.get("n_routed_experts") or 0)
    if not 0 < top_k <= num_experts:
        raise ModelFormatError(f"config.json routes each token to {top_k} of {num_experts} experts")


def _hf_mla(out: ModelConfig, cfg: dict[str, Any], model_type: str) -> None:
    """DeepSeek-V3 / GLM-4 MoE Lite: latent attention and the sigmoid-routed MoE."""
    out.mla = MLAConfig(int(cfg["kv_lora_rank"]), int(cfg["qk_nope_head_dim"]), int(cfg["qk_rope_head_dim"]),
                        int(cfg["v_head_dim"]), cfg.get("q_lora_rank"))
    out.rope_interleaved = bool(cfg.get("rope_interleave", True))
    out.query_pre_attn_scalar = _mla_query_scalar(out.mla, out.rope.scaling)
    if model_type == "glm4_moe_lite":
        types = cfg.get("mlp_layer_types") or ["dense"] + ["sparse"] * (out.num_layers - 1)
        dense = [i for i, kind in enumerate(types) if kind == "dense"]
    else:
        dense = list(range(int(cfg.get("first_k_dense_replace") or 0)))
    size = int(cfg["moe_intermediate_size"])
    out.moe = MoEConfig(int(cfg["n_routed_experts"]), int(cfg["num_experts_per_tok"]), size,
                        router="sigmoid_group_topk", normalize=bool(cfg.get("norm_topk_prob", True)),
                        shared_intermediate_size=size * int(cfg.get("n_shared_experts") or 0), dense_layers=dense,
                        num_groups=int(cfg.get("n_group") or 1), groups_used=int(cfg.get("topk_group") or 1),
                        routed_scale=float(cfg.get("routed_scaling_factor") or 1.0))


def _mla_query_scalar(mla: MLAConfig, scaling: dict[str, Any] | None) -> float:
    """1 / scale**2: queries are scaled by (nope + rope dims)^-1/2, times YaRN's
    ``mscale_all_dim`` correction squared where the rope is scaled (DeepSeek-V3)."""
    scale = (mla.qk_nope_head_dim + mla.qk_rope_head_dim) ** -0.5
    factor, mscale_all_dim = (scaling or {}).get("factor"), (scaling or {}).get("mscale_all_dim")
    if factor and mscale_all_dim and float(factor) > 1:
        scale *= (0.1 * float(mscale_all_dim) * math.log(float(factor)) + 1.0) ** 2
    return scale**-2


def _alternating_layer_types(num_layers: int) -> list[str]:
    """GPT-OSS: even layers slide, odd layers see everything (llama.cpp's swa pattern 2)."""
    return [SLIDING_ATTENTION if i % 2 == 0 else FULL_ATTENTION for i in range(num_layers)]


def _gguf_yarn(arch: str, get) -> dict[str, Any]:
    """YaRN as GGUF stores it, in HF's spelling. GGUF has no ``truncate``: llama.cpp always
    rounds the ramp's ends, but GPT-OSS was trained without rounding (its HF config says so)."""
    scaling = {
        "rope_type": "yarn",
        "factor": float(get("rope.scaling.factor", 1.0)),
        "original_max_position_embeddings": float(get("rope.scaling.original_context_length", required=True)),
        "beta_fast": get("rope.scaling.yarn_beta_fast"),
        "beta_slow": get("rope.scaling.yarn_beta_slow"),
        "truncate": arch != "gpt-oss",
    }
    if get("rope.scaling.yarn_attn_factor") is not None:
        scaling["attention_factor"] = float(get("rope.scaling.yarn_attn_factor"))
    return scaling


def _gguf_moe(cfg: ModelConfig, arch: str, get, tensor_names: set[str]) -> None:
    """The MoE fields of GGUF metadata, with llama.cpp's per-architecture routing defaults."""
    num_experts, top_k = int(get("expert_count")), int(get("expert_used_count", 0))
    if not 0 < top_k <= num_experts:
        raise ModelFormatError(f"GGUF metadata routes each token to {top_k} of {num_experts} experts")
    size = int(get("expert_feed_forward_length") or cfg.intermediate_size)
    dense = [i for i in range(cfg.num_layers) if f"blk.{i}.ffn_gate_inp.weight" not in tensor_names]
    if arch == "llama":
        cfg.architecture = "mixtral"
        cfg.moe = MoEConfig(num_experts, top_k, size, dense_layers=dense)
    elif arch == "qwen3moe":
        cfg.moe = MoEConfig(num_experts, top_k, size, normalize=True, dense_layers=dense)
    elif arch == "olmoe":
        cfg.qk_norm_full = True
        cfg.moe = MoEConfig(num_experts, top_k, size, normalize=False, dense_layers=dense)
    elif arch == "gpt-oss":
        cfg.attention_sinks = True
        cfg.sliding_window = int(get("attention.sliding_window", required=True))
        cfg.layer_types = _alternating_layer_types(cfg.num_layers)
        cfg.moe = MoEConfig(num_experts, top_k, size, router="topk_softmax", normalize=False,
                            swiglu_alpha=1.702, swiglu_limit=7.0, dense_layers=dense)
    elif arch == "lfm2moe":  # llama.cpp always normalises LFM2-MoE's routing weights
        if int(get("expert_gating_func", 2)) != 2:
            raise ModelFormatError("lfm2moe GGUF with other than sigmoid routing is not supported")
        cfg.moe = MoEConfig(num_experts, top_k, size, router="sigmoid_group_topk", normalize=True, dense_layers=dense,
                            routed_scale=float(get("expert_weights_scale", 1.0) or 1.0))
    elif arch == "deepseek2":
        _gguf_mla(cfg, get, num_experts, top_k, size, dense)
    elif arch in ("qwen3next", "qwen35moe"):
        cfg.moe = MoEConfig(num_experts, top_k, size, normalize=True, dense_layers=dense, shared_expert_gate=True,
                            shared_intermediate_size=int(get("expert_shared_feed_forward_length", 0)))
    elif arch == "gemma4":
        cfg.moe = MoEConfig(num_experts, top_k, size, router="softmax_topk_scaled", dense_layers=dense)
    elif arch == "granitehybrid":
        cfg.moe = MoEConfig(num_experts, top_k, size, router="topk_softmax", normalize=False,
                            shared_intermediate_size=int(get("expert_shared_feed_forward_length", 0) or 0))
    else:
        raise ModelFormatError(f"GGUF architecture {arch!r} declares experts, which cholla does not run for it")


def _gguf_mla(cfg: ModelConfig, get, num_experts: int, top_k: int, size: int, dense: list[int]) -> None:
    """deepseek2 (DeepSeek-V2/V3, GLM-4 MoE Lite) as llama.cpp's converter writes it. The dense
    layers are those without a router (GLM's converter writes no ``leading_dense_block_count``)."""
    if int(get("expert_gating_func", 2)) != 2:
        raise ModelFormatError("deepseek2 GGUF with softmax routing (DeepSeek-V2) is not supported; sigmoid is")
    rope_dim = int(get("rope.dimension_count", required=True))
    cfg.mla = MLAConfig(int(get("attention.kv_lora_rank", required=True)),
                        int(get("attention.key_length_mla", required=True)) - rope_dim, rope_dim,
                        int(get("attention.value_length_mla", required=True)), get("attention.q_lora_rank"))
    cfg.rope_interleaved = True
    log_multiplier = get("rope.scaling.yarn_log_multiplier")  # the converter stores 0.1 * mscale_all_dim
    if cfg.rope.scaling and log_multiplier:
        cfg.rope.scaling["mscale"] = cfg.rope.scaling["mscale_all_dim"] = float(log_multiplier) / 0.1
    cfg.query_pre_attn_scalar = _mla_query_scalar(cfg.mla, cfg.rope.scaling)
    cfg.moe = MoEConfig(num_experts, top_k, size, router="sigmoid_group_topk",
                        normalize=bool(get("expert_weights_norm", False)),
                        shared_intermediate_size=size * int(get("expert_shared_count", 0)),
                        dense_layers=dense,
                        num_groups=int(get("expert_group_count", 1) or 1),
                        groups_used=int(get("expert_group_used_count", 1) or 1),
                        routed_scale=float(get("expert_weights_scale", 1.0) or 1.0))


# -- Gated DeltaNet hybrids (Qwen3-Next, Qwen 3.5) ------------------------------------------------


def _deltanet_layer_types(num_layers: int, interval: int) -> list[str]:
    """Every ``interval``-th layer is full attention, the others Gated DeltaNet."""
    return [FULL_ATTENTION if (i + 1) % interval == 0 else LINEAR_ATTENTION for i in range(num_layers)]


def _finish_deltanet(out: ModelConfig) -> None:
    """What both formats share: gated attention, QK-norm, a state per DeltaNet layer."""
    out.qk_norm = out.attn_output_gate = True
    out.state_shapes = [out.deltanet.state_shapes() if kind == LINEAR_ATTENTION else () for kind in out.layer_types]


def _hf_deltanet(out: ModelConfig, cfg: dict[str, Any], model_type: str) -> None:
    """Qwen3-Next / Qwen 3.5 (dense and MoE) fields of a ``config.json``. Their multi-token
    prediction layers (``mtp.*``) are not read: cholla decodes one token a step."""
    out.deltanet = DeltaNetConfig(int(cfg["linear_num_key_heads"]), int(cfg["linear_num_value_heads"]),
                                  int(cfg["linear_key_head_dim"]), int(cfg["linear_value_head_dim"]),
                                  int(cfg["linear_conv_kernel_dim"]))
    out.layer_types = list(cfg.get("layer_types") or
                           _deltanet_layer_types(out.num_layers, int(cfg.get("full_attention_interval") or 4)))
    params = cfg.get("rope_parameters") or {}
    factor = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not 0 < factor <= 1:
        raise ModelFormatError(f"config.json's partial_rotary_factor = {factor!r} must be a number in (0, 1]")
    out.rotary_dim = int(out.head_dim * factor)
    _finish_deltanet(out)
    if model_type == "qwen3_next" and int(cfg.get("num_experts") or 0):
        step = int(cfg.get("decoder_sparse_step") or 1)
        only_mlp = set(cfg.get("mlp_only_layers") or [])
        dense = [i for i in range(out.num_layers) if i in only_mlp or (i + 1) % step]
        out.moe = MoEConfig(int(cfg["num_experts"]), int(cfg["num_experts_per_tok"]), int(cfg["moe_intermediate_size"]),
                            normalize=bool(cfg.get("norm_topk_prob", True)), dense_layers=dense, shared_expert_gate=True,
                            shared_intermediate_size=int(cfg.get("shared_expert_intermediate_size") or 0))
    elif model_type == "qwen3_5_moe":
        out.moe = MoEConfig(int(cfg["num_experts"]), int(cfg["num_experts_per_tok"]), int(cfg["moe_intermediate_size"]),
                            shared_expert_gate=True,
                            shared_intermediate_size=int(cfg.get("shared_expert_intermediate_size") or 0))


def _gguf_deltanet(cfg: ModelConfig, arch: str, get) -> None:
    """qwen3next / qwen35 / qwen35moe as llama.cpp's converter writes them (``ssm.*`` keys)."""
    if int(get("nextn_predict_layers", 0) or 0):
        raise ModelFormatError(f"this {arch} GGUF carries multi-token-prediction layers, which cholla does not run; "
                               "convert it with convert_hf_to_gguf.py --no-mtp")
    num_v_heads = int(get("ssm.time_step_rank", required=True))
    cfg.deltanet = DeltaNetConfig(int(get("ssm.group_count", required=True)), num_v_heads,
                                  int(get("ssm.state_size", required=True)),
                                  int(get("ssm.inner_size", required=True)) // max(num_v_heads, 1),
                                  int(get("ssm.conv_kernel", required=True)),
                                  v_heads_tiled=arch != "qwen3next")  # qwen35's converter reorders value heads
    recurrent = get("attention.recurrent_layers")
    if recurrent is not None:
        cfg.layer_types = [LINEAR_ATTENTION if r else FULL_ATTENTION for r in recurrent]
    else:
        cfg.layer_types = _deltanet_layer_types(cfg.num_layers, int(get("full_attention_interval", 4)))
    cfg.rotary_dim = int(get("rope.dimension_count", cfg.head_dim))
    _finish_deltanet(cfg)


# -- Mamba-2 and its hybrids ------------------------------------------------------------------------

# Nemotron-H's layer kinds: its hybrid_override_pattern letters, and transformers 5's layers_block_type names.
_NEMOTRON_H_KINDS = {"M": MAMBA, "*": FULL_ATTENTION, "-": MLP_ONLY, "E": MLP_ONLY,
                     "mamba": MAMBA, "linear_attention": MAMBA, "attention": FULL_ATTENTION,
                     "full_attention": FULL_ATTENTION, "mlp": MLP_ONLY, "moe": MLP_ONLY}


# transformers' NemotronHConfig still reads these older spellings.
_NEMOTRON_H_OLD_KEYS = {"n_groups": "mamba_n_groups", "conv_kernel": "mamba_d_conv", "chunk_size": "mamba_chunk_size",
                        "time_step_min": "mamba_dt_min", "use_conv_bias": "mamba_conv_bias"}


def _dt_limit(value: Any) -> tuple[float, float]:
    """HF's ``time_step_limit``; transformers 5 writes infinity as ``{"__float__": "Infinity"}``."""
    if not value:
        return 0.0, math.inf
    low, high = (float(v["__float__"]) if isinstance(v, dict) else float(v) for v in value)
    return low, high


def _with_mamba(out: ModelConfig, shape: Mamba2Shape) -> ModelConfig:
    if shape.num_heads % shape.n_groups or shape.inner_size % shape.n_groups:
        raise ModelFormatError(f"the Mamba-2 layers' {shape.n_groups} groups do not divide their {shape.num_heads} heads")
    out.mamba = shape
    out.state_shapes = [shape.state_shapes if kind == MAMBA else () for kind in out.layer_types]
    return out


def _hf_mamba2(cfg: dict[str, Any]) -> ModelConfig:
    """A pure Mamba-2 (no attention, no MLP): its attention-shaped fields carry the mixer's heads."""
    try:
        heads, head_dim, layers = int(cfg["num_heads"]), int(cfg["head_dim"]), int(cfg["num_hidden_layers"])
        shape = Mamba2Shape(int(cfg["hidden_size"]), heads, head_dim, int(cfg["state_size"]), int(cfg.get("n_groups", 8)),
                            int(cfg.get("conv_kernel", 4)), int(cfg.get("chunk_size", 256)),
                            float(cfg.get("layer_norm_epsilon", 1e-5)), _dt_limit(cfg.get("time_step_limit")),
                            bias=bool(cfg.get("use_bias", False)), conv_bias=bool(cfg.get("use_conv_bias", True)))
        vocab = int(cfg["vocab_size"])
    except KeyError as e:
        raise ModelFormatError(f"config.json lacks {e.args[0]!r}, which mamba2 needs") from None
    eos = cfg.get("eos_token_id")
    out = ModelConfig("mamba2", vocab, shape.hidden_size, shape.inner_size, layers, heads, heads, head_dim,
                      shape.norm_eps, 1 << 20, tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                      layer_types=[MAMBA] * layers, bos_token_id=cfg.get("bos_token_id"),
                      eos_token_ids=[int(e) for e in (eos if isinstance(eos, list) else [eos] if eos is not None else [])])
    return _with_mamba(out, shape)


def _nemotron_h_kinds(cfg: dict[str, Any]) -> list[str]:
    """Nemotron-H's own names for its layers: ``hybrid_override_pattern`` (``M*-E``) or ``layers_block_type``."""
    kinds = cfg.get("layers_block_type") or cfg.get("hybrid_override_pattern")
    if not kinds or any(k not in _NEMOTRON_H_KINDS for k in kinds):
        raise ModelFormatError(f"config.json's hybrid_override_pattern / layers_block_type = {str(kinds)[:60]!r} must "
                               "name each layer M (Mamba-2), * (attention), - (MLP) or E (experts)")
    return list(kinds)


def _hf_nemotron_h(out: ModelConfig, cfg: dict[str, Any]) -> None:
    """Nemotron-H: Mamba-2, attention without rope, relu2 MLP and (Nemotron Nano) MoE layers.
    transformers clamps its prefill's dt at ``time_step_min``; so does cholla (GGUF files do not
    store it: llama.cpp clamps nothing)."""
    kinds = _nemotron_h_kinds(cfg)
    if cfg.get("mlp_bias"):
        raise ModelFormatError("Nemotron-H with mlp_bias is not supported yet")

    def get(key: str, default: Any = None) -> Any:  # older configs spell the Mamba keys mamba_*
        return cfg.get(key, cfg.get(_NEMOTRON_H_OLD_KEYS.get(key, key), default))

    out.layer_types = [_NEMOTRON_H_KINDS[k] for k in kinds]
    out.head_dim = int(cfg.get("head_dim") or cfg.get("attention_head_dim") or out.head_dim)
    out.rms_norm_eps = float(cfg.get("layer_norm_epsilon", 1e-5))
    out.hidden_act = cfg.get("mlp_hidden_act", "relu2")
    heads = int(cfg["mamba_num_heads"])
    shape = Mamba2Shape(out.hidden_size, heads, int(cfg["mamba_head_dim"]), int(cfg["ssm_state_size"]),
                        int(get("n_groups", 8)), int(get("conv_kernel", 4)), int(get("chunk_size", 128)),
                        out.rms_norm_eps, (float(get("time_step_min", 0.001)), math.inf),
                        bias=bool(cfg.get("use_bias", False)), conv_bias=bool(get("use_conv_bias", True)))
    moe_layers = [i for i, k in enumerate(kinds) if k in ("E", "moe")]
    if moe_layers:
        if cfg.get("moe_latent_size") is not None:
            raise ModelFormatError("Nemotron-H with moe_latent_size (latent expert projections) is not supported yet")
        out.moe = MoEConfig(int(cfg["n_routed_experts"]), int(cfg["num_experts_per_tok"]),
                            int(cfg["moe_intermediate_size"]), router="sigmoid_group_topk",
                            normalize=bool(cfg.get("norm_topk_prob", True)),
                            shared_intermediate_size=int(cfg.get("moe_shared_expert_intermediate_size") or 0),
                            gated=False, dense_layers=[i for i in range(out.num_layers) if i not in moe_layers],
                            num_groups=int(cfg.get("n_group") or 1), groups_used=int(cfg.get("topk_group") or 1),
                            routed_scale=float(cfg.get("routed_scaling_factor") or 1.0))
    _with_mamba(out, shape)


def _gguf_mamba(metadata: dict[str, Any], arch: str, get, tensor_names: set[str],
                shapes: dict[str, tuple[int, ...]]) -> ModelConfig:
    """mamba2 and nemotron_h(_moe) as llama.cpp's converter writes them. Each layer's kind comes
    from its tensors (the converter writes a dense Nemotron-H as nemotron_h_moe, with zero MLP widths)."""
    hidden, layers = int(get("embedding_length", required=True)), int(get("block_count", required=True))
    inner, heads = int(get("ssm.inner_size", required=True)), int(get("ssm.time_step_rank", required=True))
    eps = float(get("attention.layer_norm_rms_epsilon") or get("attention.layer_norm_epsilon") or 1e-5)
    if not 0 < heads <= inner or inner % heads:
        raise ModelFormatError(f"GGUF metadata {arch}.ssm.time_step_rank = {heads} heads do not divide "
                               f"{arch}.ssm.inner_size = {inner}; the file is corrupt")
    shape = Mamba2Shape(hidden, heads, inner // heads, int(get("ssm.state_size", required=True)),
                        int(get("ssm.group_count", 1)), int(get("ssm.conv_kernel", 4)),
                        256 if arch == "mamba2" else 128, eps, conv_bias="blk.0.ssm_conv1d.bias" in tensor_names)

    def kind(i: int) -> str:
        if f"blk.{i}.ssm_in.weight" in tensor_names:
            return MAMBA
        return FULL_ATTENTION if f"blk.{i}.attn_q.weight" in tensor_names else MLP_ONLY

    vocab = get("vocab_size") or len(metadata.get("tokenizer.ggml.tokens", []))
    eos = metadata.get("tokenizer.ggml.eos_token_id")
    kinds = [kind(i) for i in range(layers)]
    attention = arch != "mamba2" and FULL_ATTENTION in kinds
    kv_heads = get("attention.head_count_kv", 0)
    num_heads = int(get("attention.head_count", required=True)) if attention else heads
    head_dim = int(get("attention.key_length", hidden // max(num_heads, 1))) if attention else inner // heads
    widths = [shapes[f"blk.{i}.ffn_up.weight"][0] for i in range(layers) if f"blk.{i}.ffn_up.weight" in shapes]
    out = ModelConfig(
        architecture=GGUF_ARCH_TO_MODEL_TYPE[arch], vocab_size=int(vocab), hidden_size=hidden,
        intermediate_size=max(widths) if widths else inner, num_layers=layers, num_heads=num_heads,
        num_kv_heads=int(max(kv_heads) if isinstance(kv_heads, list) else kv_heads) if attention else num_heads,
        head_dim=head_dim, rms_norm_eps=eps, max_position_embeddings=int(get("context_length", 1 << 20)),
        tie_word_embeddings="output.weight" not in tensor_names, layer_types=kinds, hidden_act="relu2",
        bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"), eos_token_ids=[int(eos)] if eos is not None else [])
    moe_layers = [i for i in range(layers) if f"blk.{i}.ffn_gate_inp.weight" in tensor_names]
    if moe_layers:
        out.moe = MoEConfig(int(get("expert_count", required=True)), int(get("expert_used_count", required=True)),
                            int(get("expert_feed_forward_length", required=True)), router="sigmoid_group_topk",
                            normalize=bool(get("expert_weights_norm", True)),
                            shared_intermediate_size=int(get("expert_shared_feed_forward_length", 0)), gated=False,
                            dense_layers=[i for i in range(layers) if i not in moe_layers],
                            num_groups=int(get("expert_group_count", 1) or 1),
                            groups_used=int(get("expert_group_used_count", 1) or 1),
                            routed_scale=float(get("expert_weights_scale", 1.0) or 1.0))
    return _with_mamba(out, shape)
# -- Falcon-H1 and Granite 4 hybrid: Mamba-2 beside attention ---------------------------------------

# Falcon-H1's muP multipliers (config.json keys); each is 1 (or all 1s) when absent.
FALCON_H1_MULTIPLIERS = ("embedding_multiplier", "lm_head_multiplier", "mlp_multipliers", "key_multiplier",
                         "attention_in_multiplier", "attention_out_multiplier", "ssm_multipliers", "ssm_in_multiplier",
                         "ssm_out_multiplier")


def _falcon_h1_multipliers(cfg: dict[str, Any]) -> dict[str, Any]:
    """The multipliers config.json gives, checked: finite numbers, two for the MLP, five for the SSM."""
    out = {}
    for key in FALCON_H1_MULTIPLIERS:
        value = cfg.get(key)
        if value is None:
            continue
        count = {"mlp_multipliers": 2, "ssm_multipliers": 5}.get(key)
        values = value if count else [value]
        if (not isinstance(values, list) or len(values) != (count or 1)
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)):
            raise ModelFormatError(f"config.json's {key} = {str(value)[:60]!r} must be "
                                   + (f"a list of {count} numbers" if count else "a finite number"))
        out[key] = value
    return out


def _hf_mamba_keys(cfg: dict[str, Any], out: ModelConfig, inner: int | None, gated_norm: bool,
                   norm_before_gate: bool) -> Mamba2Shape:
    """The ``mamba_*`` keys Falcon-H1 and Granite 4 hybrid share (``mamba_d_head`` may be "auto")."""
    heads = int(cfg["mamba_n_heads"])
    inner = int(inner or int(cfg.get("mamba_expand") or 2) * out.hidden_size)
    head_dim = cfg.get("mamba_d_head")
    if head_dim in (None, "auto"):
        if not 0 < heads <= inner:
            raise ModelFormatError(f"config.json's mamba_n_heads = {heads} must be in [1, {inner}]")
        head_dim = inner // heads
    if heads * int(head_dim) != inner:
        raise ModelFormatError(f"config.json's mamba_n_heads = {heads} heads of mamba_d_head = {head_dim} are not "
                               f"the mixer's {inner} channels (mamba_d_ssm, or mamba_expand x hidden_size)")
    return Mamba2Shape(out.hidden_size, heads, int(head_dim), int(cfg["mamba_d_state"]), int(cfg.get("mamba_n_groups") or 1),
                       int(cfg.get("mamba_d_conv") or 4), int(cfg.get("mamba_chunk_size") or 256), out.rms_norm_eps,
                       _dt_limit(cfg.get("time_step_limit")), norm_before_gate, gated_norm,
                       bool(cfg.get("mamba_proj_bias", False)), bool(cfg.get("mamba_conv_bias", True)))


def _hf_hybrid(out: ModelConfig, cfg: dict[str, Any], model_type: str) -> None:
    """Falcon-H1 (attention and Mamba-2 side by side in every layer, muP multipliers) and
    Granite 4 hybrid (each layer either Mamba-2 or attention; Granite's multipliers)."""
    try:
        if model_type == "falcon_h1":
            if cfg.get("mlp_bias") or bool(cfg.get("projectors_bias")) != bool(cfg.get("mamba_proj_bias")):
                raise ModelFormatError("Falcon-H1 with mlp_bias, or with projectors_bias unlike mamba_proj_bias, "
                                       "is not supported")
            shape = _hf_mamba_keys(cfg, out, cfg.get("mamba_d_ssm"), bool(cfg.get("mamba_rms_norm")),
                                   bool(cfg.get("mamba_norm_before_gate", True)))
            out.multipliers = _falcon_h1_multipliers(cfg)
            out.layer_types = [FULL_ATTENTION] * out.num_layers
        else:
            shape = _hf_mamba_keys(cfg, out, None, True, False)
            kinds = cfg.get("layer_types") or ["mamba"] * out.num_layers
            out.layer_types = [MAMBA if kind in ("mamba", "linear_attention") else FULL_ATTENTION for kind in kinds]
            out.embed_scale = float(cfg.get("embedding_multiplier") or 1.0)
            out.residual_multiplier = float(cfg.get("residual_multiplier") or 1.0)
            out.logit_scale = 1.0 / float(cfg.get("logits_scaling") or 1.0)
            out.query_pre_attn_scalar = float(cfg.get("attention_multiplier") or 1.0) ** -2
            out.no_rope = cfg.get("position_embedding_type") != "rope"
            if cfg.get("num_local_experts"):
                out.moe = MoEConfig(int(cfg["num_local_experts"]), int(cfg["num_experts_per_tok"]), out.intermediate_size,
                                    router="topk_softmax", normalize=False,
                                    shared_intermediate_size=int(cfg.get("shared_intermediate_size") or 0))
            out.intermediate_size = int(cfg.get("shared_intermediate_size") or out.intermediate_size)
    except KeyError as e:
        raise ModelFormatError(f"config.json lacks {e.args[0]!r}, which {model_type} needs") from None
    except (TypeError, ValueError) as e:
        raise ModelFormatError(f"config.json's mamba_* or multiplier keys of {model_type} are malformed ({e})") from None
    _with_mamba(out, shape)
    if model_type == "falcon_h1":  # its attention layers run a mixer too
        out.state_shapes = [shape.state_shapes] * out.num_layers


def _gguf_hybrid(cfg: ModelConfig, arch: str, get, metadata: dict[str, Any], tensor_names: set[str]) -> None:
    """falcon-h1 and granitehybrid as llama.cpp's converter writes them: the ``ssm.*`` keys (a
    ``ssm_norm`` tensor says the mixer has its gated norm); a granitehybrid layer is recurrent
    where its KV head count is 0; Granite's scales."""
    inner, heads = int(get("ssm.inner_size", required=True)), int(get("ssm.time_step_rank", required=True))
    if not 0 < heads <= inner or inner % heads:
        raise ModelFormatError(f"GGUF metadata {arch}.ssm.time_step_rank = {heads} heads do not divide "
                               f"{arch}.ssm.inner_size = {inner}; the file is corrupt")
    shape = Mamba2Shape(cfg.hidden_size, heads, inner // heads, int(get("ssm.state_size", required=True)),
                        int(get("ssm.group_count", 1)), int(get("ssm.conv_kernel", 4)), norm_eps=cfg.rms_norm_eps,
                        gated_norm=any(name.endswith("ssm_norm.weight") for name in tensor_names),
                        conv_bias=any(name.endswith("ssm_conv1d.bias") for name in tensor_names))
    if arch == "falcon-h1":
        cfg.layer_types = [FULL_ATTENTION] * cfg.num_layers
        _with_mamba(cfg, shape)
        cfg.state_shapes = [shape.state_shapes] * cfg.num_layers
        return
    cfg.rope_interleaved = True  # the converter permutes q and k as for llama
    kv_heads = metadata.get(f"{arch}.attention.head_count_kv")
    kv_heads = kv_heads if isinstance(kv_heads, list) else [cfg.num_kv_heads] * cfg.num_layers
    cfg.layer_types = [MAMBA if not n else FULL_ATTENTION for n in kv_heads]
    cfg.no_rope = not get("rope.scaling.finetuned", True)
    cfg.embed_scale = float(get("embedding_scale", 1.0) or 1.0)
    cfg.residual_multiplier = float(get("residual_scale", 1.0) or 1.0)
    cfg.logit_scale = 1.0 / float(get("logit_scale", 1.0) or 1.0)
    if get("attention.scale"):
        cfg.query_pre_attn_scalar = float(get("attention.scale")) ** -2
    if get("expert_shared_feed_forward_length"):  # the width of the shared MLP, or of the only one
        cfg.intermediate_size = int(get("expert_shared_feed_forward_length"))
    _with_mamba(cfg, shape)
