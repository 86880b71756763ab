#!/usr/bin/env python3
"""Run llama.cpp's convert_hf_to_gguf.py (from the llama-cpp-python 0.3.36 sdist, unpacked at $LLAMA_CPP_SRC)
with a dummy tokenizer, for bench_decode's transformers export, which ships none (llama.cpp's baseline beside
bench_decode: see bench.py here).

Only DeepseekV2Model.set_vocab is replaced; tensor conversion is untouched, so
the GGUF holds the checkpoint's own weights.

Dummy vocab (exactly hparams["vocab_size"] = 163840 ids, GPT-2 style byte-level BPE):
  ids 0..255          : the 256 byte tokens (GPT-2 bytes_to_unicode alphabet)
  ids 256..65791      : all 65536 two-byte tokens, each with its merge rule "a b"
  ids 65792..vocab-1  : "[PAD<i>]" placeholders (type UNUSED), except
  bos/eos/pad ids from config.json (163584/163585/163839) -> "[BOS]"/"[EOS]"/"[PAD]" (CONTROL)

GGUF fix-up: see _set_gguf_parameters below (q_lora_rank = 0 for a null q_lora_rank).

Usage: LLAMA_CPP_SRC=<sdist>/vendor/llama.cpp <venv>/bin/python convert.py <hf_dir> --outtype bf16 --outfile model.gguf
"""
import json
import os
import sys
from pathlib import Path

if "LLAMA_CPP_SRC" not in os.environ:
    sys.exit("set LLAMA_CPP_SRC to the llama.cpp source tree (the llama-cpp-python sdist's vendor/llama.cpp)")
sys.path.insert(0, str(Path(os.environ["LLAMA_CPP_SRC"])))

import convert_hf_to_gguf as cv  # noqa: E402  (also puts vendored gguf-py on sys.path)
import gguf  # noqa: E402
from conversion.deepseek import DeepseekV2Model  # noqa: E402


def bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def dummy_set_vocab(self):
    vocab_size = int(self.hparams["vocab_size"])
    cfg = json.loads((Path(self.dir_model) / "config.json").read_text())
    specials = {
        cfg.get("bos_token_id"): "[BOS]",
        cfg.get("eos_token_id"): "[EOS]",
        cfg.get("pad_token_id"): "[PAD]",
    }
    specials.pop(None, None)

    b2u = bytes_to_unicode()
    tokens: list[str] = []
    toktypes: list[int] = []
    merges: list[str] = []
    for b in range(256):
        tokens.append(b2u[b])
        toktypes.append(gguf.TokenType.NORMAL)
    for a in range(256):
        for b in range(256):
            if len(tokens) >= vocab_size:
                break
            tokens.append(b2u[a] + b2u[b])
            toktypes.append(gguf.TokenType.NORMAL)
            merges.append(f"{b2u[a]} {b2u[b]}")
    while len(tokens) < vocab_size:
        tokens.append(f"[PAD{len(tokens)}]")
        toktypes.append(gguf.TokenType.UNUSED)
    for tid, text in specials.items():
        assert 65792 <= tid < vocab_size, tid
        tokens[tid] = text
        toktypes[tid] = gguf.TokenType.CONTROL
    assert len(tokens) == vocab_size and len(set(tokens)) == vocab_size

    w = self.gguf_writer
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(toktypes)
    w.add_token_merges(merges)
    if "bos_token_id" in cfg:
        w.add_bos_token_id(cfg["bos_token_id"])
    if "eos_token_id" in cfg:
        w.add_eos_token_id(cfg["eos_token_id"])
    if "pad_token_id" in cfg:
        w.add_pad_token_id(cfg["pad_token_id"])
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    print(f"[convert_wrapper] dummy vocab: {vocab_size} tokens, {len(merges)} merges, specials {specials}", flush=True)


DeepseekV2Model.set_vocab = dummy_set_vocab

# llama.cpp's deepseek2 loader (src/models/deepseek2.cpp) only tolerates a missing
# "deepseek2.attention.q_lora_rank" key for the known "lite" layer counts (26/27/48);
# the converter writes no key when q_lora_rank is null, so a 3-layer model with a plain
# q_proj fails to load ("key not found"). Write q_lora_rank = 0, which makes the loader
# use the plain attn_q (wq) path exactly like DeepSeek-V2-Lite.
_orig_set_gguf_parameters = DeepseekV2Model.set_gguf_parameters


def _set_gguf_parameters(self):
    _orig_set_gguf_parameters(self)
    if self.hparams.get("q_lora_rank") is None:
        self.gguf_writer.add_q_lora_rank(0)
        print("[convert_wrapper] q_lora_rank is null -> wrote deepseek2.attention.q_lora_rank = 0", flush=True)


DeepseekV2Model.set_gguf_parameters = _set_gguf_parameters

if __name__ == "__main__":
    cv.main()
