"""kimivl: a small, fast, hackable PyTorch implementation of the Kimi-VL vision-language models."""

from .cache import MLACache
from .config import KimiVLConfig, TextConfig, VisionConfig
from .errors import CheckpointError, ConfigError, InputError, KimiVLError, TrainingError
from .generation import GenerationConfig, GenerationStats, generate, stream
from .model import KimiVLForConditionalGeneration, KimiVLOutput
from .processing import KimiVLImageProcessor, KimiVLProcessor
from .tokenizer import KimiTokenizer, split_thinking

__all__ = [
    "KimiVLConfig", "TextConfig", "VisionConfig",
    "KimiVLForConditionalGeneration", "KimiVLOutput", "MLACache",
    "KimiVLImageProcessor", "KimiTokenizer", "KimiVLProcessor", "split_thinking",
    "GenerationConfig", "GenerationStats", "generate", "stream",
    "KimiVLError", "ConfigError", "CheckpointError", "InputError", "TrainingError",
]
