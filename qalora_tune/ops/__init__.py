"""Custom ops (``torch.library``) behind QA-LoRA's forward and backward."""

from qalora_tune.ops import base_linear as _base_linear  # noqa: F401  (F.linear of the bases)
from qalora_tune.ops.int4_dq_linear import int4_dq_linear
from qalora_tune.ops.int4_linear import int4_linear, int4_linear_grad_input
from qalora_tune.ops.intx_linear import intx_linear, intx_linear_grad_input
from qalora_tune.ops.pooled_lora import pool_groups, pooled_lora

__all__ = [
    "int4_dq_linear",
    "int4_linear",
    "int4_linear_grad_input",
    "intx_linear",
    "intx_linear_grad_input",
    "pool_groups",
    "pooled_lora",
]
