"""The frozen base: group-wise quantization and its torchao tensor subclasses.

- :class:`GroupQuantizedWeight`: plain codes, scales and float zero points
  (``W = (q - mid) * scale + zero``), made by the quantizers :func:`quantize_rtn`,
  :func:`quantize_hqq` and :func:`quantize_gptq` (:func:`calibrate_gptq` for a model).
- The storages, each a torchao tensor subclass with ``from_hp``, ``dequantize``,
  ``to_quantized`` and a writable ``zero_points()`` view (all a merge changes), whose
  ``F.linear`` runs a custom op with an input gradient (:mod:`qalora_tune.ops`):
  :class:`CpuInt4Tensor` (CPU int4 kernel), :class:`TileInt4Tensor` (CUDA tinygemm),
  :class:`DoubleQuantInt4Tensor` (either, with 8-bit scales) and :class:`IntxBaseTensor`
  (8-bit codes or group sizes without an int4 kernel, dequantizing).
- :func:`to_base` stores a :class:`GroupQuantizedWeight` in the class its bits, group size
  and device select; :func:`as_base` turns torchao's own classes into these.

The layouts, conversions and serialized forms live in the submodules
(``int4_weight``, ``intx_weight``, ``double_quant``, ``plain_int4``, ...).
"""

from qalora_tune.quantization.base_weight import as_base, is_quantized_base, to_base
from qalora_tune.quantization.double_quant import DoubleQuantInt4Tensor
from qalora_tune.quantization.gptq import quantize_gptq
from qalora_tune.quantization.gptq_calibration import calibrate_gptq
from qalora_tune.quantization.group_quant import (
    CALIBRATED_QUANTIZERS,
    QUANTIZERS,
    SUPPORTED_BITS,
    GroupQuantizedWeight,
    get_quantizer,
    quantize_hqq,
    quantize_rtn,
)
from qalora_tune.quantization.int4_weight import (
    INT4_KERNEL_GROUP_SIZES,
    CpuInt4Tensor,
    TileInt4Tensor,
)
from qalora_tune.quantization.intx_weight import IntxBaseTensor

__all__ = [
    "CALIBRATED_QUANTIZERS",
    "CpuInt4Tensor",
    "DoubleQuantInt4Tensor",
    "GroupQuantizedWeight",
    "INT4_KERNEL_GROUP_SIZES",
    "IntxBaseTensor",
    "QUANTIZERS",
    "SUPPORTED_BITS",
    "TileInt4Tensor",
    "as_base",
    "calibrate_gptq",
    "get_quantizer",
    "is_quantized_base",
    "quantize_gptq",
    "quantize_hqq",
    "quantize_rtn",
    "to_base",
]
