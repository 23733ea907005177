"""passes."""

from .smooth import (SMOOTHED_KEY, NormReport, SmoothingResult, SmoothReport, apply_smoothing, plan_smoothing,  # noqa: F401
                     smoothed_layernorms)
