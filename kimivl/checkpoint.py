"""Checkpoint I/O in the official layout, and the one place where parameter names are mapped.

The model holds each MoE layer's routed experts stacked (`mlp.experts.gate_up_proj` [E, 2I, H],
`mlp.experts.down_proj` [E, H, I]); the files hold them per expert (`mlp.experts.{e}.gate_proj.weight` ...). Every
other name is the same on both sides. Only safetensors and JSON are read: nothing is ever unpickled.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import KimiVLConfig
from .errors import CheckpointError, KimiVLError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
Index = tuple[int, ...] | tuple[int, slice]


# ---- name mapping ---------------------------------------------------------------------------------------------
def official_parts(name: str, shape: torch.Size | tuple[int, ...]) -> Iterator[tuple[str, Index]]:
    """The official tensors that make up model parameter `name`: (official name, index into the parameter)."""
    if name.endswith(".experts.gate_up_proj"):
        prefix, inter = name[: -len(".gate_up_proj")], shape[1] // 2
        for e in range(shape[0]):
            yield f"{prefix}.{e}.gate_proj.weight", (e, slice(0, inter))
            yield f"{prefix}.{e}.up_proj.weight", (e, slice(inter, 2 * inter))
    elif name.endswith(".experts.down_proj"):
        prefix = name[: -len(".down_proj")]
        for e in range(shape[0]):
            yield f"{prefix}.{e}.down_proj.weight", (e,)
    else:
        yield name, ()


def to_official(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Model state dict -> official names (per-expert tensors are views into the stacked ones)."""
    return {off: t[idx] for name, t in state_dict.items() for off, idx in official_parts(name, t.shape)}


def expected_tensors(config: KimiVLConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape an official checkpoint of this config holds, in module order."""
    with torch.device("meta"):
        from .model import KimiVLForConditionalGeneration
        model = KimiVLForConditionalGeneration(config)
    return {k: tuple(v.shape) for k, v in to_official(model.state_dict()).items()}


# ---- loading ----------------------------------------------------------------------------------------------------
def load(path: str | os.PathLike, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu"):
    """Read config.json and the safetensors weights of a checkpoint directory into a new model.

    The model is built on the meta device and materialised straight from the files. Every problem (missing,
    unexpected, misshapen, duplicated tensors; unreadable shards) is collected and raised as one CheckpointError.
    dtype (a torch.dtype or its name) None means float32 on CPU (where bfloat16 matmuls are very slow) and the
    config's torch_dtype elsewhere.
    """
    from .model import KimiVLForConditionalGeneration

    path, device = Path(path), torch.device(device)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory" if not path.exists() else
                              f"{path} is a file; from_pretrained takes the checkpoint directory")
    try:
        config = KimiVLConfig.from_json(path / "config.json")
    except KimiVLError as e:
        raise CheckpointError(str(e)) from None
    if dtype is None:
        dtype = torch.float32 if device.type == "cpu" else _dtype(config.torch_dtype or "bfloat16")
    elif isinstance(dtype, str):
        dtype = _dtype(dtype)
    if not dtype.is_floating_point:
        raise CheckpointError(f"dtype must be a floating-point type, got {dtype}")

    with torch.device("meta"):
        model = KimiVLForConditionalGeneration(config)
    params = dict(model.state_dict())
    expected = {off: (name, idx) for name, t in params.items() for off, idx in official_parts(name, t.shape)}
    handles = open_shards(path)
    try:
        where, problems = locate_tensors(path, handles, expected, params)
        if problems:
            raise CheckpointError(f"checkpoint {path} does not match its config.json ({len(problems)} problems):\n  "
                                  + "\n  ".join(problems))
        state = {name: torch.empty(t.shape, dtype=dtype, device=device) for name, t in params.items()}
        for off, (name, idx) in expected.items():
            state[name][idx].copy_(handles[where[off]].get_tensor(off))
    finally:
        handles.clear()  # safe_open handles close when dropped
    model.load_state_dict(state, assign=True, strict=True)
    return model.eval()


def open_shards(path: Path) -> dict[str, object]:
    """Open every safetensors file the checkpoint names (via its index, or the single model.safetensors)."""
    index_file, single = path / INDEX_NAME, path / SINGLE_NAME
    if index_file.exists():
        files = sorted(set(read_index(index_file).values()))
    elif single.exists():
        files = [SINGLE_NAME]
    else:
        found = sorted(p.name for p in path.glob("*.safetensors"))
        raise CheckpointError(f"{path}: neither {INDEX_NAME} nor {SINGLE_NAME} found"
                              + (f" (safetensors files present: {', '.join(found)})" if found else ""))
    handles, problems = {}, []
    for f in files:
        try:
            handles[f] = safe_open(path / f, framework="pt")
        except FileNotFoundError:
            problems.append(f"{f}: named in {INDEX_NAME} but missing")
        except (SafetensorError, OSError, ValueError) as e:
            problems.append(f"{f}: not a readable safetensors file (truncated or corrupt?): {e}")
    if problems:
        raise CheckpointError(f"checkpoint {path}:\n  " + "\n  ".join(problems))
    return handles


def read_index(index_file: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_file}: not a valid safetensors index (needs a 'weight_map' object): {e!r}") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_file}: 'weight_map' must map tensor names to file names")
    return weight_map


def locate_tensors(path: Path, handles: dict, expected: dict[str, tuple[str, Index]],
                   params: dict[str, torch.Tensor]) -> tuple[dict[str, str], list[str]]:
    """Map each official tensor to the file holding it, and list every mismatch with the expected layout."""
    where, problems = {}, []
    for f, h in handles.items():
        for key in h.keys():
            if key in where:
                problems.append(f"{key}: stored twice, in {where[key]} and {f}")
                continue
            where[key] = f
            if key not in expected:
                problems.append(f"{key} in {f}: unexpected tensor (not part of this config's model)")
                continue
            name, idx = expected[key]
            want = tuple(params[name][idx].shape)
            info = h.get_slice(key)
            got = tuple(info.get_shape())
            if got != want:
                problems.append(f"{key} in {f}: shape {list(got)}, expected {list(want)}")
            if info.get_dtype() not in _FLOAT_DTYPES:
                problems.append(f"{key} in {f}: dtype {info.get_dtype()}, expected a floating-point type")
    index_file = path / INDEX_NAME
    indexed = read_index(index_file) if index_file.exists() else {}
    for key, f in indexed.items():
        if key in where and where[key] != f:
            problems.append(f"{key}: {INDEX_NAME} says {f} but it is stored in {where[key]}")
    problems += [f"{key}: missing" + (f" ({INDEX_NAME} says {indexed[key]}, which does not hold it)"
                                      if key in indexed else "") for key in expected if key not in where]
    return where, problems


# ---- saving -----------------------------------------------------------------------------------------------------
def save(model, path: str | os.PathLike, max_shard_size: int | str = "5GB") -> None:
    """Write config.json and the weights under their official names, sharded with an index when they exceed
    max_shard_size.

    Every file is written under a temporary name, then renamed into place: weights, then the index naming them,
    then config.json; weight files of an earlier save that this one does not use are removed last. An interrupted
    save thus leaves either the earlier checkpoint or the new one for the loader to find.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = to_official(model.state_dict())
    sizes = {k: t.numel() * t.element_size() for k, t in tensors.items()}
    shards = plan_shards(sizes, parse_size(max_shard_size))
    names = [SINGLE_NAME] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    staged = []
    for name, keys in zip(names, shards):  # one shard in memory at a time (the clones unshare expert slices)
        save_file({k: tensors[k].detach().to("cpu").clone() for k in keys}, _staging(path, name, staged),
                  metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())},
                 "weight_map": {k: n for n, keys in zip(names, shards) for k in keys}}
        _staging(path, INDEX_NAME, staged).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    config = copy.deepcopy(model.config)
    config.torch_dtype = config.vision_config.torch_dtype = config.text_config.torch_dtype = \
        str(model.dtype).removeprefix("torch.")
    config.to_json(_staging(path, "config.json", staged))
    for name, tmp in staged:
        os.chmod(tmp, 0o644)
        os.replace(tmp, path / name)
    keep = {name for name, _ in staged}
    for stale in [*path.glob("model*.safetensors"), path / INDEX_NAME]:
        if stale.name not in keep:
            stale.unlink(missing_ok=True)


def _staging(path: Path, name: str, staged: list[tuple[str, Path]]) -> Path:
    tmp = path / f".{name}.tmp"
    staged.append((name, tmp))
    return tmp


def plan_shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Greedy split of tensors (kept in order) into shards of at most max_bytes (a larger tensor gets its own)."""
    shards, current, used = [], [], 0
    for key, n in sizes.items():
        if current and used + n > max_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(key)
        used += n
    return shards + [current] if current else shards


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like "5GB" (10^9), "500MiB" (2^20), "2e6"."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?)(i?)B?\s*", str(size), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read a size from {size!r}; use bytes or e.g. '2GB', '500MB', '1GiB'")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** "_KMGT".index(m.group(2).upper() or "_"))


_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):
        raise CheckpointError(f"unknown dtype {name!r}; use e.g. 'float32' or 'bfloat16'")
    return dt
