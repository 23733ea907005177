"""Exception hierarchy.

Every error a user can cause derives from :class:`MptqError`; the CLI prints its message on one
line and exits with status 2. Anything else escaping is a bug (exit 1).
"""

from __future__ import annotations


class MptqError(Exception):
    """Base class of every user-facing error (bad input, unsupported model, bad config)."""

    exit_code = 2

    def __str__(self) -> str:  # one line of bounded length, always
        return clip(" ".join(super().__str__().split()), MESSAGE_LIMIT)


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


QUOTE_LIMIT = 120  # characters of a value an error message quotes
MESSAGE_LIMIT = 600  # characters of any error message


def quote(value: object, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)`` shortened to about ``limit`` characters (head ... tail): what a message
    quotes of a user's value, so a plan with a thousand scales does not become the message."""
    return clip(repr(value), limit)


def clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    keep = max(limit - 24, 8)
    head, tail = text[: keep * 2 // 3], text[-(keep - keep * 2 // 3):]
    return f"{head} ...[{len(text) - len(head) - len(tail)} chars]... {tail}"
