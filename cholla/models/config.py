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
    ``linear`` or ``llama3`` with its factors). ``freq_factors`` is llama.cpp's
    ``rope_freqs.weight`` (per-frequency divisors), the GGUF form of Llama 3 scaling.
    """

    theta: float = 10000.0
    scaling: dict[str, Any] | None = None
    freq_factors: list[float] | None = None


@dataclass
class MoEConfig:
    """A mixture-of-experts MLP (``layers/moe.py``). ``router``: ``softmax_topk``
    (Mixtral, Qwen-MoE, OLMoE), ``topk_softmax`` (GPT-OSS) or ``sigmoid_group_topk``
    (DeepSeek-V3). ``dense_layers`` keep a plain MLP of ``ModelConfig.intermediate_size``."""

    num_experts: int
    top_k: int
    intermediate_size: int
    router: str = "softmax_topk"
    normalize: bool = True
    shared_intermediate_size: int = 0
    shared_expert_gate: bool = False  # Qwen2/3-MoE family: the shared expert scaled by sigmoid(a learned row . x)
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
    # Hybrid models: per layer, the float32 state tensors one sequence keeps (conv state, recurrent
    # state), each given by its shape without the slot axis; () for a layer without state. Empty: none.
    # A layer may have both (Falcon-H1 runs attention and Mamba-2 side by side).
    state_shapes: list[tuple[tuple[int, ...], ...]] = field(default_factory=list)
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


def _gemma3_layer_types(num_layers: int, pattern: int = 6) -> list[str]:
    return [SLIDING_ATTENTION if (i + 1) % pattern else FULL_ATTENTION for i in range(num_layers)]


# llama.cpp folds these HF model types into the "llama" GGUF architecture.
GGUF_ARCH_TO_MODEL_TYPE = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3",
                           "lfm2": "lfm2", "qwen3moe": "qwen3_moe", "olmoe": "olmoe", "gpt-oss": "gpt_oss", "deepseek2": "deepseek_v3",
                           "qwen3next": "qwen3_next", "qwen35": "qwen3_5", "qwen35moe": "qwen3_5_moe"}
DELTANET_GGUF_ARCHS = ("qwen3next", "qwen35", "qwen35moe")
# HF model types of the Gated DeltaNet hybrids -> our architecture name (Qwen 3.5's text towers).
DELTANET_MODEL_TYPES = {"qwen3_next": "qwen3_next", "qwen3_5": "qwen3_5", "qwen3_5_text": "qwen3_5",
                        "qwen3_5_moe": "qwen3_5_moe", "qwen3_5_moe_text": "qwen3_5_moe"}


def config_from_gguf(metadata: dict[str, Any], tensor_names: set[str]) -> ModelConfig:
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
    cfg = ModelConfig(
        architecture=model_type,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length", required=True)),
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
    if arch == "lfm2":
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
    return cfg


def _hf_rope(params: dict[str, Any] | None, theta: float | None, default_theta: float) -> RopeConfig:
    params = dict(params or {})
    theta = float(params.pop("rope_theta", theta if theta is not None else default_theta))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3", "yarn"):
        raise ModelFormatError(f"rope_type {rope_type!r} is not supported yet (default, linear, llama3, yarn are)")
    params["rope_type"] = rope_type
    return RopeConfig(theta=theta, scaling=None if rope_type == "default" else params)


def config_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    """Map a Hugging Face ``config.json`` (transformers 4.x or 5.x spelling)."""
    model_type = cfg.get("model_type", "")
    if model_type in ("qwen3_5", "qwen3_5_moe") and "text_config" in cfg:  # multimodal wrapper: the text tower
        text = cfg["text_config"]
        cfg = {**text, "tie_word_embeddings": cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))}
    model_type = DELTANET_MODEL_TYPES.get(model_type, model_type)
    if model_type == "lfm2" and "intermediate_size" not in cfg:  # its older spelling
        cfg = {**cfg, "intermediate_size": cfg.get("block_ff_dim")}
    if model_type == "gemma3" and "text_config" in cfg:  # multimodal wrapper: take the text tower
        cfg = {**cfg["text_config"], "model_type": "gemma3"}
    if model_type == "gemma3_text":
        model_type = "gemma3"
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
    is_gemma3 = model_type == "gemma3"
    if is_gemma3 and rope_params and "full_attention" in rope_params:
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
        rope=_hf_rope(global_params, cfg.get("rope_theta"), 1_000_000.0 if is_gemma3 else 10000.0),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", is_gemma3)),
        attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
        qk_norm=model_type in ("qwen3", "gemma3"),
        hidden_act=cfg.get("hidden_act") or cfg.get("hidden_activation") or "silu",
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=[int(e) for e in eos_ids],
    )
    if model_type in ("mistral", "qwen2", "qwen3") and cfg.get("sliding_window") and cfg.get("use_sliding_window", model_type == "mistral"):
        out.sliding_window = int(cfg["sliding_window"])
        out.layer_types = [SLIDING_ATTENTION] * num_layers
    if is_gemma3:
        out.hidden_act = cfg.get("hidden_activation") or "gelu_pytorch_tanh"
        out.layer_types = cfg.get("layer_types") or _gemma3_layer_types(num_layers, cfg.get("sliding_window_pattern", 6))
        out.sliding_window = int(cfg.get("sliding_window") or 4096)
        out.local_rope = _hf_rope(local_params, cfg.get("rope_local_base_freq"), 10000.0)
        out.query_pre_attn_scalar = float(cfg.get("query_pre_attn_scalar", 256))
        out.embed_scale = math.sqrt(hidden)
        out.final_logit_softcapping = cfg.get("final_logit_softcapping")
        out.attn_logit_softcapping = cfg.get("attn_logit_softcapping")
    if model_type in DELTANET_MODEL_TYPES.values():
        try:
            _hf_deltanet(out, cfg, model_type)
        except KeyError as e:
            raise ModelFormatError(f"config.json lacks {e.args[0]!r}, which {model_type} needs") from None
    if model_type == "lfm2":
        _hf_lfm2(out, cfg)
    if model_type in ("qwen3_moe", "mixtral", "olmoe", "gpt_oss", "deepseek_v3", "glm4_moe_lite"):
        try:
            _hf_moe(out, cfg, model_type)
        except KeyError as e:
            raise ModelFormatError(f"config.json lacks {e.args[0]!r}, which {model_type} needs") from None
    return out


# -- hybrid models ----------------------------------------------------------------------------


def _lfm2_layers(out: ModelConfig, layer_types: list[str], kernel: int) -> None:
    """LFM2's layer kinds; a convolution layer keeps its last ``kernel - 1`` inputs per sequence."""
    if not 2 <= kernel <= 64:
        raise ModelFormatError(f"LFM2's short convolution has {kernel} taps; a model has 2 to 64 (conv_L_cache)")
    out.layer_types = layer_types
    out.short_conv_kernel = kernel
    out.state_shapes = [((out.hidden_size, kernel - 1),) if kind == SHORT_CONV else () for kind in layer_types]


def _hf_lfm2(out: ModelConfig, cfg: dict[str, Any]) -> None:
    """LFM2's config.json: its own norm and tie keys, and the MLP width it derives from ``block_ff_dim``
    (two thirds, times the multiplier, rounded up to ``block_multiple_of``), as transformers does."""
    if cfg.get("conv_bias"):
        raise ModelFormatError("LFM2 with conv_bias is not supported (no released LFM2 model uses it)")
    out.rms_norm_eps = float(cfg.get("norm_eps", 1e-5))
    out.tie_word_embeddings = bool(cfg.get("tie_word_embeddings", cfg.get("tie_embedding", True)))
    out.qk_norm = True
    if "rope_theta" not in cfg and not (cfg.get("rope_parameters") or {}).get("rope_theta"):
        out.rope.theta = 1_000_000.0
    if cfg.get("block_auto_adjust_ff_dim", True):
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
    elif arch == "deepseek2":
        _gguf_mla(cfg, get, num_experts, top_k, size, dense)
    elif arch in ("qwen3next", "qwen35moe"):
        cfg.moe = MoEConfig(num_experts, top_k, size, normalize=True, dense_layers=dense, shared_expert_gate=True,
                            shared_intermediate_size=int(get("expert_shared_feed_forward_length", 0)))
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
