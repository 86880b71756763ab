"""The training recipes run end to end (a few steps of a smaller model, so the scripts cannot rot unnoticed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from kimivl import KimiVLForConditionalGeneration, KimiVLProcessor

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_ocr_recipes_train_save_and_score(tmp_path):
    arch = {"vision_hidden": 64, "vision_layers": 1, "text_hidden": 64, "text_layers": 2}
    done = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "tiny_ocr.py"), "--out", str(tmp_path), "--glyph-steps", "3",
         "--frozen-steps", "2", "--sft-steps", "2", "--batch-size", "2", "--eval-n", "5", "--arch", json.dumps(arch)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "stage wall times: glyphs" in done.stdout and "held-out exact match" in done.stdout
    glyphs = [json.loads(x) for x in (tmp_path / "glyphs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in glyphs] == [1, 2, 3] and all(r["loss"] > 0 for r in glyphs)
    for stage in ("sft-frozen", "sft"):
        rows = [json.loads(x) for x in (tmp_path / stage / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if "loss" in r] == [1, 2] and "eval" in rows[-1]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["timings_s"]) == {"glyphs", "sft-frozen", "sft"} and summary["heldout"]["n"] == 5
    model = KimiVLForConditionalGeneration.from_pretrained(tmp_path / "model")
    assert model.config.text_config.hidden_size == 64
    assert KimiVLProcessor.from_pretrained(tmp_path / "model").tokenizer.vocab_size == 512
    # the frozen stage left the tower as the glyph stage made it
    glyph_tower = KimiVLForConditionalGeneration.from_pretrained(tmp_path / "glyphs" / "model").vision_tower
    frozen_tower = KimiVLForConditionalGeneration.from_pretrained(tmp_path / "sft-frozen" / "model").vision_tower
    for (name, a), b in zip(glyph_tower.state_dict().items(), frozen_tower.state_dict().values()):
        assert torch.equal(a, b), name

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


def test_glyph_targets_put_each_character_where_its_ink_is():
    """The glyph stage's labels: every character's centre lies on its own ink (so the patch labelled with it shows
    it), also rotated and placed in a wider canvas, and the neighbour and position labels follow the text."""
    import random

    sys.path.insert(0, str(ROOT / "recipes"))
    try:
        import tiny_ocr
    finally:
        sys.path.remove(str(ROOT / "recipes"))
    rng = random.Random(3)
    for layout in ("tight", "suite", "shapes"):
        for text in ("HIMW", "Hammer 42"):
            image, centres = tiny_ocr.render_line(rng, text, layout)
            assert len(centres) == len(text)
            grey = image.convert("L")
            background = sorted(grey.getdata())[grey.width * grey.height // 2] if layout != "shapes" else None
            xs = [x for x, _ in centres]
            assert all(a < b for a, b in zip(xs, xs[1:]))  # left to right (rotations stay within 5 degrees)
            assert all(0 <= x < image.width and 0 <= y < image.height for x, y in centres)
            for ch, (x, y) in zip(text, centres):
                if ch in "HIMW" and background is not None:  # vertical strokes cross the line's middle
                    window = [grey.getpixel((min(max(int(x) + dx, 0), image.width - 1),
                                             min(max(int(y) + dy, 0), image.height - 1)))
                              for dx in range(-3, 4) for dy in range(-3, 4)]
                    # ink differs from the background by >= 100 per channel, noise moves a pixel by <= 0.15 * 255
                    assert max(abs(v - background) for v in window) > 55, (layout, text, ch)
            grid = (-(-image.height // 28) * 2, -(-image.width // 28) * 2)
            targets = tiny_ocr.glyph_targets(text, centres, grid)
            on = targets["char"] != tiny_ocr.NONE
            labelled = sorted(targets["index"][on].tolist())
            assert labelled == sorted(set(labelled)) and set(labelled) <= set(range(len(text)))
            for i in labelled:
                k = int((targets["index"] == i).nonzero())
                assert tiny_ocr.CHARS[targets["char"][k]] == text[i]
                assert targets["prev"][k] == (tiny_ocr.CHARS.index(text[i - 1]) if i else tiny_ocr.EDGE)
                assert targets["next"][k] == (tiny_ocr.CHARS.index(text[i + 1]) if i + 1 < len(text)
                                              else tiny_ocr.EDGE)


def test_tiny_shapes_recipe_trains_and_scores_and_its_items_say_what_they_show(tmp_path):
    sys.path.insert(0, str(ROOT / "recipes"))
    from tiny_shapes import Shapes, draw_item
    import random
    from kimivl.eval.synthetic import COLOURS
    for i in range(20):  # the answer is the colour drawn, and each shape is a blob of that colour
        image, name, count = draw_item(random.Random(i))
        colours = {c for _, c in image.getcolors(1 << 20)}
        assert COLOURS[name] in colours and 1 <= count <= 4
    convo = Shapes(4, seed=0)[1]
    assert convo[1]["content"] in set(COLOURS) | {"1", "2", "3", "4"}
    done = subprocess.run([sys.executable, str(ROOT / "recipes" / "tiny_shapes.py"), "--out", str(tmp_path),
                           "--steps", "2", "--batch-size", "2", "--eval-n", "4"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["heldout"]["n"] == 4 and set(summary["categories"]) == {"colour", "count"}
    KimiVLForConditionalGeneration.from_pretrained(tmp_path / "sft" / "model", quantize="int4", group_size=32)
