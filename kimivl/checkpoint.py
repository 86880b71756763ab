"""Checkpoint I/O in the official layout, and the one place where parameter names are mapped.

The model holds each MoE layer's routed experts stacked (`mlp.experts.gate_up_proj` [E, 2I, H],
`mlp.experts.down_proj` [E, H, I]); the files hold them per expert (`mlp.experts.{e}.gate_proj.weight` ...). Every
other name is the same on both sides. Only safetensors and JSON are read: nothing is ever unpickled.

Safetensors files are read and written here directly (an 8-byte little-endian header length, a JSON header of
dtype / shape / data offsets, then the raw bytes), so that headers can be checked without touching the data and
tensors can be streamed chunk by chunk: the checkpoint tools rewrite a 32 GB checkpoint in bounded memory.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm import tqdm

from .config import KimiVLConfig
from . import fsutil
from .errors import CheckpointError, InputError, KimiVLError
from .generation import GENERATION_CONFIG_NAME, CheckpointGeneration
from .quant import (HELD_FLOAT, INT8_ROWS, TARGET, QuantWeight, Scheme, compressed_shapes, dequantize, fill_rows,
                    put_rows, quantize_modules, round_trip, scheme_of, unpack_int32)
from .kernels.quant import in_layout

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
Index = tuple[int, ...] | tuple[int, slice]
MAX_LISTED = 20  # problems shown in one error message


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
    """Every tensor name and shape an official checkpoint of this config holds, in module order (a compressed-tensors
    checkpoint holds each quantized weight as its packed parts: `quant.compressed_shapes`)."""
    with torch.device("meta"):
        from .model import KimiVLForConditionalGeneration
        model = KimiVLForConditionalGeneration(config)
    dense = {off: _indexed_shape(tuple(t.shape), idx) for name, t in model.state_dict().items()
             for off, idx in official_parts(name, t.shape)}
    scheme = scheme_of(config)
    if scheme is None:
        return dense
    out = {}
    for name, shape in dense.items():
        parts = compressed_shapes(name, shape, scheme) if TARGET.fullmatch(name) else {name: (shape, None)}
        out.update({k: shp for k, (shp, _) in parts.items()})
    return out


def _indexed_shape(shape: tuple[int, ...], idx: Index) -> tuple[int, ...]:
    """The shape of `tensor[idx]` (worked out, since indexing thousands of meta tensors takes seconds)."""
    kept = [len(range(n)[i]) for n, i in zip(shape, idx) if isinstance(i, slice)]
    return (*kept, *shape[len(idx):])


# ---- safetensors files: headers, and data in bounded memory -----------------------------------------------------
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
          "I16": torch.int16, "I8": torch.int8, "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16,
          "U8": torch.uint8, "BOOL": torch.bool}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
CHUNK_BYTES = 8 * 2 ** 20


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file as its header describes it: where its bytes are, not the bytes."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(file: Path) -> dict[str, TensorInfo]:
    """The tensors of a safetensors file, from its header alone, checked against each other and the file size.

    Raises CheckpointError naming the file (and the tensor, when one entry is at fault) if it is not a valid file.
    """
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{file.name}: not a readable safetensors file (truncated or corrupt?): {why}")

    size = file.stat().st_size
    with open(file, "rb") as f:
        if size < 8:
            raise bad(f"the file has {size} bytes, fewer than the 8 of the header length")
        n = int.from_bytes(f.read(8), "little")
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise bad(f"the header length field says {n} bytes, but the file has {size}")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise bad(f"the header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    header.pop("__metadata__", None)
    data_start, tensors = 8 + n, {}
    for name, entry in header.items():
        if isinstance(entry, dict) and isinstance(entry.get("dtype"), str) and entry["dtype"] not in DTYPES:
            raise CheckpointError(f"unsupported dtype {entry['dtype']} for tensor {name} in {file.name} (kimivl "
                                  f"reads {', '.join(DTYPES)}; convert the checkpoint to one of them)")
        try:
            dtype, shape, (begin, end) = DTYPES[entry["dtype"]], tuple(entry["shape"]), entry["data_offsets"]
            valid = all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (*shape, begin, end))
        except (KeyError, TypeError, ValueError):
            valid = False
        if not valid:
            raise bad(f"tensor {name}: malformed header entry {entry!r}")
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise bad(f"tensor {name}: data_offsets span {end - begin} bytes, but {entry['dtype']} "
                      f"{list(shape)} needs {math.prod(shape) * dtype.itemsize}")
        tensors[name] = TensorInfo(dtype, shape, data_start + begin, data_start + end)
    pos = data_start
    for name, info in sorted(tensors.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if info.start != pos:
            raise bad(f"tensor {name}: data starts at byte {info.start - data_start} of the data, expected "
                      f"{pos - data_start} (overlapping or gapped data_offsets)")
        if info.end > size:
            raise bad(f"tensor {name}: data ends {info.end - size} bytes past the end of the file")
        pos = info.end
    if pos != size:
        raise bad(f"{size - pos} bytes after the last tensor's data")
    return tensors


def read_chunks(file: Path, info: TensorInfo, chunk_bytes: int = CHUNK_BYTES) -> Iterator[torch.Tensor]:
    """A tensor's elements in order, as 1-D tensors of at most chunk_bytes each: memory holds one chunk."""
    step = max(1, chunk_bytes // info.dtype.itemsize) * info.dtype.itemsize
    with open(file, "rb") as f:
        f.seek(info.start)
        for pos in range(info.start, info.end, step):
            buf = torch.empty(min(step, info.end - pos), dtype=torch.uint8)
            _read_into(f, buf, file)
            yield buf.view(info.dtype)


def read_tensor(file: Path, info: TensorInfo) -> torch.Tensor:
    """One whole tensor, read with plain file reads (no memory map stays behind)."""
    buf = torch.empty(info.nbytes, dtype=torch.uint8)
    with open(file, "rb") as f:
        f.seek(info.start)
        _read_into(f, buf, file)
    return buf.view(info.dtype).reshape(info.shape)


def copy_tensor(file: Path, info: TensorInfo, out: torch.Tensor, chunk_bytes: int = CHUNK_BYTES) -> None:
    """Copy one tensor of a file into `out` (its shape, any dtype, any device). A contiguous `out` needs no second
    whole copy in memory: the bytes are read straight into it when it is a CPU tensor of the file's dtype, else
    converted chunk by chunk (`read_chunks`); a non-contiguous view is filled from a whole temporary."""
    if not out.is_contiguous():
        out.copy_(read_tensor(file, info))
    elif out.dtype == info.dtype and out.device.type == "cpu":
        with open(file, "rb") as f:
            f.seek(info.start)
            _read_into(f, out.view(-1).view(torch.uint8), file)
    else:
        flat, pos = out.view(-1), 0
        for chunk in read_chunks(file, info, chunk_bytes):
            flat[pos:pos + chunk.numel()].copy_(chunk)
            pos += chunk.numel()


def _read_into(f, buf: torch.Tensor, file: Path) -> None:
    view, done = memoryview(buf.numpy()), 0
    while done < len(view):
        got = f.readinto(view[done:])
        if not got:
            raise CheckpointError(f"{file.name}: ended while reading tensor data (was it changed or truncated "
                                  "while being read?)")
        done += got


class TensorSource(NamedTuple):
    """A tensor to write, given as its dtype, shape and its elements in order as chunks of any shape."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    chunks: Iterable[torch.Tensor]


def write_safetensors(file: Path, tensors: dict[str, torch.Tensor | TensorSource],
                      metadata: dict[str, str] | None = None) -> int:
    """Write a safetensors file tensor by tensor; returns its size in bytes.

    The header is built from dtypes and shapes first, then each tensor's data is written as it arrives, so memory
    holds one chunk (a TensorSource) or nothing beyond the tensors passed in: no copy of the whole file is made.
    Tensors are laid out by decreasing element size (in the given order otherwise), as safetensors' save_file does,
    so every tensor starts at a multiple of its element size and loads without a misaligned view.
    """
    sources = {k: TensorSource(v.dtype, tuple(v.shape), [v]) if isinstance(v, torch.Tensor) else v
               for k, v in sorted(tensors.items(), key=lambda kv: -kv[1].dtype.itemsize)}
    header, pos = {"__metadata__": metadata or {"format": "pt"}}, 0
    for name, src in sources.items():
        n = math.prod(src.shape) * src.dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[src.dtype], "shape": list(src.shape), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(file, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, src in sources.items():
            written = 0
            for chunk in src.chunks:
                if chunk.dtype != src.dtype:
                    raise InputError(f"{file.name}: {name} is declared {src.dtype} but a chunk is {chunk.dtype}")
                data = chunk.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
                f.write(data)
                written += data.nbytes
            if written != header[name]["data_offsets"][1] - header[name]["data_offsets"][0]:
                raise InputError(f"{file.name}: {name} got {written} bytes of data for {src.dtype} {list(src.shape)}")
    return 8 + len(raw) + pos


# ---- reading a checkpoint directory -----------------------------------------------------------------------------
KEEP_FLOAT32 = (".e_score_correction_bias",)  # router biases stay float32 whatever the model dtype, as in DeepSeek-V3
# Stored in the published Kimi-VL shards (27 float32 [32] tensors) but no parameter: the rotary frequencies, which the
# model recomputes. Accepted and ignored by loading, verify and inspect, as the published modeling code does; the
# rewriting tools do not carry them over.
IGNORED = re.compile(r"language_model\.model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


@dataclass
class Layout:
    """A checkpoint directory as its config and shard headers describe it (no tensor data is read)."""

    path: Path
    config: KimiVLConfig
    index: dict[str, str] | None  # the index's weight_map, or None for a single model.safetensors
    headers: dict[str, dict[str, TensorInfo]]  # each readable weight file -> its tensors
    where: dict[str, str]  # each tensor found -> the file holding it
    expected: dict[str, tuple[int, ...]]  # the tensors the config implies, in module order
    problems: list[str]

    @property
    def ignored(self) -> list[str]:
        """Stored tensors that are no parameter and are skipped (the published rotary buffers: IGNORED)."""
        return [k for k in self.where if k not in self.expected and IGNORED.fullmatch(k)]

    def file(self, name: str) -> Path:
        return self.path / self.where[name]

    def info(self, name: str) -> TensorInfo:
        return self.headers[self.where[name]][name]

    def raise_problems(self, what: str) -> None:
        """Raise one CheckpointError listing the problems, if there are any (the first MAX_LISTED of them; `verify`
        lists them all)."""
        if self.problems:
            n = len(self.problems)
            listed = self.problems[:MAX_LISTED] + ([f"... and {n - MAX_LISTED} more (weights_tools verify lists "
                                                    "them all)"] if n > MAX_LISTED else [])
            raise CheckpointError(f"checkpoint {self.path} {what} ({n} problem{'s' * (n != 1)}):\n  "
                                  + "\n  ".join(listed))


def read_layout(path: str | os.PathLike, check_dtypes: bool = False) -> Layout:
    """Read config.json and every weight file's header, and list each way they disagree with the config.

    Problems collected: weight files missing, unreadable or corrupt; tensors missing, unexpected, misshapen, stored
    twice, or placed elsewhere than the index says; non-float dtypes. With check_dtypes, also every tensor whose
    dtype differs from the config's torch_dtype (router correction biases may be float32). The config itself must
    be readable (CheckpointError otherwise): it is what the files are checked against.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory" if not path.exists() else
                              f"{path} is a file; a checkpoint is a directory (config.json and safetensors files)")
    try:
        config = KimiVLConfig.from_json(path / "config.json")
    except KimiVLError as e:
        raise CheckpointError(str(e)) from None
    index, files = find_shards(path)
    headers, problems = read_headers(path, files, index)
    dtype = None
    if check_dtypes and config.torch_dtype is not None:
        try:
            dtype = parse_dtype(config.torch_dtype)
        except InputError:
            problems.append(f"config.json: torch_dtype {config.torch_dtype!r} is not a floating-point dtype")
    named = max(sum(len(h) for h in headers.values()), len(index or {}))
    if config_tensor_count(config) > 2 * named + 1000:  # before building a model of that size, even on meta
        raise CheckpointError(f"{path / 'config.json'} describes a model of {config_tensor_count(config):,} tensors "
                              f"but the weight files name {named:,}: the config does not belong to these weights")
    expected = expected_tensors(config)
    where, tensor_problems = locate_tensors(headers, expected, index, dtype)
    return Layout(path, config, index, headers, where, expected, problems + tensor_problems)


def config_tensor_count(config: KimiVLConfig) -> int:
    """About how many official tensors a checkpoint of `config` holds (counted without building the model)."""
    t = config.text_config
    moe = sum(t.is_moe_layer(i) for i in range(t.num_hidden_layers))
    per_moe = 3 * (t.n_routed_experts or 0) + 3 * bool(t.n_shared_experts) + 2
    return 12 * config.vision_config.num_hidden_layers + 10 * t.num_hidden_layers + moe * per_moe + 10


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
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, RecursionError) as e:
        raise CheckpointError(f"{index_file}: not a valid safetensors index (needs a 'weight_map' object): "
                              f"{e!r}") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_file}: 'weight_map' must map tensor names to file names")
    outside = sorted({f for f in weight_map.values() if Path(f).name != f or f in (".", "..")})
    if outside:
        raise CheckpointError(f"{index_file}: file names must be plain names inside the checkpoint directory, got "
                              + ", ".join(map(repr, outside)))
    return weight_map


def read_headers(path: Path, files: list[str], index: dict[str, str] | None
                 ) -> tuple[dict[str, dict[str, TensorInfo]], list[str]]:
    """The headers of the files that read, and a problem line for each that does not (naming the tensors the index
    places in it)."""
    headers, problems = {}, []
    for f in files:
        file = path / f
        if not file.is_file():
            problem = f"{f}: missing" + (f" (named in {INDEX_NAME})" if index is not None else "")
        elif not os.access(file, os.R_OK):
            problem = f"{f}: permission denied"
        else:
            try:
                headers[f] = read_header(file)
                continue
            except CheckpointError as e:
                problem = str(e)
            except OSError as e:
                problem = f"{f}: cannot read it ({e.strerror or e})"
        held = [k for k, v in (index or {}).items() if v == f]
        if held:
            problem += f"; it should hold {len(held)} tensors: " + ", ".join(held[:3]) + (", ..." * (len(held) > 3))
        problems.append(problem)
    return headers, problems


def locate_tensors(headers: dict[str, dict[str, TensorInfo]], expected: dict[str, tuple[int, ...]],
                   index: dict[str, str] | None, dtype: torch.dtype | None = None) -> tuple[dict[str, str], list[str]]:
    """Map each tensor to the file holding it, and list every mismatch with the expected layout (and, given dtype,
    every tensor of another dtype).

    Tensors the index places in a file that could not be read are not reported again as missing.
    """
    where, problems = {}, []
    for f, tensors in headers.items():
        for key, info in tensors.items():
            if key in where:
                problems.append(f"{key}: stored twice, in {where[key]} and {f}")
                continue
            where[key] = f
            if key not in expected and IGNORED.fullmatch(key):
                continue
            if key not in expected:
                problems.append(f"{key} in {f}: unexpected tensor (not part of this config's model)")
                continue
            if info.shape != expected[key]:
                problems.append(f"{key} in {f}: shape {list(info.shape)}, expected {list(expected[key])}")
            if key.endswith(("weight_packed", "weight_shape")):  # compressed-tensors' integer parts
                if info.dtype not in ((torch.int32,) if key.endswith("_packed") else (torch.int64, torch.int32)):
                    problems.append(f"{key} in {f}: dtype {DTYPE_NAMES[info.dtype]}, expected an integer one "
                                    "(I32 words; I64 or I32 shape)")
            elif not info.dtype.is_floating_point:
                problems.append(f"{key} in {f}: dtype {DTYPE_NAMES[info.dtype]}, expected a floating-point type")
            elif dtype is not None and info.dtype != dtype and not (key.endswith(KEEP_FLOAT32)
                                                                    and info.dtype == torch.float32) \
                    and not key.endswith("weight_scale"):  # compressed-tensors scales: any float dtype
                problems.append(f"{key} in {f}: dtype {DTYPE_NAMES[info.dtype]}, expected {DTYPE_NAMES[dtype]} "
                                "(config.json torch_dtype)")
    if index is not None:
        for key, f in index.items():
            if f not in headers:
                continue
            if key not in where:
                problems.append(f"{key}: missing ({INDEX_NAME} says {f}, which does not hold it)")
            elif where[key] != f:
                problems.append(f"{key}: {INDEX_NAME} says {f} but it is stored in {where[key]}")
        problems += [f"{key} in {f}: not listed in {INDEX_NAME}" for key, f in where.items() if key not in index]
    problems += [f"{key}: missing" for key in expected if key not in where and key not in (index or {})]
    return where, problems


# ---- loading ----------------------------------------------------------------------------------------------------
def load(path: str | os.PathLike, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
         progress: bool | None = None, quantize: str | None = None, group_size: int | None = None):
    """Read config.json and the safetensors weights of a checkpoint directory into a new model.

    The model is built on the meta device and materialised straight from the files. Every problem (unreadable or
    missing files, missing, unexpected, misshapen or duplicated tensors) is collected and raised as one
    CheckpointError. dtype (a torch.dtype or its name) None means the config's torch_dtype, but float32 on a CPU
    without fast bfloat16 (`load_dtype`); router correction biases are always kept in float32. A progress
    bar over the bytes read goes to stderr when `progress` is True, or None and stderr is a terminal.

    quantize "int8" | "int4" (int4 in groups of group_size, default 128) quantizes the decoder's weights as they are
    read, one tensor (or block of rows) at a time (see `kimivl.quant`); `dtype` is then that of the float rest. A
    compressed-tensors checkpoint (`kimivl-weights quantize`) is loaded quantized as it is stored.
    """
    from .model import KimiVLForConditionalGeneration

    layout = read_layout(path)
    device = _device(device)
    dtype = load_dtype(dtype, device, layout.config)
    layout.raise_problems("cannot be loaded")
    stored = scheme_of(layout.config)
    scheme = Scheme.named(quantize, group_size) if quantize is not None else stored
    if stored is not None and scheme != stored:
        raise InputError(f"{path} is already quantized, {stored}; load it as it is (leave quantize unset) or "
                         "quantize its float original")
    with torch.device("meta"):
        model = KimiVLForConditionalGeneration(layout.config)
    targets = quantize_modules(model, scheme, dtype, device) if scheme is not None else {}
    state = {name: torch.empty(t.shape, dtype=torch.float32 if name.endswith(KEEP_FLOAT32) else dtype, device=device)
             for name, t in model.state_dict().items() if t.is_meta}
    held_float = {k for k in state if k.endswith(HELD_FLOAT)} if scheme is not None else set()
    total = sum(layout.info(k).nbytes for k in layout.expected)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"load {Path(path).name}",
              disable=None if progress is None else not progress) as bar:
        read_into({k: v for k, v in state.items() if k not in held_float}, layout, bar=bar)
        for name in held_float:
            w = read_official(layout, name, stored)
            state[name].copy_(w if stored is not None else round_trip(w, scheme))
            bar.update(sum(layout.info(k).nbytes for k in official_names(name, stored)))
        for name, (target, _) in targets.items():
            read_quantized(layout, name, target, stored, bar)
    missing, unexpected = model.load_state_dict(state, assign=True, strict=False)
    unfilled = unexpected + [k for k in missing if not k.endswith((".data", ".scale"))]  # quantized: filled above
    if unfilled:
        raise CheckpointError(f"{path}: internal error: tensors left unfilled: {unfilled}")
    model.generation_config = CheckpointGeneration.read(path)
    model.quantization = scheme
    return model.eval()


def official_names(name: str, stored: Scheme | None) -> list[str]:
    """The file tensors behind a 2-D model weight `name`: itself, or its compressed parts."""
    return [name] if stored is None else [name + p for p in ("_packed", "_scale", "_shape")]


def read_official(layout: Layout, name: str, stored: Scheme | None) -> torch.Tensor:
    """A whole 2-D target weight as float32: read, or unpacked and dequantized from a compressed checkpoint."""
    if stored is None:
        return read_tensor(layout.file(name), layout.info(name)).float()
    data = unpack_int32(read_tensor(layout.file(name + "_packed"), layout.info(name + "_packed")), stored.bits)
    return dequantize(data, _stored_scale(layout, name, stored), stored.bits)


def read_rows(file: Path, info: TensorInfo, start: int, stop: int) -> torch.Tensor:
    """Rows start:stop of a tensor (along its first dimension), read alone."""
    row = info.nbytes // info.shape[0]
    buf = torch.empty((stop - start) * row, dtype=torch.uint8)
    with open(file, "rb") as f:
        f.seek(info.start + start * row)
        _read_into(f, buf, file)
    return buf.view(info.dtype).view(stop - start, *info.shape[1:])


ROW_BLOCK_BYTES = 32 * 2 ** 20  # float rows read and quantized at a time (a multiple of 64 rows: the int4 kernel's)


@torch.no_grad()
def read_quantized(layout: Layout, name: str, target: QuantWeight, stored: Scheme | None, bar: tqdm) -> None:
    """Fill quantized model weight `name` (2-D, or stacked experts) from its official tensors, block by block."""
    if target.data.dim() == 3:  # experts: each expert's parts (gate and up rows) gathered, then quantized at once
        for e in range(target.shape[0]):
            parts = [(off, idx[1] if len(idx) > 1 else slice(None)) for off, idx in official_parts(name, target.shape)
                     if idx[0] == e]
            if stored is None:
                w = torch.cat([read_tensor(layout.file(off), layout.info(off)) for off, _ in parts]).float()
                fill_rows(target[e], slice(None), w)
            else:
                data = torch.cat([unpack_int32(read_tensor(layout.file(off + "_packed"),
                                                           layout.info(off + "_packed")), stored.bits)
                                  for off, _ in parts])
                scale = torch.cat([_stored_scale(layout, off, stored) for off, _ in parts])
                put_rows(target[e], slice(None), *in_layout(data, scale, target.layout))
            bar.update(sum(layout.info(k).nbytes for off, _ in parts for k in official_names(off, stored)))
        return
    if stored is None or name in INT8_ROWS:  # a float tensor (lm_head, embedding: in every file), block by block
        info = layout.info(name)
        N = info.shape[0]
        step = max(64, ROW_BLOCK_BYTES // max(1, info.nbytes // N) // 64 * 64)
        for a in range(0, N, step):
            b = min(N, a + step)
            fill_rows(target, slice(a, b), read_rows(layout.file(name), info, a, b).float())
            bar.update((b - a) * (info.nbytes // N))
        return
    data = unpack_int32(read_tensor(layout.file(name + "_packed"), layout.info(name + "_packed")), stored.bits)
    put_rows(target, slice(None), *in_layout(data, _stored_scale(layout, name, stored), target.layout))
    bar.update(sum(layout.info(k).nbytes for k in official_names(name, stored)))


def _stored_scale(layout: Layout, name: str, stored: Scheme) -> torch.Tensor:
    """A compressed weight's scales as bfloat16, what the kernels take (llm-compressor writes them in the model's
    dtype, bfloat16 for Kimi-VL; float32 or float16 scales are rounded)."""
    scale = read_tensor(layout.file(name + "_scale"), layout.info(name + "_scale")).to(torch.bfloat16)
    return scale[:, 0] if stored.bits == 8 else scale


@torch.no_grad()
def read_into(state: dict[str, torch.Tensor], layout: Layout, desc: str = "load", progress: bool | None = False,
              bar: tqdm | None = None) -> None:
    """Fill the tensors of `state` (the model's own names) from a checked checkpoint layout, in place, each cast to
    its tensor's dtype, with a progress bar over the bytes read (see `load`), or advancing `bar` if given."""
    if bar is None:
        total = sum(layout.info(off).nbytes for name, t in state.items() for off, _ in official_parts(name, t.shape))
        with tqdm(total=total, unit="B", unit_scale=True, desc=desc,
                  disable=None if progress is None else not progress) as bar:
            return read_into(state, layout, bar=bar)
    for name, t in state.items():
        for off, idx in official_parts(name, t.shape):
            copy_tensor(layout.file(off), layout.info(off), t[idx])
            bar.update(layout.info(off).nbytes)


# ---- saving -----------------------------------------------------------------------------------------------------
def save(model, path: str | os.PathLike, max_shard_size: int | str = "5GB",
         state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write config.json (and generation_config.json when the model was loaded with one) and the weights under their
    official names, sharded with an index when they exceed max_shard_size. `state_dict` (the model's own names)
    replaces the model's tensors, e.g. LoRA-merged weights.

    The new version is built complete in a hidden folder beside `path` (other files already in `path`, such as the
    tokenizer's, hard-linked or copied in; the old weight files left out), then swapped with `path` in one atomic
    step (`fsutil.publish_dir`): killed at any instant, `path` holds the old model or the new one. What a killed
    earlier save left beside `path` is removed first.
    """
    if getattr(model, "quantization", None) is not None:
        raise InputError(f"this model was loaded quantized ({model.quantization}) and is not saved as such; write a "
                         "quantized checkpoint from its float original with `kimivl-weights quantize`")
    from .prepack import refuse_prepacked
    refuse_prepacked(model, "saving")
    path, max_bytes = Path(path), parse_size(max_shard_size)
    if path.is_symlink():
        path = path.resolve()
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"cannot save a model to {path}: it is a file, not a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    fsutil.clean_stale(path)
    stage = fsutil.staging_name(path)
    stage.mkdir()
    try:
        names = write_shards(stage, to_official(model.state_dict() if state_dict is None else state_dict),
                             max_bytes)
        config = copy.deepcopy(model.config)
        config.torch_dtype = config.vision_config.torch_dtype = config.text_config.torch_dtype = \
            str(model.dtype).removeprefix("torch.")
        config.to_json(stage / "config.json")
        if getattr(model, "generation_config", None) is not None:
            (stage / GENERATION_CONFIG_NAME).write_text(json.dumps(model.generation_config.raw, indent=2) + "\n",
                                                        encoding="utf-8")
        for f in stage.iterdir():
            os.chmod(f, 0o644)
        if path.is_dir():
            _carry_over(path, stage, skip=_weight_files(path) | {INDEX_NAME, SINGLE_NAME})
        fsutil.publish_dir(stage, path)
    except BaseException:
        fsutil.remove(stage)
        raise


def _carry_over(old: Path, new: Path, skip: set[str]) -> None:
    """Hard-link (or copy, where links fail) every entry of `old` that `new` does not already hold into `new`."""
    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst, follow_symlinks=False)
        except OSError:
            shutil.copy2(src, dst, follow_symlinks=False)

    for entry in old.iterdir():
        target = new / entry.name
        if entry.name in skip or os.path.lexists(target):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, target, symlinks=True, copy_function=link)
        else:
            link(str(entry), str(target))


def write_shards(folder: Path, tensors: dict[str, torch.Tensor | TensorSource], max_shard_size: int | str
                 ) -> list[str]:
    """Write tensors into folder as the weight files of a checkpoint: split in order into shards of at most
    max_shard_size (plan_shards), each written tensor by tensor (no copy of a shard is made), plus the index when
    there is more than one. Returns the weight file names (shard_names)."""
    sizes = {k: math.prod(t.shape) * t.dtype.itemsize for k, t in tensors.items()}
    shards = plan_shards(sizes, parse_size(max_shard_size))
    names = shard_names(len(shards))
    for name, keys in zip(names, shards):
        write_safetensors(folder / name, {k: tensors[k] for k in keys})
    if len(names) > 1:
        write_index(folder, {k: n for n, keys in zip(names, shards) for k in keys}, sum(sizes.values()))
    return names


def shard_names(n: int) -> list[str]:
    """The weight file names of an n-shard checkpoint: model.safetensors alone, or model-0000i-of-0000n."""
    return [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def write_index(folder: Path, weight_map: dict[str, str], total_size: int) -> None:
    """Write model.safetensors.index.json (total_size: the tensors' bytes, as transformers writes it)."""
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


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
    """Bytes (at least 1) from an int or a string like "5GB" (10^9), "500MiB" (2^20), "2e6"."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?)(i?)B?\s*", str(size), flags=re.IGNORECASE)
    value = math.nan
    if m:
        try:
            value = float(m.group(1)) * (1024 if m.group(3) else 1000) ** "_KMGT".index(m.group(2).upper() or "_")
        except ValueError:  # e.g. "1.2.3"
            pass
    if not (math.isfinite(value) and value >= 1):
        raise InputError(f"cannot read a size from {size!r}: need a finite number of bytes, at least 1; use bytes "
                         "or e.g. '2GB', '500MB', '1GiB'")
    return int(value)


def parse_dtype(value: torch.dtype | str) -> torch.dtype:
    """A floating-point torch dtype from itself or its name ("bfloat16", "torch.float32")."""
    dt = value if isinstance(value, torch.dtype) else getattr(torch, str(value).removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise InputError(f"dtype must be a floating-point torch dtype or its name (e.g. 'float32', 'bfloat16'), "
                         f"got {value!r}")
    return dt


def load_dtype(dtype: torch.dtype | str | None, device: str | torch.device, config: KimiVLConfig) -> torch.dtype:
    """The dtype `load` gives the weights: `dtype` itself, or for None the config's torch_dtype, except float32 on a
    CPU without fast bfloat16 (AVX2: bfloat16 matmuls run at under 1 GFLOP/s there). On an AVX512-BF16 / AMX CPU a
    bfloat16 checkpoint runs in bfloat16: at A3B widths (3 layers, full vocabulary, 2 threads) decode 73 against 138 ms
    a step and prefill 585 against 244 tokens/s than in float32."""
    if dtype is not None:
        return parse_dtype(dtype)
    from .kernels.quant import cpu_bf16_fast
    if _device(device).type == "cpu" and not cpu_bf16_fast():
        return torch.float32
    return parse_dtype(config.torch_dtype or "bfloat16")


def fingerprint(path: str | os.PathLike) -> str:
    """A cheap identity of a checkpoint's contents: sha256 of config.json and of each weight file's name, size and
    modification time. Rewriting the weights (a new save, a retrained model) changes it; copying a checkpoint without
    keeping modification times changes it too."""
    path = Path(path)
    h = hashlib.sha256()
    try:
        h.update((path / "config.json").read_bytes())
        index, files = find_shards(path)
        for name in [INDEX_NAME] * (index is not None) + sorted(files):
            st = (path / name).stat()
            h.update(f"\0{name}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read {e.filename}: {e.strerror}") from None
    return h.hexdigest()[:16]


def _device(value: str | torch.device) -> torch.device:
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"device {value!r} is not a torch device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {value!r} asked for, but CUDA is not available on this machine")
    return device
