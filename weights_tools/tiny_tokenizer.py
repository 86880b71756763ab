"""A small real BPE vocabulary and Kimi's tokenizer files for tiny checkpoints, so tests read tokenizers through the
same code path as a published checkpoint."""

from __future__ import annotations

import collections
import functools
import json
import re
from pathlib import Path

from kimivl.tokenizer import NUM_RESERVED_SPECIAL_TOKENS, write_tiktoken_model

# Named special tokens by offset from the end of the base vocabulary, as in the published tokenizer_config.json
# (spec 7: 163584 + offset); the other reserved ids are `<|reserved_token_{id}|>`.
SPECIAL_TOKEN_OFFSETS = {
    0: "[BOS]", 1: "[EOS]", 2: "<|im_end|>", 3: "<|im_user|>", 4: "<|im_assistant|>", 6: "<|start_header_id|>",
    7: "<|end_header_id|>", 9: "[EOT]", 10: "<|im_system|>", 17: "<|im_middle|>", 18: "<|media_start|>",
    19: "<|media_content|>", 20: "<|media_end|>", 21: "<|media_pad|>", 254: "[UNK]", 255: "[PAD]",
}

# A jinja copy of the built-in chat format (kimivl.tokenizer.render_chat), shipped as chat_template.jinja the way
# published checkpoints ship theirs.
CHAT_TEMPLATE = """\
{%- for message in messages -%}
{%- if loop.first and message['role'] != 'system' -%}
<|im_system|>system<|im_middle|>You are a helpful assistant<|im_end|>
{%- endif -%}
<|im_{{ message['role'] }}|>{{ message['role'] }}<|im_middle|>
{%- if message['content'] is string -%}
{{ message['content'] }}
{%- else -%}
{%- for item in message['content'] -%}
{%- if item['type'] == 'image' -%}
<|media_start|>image<|media_content|><|media_pad|><|media_end|>
{%- else -%}
{{ item['text'] }}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
<|im_end|>
{%- endfor -%}
{%- if add_generation_prompt -%}
<|im_assistant|>assistant<|im_middle|>
{%- endif -%}
"""

CORPUS = """\
You are a helpful assistant. Describe the image. What is written in the picture? Read the text in the image and
answer the question with a single word or phrase. The quick brown fox jumps over the lazy dog near the river bank.
A small model reads pictures and words; it looks at each patch of the image, then writes an answer one token at a
time. Please think step by step, then give the final answer. What colour is the box? The box is red, green, blue,
yellow, black, white, orange or purple. How many people are in the photo? There are two cats on the sofa and one
dog under the table. Which option is correct? Answer with the option's letter from the given choices directly.
The document shows a receipt with the total amount, the date and the name of the shop. Street signs, book covers,
menus, charts and tables are common sources of text in natural images. Élan, café, naïve and über use letters
beyond ASCII; 你好世界 is Chinese for hello world; emoji such as 🙂 take four bytes in UTF-8.
"""


def tiny_vocab_text() -> str:
    return CORPUS + " ".join(str(i) for i in range(1000))


@functools.lru_cache(maxsize=None)
def train_bpe(text: str, size: int) -> dict[bytes, int]:
    """Byte-level BPE ranks: the 256 bytes, then the most frequent adjacent pair merged, repeatedly, until `size`
    tokens (ties broken by the pair's bytes, so the result is deterministic)."""
    # a Python-re approximation of the Kimi pre-tokeniser (spec 7): letters with one leading non-letter, digits
    # in runs of up to 3, punctuation, whitespace
    freq = collections.Counter(re.findall(r"[^\r\n\w]?[^\W\d_]+|\d{1,3}| ?[^\s\w]+[\r\n]*|\s*[\r\n]+|\s+", text))
    words = {w: [bytes([b]) for b in w.encode()] for w in freq}
    ranks = {bytes([b]): b for b in range(256)}
    counts: collections.Counter = collections.Counter()
    where: dict[tuple[bytes, bytes], set[str]] = collections.defaultdict(set)

    def tally(w: str, sign: int) -> None:
        s = words[w]
        for pair in zip(s, s[1:]):
            counts[pair] += sign * freq[w]
            if sign > 0:
                where[pair].add(w)

    for w in words:
        tally(w, 1)
    while len(ranks) < size:
        (a, b), n = max(counts.items(), key=lambda kv: (kv[1], kv[0]), default=((b"", b""), 0))
        if n <= 0:
            raise ValueError(f"the corpus allows only {len(ranks)} tokens, fewer than {size}")
        ranks[a + b] = len(ranks)
        for w in where.pop((a, b)):
            tally(w, -1)
            s, merged, i = words[w], [], 0
            while i < len(s):
                if i + 1 < len(s) and s[i] == a and s[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(s[i])
                    i += 1
            words[w] = merged
            tally(w, 1)
    return ranks


def write_tokenizer(out: str | Path, vocab_size: int, corpus: str | None = None) -> None:
    """tiktoken.model (vocab_size - 256 BPE ranks learnt from `corpus`, default the built-in English sample),
    tokenizer_config.json and chat_template.jinja in `out`."""
    out = Path(out)
    n = vocab_size - NUM_RESERVED_SPECIAL_TOKENS
    write_tiktoken_model(train_bpe(corpus or tiny_vocab_text(), n), out / "tiktoken.model")
    config = {
        "tokenizer_class": "TikTokenTokenizer",
        "added_tokens_decoder": {str(n + k): {"content": name, "lstrip": False, "normalized": False,
                                              "rstrip": False, "single_word": False, "special": True}
                                 for k, name in SPECIAL_TOKEN_OFFSETS.items()},
        "bos_token": "[BOS]", "eos_token": "[EOS]", "pad_token": "[PAD]", "unk_token": "[UNK]",
        "model_max_length": 1048576,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
