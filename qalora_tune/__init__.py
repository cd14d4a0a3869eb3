"""qalora-tune: QA-LoRA fine-tuning for torchtune on torchao int4 bases.

Importing the package registers the ``qalora_tune::*`` custom ops and the device/dtype
moves of torchao's int4 weights.
"""

from qalora_tune.checkpointing import load_merged
from qalora_tune.modules import Int4Linear, QALoRALinear
from qalora_tune.ops import int4_linear, pool_groups, pooled_lora
from qalora_tune.quantization import (
    GroupQuantizedWeight,
    dequantize_int4,
    from_torchao_int4,
    quantize_hqq,
    quantize_rtn,
    to_torchao_int4,
)

__version__ = "0.1.0"

__all__ = [
    "GroupQuantizedWeight",
    "Int4Linear",
    "QALoRALinear",
    "dequantize_int4",
    "from_torchao_int4",
    "int4_linear",
    "load_merged",
    "pool_groups",
    "pooled_lora",
    "quantize_hqq",
    "quantize_rtn",
    "to_torchao_int4",
]
