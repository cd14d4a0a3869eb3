"""QA-LoRA layers: the frozen int4 base and the base plus a pooled adapter."""

from qalora_tune.modules.int4_linear import Int4Linear
from qalora_tune.modules.qalora_linear import POOLINGS, QALoRALinear

__all__ = ["POOLINGS", "Int4Linear", "QALoRALinear"]
