"""QA-LoRA layers: the frozen int4 base and the base plus a pooled adapter; the tied output."""

from qalora_tune.modules.int4_linear import Int4Linear
from qalora_tune.modules.qalora_linear import QALoRALinear
from qalora_tune.modules.tied_linear import FoldedTiedLinear

__all__ = ["FoldedTiedLinear", "Int4Linear", "QALoRALinear"]
