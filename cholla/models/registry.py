"""Architecture name (HF ``model_type``, GGUF ``general.architecture``) -> model class."""

from __future__ import annotations

from torch import nn

from cholla.errors import UnsupportedArchitectureError
from cholla.models.deepseek_v3 import DeepseekV3ForCausalLM
from cholla.models.falcon_h1 import FalconH1ForCausalLM
from cholla.models.gemma3 import Gemma3ForCausalLM
from cholla.models.gemma4 import Gemma4ForCausalLM
from cholla.models.gpt_oss import GptOssForCausalLM
from cholla.models.granitemoehybrid import GraniteMoeHybridForCausalLM
from cholla.models.lfm2 import Lfm2ForCausalLM
from cholla.models.llama import LlamaForCausalLM
from cholla.models.mamba2 import Mamba2ForCausalLM
from cholla.models.mixtral import MixtralForCausalLM
from cholla.models.nemotron_h import NemotronHForCausalLM
from cholla.models.olmoe import OlmoeForCausalLM
from cholla.models.qwen3_moe import Qwen3MoeForCausalLM
from cholla.models.qwen3_next import Qwen3NextForCausalLM

MODELS: dict[str, type[nn.Module]] = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "qwen3": LlamaForCausalLM,
    "gemma3": Gemma3ForCausalLM,
    "gemma4": Gemma4ForCausalLM,
    "qwen3_moe": Qwen3MoeForCausalLM,
    "mixtral": MixtralForCausalLM,
    "olmoe": OlmoeForCausalLM,
    "gpt_oss": GptOssForCausalLM,
    "deepseek_v3": DeepseekV3ForCausalLM,
    "glm4_moe_lite": DeepseekV3ForCausalLM,
    "qwen3_next": Qwen3NextForCausalLM,
    "qwen3_5": Qwen3NextForCausalLM,
    "qwen3_5_moe": Qwen3NextForCausalLM,
    "lfm2": Lfm2ForCausalLM,
    "lfm2_moe": Lfm2ForCausalLM,
    "mamba2": Mamba2ForCausalLM,
    "nemotron_h": NemotronHForCausalLM,
    "falcon_h1": FalconH1ForCausalLM,
    "granitemoehybrid": GraniteMoeHybridForCausalLM,
}


def model_class(architecture: str) -> type[nn.Module]:
    if architecture not in MODELS:
        raise UnsupportedArchitectureError(
            f"architecture {architecture!r} is not supported; cholla runs: {', '.join(sorted(MODELS))}"
        )
    return MODELS[architecture]
