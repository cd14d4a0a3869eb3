"""qalora-tune: QA-LoRA fine-tuning for torchtune on torchao int4 bases.

Importing the package registers the ``qalora_tune::*`` custom ops and the ``F.linear`` of
its base tensor classes (:mod:`qalora_tune.ops`). Architecture: ``docs/design.md`` §1.
"""

from qalora_tune._version import __version__
from qalora_tune.errors import UserError
from qalora_tune.modules import Int4Linear, QALoRAConfig, QALoRALinear, QuantizedLinear
from qalora_tune.ops import int4_linear, pool_groups, pooled_lora
from qalora_tune.quantization import (
    CpuInt4Tensor,
    DoubleQuantInt4Tensor,
    GroupQuantizedWeight,
    IntxBaseTensor,
    TileInt4Tensor,
    quantize_hqq,
    quantize_rtn,
    to_base,
)
from qalora_tune.tasks import load_merged  # a merged model, with model.load_task

__all__ = [
    "__version__",
    "CpuInt4Tensor",
    "DoubleQuantInt4Tensor",
    "GroupQuantizedWeight",
    "Int4Linear",
    "IntxBaseTensor",
    "QALoRAConfig",
    "QALoRALinear",
    "QuantizedLinear",
    "TileInt4Tensor",
    "UserError",
    "int4_linear",
    "load_merged",
    "pool_groups",
    "pooled_lora",
    "quantize_hqq",
    "quantize_rtn",
    "to_base",
]
