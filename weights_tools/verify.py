"""Check a checkpoint against its config without loading it: every problem found, each naming file and tensor."""

from __future__ import annotations

import json
import os

import torch
from tqdm import tqdm

from kimivl.checkpoint import INDEX_NAME, SINGLE_NAME, Layout, read_chunks, read_layout
from kimivl.errors import CheckpointError


def verify(path: str | os.PathLike, scan: bool = False, progress: bool = False) -> list[str]:
    """The problems of checkpoint `path` (empty when it is sound), from config.json and the shard headers.

    Checked: every tensor the config implies is present with its shape and the config's torch_dtype (router
    correction biases may be float32), nothing unexpected, no tensor stored twice, the index and the files agree
    (and its total_size with the tensors), every file is a complete safetensors file, no stray safetensors file
    lies beside them. scan also reads all the data (chunk by chunk) for NaN and Inf.
    """
    try:
        layout = read_layout(path, check_dtypes=True)
    except CheckpointError as e:
        return [str(e)]
    problems = layout.problems + file_problems(layout)
    if scan:
        total = sum(info.nbytes for tensors in layout.headers.values() for info in tensors.values())
        with tqdm(total=total, unit="B", unit_scale=True, desc="scan", disable=not progress) as bar:
            for f, tensors in layout.headers.items():
                for name, info in tensors.items():
                    nan = inf = 0
                    for chunk in read_chunks(layout.path / f, info):
                        if not all_finite(chunk):
                            nan += int(torch.isnan(chunk).sum())
                            inf += int(torch.isinf(chunk).sum())
                        bar.update(chunk.numel() * chunk.element_size())
                    if nan or inf:
                        problems.append(f"{name} in {f}: {nan} NaN and {inf} Inf values of {info.numel}")
    return problems


def file_problems(layout: Layout) -> list[str]:
    """What loaders do not check: the index's metadata.total_size (when present, and every file's header read)
    against the tensors' bytes, and safetensors files in the directory that are not part of the checkpoint."""
    problems, used, why = [], {SINGLE_NAME}, f"only {SINGLE_NAME} is read (there is no {INDEX_NAME})"
    if layout.index is not None:
        used, why = set(layout.index.values()), f"{INDEX_NAME} does not list it"
        metadata = json.loads((layout.path / INDEX_NAME).read_text(encoding="utf-8")).get("metadata")
        total = metadata.get("total_size") if isinstance(metadata, dict) else None
        actual = sum(info.nbytes for tensors in layout.headers.values() for info in tensors.values())
        if total is not None and set(layout.headers) == used and total != actual:
            problems.append(f"{INDEX_NAME}: metadata.total_size is {total!r}, but the tensors hold {actual} bytes")
    stray = sorted(p.name for p in layout.path.glob("*.safetensors") if p.is_file() and p.name not in used)
    return problems + [f"{f}: not part of the checkpoint, {why}; remove it if it is left over" for f in stray]


def all_finite(x: torch.Tensor) -> bool:
    """No NaN or Inf in x, decided by the float32 sum when it is finite: any NaN or Inf makes it non-finite, and
    it costs a fraction of elementwise tests on bfloat16 (a non-finite sum of finite values falls back to them)."""
    if not x.dtype.is_floating_point:
        return True
    return bool(torch.isfinite(x.float().sum())) or bool(torch.isfinite(x).all())
