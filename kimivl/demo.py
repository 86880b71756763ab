"""`python -m kimivl.demo`: make (once) a tiny random checkpoint, load it, and run one image + text forward pass.

This stands in for the generation demo until inference lands; it shows the whole path a real checkpoint takes.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from kimivl import KimiVLForConditionalGeneration

DEMO_DIR = Path("runs/demo-tiny")


def main() -> int:
    if not (DEMO_DIR / "config.json").exists():
        from weights_tools.tiny import make_tiny
        make_tiny(DEMO_DIR, preset="tiny", seed=0)
        print(f"created a tiny random checkpoint in {DEMO_DIR}")
    t0 = time.perf_counter()
    model = KimiVLForConditionalGeneration.from_pretrained(DEMO_DIR)
    cfg = model.config
    print(f"loaded {DEMO_DIR} in {time.perf_counter() - t0:.2f} s: "
          f"{sum(p.numel() for p in model.parameters()):,} parameters, {model.dtype}")

    # One 56x84-pixel image = a 4x6 grid of 14x14 patches -> 2x3 = 6 merged tokens after the 2x2 merge.
    h, w = 4, 6
    pixel_values = torch.rand(h * w, 3, 14, 14) * 2 - 1
    image_grid_hws = torch.tensor([[h, w]])
    n_media = h * w // 4
    text = torch.randint(0, 1000, (10,))
    input_ids = torch.cat([text[:4], torch.full((n_media,), cfg.media_placeholder_token_id), text[4:]])[None]
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model(input_ids, pixel_values=pixel_values, image_grid_hws=image_grid_hws, labels=input_ids)
    ms = (time.perf_counter() - t0) * 1000
    print(f"forward: {input_ids.shape[1]} tokens ({n_media} from a {h}x{w}-patch image) -> logits "
          f"{list(out.logits.shape)}, loss {out.loss.item():.3f} (random weights: ~ln(vocab) = "
          f"{torch.log(torch.tensor(float(cfg.text_config.vocab_size))).item():.3f}) in {ms:.1f} ms")
    print("next-token argmax:", out.logits[0].argmax(-1).tolist())
    return 0


if __name__ == "__main__":
    sys.exit(main())
