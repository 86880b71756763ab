"""A tiny Kimi-VL that knows something in minutes: the colour and the number of shapes in an image.

    .venv/bin/python recipes/tiny_shapes.py --out runs/tiny-shapes [--steps 600]

Images: 96-320 x 64-160 px, a light background, 1-4 filled rectangles or discs of one of the synthetic suite's six
colours, light noise. Questions: `What colour are the shapes?` (a colour name) and `How many shapes are there?` (a
digit). Stages, each skipped when its folder is complete: `init` (random weights, a byte-level tokenizer), `sft`
(`kimivl.train` SFT, everything trainable), `eval` (`kimivl eval`, `ocr` exact match, on 240 held-out images drawn
with another seed). The model's widths are multiples of 32, so that it also quantizes in int4 groups of 32:
`benchmarks/bench_quant.py accuracy` measures it in float32, int8 and int4. (The tiny reader of recipes/tiny_ocr.py
does not read yet; this is the model that knows something which quantization is measured on meanwhile.)
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_ocr import config  # noqa: E402

from kimivl import KimiVLForConditionalGeneration, KimiVLProcessor  # noqa: E402
from kimivl.eval.data import Sample, write_jsonl  # noqa: E402
from kimivl.eval.runner import run_benchmark  # noqa: E402
from kimivl.eval.synthetic import COLOURS  # noqa: E402
from kimivl.model import init_weights  # noqa: E402
from kimivl.train import SFTConfig, train  # noqa: E402
from weights_tools.tiny import write_checkpoint  # noqa: E402

QUESTIONS = {"colour": "What colour are the shapes?", "count": "How many shapes are there?"}
ARCH = dict(vision_hidden=64, vision_layers=2, text_hidden=128, text_layers=2, text_heads=4, kv_lora_rank=64)


def draw_item(rng: random.Random) -> tuple[Image.Image, str, int]:
    """An image, its shapes' colour name and their number."""
    width, height = rng.randint(96, 320), rng.randint(64, 160)
    image = Image.new("RGB", (width, height), tuple(rng.randint(200, 255) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    name = rng.choice(sorted(COLOURS))
    count = rng.randint(1, 4)
    slot = width // count
    for k in range(count):  # one shape per vertical strip: they never overlap
        w, h = rng.randint(12, max(13, min(slot - 6, 60))), rng.randint(12, max(13, min(height - 10, 60)))
        x0, y0 = k * slot + rng.randint(2, max(2, slot - w - 2)), rng.randint(2, height - h - 2)
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x0 + w, y0 + h), fill=COLOURS[name])
    pixels = image.load()
    for _ in range(width * height // 50):  # light pixel noise
        x, y = rng.randrange(width), rng.randrange(height)
        pixels[x, y] = tuple(max(0, min(255, c + rng.randint(-40, 40))) for c in pixels[x, y])
    return image, name, count


class Shapes(Sequence):
    """n conversations; item i depends only on (seed, i)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> list[dict]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        rng = random.Random(f"shapes:{self.seed}:{i}")
        image, name, count = draw_item(rng)
        kind = rng.choice(sorted(QUESTIONS))
        return [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": QUESTIONS[kind]}]},
                {"role": "assistant", "content": name if kind == "colour" else str(count)}]


def write_heldout(path: Path, n: int, seed: int) -> Path:
    samples = []
    for i in range(n):
        rng = random.Random(f"heldout:{seed}:{i}")
        image, name, count = draw_item(rng)
        kind = sorted(QUESTIONS)[i % 2]
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        samples.append(Sample(index=str(i), question=QUESTIONS[kind], answers=[name if kind == "colour" else str(count)],
                              images=[buf.getvalue()], category=kind))
    return write_jsonl(samples, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/tiny-shapes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-n", type=int, default=240)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    heldout = out / "heldout" / "heldout.jsonl"
    if not heldout.is_file():
        write_heldout(heldout, args.eval_n, seed=args.seed + 1)
    init = out / "init"
    if not (init / "config.json").is_file():
        model = KimiVLForConditionalGeneration(config(**ARCH))
        init_weights(model, seed=args.seed)
        write_checkpoint(model, init, " ")  # no merges: a byte-level vocabulary
    timings = {}
    if not (out / "sft" / "model" / "config.json").is_file():
        model = KimiVLForConditionalGeneration.from_pretrained(init)
        processor = KimiVLProcessor.from_pretrained(init)
        t0 = time.perf_counter()
        train(model, processor, Shapes(args.steps * args.batch_size, args.seed), SFTConfig(
            out=str(out / "sft"), steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.steps // 20,
            weight_decay=0.0, seed=args.seed, save_every=args.steps, progress=True))
        timings["sft_s"] = round(time.perf_counter() - t0, 1)
    report = run_benchmark(str(out / "sft" / "model"), heldout, "ocr", out / "eval", progress=True)
    summary = {"timings": timings, "heldout": report["overall"], "categories": report["categories"]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
