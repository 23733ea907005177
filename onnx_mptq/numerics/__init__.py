"""numerics."""

from .conv import ConvGeometry, im2col
from .metrics import (MetricAccumulator, MetricSummary, cosine, kl_softmax, softmax, sqnr_db,
                      top1_agreement, topk_accuracy)
from .quant import (UniformParams, container_dtype, dequantize, dequantized_bounds, fake_quant,
                    minmax_params, params_from_range, percentile_params, qrange, quantize,
                    weight_params)
from .search import (LinearObjective, OperandObjective, output_error, search_activation_scale,
                     search_matmul_operand_scale, search_weight_scales)
from .smoothing import (Conditioning, conditioning, fold_layernorm, fold_linear, shift_vector,
                        shifted_absmax, smoothing_factors, weight_absmax_rows)
from .twin import (TwinParams, fixed_ratio_twin, search_twin, search_twin_operand, twin_dequantize,
                   twin_fake_quant, twin_quantize, twin_region_params)

__all__ = [
    "Conditioning", "ConvGeometry", "LinearObjective", "MetricAccumulator", "MetricSummary", "OperandObjective",
    "TwinParams", "UniformParams", "conditioning", "container_dtype", "cosine", "dequantize",
    "dequantized_bounds", "fake_quant", "fixed_ratio_twin", "fold_layernorm", "fold_linear", "im2col",
    "kl_softmax", "minmax_params", "output_error", "params_from_range", "percentile_params",
    "qrange", "quantize", "search_activation_scale", "search_matmul_operand_scale", "search_twin",
    "search_twin_operand", "search_weight_scales", "shift_vector", "shifted_absmax",
    "smoothing_factors", "softmax", "sqnr_db", "top1_agreement", "topk_accuracy", "twin_dequantize",
    "twin_fake_quant", "twin_quantize", "twin_region_params", "weight_absmax_rows", "weight_params",
]
