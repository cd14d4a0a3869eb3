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
    "QUANTIZERS",
    "SUPPORTED_BITS",
    "calibrate_gptq",
    "dequantize_int4",
    "empty_int4",
    "from_plain_int4",
    "from_torchao_int4",
    "get_quantizer",
    "is_int4_weight",
    "is_plain_int4",
    "load_quantized_base",
    "plain_int4_bytes",
    "quantize_gptq",
    "quantize_hqq",
    "quantize_rtn",
    "sample_calibration_sequences",
    "to_plain_int4",
    "to_torchao_int4",
    "validate_group_size",
    "zero_points",
]
