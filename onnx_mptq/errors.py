"""Exception hierarchy.

Every error a user can cause derives from :class:`MptqError`; the CLI prints its message on one
line and exits with status 2. Anything else escaping is a bug (exit 1).
"""

from __future__ import annotations


class MptqError(Exception):
    """Base class of every user-facing error (bad input, unsupported model, bad config)."""

    exit_code = 2

    def __str__(self) -> str:  # one line, always
        return " ".join(super().__str__().split())


class ConfigError(MptqError):
    """A configuration value is unknown or out of range."""


class ModelLoadError(MptqError):
    """A model file is missing, unreadable, corrupt or fails preflight."""


class UnsupportedModelError(MptqError):
    """The graph is not a transformer this tool understands, or uses something unsupported."""


class DataError(MptqError):
    """Calibration or evaluation data is missing, malformed, or does not fit the model."""


class CalibrationError(MptqError):
    """Calibration could not produce usable statistics."""


class PlanError(MptqError):
    """A plan is malformed, of an unknown version, or made for another model."""


class OutputError(MptqError):
    """An output file cannot be written (permissions, a folder in the way, disk full)."""


class ProviderError(MptqError):
    """A requested ONNX Runtime execution provider cannot be used."""


class ExportError(MptqError):
    """Exporting a timm model to ONNX failed or did not match torch."""
