"""passes."""

from .smooth import SMOOTHED_KEY, NormReport, SmoothReport, apply_smoothing, plan_smoothing, smoothed_layernorms  # noqa: F401
