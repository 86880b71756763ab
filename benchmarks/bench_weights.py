"""Peak memory of the checkpoint tools on a checkpoint with the full a3b layer widths and few layers.

Writes a synthetic bfloat16 checkpoint (a3b widths: 163840 x 2048 embeddings and head, 64 experts of 1408, the full
MoonViT width; 2 decoder layers and 1 vision layer by default, about 2.8 GB) tensor by tensor, then runs each tool in
its own process and reads that process's peak RSS (os.wait4). Goal: peak RSS <= 1.5 x the largest shard + 300 MB.
The tools stream 8 MiB chunks, so their peak is mostly the process itself (inspect's row: Python and torch, ~275 MB,
plus ~150 MB of modules first imported when the model is built on the meta device to list the expected tensors).
With the default 2GB output shards that goal is above the size of the whole checkpoint, so a tool that read it all
into memory would pass too; the 100MB reshard row has a goal below the input size, which only streaming meets. The
baseline rows do what the tools avoid: each output shard gathered in memory with safetensors' get_tensor and written
with save_file, and (100MB) the whole checkpoint read with load_file before writing the shards.

    .venv/bin/python benchmarks/bench_weights.py [--text-layers 2] [--vision-layers 1] [--max-shard-size 2GB]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from kimivl import KimiVLConfig
from kimivl.checkpoint import (CHUNK_BYTES, KEEP_FLOAT32, TensorSource, expected_tensors, parse_size, plan_shards,
                               read_layout, shard_names, write_shards)

MB = 10 ** 6
SMALL = "100MB"  # output shards for the rows whose goal holding the whole checkpoint would miss


def synthetic_config(text_layers: int, vision_layers: int) -> KimiVLConfig:
    a3b = KimiVLConfig.preset("a3b")
    return dataclasses.replace(a3b, text_config=dataclasses.replace(a3b.text_config, num_hidden_layers=text_layers),
                               vision_config=dataclasses.replace(a3b.vision_config, num_hidden_layers=vision_layers))


def write_synthetic(out: Path, config: KimiVLConfig, shard_size: str) -> None:
    """A random bfloat16 checkpoint of config (float32 router biases), generated chunk by chunk into the files."""
    out.mkdir()
    gen = torch.Generator().manual_seed(0)

    def random_chunks(shape: tuple[int, ...], dtype: torch.dtype):
        n, step = math.prod(shape), CHUNK_BYTES // dtype.itemsize
        for start in range(0, n, step):
            yield (torch.randn(min(step, n - start), generator=gen) * 0.02).to(dtype)

    tensors = {}
    for k, shape in expected_tensors(config).items():
        dtype = torch.float32 if k.endswith(KEEP_FLOAT32) else torch.bfloat16
        tensors[k] = TensorSource(dtype, shape, random_chunks(shape, dtype))
    write_shards(out, tensors, shard_size)
    config.to_json(out / "config.json")


def naive_reshard(src: Path, out: Path, max_shard_size: str, whole: bool = False) -> None:
    """The baselines: every output shard gathered whole in memory (whole: the whole checkpoint read into memory
    first, as a load-then-save tool does), then safetensors' save_file."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    layout = read_layout(src)
    loaded = {k: v for f in layout.headers for k, v in load_file(src / f).items()} if whole else {}
    shards = plan_shards({k: layout.info(k).nbytes for k in layout.expected}, parse_size(max_shard_size))
    out.mkdir()
    for name, keys in zip(shard_names(len(shards)), shards):
        tensors = {}
        for k in keys:
            if whole:
                tensors[k] = loaded[k]
            else:
                with safe_open(layout.file(k), framework="pt") as h:
                    tensors[k] = h.get_tensor(k)
        save_file(tensors, out / name, metadata={"format": "pt"})
        del tensors


def measured(args: list[str]) -> tuple[float, int]:
    """Run a command; (seconds, peak RSS in bytes of that process alone)."""
    start = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(args)}")
    return time.perf_counter() - start, usage.ru_maxrss * 1024


def largest_shard(path: Path) -> int:
    return max(f.stat().st_size for f in path.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text-layers", type=int, default=2, help="decoder layers (1 dense, the rest MoE)")
    parser.add_argument("--vision-layers", type=int, default=1)
    parser.add_argument("--input-shard-size", default="1GB")
    parser.add_argument("--max-shard-size", default="2GB", help="for reshard, convert and export-text")
    parser.add_argument("--dir", help="work folder (default: a temporary one, removed at the end)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # one measured operation, in its own process
        what, *rest = args.child
        if what == "write":
            config = synthetic_config(args.text_layers, args.vision_layers)
            write_synthetic(Path(rest[0]), config, args.input_shard_size)
        else:  # naive | whole, src, out, shard size
            naive_reshard(Path(rest[0]), Path(rest[1]), rest[2], whole=what == "whole")
        return

    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench-weights-"))
    work.mkdir(parents=True, exist_ok=True)
    src = work / "src"
    me = [sys.executable, __file__, "--text-layers", str(args.text_layers), "--vision-layers",
          str(args.vision_layers), "--input-shard-size", args.input_shard_size]
    tool = [sys.executable, "-m", "weights_tools"]
    size = ["--max-shard-size", args.max_shard_size]
    ops = [  # (operation, command, output folder or None, goal measured against its output shards)
        (f"write synthetic ({args.input_shard_size} shards)", me + ["--child", "write", str(src)], src),
        ("inspect (headers only)", tool + ["inspect", str(src)], None),
        ("verify --scan", tool + ["verify", str(src), "--scan"], None),
        (f"reshard {args.max_shard_size}", tool + ["reshard", str(src), str(work / "reshard"), *size],
         work / "reshard"),
        (f"convert float32 {args.max_shard_size}", tool + ["convert", str(src), str(work / "convert"), "--dtype",
                                                          "float32", *size], work / "convert"),
        ("export-text", tool + ["export-text", str(src), str(work / "export"), *size], work / "export"),
        (f"baseline: gather + save_file {args.max_shard_size}", me + ["--child", "naive", str(src),
                                                                     str(work / "naive"), args.max_shard_size],
         work / "naive"),
        # small shards: a goal below the data size, which only streaming meets
        (f"reshard {SMALL}", tool + ["reshard", str(src), str(work / "reshard-small"), "--max-shard-size", SMALL],
         work / "reshard-small"),
        (f"baseline: whole in memory {SMALL}", me + ["--child", "whole", str(src), str(work / "whole"), SMALL],
         work / "whole"),
    ]
    rows = []
    try:
        for name, cmd, out in ops:
            seconds, peak = measured(cmd)
            shard = largest_shard(out if out is not None else src)
            goal = 1.5 * shard + 300 * MB
            total = sum(f.stat().st_size for f in (out or src).glob("*.safetensors"))
            rows.append((name, total, shard, peak, goal, peak <= goal, seconds))
        for out in ("reshard", "convert", "reshard-small"):  # the results pass verify
            subprocess.run(tool + ["verify", str(work / out)], check=True, stdout=subprocess.DEVNULL)
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)

    print_table(rows, args)


def print_table(rows: list[tuple], args: argparse.Namespace) -> None:
    """rows: (operation, bytes written, largest shard, peak RSS, goal, passed, seconds), the synthetic input first."""
    data = rows[0][1]
    print(f"synthetic a3b-width checkpoint: {args.text_layers} decoder layers, {args.vision_layers} vision layer(s), "
          f"bfloat16, {data / 1e9:.2f} GB; torch {torch.__version__}, {os.cpu_count()} CPUs")
    print(f"| {'operation':<34} | {'data':>8} | {'largest shard':>13} | {'peak RSS':>9} | "
          f"{'goal 1.5 x shard + 300 MB':>25} | {'goal / input':>12} | {'pass':<4} | {'time':>6} |")
    print(f"|{'-' * 36}|{'-' * 10}|{'-' * 15}|{'-' * 11}|{'-' * 27}|{'-' * 14}|{'-' * 6}|{'-' * 8}|")
    for name, total, shard, peak, goal, ok, seconds in rows:
        print(f"| {name:<34} | {total / 1e9:>5.2f} GB | {shard / MB:>10,.0f} MB | {peak / MB:>6,.0f} MB | "
              f"{goal / MB:>22,.0f} MB | {goal / data:>11.2f}x | {'pass' if ok else 'FAIL':<4} | {seconds:>5.1f}s |")
    small = next(r for r in rows if r[0] == f"reshard {SMALL}")
    print("(inspect, verify: the shard column is the largest input shard; inspect's peak is the process itself: Python,"
          " torch and the model built on the meta device. The outputs of reshard and convert pass verify.)")
    print(f"(goal / input < 1: a tool holding the whole {data / 1e9:.2f} GB input in memory misses the goal, as the "
          f"last row does. Of the rewrites only reshard {SMALL} has such a goal ({small[4] / MB:,.0f} MB); the "
          f"{args.max_shard_size} rows' goals exceed the input, so they cannot tell streaming from that.)")


if __name__ == "__main__":
    main()
