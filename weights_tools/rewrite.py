"""Rewrite a checkpoint into a new directory, streaming: reshard, convert dtype, or (export.py) rename.

One writer serves them all: tensors go from the input files to the output shards chunk by chunk, so memory holds
one chunk (8 MiB), never a tensor or a shard. The output is built in a hidden folder next to OUT and renamed to
OUT only when complete; on any failure the folder is removed and OUT is left as it was. The input is only read.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from kimivl.checkpoint import (KEEP_FLOAT32, Layout, TensorInfo, TensorSource, parse_dtype, parse_size, read_chunks,
                               read_layout, write_shards)
from kimivl.errors import InputError
from kimivl.fsutil import clean_stale, copy_checkpoint_files, publish_dir, staging_name

from .verify import all_finite

WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.pt", "*.pth")
DTYPE_CHOICES = ("bfloat16", "float16", "float32")


def reshard(src: str | os.PathLike, out: str | os.PathLike, max_shard_size: int | str, force: bool = False,
            progress: bool = False) -> Path:
    """Copy checkpoint src to out with its tensors regrouped into shards of at most max_shard_size, bit for bit."""
    return rewrite(src, out, max_shard_size=max_shard_size, force=force, progress=progress)


def convert(src: str | os.PathLike, out: str | os.PathLike, dtype: str | torch.dtype,
            max_shard_size: int | str = "5GB", force: bool = False, progress: bool = False) -> Path:
    """Copy checkpoint src to out with every tensor cast to dtype (router correction biases stay float32) and
    config.json's torch_dtype updated."""
    return rewrite(src, out, max_shard_size=max_shard_size, dtype=dtype, force=force, progress=progress)


def rewrite(src: str | os.PathLike, out: str | os.PathLike, max_shard_size: int | str = "5GB",
            dtype: str | torch.dtype | None = None, force: bool = False, progress: bool = False) -> Path:
    """Reshard and/or convert: the input must be a checkpoint kimivl loads (CheckpointError listing every problem
    otherwise)."""
    target = parse_dtype(dtype) if dtype is not None else None
    if target is not None and str(target).removeprefix("torch.") not in DTYPE_CHOICES:
        raise InputError(f"convert to one of {', '.join(DTYPE_CHOICES)}, got {dtype!r}")
    out = check_output(src, out, force)
    layout = read_layout(src)
    layout.raise_problems("cannot be rewritten")
    tensors = {name: (name, _out_dtype(name, layout.info(name), target)) for name in layout.expected}
    config = None
    if target is not None:
        config = json.loads((layout.path / "config.json").read_text(encoding="utf-8"))
        name = str(target).removeprefix("torch.")
        for part in (config, config.get("vision_config"), config.get("text_config")):
            if isinstance(part, dict):
                part["torch_dtype"] = name
                if "dtype" in part:
                    part["dtype"] = name
    return write_checkpoint(layout, out, tensors, max_shard_size, config=config, progress=progress)


def _out_dtype(name: str, info: TensorInfo, target: torch.dtype | None) -> torch.dtype:
    # a compressed checkpoint's integer words and shapes, and its scales, stay as stored
    if target is None or not info.dtype.is_floating_point or name.endswith("weight_scale"):
        return info.dtype
    return torch.float32 if name.endswith(KEEP_FLOAT32) else target


def check_output(src: str | os.PathLike, out: str | os.PathLike, force: bool) -> Path:
    """OUT as an absolute path (a symlink is not followed: with force the link itself is replaced), refused when it
    is, contains or lies inside the input; when it exists, unless force; with force, unless it is a symlink, an
    empty folder or a checkpoint (has config.json), so that --force never deletes an unrelated folder or file."""
    real_src, real_out = Path(src).resolve(), Path(out).resolve()
    if real_out == real_src or real_src in real_out.parents or real_out in real_src.parents:
        raise InputError(f"output {out} is, contains or lies inside the input {real_src}; write to another directory")
    out = Path(out).absolute()
    if os.path.lexists(out):
        if not force:
            raise InputError(f"output {out} already exists; pass --force to replace it")
        if not (out.is_symlink() or out.is_dir() and (not any(out.iterdir()) or (out / "config.json").is_file())):
            raise InputError(f"output {out} exists and is not a checkpoint (no config.json) nor an empty folder; "
                             "--force only replaces those: choose another output, or remove it yourself")
    if not out.parent.is_dir():
        raise InputError(f"the folder {out.parent} to hold the output does not exist; create it first")
    return out


def write_checkpoint(layout: Layout, out: Path, tensors: dict[str, tuple[str, torch.dtype]],
                     max_shard_size: int | str, config: dict | None = None, skip: tuple[str, ...] = (),
                     progress: bool = False) -> Path:
    """Write a checkpoint directory at out (checked by check_output), streamed from layout's files.

    tensors: output name -> (input name, output dtype), in output order. config: written as config.json, or None
    to copy the input's. Every other top-level file of the input that is not a weight file is copied, except those
    matching a pattern in skip and symlinks that lead out of the input folder (copy_checkpoint_files). The output
    replaces OUT in one atomic swap (publish_dir); what a killed earlier run left beside OUT is removed first.
    """
    max_bytes = parse_size(max_shard_size)
    total = sum(layout.info(src).numel * dt.itemsize for src, dt in tensors.values())
    clean_stale(out)
    stage = staging_name(out)
    stage.mkdir()
    try:
        with tqdm(total=total, unit="B", unit_scale=True, desc=out.name, disable=not progress) as bar:
            write_shards(stage, {k: TensorSource(dt, layout.info(src).shape, _chunks(layout, src, dt, bar))
                                 for k, (src, dt) in tensors.items()}, max_bytes)
        if config is not None:
            (stage / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        copy_checkpoint_files(layout.path, stage, [
            f.name for f in sorted(layout.path.iterdir())
            if not (config is not None and f.name == "config.json")
            and not any(fnmatch.fnmatch(f.name, p) for p in WEIGHT_PATTERNS + skip)])
        publish_dir(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return out


def _chunks(layout: Layout, src: str, dtype: torch.dtype, bar: tqdm) -> Iterator[torch.Tensor]:
    """The input tensor src as dtype, chunk by chunk; a cast that overflows the new dtype is an error."""
    file = layout.file(src)
    for chunk in read_chunks(file, layout.info(src)):
        if chunk.dtype != dtype:
            cast = chunk.to(dtype)
            overflow = 0 if all_finite(cast) else int((torch.isinf(cast) & torch.isfinite(chunk)).sum())
            if overflow:
                name = str(dtype).removeprefix("torch.")
                raise InputError(f"{src} in {file.name}: {overflow} values overflow {name} (largest |x| = "
                                 f"{chunk.abs().max().item():.4g}); choose a wider dtype")
            chunk = cast
        bar.update(chunk.numel() * chunk.element_size())
        yield chunk
