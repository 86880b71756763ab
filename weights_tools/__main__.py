"""`python -m weights_tools <command>` (or `kimivl-weights`): inspect, verify, reshard, convert and export
checkpoints in bounded memory, and make tiny random ones."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from kimivl.config import PRESETS
from kimivl.errors import KimiVLError

from .rewrite import DTYPE_CHOICES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m weights_tools", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="config, parameters, dtypes, shards and experts, from the headers only")
    p.add_argument("dir", help="checkpoint directory")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p = sub.add_parser("verify", help="check every tensor against the config; exit status 1 listing each problem")
    p.add_argument("dir", help="checkpoint directory")
    p.add_argument("--scan", action="store_true", help="also read all the data and report NaN / Inf values")
    for name, text in [("reshard", "rewrite into shards of at most --max-shard-size, bit for bit"),
                       ("convert", "rewrite with every tensor cast to --dtype (router biases stay float32)"),
                       ("export-text", "the language model alone, as a DeepseekV3ForCausalLM checkpoint")]:
        p = sub.add_parser(name, help=text)
        p.add_argument("dir", help="checkpoint directory (only read)")
        p.add_argument("out", help="output directory (must not exist, unless --force)")
        p.add_argument("--max-shard-size", required=name == "reshard", default="5GB",
                       help="e.g. 2GB (10^9 bytes) or 2GiB; default 5GB" if name != "reshard" else "e.g. 2GB or 2GiB")
        if name == "convert":
            p.add_argument("--dtype", required=True, choices=DTYPE_CHOICES)
        p.add_argument("--force", action="store_true",
                       help="replace OUT if it is a checkpoint, an empty folder or a symlink (the link, not its target)")
    p = sub.add_parser("quantize", help="write the weights int8 / int4 in the compressed-tensors layout (vLLM and "
                                        "from_pretrained load it)")
    p.add_argument("dir", help="checkpoint directory (only read)")
    p.add_argument("out", help="output directory (must not exist, unless --force)")
    p.add_argument("--scheme", required=True, choices=["int8", "int4"],
                   help="int8: one scale per output channel; int4: one scale per --group-size inputs")
    p.add_argument("--group-size", type=int, choices=[32, 64, 128], help="int4 group size (default 128)")
    p.add_argument("--max-shard-size", default="5GB", help="e.g. 2GB (10^9 bytes) or 2GiB; default 5GB")
    p.add_argument("--force", action="store_true",
                   help="replace OUT if it is a checkpoint, an empty folder or a symlink (the link, not its target)")
    p = sub.add_parser("make-tiny", help="write a random tiny checkpoint in the official format")
    p.add_argument("out", help="output directory")
    p.add_argument("--preset", default="tiny", choices=sorted(n for n in PRESETS if n != "a3b"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shards", type=int, default=2, help="split the weights into about this many files")
    p.add_argument("--force", action="store_true", help="write into OUT even if it is not empty")
    args = parser.parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _terminate)  # so that a killed rewrite removes its staging folder
    try:
        return run(args)
    except BrokenPipeError:  # e.g. `inspect --json | head`: the reader has gone, nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (KimiVLError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: nothing was written" if args.command != "make-tiny" else
              f"interrupted: {args.out} may be incomplete", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _terminate(signum: int, frame) -> None:
    """SIGTERM as an exception (exit status 128 + 15), so that `finally` and `except` blocks clean up."""
    raise SystemExit(143)


def run(args: argparse.Namespace) -> int:
    if args.command == "inspect":
        from .inspection import inspect_checkpoint
        summary = inspect_checkpoint(args.dir)
        print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    elif args.command == "verify":
        from .verify import verify
        problems = verify(args.dir, scan=args.scan, progress=True)
        for line in problems:
            print(line)
        n = len(problems)
        print(f"{args.dir}: {n} problem{'s' * (n != 1)}" if problems else f"{args.dir}: ok",
              file=sys.stderr if problems else sys.stdout)
        return 1 if problems else 0
    elif args.command == "reshard":
        from .rewrite import reshard
        print(f"wrote {reshard(args.dir, args.out, args.max_shard_size, force=args.force, progress=True)}")
    elif args.command == "convert":
        from .rewrite import convert
        out = convert(args.dir, args.out, args.dtype, max_shard_size=args.max_shard_size, force=args.force,
                      progress=True)
        print(f"wrote {out} ({args.dtype})")
    elif args.command == "export-text":
        from .export import export_text
        out = export_text(args.dir, args.out, max_shard_size=args.max_shard_size, force=args.force, progress=True)
        print(f"wrote {out} (load it with transformers' DeepseekV3ForCausalLM.from_pretrained)")
    elif args.command == "quantize":
        from .quantize import quantize_checkpoint
        if args.scheme == "int8" and args.group_size is not None:
            raise KimiVLError("--group-size is for --scheme int4 (int8 has one scale per output channel)")
        out = quantize_checkpoint(args.dir, args.out, args.scheme, args.group_size, max_shard_size=args.max_shard_size,
                                  force=args.force, progress=True)
        print(f"wrote {out} ({args.scheme}, compressed-tensors pack-quantized)")
    elif args.command == "make-tiny":
        from .tiny import make_tiny
        model = make_tiny(args.out, preset=args.preset, seed=args.seed, shards=args.shards, force=args.force)
        n = sum(p.numel() for p in model.parameters())
        print(f"wrote {args.preset} checkpoint ({n:,} parameters) to {args.out}")
    return 0


def format_summary(s: dict) -> str:
    """inspect's summary as text."""
    c, v, t, e = s["config"], s["config"]["vision"], s["config"]["text"], s["experts"]
    found = sorted(set(e["routed_found"].values()))
    lines = [
        f"{s['path']}: {c['model_type']}, torch_dtype {c['torch_dtype']}",
        f"  vision   {v['layers']} layers, hidden {v['hidden_size']}, {v['heads']} heads, MLP "
        f"{v['intermediate_size']}, patch {v['patch_size']}, merge {'x'.join(map(str, v['merge_kernel_size']))}",
        f"  decoder  {t['layers']} layers ({t['dense_layers']} dense + {t['moe_layers']} MoE), hidden "
        f"{t['hidden_size']}, {t['heads']} heads, vocab {t['vocab_size']}, kv_lora_rank {t['kv_lora_rank']}, "
        f"q_lora_rank {t['q_lora_rank']}, context {t['max_position_embeddings']}",
        f"  experts  {e['routed']} routed ({e['per_token']} per token) + {e['shared']} shared per MoE layer; in the "
        f"files: {' / '.join(map(str, found)) or 'none'} routed per layer over {len(e['routed_found'])} layers",
        f"{'parameters':<14}{'total':>17}{'activated/token':>17}",
    ]
    for name, n in s["parameters"].items():
        label = f"  {name}" if name == "embeddings" else name  # part of the decoder
        lines.append(f"  {label:<12}{n['total']:>17,}{n['activated']:>17,}")
    lines.append("dtypes")
    for name, d in s["dtypes"].items():
        lines.append(f"  {name:<8}{d['tensors']:>7,} tensors{d['parameters']:>17,} parameters{human(d['bytes']):>11}")
    lines.append(f"shards ({len(s['shards'])} files, {human(sum(f['bytes'] for f in s['shards']))})")
    lines += [f"  {f['file']:<36}{f['tensors']:>7,} tensors{human(f['bytes']):>11}" for f in s["shards"]]
    if s["ignored"]:
        lines.append(f"ignored: {s['ignored']} stored rotary buffers (inv_freq: no parameter, recomputed)")
    lines.append(f"problems: {s['problems']}" + (" (run verify to list them)" if s["problems"] else ""))
    return "\n".join(lines)


def human(n: int) -> str:
    """Bytes in decimal units, as shard sizes are given (5GB = 10^9 bytes)."""
    units, i = ("B", "KB", "MB", "GB", "TB"), 0
    while n >= 1000 and i < len(units) - 1:
        n, i = n / 1000, i + 1
    return f"{n:.0f} B" if i == 0 else f"{n:.2f} {units[i]}"


if __name__ == "__main__":
    sys.exit(main())
