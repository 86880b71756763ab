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
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import KimiVLConfig
from .errors import CheckpointError, InputError, KimiVLError

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
KEEP_FLOAT32 = (".e_score_correction_bias",)  # router biases stay float32 whatever the model dtype, as in DeepSeek-V3


def load(path: str | os.PathLike, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu"):
    """Read config.json and the safetensors weights of a checkpoint directory into a new model.

    The model is built on the meta device and materialised straight from the files. Every problem (unreadable or
    missing files, missing, unexpected, misshapen or duplicated tensors) is collected and raised as one
    CheckpointError. dtype (a torch.dtype or its name) None means float32 on CPU (where bfloat16 matmuls are very
    slow) and the config's torch_dtype elsewhere; router correction biases are always kept in float32.
    """
    from .model import KimiVLForConditionalGeneration

    path, device = Path(path), _device(device)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory" if not path.exists() else
                              f"{path} is a file; from_pretrained takes the checkpoint directory")
    try:
        config = KimiVLConfig.from_json(path / "config.json")
    except KimiVLError as e:
        raise CheckpointError(str(e)) from None
    dtype = _dtype(dtype) if dtype is not None else (
        torch.float32 if device.type == "cpu" else _dtype(config.torch_dtype or "bfloat16"))

    with torch.device("meta"):
        model = KimiVLForConditionalGeneration(config)
    params = dict(model.state_dict())
    expected = {off: (name, idx) for name, t in params.items() for off, idx in official_parts(name, t.shape)}
    index, files = find_shards(path)
    handles, problems = open_shards(path, files)
    where, tensor_problems = locate_tensors(handles, expected, params, index)
    problems += tensor_problems
    if problems:
        raise CheckpointError(f"checkpoint {path} cannot be loaded ({len(problems)} problems):\n  "
                              + "\n  ".join(problems))
    state = {name: torch.empty(t.shape, dtype=torch.float32 if name.endswith(KEEP_FLOAT32) else dtype, device=device)
             for name, t in params.items()}
    for off, (name, idx) in expected.items():
        state[name][idx].copy_(handles[where[off]].get_tensor(off))
    model.load_state_dict(state, assign=True, strict=True)
    return model.eval()


def find_shards(path: Path) -> tuple[dict[str, str] | None, list[str]]:
    """(the index's weight_map or None, the weight files to open): via the index, else the single file."""
    index_file, single = path / INDEX_NAME, path / SINGLE_NAME
    if index_file.exists():
        index = read_index(index_file)
        return index, sorted(set(index.values()))
    if single.exists():
        return None, [SINGLE_NAME]
    found = sorted(p.name for p in path.glob("*.safetensors"))
    raise CheckpointError(f"{path}: neither {INDEX_NAME} nor {SINGLE_NAME} found"
                          + (f" (safetensors files present: {', '.join(found)})" if found else ""))


def read_index(index_file: Path) -> dict[str, str]:
    """The weight_map of a safetensors index; its file names must be plain names inside the checkpoint directory."""
    try:
        weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
    except OSError as e:
        raise CheckpointError(f"{index_file}: cannot read it ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_file}: not a valid safetensors index (needs a 'weight_map' object): {e!r}") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_file}: 'weight_map' must map tensor names to file names")
    outside = sorted({f for f in weight_map.values() if Path(f).name != f or f in (".", "..")})
    if outside:
        raise CheckpointError(f"{index_file}: file names must be plain names inside the checkpoint directory, got "
                              + ", ".join(map(repr, outside)))
    return weight_map


def open_shards(path: Path, files: list[str]) -> tuple[dict[str, object], list[str]]:
    """safetensors handles for the files that open, and a problem line for each that does not."""
    handles, problems = {}, []
    for f in files:
        file = path / f
        if not file.is_file():
            problems.append(f"{f}: missing" + (f" (named in {INDEX_NAME})" if f != SINGLE_NAME else ""))
        elif not os.access(file, os.R_OK):
            problems.append(f"{f}: permission denied")
        else:
            try:
                handles[f] = safe_open(file, framework="pt")
            except (SafetensorError, OSError, ValueError) as e:
                problems.append(f"{f}: not a readable safetensors file (truncated or corrupt?): {e}")
    return handles, problems


def locate_tensors(handles: dict, expected: dict[str, tuple[str, Index]], params: dict[str, torch.Tensor],
                   index: dict[str, str] | None) -> tuple[dict[str, str], list[str]]:
    """Map each official tensor to the file holding it, and list every mismatch with the expected layout.

    Tensors the index places in a file that could not be opened are not reported again as missing.
    """
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
    index = index or {}
    for key, f in index.items():
        if f not in handles:
            continue
        if key not in where:
            problems.append(f"{key}: missing ({INDEX_NAME} says {f}, which does not hold it)")
        elif where[key] != f:
            problems.append(f"{key}: {INDEX_NAME} says {f} but it is stored in {where[key]}")
    problems += [f"{key}: missing" for key in expected if key not in where and key not in index]
    return where, problems


# ---- saving -----------------------------------------------------------------------------------------------------
def save(model, path: str | os.PathLike, max_shard_size: int | str = "5GB") -> None:
    """Write config.json and the weights under their official names, sharded with an index when they exceed
    max_shard_size.

    Everything is first written to a staging folder inside `path`. Publishing removes the old entry point (index or
    single file) first and puts the new one in place last, so an interrupted save never leaves a directory that
    loads as a mix of two models: it loads the old one, the new one, or fails with a clear error. Weight files of
    the previous checkpoint that the new one does not use are then removed; other files are left alone.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = to_official(model.state_dict())
    sizes = {k: t.numel() * t.element_size() for k, t in tensors.items()}
    shards = plan_shards(sizes, parse_size(max_shard_size))
    names = [SINGLE_NAME] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    entry = SINGLE_NAME if len(shards) == 1 else INDEX_NAME
    previous = _weight_files(path)
    stage = Path(tempfile.mkdtemp(prefix=".kimivl-save-", dir=path))
    try:
        for name, keys in zip(names, shards):  # one shard in memory at a time (the clones unshare expert slices)
            save_file({k: tensors[k].detach().to("cpu").clone() for k in keys}, stage / name,
                      metadata={"format": "pt"})
        if entry == INDEX_NAME:
            index = {"metadata": {"total_size": sum(sizes.values())},
                     "weight_map": {k: n for n, keys in zip(names, shards) for k in keys}}
            (stage / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        config = copy.deepcopy(model.config)
        config.torch_dtype = config.vision_config.torch_dtype = config.text_config.torch_dtype = \
            str(model.dtype).removeprefix("torch.")
        config.to_json(stage / "config.json")
        for f in stage.iterdir():
            os.chmod(f, 0o644)
        for old_entry in (INDEX_NAME, SINGLE_NAME):
            (path / old_entry).unlink(missing_ok=True)
        for name in ["config.json", *(n for n in names if n != entry), entry]:
            os.replace(stage / name, path / name)
        for stale in previous - set(names):
            (path / stale).unlink(missing_ok=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _weight_files(path: Path) -> set[str]:
    """The weight files of the checkpoint currently in `path` (those its index names, or the single file)."""
    files = {SINGLE_NAME} if (path / SINGLE_NAME).exists() else set()
    if (path / INDEX_NAME).exists():
        try:
            files |= set(read_index(path / INDEX_NAME).values())
        except CheckpointError:
            pass  # an unreadable old index names nothing we may safely delete
    return files


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
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?)(i?)B?\s*", str(size), flags=re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise InputError(f"cannot read a size from {size!r}; use bytes or e.g. '2GB', '500MB', '1GiB'")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** "_KMGT".index(m.group(2).upper() or "_"))


_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def _dtype(value: torch.dtype | str) -> torch.dtype:
    dt = value if isinstance(value, torch.dtype) else getattr(torch, str(value).removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise InputError(f"dtype must be a floating-point torch dtype or its name (e.g. 'float32', 'bfloat16'), "
                         f"got {value!r}")
    return dt


def _device(value: str | torch.device) -> torch.device:
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"device {value!r} is not a torch device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {value!r} asked for, but CUDA is not available on this machine")
    return device
