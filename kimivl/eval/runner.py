"""The evaluation runner: batched predictions appended to a JSONL file as they come (so an interrupted run resumes
where it stopped), then scored into a report (JSON and a markdown table, overall and per category).

Files in the output directory:
  run.json           what the predictions are of (checkpoint fingerprint, data sha256, circular, prompt format,
                     generation settings); a rerun must match it to resume.
  predictions.jsonl  one {"index", "prediction", "seconds"} per line, appended and fsynced batch by batch.
  scores.jsonl       one line per sample: prediction, ground truth, score and the metric's details.
  report.json        overall and per-category summaries, the headline number, counts and timing.
  report.md          the same as a markdown table.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Protocol

from tqdm.auto import tqdm

from ..checkpoint import fingerprint
from ..fsutil import write_text_atomic
from ..errors import InputError, KimiVLError
from .data import CIRCULAR_STRIDE, Sample, build_prompt, circular_expand, read_dataset, sample_turn
from .errors import EvalError
from .metrics import Metric, evaluate, get_metric

log = logging.getLogger(__name__)

# run.json keys a resumed run must match: what was asked and answered, not where the files are (a moved checkpoint
# or data file still resumes)
IDENTITY = {"checkpoint": "the model or its weight files differ", "data_sha256": "the data file's contents differ",
            "circular": "circular evaluation is on in one, off in the other",
            "prompt": "the prompt format of kimivl differs", "generation": "the generation settings differ"}
PROMPT_FORMAT = "vlmevalkit-v1"  # build_prompt's layout; bump it when the prompt changes so old predictions go unused


class Predictor(Protocol):
    """Anything that answers a batch of samples with one text each (the model adapter, or a stub).

    `settings` holds what else decides its answers (generation settings), recorded in run.json: resuming with other
    settings is refused rather than mixing predictions of two setups."""

    settings: dict

    def predict(self, samples: list[Sample]) -> list[str]: ...


class OraclePredictor:
    """`stub:oracle`: answers with the first ground truth. A pipeline check, not a model."""

    settings: dict = {}

    def predict(self, samples: list[Sample]) -> list[str]:
        return [s.answers[0] if s.answers else "" for s in samples]


class EchoPredictor:
    """`stub:echo`: answers with the prompt text (`build_prompt`). A pipeline check, not a model."""

    settings: dict = {}

    def predict(self, samples: list[Sample]) -> list[str]:
        return [build_prompt(s) for s in samples]


STUBS = {"stub:oracle": OraclePredictor, "stub:echo": EchoPredictor}


class ModelPredictor:
    """A checkpoint directory answering through `kimivl.generate`: one user turn per sample (its images, then the
    `build_prompt` text), a batch generated together (left-padded), greedy. A Thinking model's ◁think▷...◁/think▷
    part is dropped: the answer after it is what gets scored (empty when max_new_tokens cut the thinking short).

    The checkpoint's files, tokenizer and settings are checked at once; the weights load on the first `predict`, so a
    run with nothing left to predict (or refused for another reason) never waits for them."""

    def __init__(self, path: str | os.PathLike, *, max_new_tokens: int = 128, dtype: str | None = None,
                 device: str = "cpu", system: str | None = None, progress: bool | None = None,
                 quantize: str | None = None, group_size: int | None = None):
        from ..checkpoint import load_dtype, read_layout
        from ..quant import Scheme
        from ..processing import KimiVLProcessor

        if max_new_tokens < 1:
            raise EvalError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
        layout = read_layout(path)
        layout.raise_problems("cannot be loaded")
        context = layout.config.text_config.max_position_embeddings
        if max_new_tokens >= context:
            raise EvalError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's context "
                            f"of {context} tokens")
        self.path, self.device, self.progress, self.context = path, device, progress, context
        self.dtype = load_dtype(dtype, device, layout.config)
        self.processor = KimiVLProcessor.from_pretrained(path)
        self.max_new_tokens, self.system = max_new_tokens, system or None
        self.settings = {"max_new_tokens": max_new_tokens, "temperature": 0.0, "system": self.system,
                         "dtype": str(self.dtype).removeprefix("torch.")}
        self.quantize, self.group_size = quantize, group_size
        if quantize is not None:  # recorded, so that resuming with another quantization is refused
            self.settings["quantize"] = str(Scheme.named(quantize, group_size))
        self._model = None

    @property
    def model(self):
        if self._model is None:
            from ..model import KimiVLForConditionalGeneration
            from ..prepack import prepack_for_inference
            self._model = KimiVLForConditionalGeneration.from_pretrained(
                self.path, dtype=self.dtype, device=self.device, progress=self.progress, quantize=self.quantize,
                group_size=self.group_size)
            prepack_for_inference(self._model)
        return self._model

    def conversation(self, sample: Sample) -> list[dict]:
        messages = [{"role": "system", "content": self.system}] if self.system else []
        return messages + [sample_turn(sample)]

    def predict(self, samples: list[Sample]) -> list[str]:
        from ..generation import generate
        from ..tokenizer import split_thinking

        batch = [self.conversation(s) for s in samples]
        try:
            # greedy whatever the checkpoint's generation_config.json suggests: scores must repeat
            texts = generate(self.model, self.processor, batch, max_new_tokens=self.max_new_tokens, temperature=0.0)
        except InputError:
            lengths = self.processor(batch)["attention_mask"].sum(-1).tolist()
            long = [f"{s.index} ({n} tokens)" for s, n in zip(samples, lengths)
                    if n + self.max_new_tokens > self.context]
            if not long:
                raise
            raise EvalError(f"sample{'s' * (len(long) > 1)} {', '.join(long)}: the prompt and --max-new-tokens "
                            f"{self.max_new_tokens} do not fit in the model's context of {self.context} tokens; "
                            "lower --max-new-tokens or leave the sample out") from None
        return [split_thinking(t)[1] for t in texts]


def load_predictor(spec: str, **settings) -> Predictor:
    """A stub by name (`stub:oracle`, `stub:echo`) or a checkpoint directory (`ModelPredictor`, given `settings`:
    max_new_tokens, dtype, device, system, progress, quantize, group_size; stubs ignore them)."""
    if spec in STUBS:
        return STUBS[spec]()
    if spec.startswith("stub:"):
        raise EvalError(f"unknown stub {spec!r}; the stubs are {', '.join(STUBS)}")
    if (Path(spec) / "config.json").is_file():
        return ModelPredictor(spec, **settings)
    raise EvalError(f"--model {spec}: not a checkpoint directory (no config.json) and not one of {', '.join(STUBS)}")


def run_benchmark(model: str, data: str | os.PathLike, metric: str, out: str | os.PathLike, *,
                  limit: int | None = None, batch_size: int = 8, circular: bool = False, seed: int = 42,
                  progress: bool = True, **settings) -> dict:
    """`kimivl eval`: read `data`, keep the first `limit` rows, expand them for circular evaluation if asked,
    predict with `model` (a checkpoint directory, loaded with `settings`, or a stub) and score with `metric` into
    `out`. Returns the report."""
    scorer = get_metric(metric, seed=seed, circular=circular)  # before any work, so a bad name fails at once
    if limit is not None and limit < 1:
        raise EvalError(f"--limit must be at least 1, got {limit}")
    samples = read_dataset(data)[:limit]
    if circular:
        samples = _circular(samples)
    predictor = load_predictor(model, progress=progress, **settings)  # cheap: the weights load on the first predict
    stub = model.startswith("stub:")
    with open(data, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    info = {"model": model if stub else str(Path(model).resolve()), "checkpoint": model if stub else fingerprint(model),
            "data": str(Path(data).resolve()), "data_sha256": digest, "circular": circular, "prompt": PROMPT_FORMAT,
            "generation": predictor.settings}
    return run_eval(predictor, samples, scorer, out, batch_size=batch_size, run_info=info, progress=progress)


def _circular(samples: list[Sample]) -> list[Sample]:
    """Expand to rotated copies, unless the file already holds them (indices >= 1e6, as MMBench's TSVs do)."""
    if not any(s.index.isdigit() and int(s.index) >= CIRCULAR_STRIDE for s in samples):
        return circular_expand(samples)
    bad = [s.index for s in samples if not s.index.isdigit()]
    if bad:
        raise EvalError(f"circular evaluation needs integer indices; found {bad[0]!r}")
    return samples


def check_samples(metric: Metric, samples: list[Sample]) -> None:
    """Fail now, not after generation, on a sample the metric cannot score (VQA without human answers, an answer
    that is not one of the options, ...)."""
    for s in samples:
        metric.score(s, "")


def run_eval(predictor: Predictor, samples: list[Sample], metric: Metric, out_dir: str | os.PathLike, *,
             batch_size: int = 8, run_info: dict | None = None, progress: bool = True) -> dict:
    """Predict every sample that `out_dir/predictions.jsonl` does not hold yet, appending each batch as it is done,
    then score all of them and write the report. Safe to interrupt at any point and call again."""
    if batch_size < 1:
        raise EvalError(f"--batch-size must be at least 1, got {batch_size}")
    check_samples(metric, samples)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise EvalError(f"--out {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    with _exclusive(out):
        return _run_eval(predictor, samples, metric, out, batch_size, dict(run_info or {}), progress)


@contextlib.contextmanager
def _exclusive(out: Path):
    """Hold an advisory lock on OUT/.lock for the run: a second run into the same folder is refused at once."""
    import fcntl

    with open(out / ".lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise EvalError(f"another kimivl eval is writing to {out}; wait for it to finish or choose another "
                            "--out") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _predict(predictor: Predictor, batch: list[Sample]) -> list[str]:
    """predictor.predict(batch); a failure names the sample at fault (found by asking them one at a time)."""
    try:
        return predictor.predict(batch)
    except KimiVLError as e:
        if str(e).startswith("sample"):
            raise
        if len(batch) == 1:
            raise EvalError(f"sample {batch[0].index}: {e}") from None
        for s in batch:
            _predict(predictor, [s])
        raise


def _run_eval(predictor: Predictor, samples: list[Sample], metric: Metric, out: Path, batch_size: int, info: dict,
              progress: bool) -> dict:
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
            texts = _predict(predictor, batch)
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
    write_text_atomic(out / "scores.jsonl", "".join(
        json.dumps({"index": s.index, "category": s.category, "prediction": done[s.index]["prediction"],
                    "answers": s.answers, **r}, ensure_ascii=False) + "\n" for s, r in zip(samples, records)))
    write_text_atomic(out / "report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    write_text_atomic(out / "report.md", format_report(report))
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
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise EvalError(f"{path} is not valid JSON; delete {path.parent} to start this run afresh") from None
        diff = [f"{why} ({k}: {old.get(k)!r} there, {info.get(k)!r} now)" for k, why in IDENTITY.items()
                if old.get(k) != info.get(k)]
        if diff:
            raise EvalError(f"{path.parent} holds predictions of another run: {'; '.join(diff)}. Use another --out "
                            "directory, or delete this one to start afresh")
    else:
        write_text_atomic(path, json.dumps(info, indent=2) + "\n")


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
    try:
        text = raw[:keep].decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise EvalError(f"{path} line {line}: not valid UTF-8; fix or delete the file") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            done[str(obj["index"])] = {"index": str(obj["index"]), "prediction": str(obj["prediction"]),
                                       "seconds": float(obj.get("seconds", 0.0))}
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, RecursionError):
            raise EvalError(f"{path} line {lineno} is not a prediction record; fix or delete the file") from None
    return done


