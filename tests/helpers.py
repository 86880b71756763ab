"""Small input builders shared by tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kimivl.checkpoint import INDEX_NAME


def image_batch(grids: list[tuple[int, int]], patch: int = 14, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random packed pixel_values [sum h*w, 3, p, p] and image_grid_hws [N, 2] for the given patch grids."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(h * w for h, w in grids)
    return torch.randn(n, 3, patch, patch, generator=gen), torch.tensor(grids)


def prompt_with_images(config, grids: list[tuple[int, int]], text_len: int = 6, seed: int = 0) -> torch.Tensor:
    """Token ids [1, T]: random text with each image's (h*w)/4 placeholders in the middle of a text run."""
    gen = torch.Generator().manual_seed(seed)
    pad = config.media_placeholder_token_id
    parts = [torch.randint(0, 1000, (text_len,), generator=gen)]
    for h, w in grids:
        parts += [torch.full((h * w // 4,), pad), torch.randint(0, 1000, (text_len,), generator=gen)]
    return torch.cat(parts)[None]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def shard_of(ckpt: Path, key: str) -> Path:
    """The weight file a sharded checkpoint's index names for tensor `key`."""
    return ckpt / json.loads((ckpt / INDEX_NAME).read_text())["weight_map"][key]


def edit_shard(file: Path, edit) -> None:
    """Rewrite a safetensors file after edit(tensors) changed its dict of tensors in place."""
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def store_twice(ckpt: Path, key: str) -> Path:
    """Copy tensor `key` into a second shard of a two-shard checkpoint (a corruption); returns that shard."""
    first, second = sorted(ckpt.glob("model-*.safetensors"))
    other = second if shard_of(ckpt, key) == first else first
    value = load_file(shard_of(ckpt, key))[key]
    edit_shard(other, lambda t: t.update({key: value}))
    return other
