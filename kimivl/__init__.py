"""kimivl: a small, fast, hackable PyTorch implementation of the Kimi-VL vision-language models."""

from .config import KimiVLConfig, TextConfig, VisionConfig
from .errors import CheckpointError, ConfigError, InputError, KimiVLError
from .model import KimiVLForConditionalGeneration, KimiVLOutput

__all__ = [
    "KimiVLConfig", "TextConfig", "VisionConfig",
    "KimiVLForConditionalGeneration", "KimiVLOutput",
    "KimiVLError", "ConfigError", "CheckpointError", "InputError",
]
