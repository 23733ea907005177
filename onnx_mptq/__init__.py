"""onnx-mptq: mixed-precision post-training quantization of vision transformers in ONNX."""

from .config import Config
from .errors import MptqError

__version__ = "0.1.0"

__all__ = ["Config", "MptqError", "__version__"]
