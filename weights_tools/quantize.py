"""`kimivl-weights quantize`: a checkpoint streamed into the compressed-tensors `pack-quantized` layout.

Each decoder weight `kimivl.quant.TARGET` names becomes `X.weight_packed` (int32 words), `X.weight_scale` (bfloat16,
[N, 1] per channel or [N, K / group]) and `X.weight_shape` (int64 [N, K]); config.json gains the
`quantization_config` llm-compressor writes for W8A16 / W4A16 (vLLM and `from_pretrained` load it). Everything else
(vision tower, projector, embeddings, lm_head, routers, norms) is copied as stored. Weights are read and quantized a
block of rows at a time, so memory holds a block and the scales of one output shard; the output appears at OUT only
when complete (`rewrite.write_checkpoint`'s staging and swap).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from kimivl.checkpoint import (Layout, TensorSource, parse_size, read_chunks, read_layout, read_rows, ROW_BLOCK_BYTES,
                               write_shards)
from kimivl.errors import InputError
from kimivl.fsutil import clean_stale, copy_checkpoint_files, publish_dir, staging_name
from kimivl.kernels.quant import quantize
from kimivl.quant import TARGET, Scheme, compressed_config, compressed_shapes, pack_int32, scheme_of

from .rewrite import WEIGHT_PATTERNS, check_output


def quantize_checkpoint(src: str | os.PathLike, out: str | os.PathLike, scheme: str, group_size: int | None = None,
                        max_shard_size: int | str = "5GB", force: bool = False, progress: bool = False) -> Path:
    """Write checkpoint src, quantized with scheme ("int8" per channel | "int4" in groups of group_size, default
    128), to out in the compressed-tensors layout. Returns out."""
    s = Scheme.named(scheme, group_size)
    out = check_output(src, out, force)
    layout = read_layout(src)
    layout.raise_problems("cannot be quantized")
    if scheme_of(layout.config) is not None:
        raise InputError(f"{src} is already quantized; quantize its float original")
    check_widths({name: shape for name, shape in layout.expected.items() if TARGET.fullmatch(name)}, s)
    config = json.loads((layout.path / "config.json").read_text(encoding="utf-8"))
    config["quantization_config"] = compressed_config(s)
    total = sum(layout.info(k).nbytes for k in layout.expected)
    clean_stale(out)
    stage = staging_name(out)
    stage.mkdir()
    try:
        with tqdm(total=total, unit="B", unit_scale=True, desc=Path(out).name, disable=not progress) as bar:
            write_shards(stage, Sources(layout, s, bar).all(), parse_size(max_shard_size))
        (stage / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        copy_checkpoint_files(layout.path, stage, [
            f.name for f in sorted(layout.path.iterdir()) if f.name != "config.json"
            and not any(Path(f.name).match(p) for p in WEIGHT_PATTERNS)])
        publish_dir(stage, out)
    except BaseException:
        import shutil
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return out


def check_widths(targets: dict[str, tuple[int, ...]], scheme: Scheme) -> None:
    """Refuse, before anything is written, input widths the format cannot hold: int4 groups must divide them, and
    compressed-tensors packs 32 bits a word (so int8 widths must be multiples of 4)."""
    widths = sorted({shape[-1] for shape in targets.values()})
    step = scheme.group or 32 // scheme.bits
    bad = [w for w in widths if w % step]
    if bad:
        name = next(n for n, shape in targets.items() if shape[-1] == bad[0])
        fits = [g for g in (128, 64, 32) if all(w % g == 0 for w in widths)] if scheme.group else []
        raise InputError(f"{scheme}: input widths {bad} (e.g. {name}) are not multiples of {step}"
                         + (f"; use --group-size {fits[0]}" if fits else "; this model cannot be written in this "
                            "scheme (loading it with quantize= still works)"))


class Sources:
    """The output tensors as TensorSources, quantizing lazily: a target's packed words are computed when written, and
    its scales kept until they are written (safetensors files hold the 8-byte shapes first, then the int32 words,
    then the 2-byte scales, so a shard's scales wait at most for its words)."""

    def __init__(self, layout: Layout, scheme: Scheme, bar: tqdm):
        self.layout, self.scheme, self.bar = layout, scheme, bar
        self.scales: dict[str, list[torch.Tensor]] = {}

    def all(self) -> dict[str, TensorSource]:
        out = {}
        for name in self.layout.expected:
            info = self.layout.info(name)
            if not TARGET.fullmatch(name):
                out[name] = TensorSource(info.dtype, info.shape, self._copy(name))
                continue
            parts = compressed_shapes(name, info.shape, self.scheme)
            chunks = {name + "_packed": self._packed(name), name + "_scale": self._scale(name),
                      name + "_shape": iter([torch.tensor(info.shape, dtype=torch.int64)])}
            out.update({k: TensorSource(dt, shape, chunks[k]) for k, (shape, dt) in parts.items()})
        return out

    def _copy(self, name: str) -> Iterator[torch.Tensor]:
        for chunk in read_chunks(self.layout.file(name), self.layout.info(name)):
            self.bar.update(chunk.nbytes)
            yield chunk

    def _blocks(self, name: str) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """(data, scale, source bytes) per block of rows of a target."""
        info = self.layout.info(name)
        N = info.shape[0]
        step = max(1, ROW_BLOCK_BYTES // max(1, info.nbytes // N))
        for a in range(0, N, step):
            b = min(N, a + step)
            data, scale = quantize(read_rows(self.layout.file(name), info, a, b), self.scheme.bits, self.scheme.group)
            yield data, scale, (b - a) * (info.nbytes // N)

    def _packed(self, name: str) -> Iterator[torch.Tensor]:
        self.scales[name] = []
        for data, scale, n in self._blocks(name):
            self.scales[name].append(scale)
            self.bar.update(n)
            yield pack_int32(data, self.scheme.bits)

    def _scale(self, name: str) -> Iterator[torch.Tensor]:
        blocks = self.scales.pop(name, None)
        if blocks is None:  # written before its words (not the order write_safetensors uses): quantize again
            blocks = [scale for _, scale, _ in self._blocks(name)]
        for scale in blocks:
            yield scale if self.scheme.group else scale[:, None]
