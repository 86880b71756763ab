"""Exception types: one per family, so callers can catch what they can act on."""


class KimiVLError(Exception):
    """Base class of every error kimivl raises on purpose."""


class ConfigError(KimiVLError, ValueError):
    """A config.json or config object is malformed or inconsistent."""


class CheckpointError(KimiVLError):
    """A checkpoint directory is missing, incomplete, corrupt or does not match its config."""


class InputError(KimiVLError, ValueError):
    """Arguments or inputs (ids, images, grids, dtypes, sizes) are invalid or inconsistent."""


class TrainingError(KimiVLError):
    """A training run cannot go on (its loss or gradients stopped being finite)."""
