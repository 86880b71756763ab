"""The evaluation package's error types (both are KimiVLError, so the CLI reports them as one line)."""

from __future__ import annotations

from ..errors import InputError, KimiVLError


class DataError(InputError):
    """A benchmark file or sample is malformed: a missing column, an undecodable image, an empty file."""


class EvalError(KimiVLError):
    """An evaluation run cannot proceed: unknown metric or model, an output directory of another run."""
