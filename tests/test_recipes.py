"""The training recipes run end to end (a few steps of a smaller model, so the scripts cannot rot unnoticed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from kimivl import KimiVLForConditionalGeneration, KimiVLProcessor

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_ocr_recipes_train_save_and_score(tmp_path):
    arch = {"vision_hidden": 64, "vision_layers": 1, "text_hidden": 64, "text_layers": 2}
    done = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "tiny_ocr.py"), "--out", str(tmp_path), "--steps", "3",
         "--batch-size", "2", "--warmup", "1", "--eval-n", "5", "--save-every", "0", "--arch", json.dumps(arch)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "3 steps in" in done.stdout and "held-out exact match" in done.stdout
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3] and "eval" in rows[-1]
    assert json.loads((tmp_path / "eval" / "report.json").read_text())["n"] == 5
    model = KimiVLForConditionalGeneration.from_pretrained(tmp_path / "model")
    assert model.config.text_config.hidden_size == 64
    assert KimiVLProcessor.from_pretrained(tmp_path / "model").tokenizer.vocab_size == 576

    # the RL recipe starts from that model
    rl_out = tmp_path / "grpo"
    done = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "tiny_ocr_rl.py"), "--start", str(tmp_path / "model"), "--out",
         str(rl_out), "--steps", "2", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "4",
         "--eval-n", "5", "--save-every", "0", "--categories", "word", "box_colour"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "grpo: 2 steps in" in done.stdout and "held-out exact match" in done.stdout
    rows = [json.loads(x) for x in (rl_out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward" in r] == [1, 2] and "eval" in rows[-1]
    assert (rl_out / "reward.png").is_file()
    KimiVLForConditionalGeneration.from_pretrained(rl_out / "model")
