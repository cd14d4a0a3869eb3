"""QA-LoRA layers."""

from qalora_tune.modules.qalora_linear import QALoRALinear

__all__ = ["QALoRALinear"]
