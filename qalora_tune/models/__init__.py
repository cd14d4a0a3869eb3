"""QA-LoRA model builders (torchtune style: one component builder, size-fixing model builders)."""

from qalora_tune.models._knobs import CALIBRATED_QUANTIZERS
from qalora_tune.models._component_builders import (
    ATTENTION_PROJECTIONS,
    MLP_PROJECTIONS,
    count_parameters,
    qalora_transformer,
    tensor_nbytes,
)
from qalora_tune.models._model_builders import (
    qalora_llama2_13b,
    qalora_llama2_70b,
    qalora_llama2_7b,
    qalora_llama3_1_70b,
    qalora_llama3_1_8b,
    qalora_llama3_2_1b,
    qalora_llama3_2_3b,
    qalora_mistral_7b,
    qalora_qwen2_5_0_5b,
    qalora_qwen2_5_14b,
    qalora_qwen2_5_1_5b,
    qalora_qwen2_5_7b,
    qalora_stories260k,
    qalora_tiny_llama,
    qalora_tinystories656k,
    tied_llama,
)

__all__ = [
    "ATTENTION_PROJECTIONS",
    "CALIBRATED_QUANTIZERS",
    "MLP_PROJECTIONS",
    "count_parameters",
    "qalora_llama2_13b",
    "qalora_llama2_70b",
    "qalora_llama2_7b",
    "qalora_llama3_1_70b",
    "qalora_llama3_1_8b",
    "qalora_llama3_2_1b",
    "qalora_llama3_2_3b",
    "qalora_mistral_7b",
    "qalora_qwen2_5_0_5b",
    "qalora_qwen2_5_14b",
    "qalora_qwen2_5_1_5b",
    "qalora_qwen2_5_7b",
    "qalora_stories260k",
    "qalora_tiny_llama",
    "qalora_tinystories656k",
    "qalora_transformer",
    "tensor_nbytes",
    "tied_llama",
]
