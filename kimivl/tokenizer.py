"""Kimi's tiktoken BPE tokenizer and chat format (spec 7), read from a checkpoint's `tiktoken.model` and
`tokenizer_config.json`."""

from __future__ import annotations

import base64
import functools
import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

import tiktoken

from .errors import CheckpointError, InputError
from .fsutil import write_text_atomic

# Pre-tokenisation regex (spec 7): the alternatives in order, joined with "|".
PAT_STR = "|".join([
    r"[\p{Han}]+",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])
NUM_RESERVED_SPECIAL_TOKENS = 256
MAX_CHUNK_CHARS = 400_000  # tiktoken is handed text in chunks no longer than this ...
MAX_RUN_CHARS = 25_000  # ... and runs of whitespace / non-whitespace no longer than this (its worst case is quadratic)

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant"
ROLES = ("system", "user", "assistant")
IMAGE_SLOT = "<|media_start|>image<|media_content|><|media_pad|><|media_end|>"
GENERATION_PROMPT = "<|im_assistant|>assistant<|im_middle|>"
THINK_START, THINK_END = "◁think▷", "◁/think▷"


def read_tiktoken_model(path: str | os.PathLike) -> dict[bytes, int]:
    """Mergeable ranks from a `tiktoken.model` file: one `base64(token bytes) rank` per line.

    Read here rather than with `tiktoken.load.load_tiktoken_bpe`, which caches by path and would return a stale
    vocabulary when a file is rewritten in place.
    """
    ranks: dict[bytes, int] = {}
    try:
        lines = Path(path).read_bytes().splitlines()
    except OSError as e:
        raise CheckpointError(f"cannot read the tokenizer vocabulary {path}: {e.strerror or e}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise CheckpointError(f"{path} line {n} is not `base64-token rank`: {line[:80]!r}") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise CheckpointError(f"{path}: ranks must be 0..{len(ranks) - 1} with no gaps or repeats")
    return ranks


def write_tiktoken_model(ranks: dict[bytes, int], path: str | os.PathLike) -> None:
    lines = (f"{base64.b64encode(tok).decode()} {rank}\n" for tok, rank in sorted(ranks.items(), key=lambda t: t[1]))
    write_text_atomic(Path(path), "".join(lines))


def _token_name(value: Any) -> str | None:
    """`bos_token` and friends are stored as a string or as {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


class KimiTokenizer:
    """Byte-level BPE (tiktoken) with 256 special ids after the base vocabulary, named from `added_tokens_decoder`
    and `<|reserved_token_{id}|>` otherwise. Special-token strings inside text are encoded as their ids, as the
    official tokenizer does."""

    def __init__(self, mergeable_ranks: dict[bytes, int], named_specials: dict[int, str] | None = None,
                 eos_token: str = "[EOS]", pad_token: str = "[PAD]", bos_token: str = "[BOS]",
                 chat_template: str | None = None):
        n = len(mergeable_ranks)
        names = named_specials or {}
        outside = [i for i in names if not n <= i < n + NUM_RESERVED_SPECIAL_TOKENS]
        if outside:
            last = n + NUM_RESERVED_SPECIAL_TOKENS - 1
            raise CheckpointError(f"special token ids {outside} lie outside {n}..{last}, "
                                  f"the ids after the {n}-token base vocabulary")
        self.special_tokens = {names.get(i, f"<|reserved_token_{i}|>"): i
                               for i in range(n, n + NUM_RESERVED_SPECIAL_TOKENS)}
        self.encoding = tiktoken.Encoding("kimi", pat_str=PAT_STR, mergeable_ranks=mergeable_ranks,
                                          special_tokens=self.special_tokens)
        self.num_base_tokens = n
        self.mergeable_ranks, self.named_specials = mergeable_ranks, dict(names)
        self.chat_template = chat_template
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "KimiTokenizer":
        """Read `tiktoken.model`, `tokenizer_config.json` and, when present, `chat_template.jinja` from a directory."""
        path = Path(path)
        if not (path / "tiktoken.model").is_file():
            raise CheckpointError(f"{path} has no tiktoken.model: it is not a Kimi tokenizer directory")
        ranks = read_tiktoken_model(path / "tiktoken.model")
        config: dict[str, Any] = {}
        if (path / "tokenizer_config.json").is_file():
            try:
                config = json.loads((path / "tokenizer_config.json").read_text())
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
                raise CheckpointError(f"{path / 'tokenizer_config.json'} is not valid JSON: {e}") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{path / 'tokenizer_config.json'} must hold a JSON object, got "
                                  f"{type(config).__name__}")
        try:
            named = {int(i): entry["content"] for i, entry in config.get("added_tokens_decoder", {}).items()}
            if not all(isinstance(name, str) and name for name in named.values()):
                raise TypeError
        except (ValueError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{path / 'tokenizer_config.json'}: added_tokens_decoder must map ids to "
                                  '{"content": name, ...}') from None
        file = path / "tokenizer_config.json"
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                            None)
        if template is not None and not isinstance(template, str):
            raise CheckpointError(f"{file}: chat_template must be a string (or a list of named templates), got "
                                  f"{type(template).__name__}")
        if (path / "chat_template.jinja").is_file():
            try:
                template = (path / "chat_template.jinja").read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise CheckpointError(f"{path / 'chat_template.jinja'} is not valid UTF-8: {e.reason}") from None
        kwargs = {k: _token_name(config[k]) for k in ("eos_token", "pad_token", "bos_token") if config.get(k)}
        bad = {k: v for k, v in kwargs.items() if not isinstance(v, str)}
        if bad:
            raise CheckpointError(f"{file}: {', '.join(bad)} must name a token (a string), got {bad}")
        return cls(ranks, named, chat_template=template, **kwargs)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write `tiktoken.model`, `tokenizer_config.json` and (when the tokenizer has one) `chat_template.jinja`:
        the files `from_pretrained` reads."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        write_tiktoken_model(self.mergeable_ranks, path / "tiktoken.model")
        entry = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
        config = {"tokenizer_class": "TikTokenTokenizer",
                  "added_tokens_decoder": {str(i): {"content": name, **entry}
                                           for i, name in sorted(self.named_specials.items())},
                  "bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token}
        write_text_atomic(path / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
        if self.chat_template is not None:
            write_text_atomic(path / "chat_template.jinja", self.chat_template)

    # ---- ids ---------------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.num_base_tokens + NUM_RESERVED_SPECIAL_TOKENS

    def token_id(self, name: str) -> int:
        if name not in self.special_tokens:
            raise InputError(f"the tokenizer has no special token {name!r}")
        return self.special_tokens[name]

    @property
    def eos_id(self) -> int:
        return self.token_id(self.eos_token)

    @property
    def pad_id(self) -> int:
        return self.token_id(self.pad_token)

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end an assistant turn: `<|im_end|>` and the EOS token."""
        return sorted({self.token_id("<|im_end|>"), self.eos_id})

    def is_special(self, token_id: int) -> bool:
        return token_id >= self.num_base_tokens

    def is_skipped(self, token_id: int) -> bool:
        """Dropped by decode(skip_special_tokens=True): a named special token."""
        return token_id in self.named_specials

    # ---- text <-> ids ------------------------------------------------------------------------------------------
    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Text -> ids. With allow_special, special-token strings in the text become their ids (official
        behaviour), except inside text that `shield` marked (message text rendered by apply_chat_template), which is
        always plain text; without allow_special every special-token string is plain text.

        As the published tokenizer (transformers' tokenize step, then tokenization_moonshot's encode): the text is
        first split at the named special tokens (those of `added_tokens_decoder`), and each piece between them is
        encoded in chunks whose runs of whitespace / non-whitespace stay under MAX_RUN_CHARS, so the template's
        markers never count toward the length of a user's run."""
        if not allow_special:
            return self._encode_plain(text, set())
        ids: list[int] = []
        for n, piece in enumerate(self._named_split.split(text)):
            if n % 2:  # the pattern's group: a named special token
                ids.append(self.special_tokens[piece])
            elif SHIELD in piece:  # holds message text: its marked special-token strings stay text
                for m, part in enumerate(self._special_pattern.split(piece)):
                    ids += [self.special_tokens[part]] if m % 2 else self._encode_plain(unshield(part), set())
            elif piece:
                ids += self._encode_plain(piece, "all")  # reserved names inside a piece still become their ids
        return ids

    def _encode_plain(self, text: str, allowed: Any) -> list[int]:
        ids: list[int] = []
        for chunk in _chunks(text):
            ids += self.encoding.encode(chunk, allowed_special=allowed, disallowed_special=())
        return ids

    @functools.cached_property
    def _named_split(self) -> re.Pattern:
        """Splits text at the named special tokens, keeping them (as the pattern's one group)."""
        names = sorted(self.named_specials.values(), key=len, reverse=True)
        return re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else re.compile("(?!)()")

    def decode_bytes(self, ids: Sequence[int], skip_special_tokens: bool = False) -> bytes:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise InputError(f"token ids {bad[:5]} are outside the vocabulary 0..{self.vocab_size - 1}")
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.named_specials]
        return self.encoding.decode_bytes(ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Ids -> text; bytes that do not form valid UTF-8 (a character cut between tokens) become U+FFFD.
        Special ids read as their names; skip_special_tokens drops the named ones (`added_tokens_decoder`) and,
        as the published tokenizer does, still prints the unnamed as `<|reserved_token_N|>`."""
        return self.decode_bytes(ids, skip_special_tokens).decode("utf-8", errors="replace")

    # ---- chat format -------------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                            specials_in_text: bool = False) -> str:
        """Render a conversation as the model's prompt text: the checkpoint's own template when it ships one, else
        the built-in rendering of spec 7.

        Message text is text: a special-token string typed in it (`<|im_end|>`, `<|media_pad|>`, ...) is marked
        (`shield`) so that `encode` spells it as plain text and it cannot open or close a turn or claim an image.
        `specials_in_text=True` leaves it unmarked, so it becomes the control token, as the published tokenizer
        does (for bit-exact published prompts)."""
        check_messages(messages)
        messages = [self._shielded(m, None if specials_in_text else self._special_pattern) for m in messages]
        if self.chat_template is None:
            return render_chat(messages, add_generation_prompt)
        return render_bounded(_jinja_template(self.chat_template), messages=list(messages),
                              add_generation_prompt=add_generation_prompt, bos_token=self.bos_token,
                              eos_token=self.eos_token)


    @staticmethod
    def _shielded(message: dict, specials: re.Pattern | None) -> dict:
        content = message["content"]
        if isinstance(content, str):
            return dict(message, content=shield(content, specials))
        return dict(message, content=[dict(item, text=shield(item["text"], specials))
                                      if item["type"] == "text" else item for item in content])

    @functools.cached_property
    def _special_pattern(self) -> re.Pattern:
        """Any special-token string (the named ones and `<|reserved_token_N|>`), as the pattern's one group."""
        names = sorted(self.special_tokens, key=len, reverse=True)
        return re.compile("(" + "|".join(map(re.escape, names)) + ")")


# A character from Unicode's supplementary private use area marks message text: inserted after the first character
# of every special-token string in it (so no split or tiktoken match sees the name), doubled where the text itself
# holds one, and removed by `unshield` just before the plain-text encoding.
SHIELD = "\U000FFFFD"
_UNSHIELD = re.compile(SHIELD + "(" + SHIELD + "?)")


def shield(text: str, specials: re.Pattern | None) -> str:
    """Mark message text: a SHIELD it holds is doubled (kept as text), and each match of `specials` is broken by
    a SHIELD after its first character (kept as text); specials=None keeps special-token strings as typed."""
    text = text.replace(SHIELD, SHIELD + SHIELD)
    return text if specials is None else specials.sub(lambda m: m.group()[0] + SHIELD + m.group()[1:], text)


def unshield(text: str) -> str:
    return _UNSHIELD.sub(r"\1", text)


def _chunks(text: str):
    """Pieces of at most MAX_CHUNK_CHARS, cut so no run of whitespace / non-whitespace exceeds MAX_RUN_CHARS."""
    for start in range(0, len(text), MAX_CHUNK_CHARS):
        chunk, piece_start, run_start = text[start:start + MAX_CHUNK_CHARS], 0, 0
        for i in range(1, len(chunk)):
            if chunk[i].isspace() != chunk[i - 1].isspace():
                run_start = i
            elif i - run_start >= MAX_RUN_CHARS:
                yield chunk[piece_start:i]
                piece_start = run_start = i
        yield chunk[piece_start:]


def check_messages(messages: Sequence[dict]) -> None:
    if not messages:
        raise InputError("the conversation is empty: give at least one message")
    for n, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise InputError(f"message {n} must be a dict with 'role' and 'content', got {m!r:.80}")
        if m["role"] not in ROLES:
            raise InputError(f"message {n} has role {m['role']!r}; expected one of {', '.join(ROLES)}")
        if isinstance(m["content"], str):
            continue
        if not isinstance(m["content"], list):
            raise InputError(f"message {n} content must be a string or a list of items")
        for item in m["content"]:
            kind = item.get("type") if isinstance(item, dict) else None
            if kind not in ("image", "text") or (kind == "text" and not isinstance(item.get("text"), str)):
                raise InputError(f"message {n} has an item {item!r:.80}; expected {{'type': 'image', 'image': ...}} "
                                 "or {'type': 'text', 'text': str}")


def render_chat(messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """The built-in chat format (spec 7): a default system turn unless the first message is one, then
    `<|im_{role}|>{role}<|im_middle|>{content}<|im_end|>` per message, images as media slots; no newlines."""
    parts = []
    for n, m in enumerate(messages):
        if n == 0 and m["role"] != "system":
            parts.append(f"<|im_system|>system<|im_middle|>{DEFAULT_SYSTEM_PROMPT}<|im_end|>")
        content = m["content"]
        if not isinstance(content, str):
            content = "".join(IMAGE_SLOT if item["type"] == "image" else item["text"] for item in content)
        parts.append(f"<|im_{m['role']}|>{m['role']}<|im_middle|>{content}<|im_end|>")
    if add_generation_prompt:
        parts.append(GENERATION_PROMPT)
    return "".join(parts)


def _raise_exception(message: str):
    raise InputError(f"the chat template refused the conversation: {message}")


# What a checkpoint's chat template may cost: its output (characters) and its rendering time (seconds, enforced with
# SIGALRM when rendering on the main thread). The environment variables raise them.
TEMPLATE_MAX_CHARS = int(os.environ.get("KIMIVL_TEMPLATE_MAX_CHARS", 20_000_000))
TEMPLATE_MAX_SECONDS = float(os.environ.get("KIMIVL_TEMPLATE_MAX_SECONDS", 10))


class TemplateLimit(Exception):
    pass


def _too_big(n: int) -> TemplateLimit:
    return TemplateLimit(f"it would build a value of {n:,} characters or items, more than the limit of "
                         f"{TEMPLATE_MAX_CHARS:,} (KIMIVL_TEMPLATE_MAX_CHARS)")


def _bounded_filter(fn):
    @functools.wraps(fn)  # keeps jinja's pass_context / pass_environment marks
    def bounded(*args, **kwargs):
        for value in (*args, *kwargs.values()):
            if isinstance(value, int) and not isinstance(value, bool) and abs(value) > TEMPLATE_MAX_CHARS:
                raise _too_big(abs(value))
        return fn(*args, **kwargs)
    return bounded


@functools.lru_cache(maxsize=8)
def _jinja_template(source: str):
    """Compile a checkpoint's template the way transformers does: sandboxed, trimmed blocks, loop controls and a
    `raise_exception` helper. Compiled once per template (compiling costs milliseconds, rendering microseconds).
    On top of the sandbox's bounds on what a template may call, what it may build is bounded: repetition (`*`),
    powers, filter sizes and namespace values (TEMPLATE_MAX_CHARS); render_bounded bounds output and time."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from jinja2.utils import Namespace

    class Bounded(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**"])

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > TEMPLATE_MAX_CHARS:
                        raise _too_big(len(seq) * n)
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64 \
                    and isinstance(left, (int, float)) and abs(left) > 1:
                raise TemplateLimit(f"{left} ** {right} is too large a power")
            return super().call_binop(context, operator, left, right)

    class BoundedNamespace(Namespace):
        def __setitem__(self, name, value):
            if isinstance(value, (str, list, tuple, dict)) and len(value) > TEMPLATE_MAX_CHARS:
                raise _too_big(len(value))
            super().__setitem__(name, value)

    env = Bounded(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise_exception
    env.globals["namespace"] = BoundedNamespace
    env.filters = {name: _bounded_filter(fn) for name, fn in env.filters.items()}
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise CheckpointError(f"the checkpoint's chat template does not parse: {e}") from None


def render_bounded(template, **variables) -> str:
    """Render a compiled template with its output held to TEMPLATE_MAX_CHARS and, on the main thread, its time to
    TEMPLATE_MAX_SECONDS; any failure is an InputError naming the limit or the template's own error."""
    import signal
    import threading

    from jinja2.exceptions import TemplateError

    def timeout(signum, frame):
        raise TemplateLimit(f"rendering took more than {TEMPLATE_MAX_SECONDS:g} s (KIMIVL_TEMPLATE_MAX_SECONDS)")

    timed = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
    if timed:
        previous = signal.signal(signal.SIGALRM, timeout)
        signal.setitimer(signal.ITIMER_REAL, TEMPLATE_MAX_SECONDS)
    try:
        parts, size = [], 0
        for part in template.generate(**variables):
            size += len(part)
            if size > TEMPLATE_MAX_CHARS:
                raise _too_big(size)
            parts.append(part)
        return "".join(parts)
    except TemplateLimit as e:
        raise InputError(f"the checkpoint's chat template was stopped: {e}") from None
    except TemplateError as e:
        raise InputError(f"the checkpoint's chat template failed on this conversation: {e}") from None
    except (RecursionError, MemoryError, OverflowError) as e:
        raise InputError(f"the checkpoint's chat template failed on this conversation: {type(e).__name__}: "
                         f"{e}") from None
    finally:
        if timed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


def split_thinking(text: str) -> tuple[str, str]:
    """Split a Thinking model's output into (thinking, answer) at the ◁think▷ ... ◁/think▷ markers.

    Without an opening marker the whole text is the answer; an unclosed marker (generation cut short) means the
    whole rest is thinking and the answer is empty.
    """
    start = text.find(THINK_START)
    if start < 0:
        return "", text.strip()
    body = text[start + len(THINK_START):]
    end = body.find(THINK_END)
    if end < 0:
        return body.strip(), ""
    return body[:end].strip(), (text[:start] + body[end + len(THINK_END):]).strip()
