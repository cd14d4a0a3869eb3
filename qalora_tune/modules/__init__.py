"""QA-LoRA layers: the frozen quantized base, and the base plus a pooled adapter; the tied output."""

from qalora_tune.modules.config import POOLINGS, QALoRAConfig
from qalora_tune.modules.qalora_linear import QALoRALinear
from qalora_tune.modules.tied_linear import FoldedTiedLinear
from qalora_tune.modules.quantized_linear import Int4Linear, QuantizedLinear

__all__ = ["POOLINGS", "FoldedTiedLinear", "Int4Linear", "QALoRAConfig", "QALoRALinear", "QuantizedLinear"]
