"""Group-wise quantization of the frozen base and its torchao int4 storage."""

from qalora_tune.quantization.group_quant import (
    CALIBRATED_QUANTIZERS,
    GroupQuantizedWeight,
    QUANTIZERS,
    SUPPORTED_BITS,
    get_quantizer,
    quantize_hqq,
    quantize_rtn,
    validate_group_size,
)
from qalora_tune.quantization.gptq import HessianAccumulator, quantize_gptq
from qalora_tune.quantization.gptq_calibration import (
    calibrate_gptq,
    load_quantized_base,
    sample_calibration_sequences,
)
from qalora_tune.quantization.int4_weight import (
    INT4_KERNEL_GROUP_SIZES,
    Int4Weight,
    dequantize_int4,
    empty_int4,
    from_torchao_int4,
    is_int4_weight,
    to_torchao_int4,
    zero_points,
)
from qalora_tune.quantization.intx_weight import (
    IntxWeight,
    empty_intx,
    from_torchao_intx,
    intx_bits,
    is_intx_weight,
    to_torchao_intx,
)
from qalora_tune.quantization.base_weight import (
    dequantize_base,
    empty_base,
    from_torchao_base,
    is_quantized_base,
    shift_zero_points_,
    stored_zero_points,
    to_torchao_base,
    uses_int4_kernel,
)
from qalora_tune.quantization.plain_int4 import (
    from_plain_int4,
    is_plain_int4,
    plain_int4_bytes,
    to_plain_int4,
)

__all__ = [
    "CALIBRATED_QUANTIZERS",
    "GroupQuantizedWeight",
    "HessianAccumulator",
    "INT4_KERNEL_GROUP_SIZES",
    "Int4Weight",
    "IntxWeight",
    "QUANTIZERS",
    "SUPPORTED_BITS",
    "calibrate_gptq",
    "dequantize_base",
    "dequantize_int4",
    "empty_base",
    "empty_int4",
    "empty_intx",
    "from_plain_int4",
    "from_torchao_base",
    "from_torchao_int4",
    "from_torchao_intx",
    "get_quantizer",
    "intx_bits",
    "is_int4_weight",
    "is_intx_weight",
    "is_plain_int4",
    "is_quantized_base",
    "load_quantized_base",
    "plain_int4_bytes",
    "quantize_gptq",
    "quantize_hqq",
    "quantize_rtn",
    "sample_calibration_sequences",
    "shift_zero_points_",
    "stored_zero_points",
    "to_plain_int4",
    "to_torchao_base",
    "to_torchao_int4",
    "to_torchao_intx",
    "uses_int4_kernel",
    "validate_group_size",
    "zero_points",
]
