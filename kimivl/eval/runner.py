"""The evaluation runner: batched predictions appended to a JSONL file as they come (so an interrupted run resumes
where it stopped), then scored into a report (JSON and a markdown table, overall and per category).

Files in the output directory:
  run.json           what the predictions are of (model, data, circular); a rerun must match it to resume.
  predictions.jsonl  one {"index", "prediction", "seconds"} per line, appended and fsynced batch by batch.
  scores.jsonl       one line per sample: prediction, ground truth, score and the metric's details.
  report.json        overall and per-category summaries, the headline number, counts and timing.
  report.md          the same as a markdown table.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Protocol

from tqdm.auto import tqdm

from .data import CIRCULAR_STRIDE, Sample, build_prompt, circular_expand, read_dataset
from .errors import EvalError
from .metrics import Metric, evaluate, get_metric

log = logging.getLogger(__name__)

IDENTITY = ("model", "data", "circular")  # run.json keys that must match for predictions to be reused


class Predictor(Protocol):
    """Anything that answers a batch of samples with one text each (the model adapter, or a stub)."""

    def predict(self, samples: list[Sample]) -> list[str]: ...


class OraclePredictor:
    """`stub:oracle`: answers with the first ground truth. A pipeline check, not a model."""

    def predict(self, samples: list[Sample]) -> list[str]:
        return [s.answers[0] if s.answers else "" for s in samples]


class EchoPredictor:
    """`stub:echo`: answers with the prompt text (`build_prompt`). A pipeline check, not a model."""

    def predict(self, samples: list[Sample]) -> list[str]:
        return [build_prompt(s) for s in samples]


STUBS = {"stub:oracle": OraclePredictor, "stub:echo": EchoPredictor}


def load_predictor(spec: str) -> Predictor:
    """A stub by name (`stub:oracle`, `stub:echo`), or a checkpoint directory (once generation is available)."""
    if spec in STUBS:
        return STUBS[spec]()
    if spec.startswith("stub:"):
        raise EvalError(f"unknown stub {spec!r}; the stubs are {', '.join(STUBS)}")
    if (Path(spec) / "config.json").is_file():
        raise EvalError(f"{spec}: generation is not available in kimivl yet (it comes with the inference issue); "
                        f"use --model {' or '.join(STUBS)} to check the evaluation pipeline")
    raise EvalError(f"--model {spec}: not a checkpoint directory (no config.json) and not one of {', '.join(STUBS)}")


def run_benchmark(model: str, data: str | os.PathLike, metric: str, out: str | os.PathLike, *,
                  limit: int | None = None, batch_size: int = 8, circular: bool = False, seed: int = 42,
                  progress: bool = True) -> dict:
    """`kimivl eval`: read `data`, keep the first `limit` rows, expand them for circular evaluation if asked,
    predict with `model` and score with `metric` into `out`. Returns the report."""
    scorer = get_metric(metric, seed=seed, circular=circular)  # before any work, so a bad name fails at once
    predictor = load_predictor(model)
    samples = read_dataset(data)
    if limit is not None:
        if limit < 1:
            raise EvalError(f"--limit must be at least 1, got {limit}")
        samples = samples[:limit]
    if circular:
        samples = _circular(samples)
    info = {"model": model, "data": str(Path(data).resolve()), "circular": circular}
    return run_eval(predictor, samples, scorer, out, batch_size=batch_size, run_info=info, progress=progress)


def _circular(samples: list[Sample]) -> list[Sample]:
    """Expand to rotated copies, unless the file already holds them (indices >= 1e6, as MMBench's TSVs do)."""
    if not any(s.index.isdigit() and int(s.index) >= CIRCULAR_STRIDE for s in samples):
        return circular_expand(samples)
    bad = [s.index for s in samples if not s.index.isdigit()]
    if bad:
        raise EvalError(f"circular evaluation needs integer indices; found {bad[0]!r}")
    return samples


def run_eval(predictor: Predictor, samples: list[Sample], metric: Metric, out_dir: str | os.PathLike, *,
             batch_size: int = 8, run_info: dict | None = None, progress: bool = True) -> dict:
    """Predict every sample that `out_dir/predictions.jsonl` does not hold yet, appending each batch as it is done,
    then score all of them and write the report. Safe to interrupt at any point and call again."""
    if batch_size < 1:
        raise EvalError(f"--batch-size must be at least 1, got {batch_size}")
    for s in samples:  # a malformed sample (an answer that is not an option, ...) fails now, not after generation
        metric.score(s, "")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = dict(run_info or {})
    _check_run(out / "run.json", info)
    pred_path = out / "predictions.jsonl"
    done = _load_predictions(pred_path)
    todo = [s for s in samples if s.index not in done]
    resumed = len(samples) - len(todo)
    if resumed:
        log.info("resuming: %d of %d predictions found in %s", resumed, len(samples), pred_path)
    start = time.perf_counter()
    with open(pred_path, "a", encoding="utf-8") as f, \
            tqdm(total=len(samples), initial=resumed, desc=f"eval {metric.name}", unit="sample",
                 disable=not progress) as bar:
        for b in range(0, len(todo), batch_size):
            batch = todo[b:b + batch_size]
            t0 = time.perf_counter()
            texts = predictor.predict(batch)
            seconds = (time.perf_counter() - t0) / len(batch)
            if not isinstance(texts, list) or len(texts) != len(batch) or not all(isinstance(t, str) for t in texts):
                raise EvalError(f"the predictor returned {type(texts).__name__} of "
                                f"{len(texts) if hasattr(texts, '__len__') else '?'} items for a batch of "
                                f"{len(batch)} samples; expected one string per sample")
            for s, text in zip(batch, texts):
                done[s.index] = {"index": s.index, "prediction": text, "seconds": seconds}
                f.write(json.dumps(done[s.index], ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(batch))
    session = time.perf_counter() - start

    t0 = time.perf_counter()
    overall, categories, records = evaluate(metric, samples, {s.index: done[s.index]["prediction"] for s in samples})
    generation = sum(done[s.index]["seconds"] for s in samples)
    report = {
        "metric": metric.name, "title": metric.title, **info, "n": len(samples),
        "headline": {"key": metric.headline, "value": overall[metric.headline], "unit": metric.unit},
        "overall": overall, "categories": categories,
        "timing": {"generation_seconds": generation, "seconds_per_sample": generation / max(len(samples), 1),
                   "predicted_now": len(todo), "resumed": resumed, "session_seconds": session,
                   "scoring_seconds": time.perf_counter() - t0},
    }
    _write_atomic(out / "scores.jsonl", "".join(
        json.dumps({"index": s.index, "category": s.category, "prediction": done[s.index]["prediction"],
                    "answers": s.answers, **r}, ensure_ascii=False) + "\n" for s, r in zip(samples, records)))
    _write_atomic(out / "report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    _write_atomic(out / "report.md", format_report(report))
    return report


def format_report(report: dict) -> str:
    """The report as markdown: the headline, then one row for all samples and one per category."""
    overall = report["overall"]
    extras = [k for k in overall if k not in ("n", "score")]
    head = report["headline"]
    lines = [f"# kimivl eval: {report['metric']}", "",
             f"model `{report.get('model', '?')}` · data `{report.get('data', '?')}` · {report['n']} samples", "",
             f"**{report['title']}: {_fmt(head['value'])} {head['unit']}**", "",
             "| " + " | ".join(["category", "n", "score (%)", *extras]) + " |",
             "|---|---:|---:|" + "---:|" * len(extras)]
    rows = [("**overall**", overall), *report["categories"].items()]
    for name, summary in rows:
        cells = [name, str(summary["n"]), _fmt(summary["score"]), *(_fmt(summary.get(k)) for k in extras)]
        lines.append("| " + " | ".join(cells) + " |")
    t = report["timing"]
    lines += ["", f"generation {t['generation_seconds']:.2f} s ({t['seconds_per_sample']:.3f} s/sample; "
                  f"{t['predicted_now']} predicted now, {t['resumed']} resumed) · scoring {t['scoring_seconds']:.2f} s",
              ""]
    return "\n".join(lines)


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def _check_run(path: Path, info: dict) -> None:
    """Record what the predictions are of; refuse to mix predictions of another model or data set."""
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            raise EvalError(f"{path} is not valid JSON; delete {path.parent} to start this run afresh") from None
        diff = [f"{k}: {old.get(k)!r} there, {info.get(k)!r} now" for k in IDENTITY if old.get(k) != info.get(k)]
        if diff:
            raise EvalError(f"{path.parent} holds predictions of another run ({'; '.join(diff)}); "
                            "use another --out directory or delete this one")
    else:
        _write_atomic(path, json.dumps(info, indent=2) + "\n")


def _load_predictions(path: Path) -> dict[str, dict]:
    """Predictions saved so far. A last line without its newline was cut by an interruption: it is dropped (and
    truncated from the file, so appends start on a fresh line); any other bad line is an error."""
    if not path.is_file():
        return {}
    raw = path.read_bytes()
    keep = raw.rfind(b"\n") + 1
    if keep < len(raw):
        log.warning("%s: dropping an incomplete last line (%d bytes) left by an interrupted run", path, len(raw) - keep)
        with open(path, "r+b") as f:
            f.truncate(keep)
    done = {}
    for lineno, line in enumerate(raw[:keep].decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            done[str(obj["index"])] = {"index": str(obj["index"]), "prediction": str(obj["prediction"]),
                                       "seconds": float(obj.get("seconds", 0.0))}
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise EvalError(f"{path} line {lineno} is not a prediction record; fix or delete the file") from None
    return done


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
