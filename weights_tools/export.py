"""Export the language model of a Kimi-VL checkpoint as a plain DeepSeek-V3 checkpoint.

transformers' own `DeepseekV3ForCausalLM` loads the result without remote code: the `language_model.` prefix is
stripped and config.json becomes the text_config. Routed experts keep the official per-expert names
(`mlp.experts.{e}.gate_proj.weight` ...); transformers 5.23 stacks them into its fused `gate_up_proj` / `down_proj`
while loading (its DeepSeek-V3 weight conversion) and splits them back when saving, both exactly. Tensors keep their
dtype and bytes; they are streamed as by reshard, so memory holds one chunk.
"""

from __future__ import annotations

import os
from pathlib import Path

from kimivl.checkpoint import read_layout

from .rewrite import check_output, write_checkpoint

PREFIX = "language_model."
# the image side and the Kimi-VL remote code do not belong to a text-only checkpoint; tokenizer files do
SKIP = ("preprocessor_config.json", "processor_config.json", "configuration_*.py", "modeling_*.py",
        "processing_*.py", "image_processing_*.py")


def export_text(src: str | os.PathLike, out: str | os.PathLike, max_shard_size: int | str = "5GB",
                force: bool = False, progress: bool = False) -> Path:
    """Write the decoder of checkpoint src to out as a DeepseekV3ForCausalLM checkpoint (config.json, weights,
    tokenizer and generation files)."""
    out = check_output(src, out, force)
    layout = read_layout(src)
    layout.raise_problems("cannot be exported")
    tensors = {name.removeprefix(PREFIX): (name, layout.info(name).dtype)
               for name in layout.expected if name.startswith(PREFIX)}
    config = {"architectures": ["DeepseekV3ForCausalLM"], **layout.config.to_dict()["text_config"],
              "torch_dtype": str(layout.info(PREFIX + "lm_head.weight").dtype).removeprefix("torch.")}
    return write_checkpoint(layout, out, tensors, max_shard_size, config=config, skip=SKIP, progress=progress)
