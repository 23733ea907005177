"""search."""

from .scales import layer_output_errors, search_scales

__all__ = ["layer_output_errors", "search_scales"]
