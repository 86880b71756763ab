"""The `kimivl` command. Subcommands: `eval` (and `eval make-synthetic`); generate, chat and train come later."""

from __future__ import annotations

import argparse
import logging
import sys

from .errors import KimiVLError


def _add_eval(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from .eval.metrics import METRICS
    from .eval.runner import STUBS
    p = sub.add_parser(
        "eval", help="score a model on a benchmark file; `kimivl eval make-synthetic` writes the offline suite",
        description="Predict every sample of --data with --model (appending to OUT/predictions.jsonl, so an "
                    "interrupted run resumes where it stopped when rerun with the same arguments), then score with "
                    "--metric into OUT/report.json and OUT/report.md. Metrics: "
                    + "; ".join(f"{k}: {title}, {what}" for k, (title, what) in METRICS.items()) + ".")
    p.add_argument("--model", help=f"checkpoint directory, or a pipeline-check stub: {', '.join(STUBS)}")
    p.add_argument("--data", help="benchmark file: .tsv (VLMEvalKit layout) or .jsonl (image paths relative to it)")
    p.add_argument("--metric", choices=list(METRICS), help="how to score the predictions")
    p.add_argument("--out", help="output directory (predictions, scores, report)")
    p.add_argument("--limit", type=int, help="only the first N rows of --data")
    p.add_argument("--batch-size", type=int, default=8, help="samples per predict call (default 8)")
    p.add_argument("--circular", action="store_true",
                   help="MMBench circular evaluation (multiple-choice metrics): every rotation of the options must "
                        "be answered right")
    p.add_argument("--seed", type=int, default=42,
                   help="seed of the random option picked for an unparsable multiple-choice answer (default 42)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    evsub = p.add_subparsers(dest="eval_command", title="subcommand", metavar="make-synthetic")
    m = evsub.add_parser("make-synthetic", help="write the offline OCR / image-QA suite as a TSV",
                         description="Render a deterministic OCR and simple image-QA suite with Pillow into a TSV "
                                     "(VLMEvalKit layout, one ground-truth answer per row).")
    m.add_argument("out", help="output .tsv file")
    m.add_argument("--n", type=int, default=200, help="number of samples (default 200)")
    m.add_argument("--seed", dest="synthetic_seed", type=int, default=0, help="seed (default 0)")
    m.add_argument("--split", choices=["train", "test"], default="test",
                   help="train and test hold disjoint words and numbers (default test)")
    return p


def _eval(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.eval_command == "make-synthetic":
        from .eval.synthetic import write_synthetic
        path = write_synthetic(args.out, n=args.n, seed=args.synthetic_seed, split=args.split)
        print(f"wrote {args.n} samples (split {args.split}, seed {args.synthetic_seed}) to {path}")
        return
    missing = [f"--{k}" for k in ("model", "data", "metric", "out") if getattr(args, k) is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    from .eval.runner import format_report, run_benchmark
    report = run_benchmark(args.model, args.data, args.metric, args.out, limit=args.limit,
                           batch_size=args.batch_size, circular=args.circular, seed=args.seed,
                           progress=not args.no_progress)
    print(format_report(report))
    print(f"report: {args.out}/report.json, {args.out}/report.md; per-sample scores: {args.out}/scores.jsonl")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kimivl", description="Kimi-VL in plain PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    eval_parser = _add_eval(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        if args.command == "eval":
            _eval(args, eval_parser)
    except KimiVLError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: the predictions so far are saved; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
