"""The runner: resuming after an interruption gives the same report, and the `kimivl eval` command end to end, with the
stub predictors and with a tiny random checkpoint (whose scores are meaningless: the pipeline is what is checked)."""

import io
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from kimivl import KimiVLForConditionalGeneration
from kimivl.cli import main
from kimivl.eval.data import Sample, read_tsv, write_tsv
from kimivl.eval.errors import EvalError
from kimivl.eval.metrics import get_metric
from kimivl.eval.runner import ModelPredictor, load_predictor, run_benchmark, run_eval
from kimivl.eval.synthetic import write_synthetic


class Interrupted(Exception):
    pass


class Student:
    """Deterministic and imperfect: right on two samples in three, a near miss otherwise; can stop after k calls."""

    def __init__(self, crash_after: int | None = None):
        self.crash_after, self.calls, self.seen = crash_after, 0, []

    def predict(self, samples):
        if self.crash_after is not None and self.calls == self.crash_after:
            raise Interrupted
        self.calls += 1
        self.seen += [s.index for s in samples]
        return [s.answers[0] if int(s.index) % 3 else s.answers[0][:-1] + "#" for s in samples]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("syn") / "syn.tsv", n=20, seed=3)


def without_timing(report):
    return {k: v for k, v in report.items() if k != "timing"}


def run(samples, out, predictor, metric="ocr", **kw):
    return run_eval(predictor, samples, get_metric(metric), out, batch_size=3, run_info={"checkpoint": "student"},
                    progress=False, **kw)


def test_resume_after_interruption_gives_the_same_report(tmp_path, data):
    samples = read_tsv(data)
    reference = run(samples, tmp_path / "ref", Student())
    assert 0 < reference["overall"]["score"] < 100 and reference["overall"]["cer"] > 0

    with pytest.raises(Interrupted):
        run(samples, tmp_path / "run", Student(crash_after=2))  # 2 batches of 3 saved, then the process "dies"
    lines = (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(line)["index"] for line in lines] == [s.index for s in samples[:6]]
    with open(tmp_path / "run" / "predictions.jsonl", "a") as f:
        f.write('{"index": "6", "predic')  # and it died in the middle of writing a line

    second = Student()
    resumed = run(samples, tmp_path / "run", second)
    assert second.seen == [s.index for s in samples[6:]]  # nothing redone, nothing lost
    assert without_timing(resumed) == without_timing(reference)
    assert resumed["timing"]["resumed"] == 6 and resumed["timing"]["predicted_now"] == 14
    for name in ("scores.jsonl", "report.md"):
        ref_text, run_text = ((tmp_path / d / name).read_text() for d in ("ref", "run"))
        if name == "report.md":  # the last line is timing
            ref_text, run_text = ref_text.rsplit("generation", 1)[0], run_text.rsplit("generation", 1)[0]
        assert ref_text == run_text

    third = Student()
    run(samples, tmp_path / "run", third)  # complete: nothing to predict, the report is rewritten the same
    assert third.calls == 0
    assert without_timing(json.loads((tmp_path / "run" / "report.json").read_text())) == without_timing(reference)


def test_run_refuses_predictions_of_another_run(tmp_path, data):
    samples = read_tsv(data)[:4]
    run(samples, tmp_path, Student())
    with pytest.raises(EvalError, match="holds predictions of another run: the model or its weight files differ "
                                        r"\(checkpoint: 'student' there, 'other' now\)"):
        run_eval(Student(), samples, get_metric("ocr"), tmp_path, run_info={"checkpoint": "other"}, progress=False)


def test_predictor_contract_is_checked(tmp_path, data):
    class Short:
        def predict(self, samples):
            return ["x"] * (len(samples) - 1)
    with pytest.raises(EvalError, match="for a batch of 3 samples"):
        run(read_tsv(data)[:4], tmp_path, Short())


def test_limit_then_more(tmp_path, data):
    first = run_benchmark("stub:oracle", data, "ocrbench", tmp_path, limit=5, progress=False)
    assert first["n"] == 5 and first["headline"]["value"] == 1000.0
    more = run_benchmark("stub:oracle", data, "ocrbench", tmp_path, limit=12, progress=False)
    assert more["n"] == 12 and more["timing"]["resumed"] == 5 and more["timing"]["predicted_now"] == 7


def test_predictor_specs():
    assert load_predictor("stub:oracle").predict([Sample("0", "q", ["a", "b"])]) == ["a"]
    assert load_predictor("stub:echo").predict([Sample("0", "q?", ["a"])]) == ["q?"]
    with pytest.raises(EvalError, match="unknown stub"):
        load_predictor("stub:nope")


def test_cli_end_to_end_on_the_synthetic_suite(tmp_path, capsys):
    data, out = tmp_path / "syn.tsv", tmp_path / "out"
    assert main(["eval", "make-synthetic", str(data), "--n", "10", "--seed", "5"]) == 0
    assert main(["eval", "--model", "stub:oracle", "--data", str(data), "--metric", "ocrbench", "--out", str(out),
                 "--batch-size", "4", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "**OCRBench: 1000.00 / 1000**" in printed and "| box_colour | 2 | 100.00 | 2 | 1000.00 |" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["n"] == 10 and report["overall"]["hits"] == 10 and set(report["categories"]) == {
        "word", "number", "phrase", "box_text", "box_colour"}
    assert report["timing"]["predicted_now"] == 10 and (out / "report.md").read_text().startswith("# kimivl eval")
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(scores) == 10 and all(r["score"] == 1.0 and r["prediction"] == r["answers"][0] for r in scores)


def test_cli_multiple_choice_circular_with_echo(tmp_path, capsys):
    """stub:echo answers with the whole prompt (every letter and option): unparsable, so every answer is a seeded
    random pick, counted in the report."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    samples = [Sample(str(i), f"question {i}", ["B"], [buf.getvalue()], options={"A": "yes", "B": "no", "C": "maybe"},
                      category="c") for i in range(4)]
    data = write_tsv(samples, tmp_path / "mc.tsv")
    args = ["eval", "--model", "stub:echo", "--data", str(data), "--metric", "mcq", "--circular", "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    a, b = (json.loads((tmp_path / d / "report.json").read_text()) for d in "ab")
    assert a["n"] == 12 and a["overall"]["groups"] == 4 and a["overall"]["random_picks"] == 12
    assert without_timing(a) == without_timing(b)  # the random picks are seeded
    assert "random_picks" in capsys.readouterr().out


def test_cli_mmmu_scores_open_questions(tmp_path, capsys):
    """`--metric mmmu` on a file mixing a multiple-choice question with open ones (no options): every question is
    scored, the open ones as MMMU's eval_open does (the oracle answers with the first ground truth)."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    png = buf.getvalue()
    samples = [Sample("0", "Which?", ["B"], [png], options={"A": "yes", "B": "no"}, category="mc"),
               Sample("1", "How far?", ["1,000"], [png], category="open"),
               Sample("2", "Ratio?", ["3.429", "24/7"], [png], category="open"),
               Sample("3", "Capital?", ["Paris"], [png], category="open")]
    data = write_tsv(samples, tmp_path / "mmmu.tsv")
    out = tmp_path / "out"
    assert main(["eval", "--model", "stub:oracle", "--data", str(data), "--metric", "mmmu", "--out", str(out),
                 "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["overall"] == {"n": 4, "score": 100.0, "random_picks": 0, "no_option": 0}
    assert report["categories"]["open"]["n"] == 3
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert [r.get("parsed") for r in scores] == [None, [1000.0, 0.0], [3.43], ["paris"]]

    class Student:
        settings: dict = {}

        def predict(self, batch):
            return [{"0": "A", "1": "about 1000 m", "2": "so it is 3.42", "3": "the capital is paris"}[s.index]
                    for s in batch]
    report = run_eval(Student(), read_tsv(data), get_metric("mmmu"), tmp_path / "student", progress=False)
    # "about 1000 m" has no indicator: the whole response is the key, 1000 is extracted from it; 3.42 != 3.43
    assert report["overall"]["score"] == 50.0 and report["categories"]["open"]["score"] == pytest.approx(200 / 3)


def test_cli_errors(tmp_path, data, capsys, tiny_checkpoint):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint("tiny"), ckpt)
    shard = next(ckpt.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-100])  # a truncated weight file: refused before anything is written
    assert main(["eval", "--model", str(ckpt), "--data", str(data), "--metric", "ocr", "--out", str(tmp_path / "o")]) == 1
    assert f"error: checkpoint {ckpt} cannot be loaded" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert main(["eval", "--model", "stub:oracle", "--data", str(data), "--metric", "vqa",
                 "--out", str(tmp_path / "v")]) == 1
    assert "error: sample 0: VQA accuracy needs the human answers" in capsys.readouterr().err
    assert not (tmp_path / "v").exists()  # refused before generating (or writing) anything
    with pytest.raises(SystemExit):
        main(["eval", "--model", "stub:oracle"])
    assert "required: --data, --metric, --out" in capsys.readouterr().err


def test_cli_end_to_end_on_a_tiny_checkpoint(tmp_path, tiny_checkpoint, data, capsys, monkeypatch):
    ckpt, out = tiny_checkpoint("tiny"), tmp_path / "out"
    args = ["eval", "--model", ckpt, "--data", str(data), "--metric", "ocrbench", "--out", str(out), "--limit", "5",
            "--batch-size", "2", "--max-new-tokens", "6", "--no-progress"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "**OCRBench:" in captured.out and "100%" not in captured.err  # --no-progress: no load or eval bar
    report = json.loads((out / "report.json").read_text())
    assert report["n"] == 5 and sum(c["n"] for c in report["categories"].values()) == 5
    assert report["timing"]["predicted_now"] == 5 and report["timing"]["generation_seconds"] > 0
    assert report["generation"] == {"max_new_tokens": 6, "temperature": 0.0, "system": None, "dtype": "float32"}
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["index"] for p in predictions] == [str(i) for i in range(5)]

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded with nothing left to predict")
    monkeypatch.setattr(KimiVLForConditionalGeneration, "from_pretrained", no_loading)
    monkeypatch.chdir(Path(ckpt).parent)  # the same checkpoint by a relative path, the data moved: still this run
    moved = tmp_path / "moved.tsv"
    shutil.copy(data, moved)
    relative = [os.path.basename(ckpt) if a == ckpt else str(moved) if a == str(data) else a for a in args]
    assert main(relative) == 0  # rerun: everything is resumed, nothing predicted again (or loaded), the same report
    again = json.loads((out / "report.json").read_text())
    assert again["timing"]["predicted_now"] == 0 and again["timing"]["resumed"] == 5
    assert without_timing(again) == without_timing(report) | {"data": str(moved)}
    assert (out / "predictions.jsonl").read_text().count("\n") == 5


@pytest.mark.parametrize("change, reason", [
    ("max_new_tokens", "the generation settings differ"),
    ("weights", "the model or its weight files differ"),
    ("data", "the data file's contents differ"),
])
def test_cli_refuses_to_mix_runs(tmp_path, tiny_checkpoint, data, capsys, change, reason):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint("tiny"), ckpt)
    model = KimiVLForConditionalGeneration.from_pretrained(ckpt)
    model.save_pretrained(ckpt)  # as save_pretrained writes it, so that a second save differs only in the weights
    config = (ckpt / "config.json").read_bytes()
    tsv = tmp_path / "data.tsv"
    shutil.copy(data, tsv)
    args = ["eval", "--model", str(ckpt), "--data", str(tsv), "--metric", "ocr", "--out", str(tmp_path / "out"),
            "--limit", "2", "--max-new-tokens", "4", "--no-progress"]
    assert main(args) == 0
    if change == "max_new_tokens":
        args[args.index("4")] = "5"
    elif change == "weights":  # trained further into the same folder: the same config and file sizes
        with torch.no_grad():
            model.language_model.lm_head.weight.mul_(2)
        model.save_pretrained(ckpt)
        assert (ckpt / "config.json").read_bytes() == config
    else:
        write_synthetic(tsv, n=20, seed=4)
    capsys.readouterr()
    assert main(args) == 1
    assert f"holds predictions of another run: {reason}" in capsys.readouterr().err


def test_cli_interrupted_run_resumes_with_the_same_predictions(tmp_path, tiny_checkpoint, data, capsys, monkeypatch):
    import kimivl.generation
    ckpt = tiny_checkpoint("tiny")
    args = ["eval", "--model", ckpt, "--data", str(data), "--metric", "ocr", "--limit", "6", "--batch-size", "2",
            "--max-new-tokens", "4", "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "whole")]) == 0
    real, calls = kimivl.generation.generate, []

    def ctrl_c_on_the_second_batch(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(kimivl.generation, "generate", ctrl_c_on_the_second_batch)
    assert main(args + ["--out", str(tmp_path / "cut")]) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err
    assert (tmp_path / "cut" / "predictions.jsonl").read_text().count("\n") == 2
    assert main(args + ["--out", str(tmp_path / "cut")]) == 0
    whole, cut = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("whole", "cut"))
    assert cut["timing"]["resumed"] == 2 and cut["timing"]["predicted_now"] == 4
    preds = {d: (tmp_path / d / "scores.jsonl").read_text() for d in ("whole", "cut")}
    assert preds["whole"] == preds["cut"] and without_timing(whole) == without_timing(cut)


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint):
    return ModelPredictor(tiny_checkpoint("tiny"), max_new_tokens=8)


def test_model_predictor_batch_equals_alone(predictor, data):
    """Left-padded batches of samples with different prompts answer as each sample does alone (greedy)."""
    samples = read_tsv(data)[:4]
    alone = [predictor.predict([s])[0] for s in samples]
    assert predictor.predict(samples) == alone
    assert len(set(alone)) > 1  # the answers depend on the sample (random weights, but not a constant)


def test_model_predictor_prompt(predictor, data):
    """One user turn: the sample's images, then the build_prompt text; the processor gives each image its tokens."""
    sample = read_tsv(data)[0]
    conv = predictor.conversation(sample)
    assert [m["role"] for m in conv] == ["user"]
    items = conv[0]["content"]
    assert [i["type"] for i in items] == ["image"] * len(sample.images) + ["text"] and len(sample.images) == 1
    assert items[-1]["text"] == sample.question
    inputs = predictor.processor(conv)
    (h, w), = inputs["image_grid_hws"].tolist()  # patches; the 2x2 merge leaves h*w/4 tokens
    media_pad = predictor.processor.tokenizer.token_id("<|media_pad|>")
    assert int((inputs["input_ids"][0] == media_pad).sum()) == h * w // 4 > 0


def test_model_predictor_settings(tiny_checkpoint):
    p = ModelPredictor(tiny_checkpoint("tiny"), system="", dtype="bfloat16")
    assert p.settings == {"max_new_tokens": 128, "temperature": 0.0, "system": None, "dtype": "bfloat16"}
    assert p._model is None  # not loaded until something is predicted
    with pytest.raises(EvalError, match="--max-new-tokens 2048 leaves no room for a prompt in the model's context"):
        ModelPredictor(tiny_checkpoint("tiny"), max_new_tokens=2048)  # checked before loading anything
    with pytest.raises(EvalError, match="at least 1"):
        ModelPredictor(tiny_checkpoint("tiny"), max_new_tokens=0)


def test_model_predictor_scores_the_answer_after_thinking(predictor, monkeypatch):
    import kimivl.generation
    monkeypatch.setattr(kimivl.generation, "generate",
                        lambda *a, **k: ["◁think▷it says 42◁/think▷42", "◁think▷cut short", "plain"])
    assert predictor.predict([Sample(str(i), "q", ["a"]) for i in range(3)]) == ["42", "", "plain"]


def test_model_predictor_names_only_the_samples_too_long(predictor, data):
    short, long = read_tsv(data)[:2]
    long.question = " ".join(["the"] * 2100)  # the tiny context is 2048 tokens
    with pytest.raises(EvalError, match=r"^sample 1 \(2\d\d\d tokens\): the prompt and --max-new-tokens 8 do not fit "
                                        "in the model's context of 2048 tokens"):
        predictor.predict([short, long])
