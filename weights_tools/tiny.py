"""Tiny random checkpoints in the official format, for tests and demos."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from kimivl import InputError, KimiVLConfig, KimiVLForConditionalGeneration
from kimivl.model import init_weights

from .tiny_tokenizer import write_tokenizer

# The published Kimi-VL-A3B-Instruct preprocessor settings (spec 6); image_mean/std are read from the checkpoint.
PREPROCESSOR_CONFIG = {
    "image_processor_type": "KimiVLImageProcessor",
    "processor_class": "KimiVLProcessor",
    "patch_size": 14,
    "in_token_limit": 4096,
    "pad_input": True,
    "merge_kernel_size": [2, 2],
    "num_pooled_tokens": 1024,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
}


def make_tiny(out: str | os.PathLike, preset: str = "tiny", seed: int = 0, shards: int = 2, force: bool = False
              ) -> KimiVLForConditionalGeneration:
    """Write a random `preset` model to `out` as an official checkpoint split into about `shards` files, with the
    preprocessor settings and tokenizer files (a small BPE vocabulary, Kimi special tokens, chat template).

    Every parameter is random (norm weights near 1, biases and router correction biases non-zero) so that tests
    see a wrong layout or a dropped term. Returns the model (float32). `out` must be new or empty unless `force`
    (then files of the same names are replaced and others kept).
    """
    if Path(out).exists() and not Path(out).is_dir():
        raise InputError(f"{out} exists and is not a directory")
    if Path(out).is_dir() and any(Path(out).iterdir()) and not force:
        raise InputError(f"{out} is not empty: make-tiny writes into a new or empty folder (--force to write into "
                         "it anyway)")
    if shards < 1:
        raise InputError(f"shards must be >= 1, got {shards}")
    config = KimiVLConfig.preset(preset)
    model = KimiVLForConditionalGeneration(config)
    init_weights(model, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    total = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    write_checkpoint(model, out, max_shard_size=total // shards + 1)
    return model


def write_checkpoint(model: KimiVLForConditionalGeneration, out: str | os.PathLike, corpus: str | None = None,
                     max_shard_size: int | str = "5GB") -> None:
    """`model` as an official checkpoint directory: weights and config, the published preprocessor settings and a
    small BPE tokenizer learnt from `corpus` (default: the built-in English sample) sized to the model's vocabulary."""
    model.save_pretrained(out, max_shard_size=max_shard_size)
    (Path(out) / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2) + "\n")
    write_tokenizer(out, model.config.text_config.vocab_size, corpus)
