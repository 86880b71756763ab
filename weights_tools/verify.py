"""Check a checkpoint against its config without loading it: every problem found, each naming file and tensor."""

from __future__ import annotations

import os

import torch
from tqdm import tqdm

from kimivl.checkpoint import read_chunks, read_layout
from kimivl.errors import CheckpointError


def verify(path: str | os.PathLike, scan: bool = False, progress: bool = False) -> list[str]:
    """The problems of checkpoint `path` (empty when it is sound), from config.json and the shard headers.

    Checked: every tensor the config implies is present with its shape and the config's torch_dtype (router
    correction biases may be float32), nothing unexpected, no tensor stored twice, the index and the files agree,
    every file is a complete safetensors file. scan also reads all the data (chunk by chunk) for NaN and Inf.
    """
    try:
        layout = read_layout(path, check_dtypes=True)
    except CheckpointError as e:
        return [str(e)]
    problems = list(layout.problems)
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


def all_finite(x: torch.Tensor) -> bool:
    """No NaN or Inf in x, decided by the float32 sum when it is finite: any NaN or Inf makes it non-finite, and
    it costs a fraction of elementwise tests on bfloat16 (a non-finite sum of finite values falls back to them)."""
    if not x.dtype.is_floating_point:
        return True
    return bool(torch.isfinite(x.float().sum())) or bool(torch.isfinite(x).all())
