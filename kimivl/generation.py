"""Generation: prefill into the MLA latent cache, one-token decode steps, sampling, stopping and text streaming."""

from __future__ import annotations

import codecs
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch

from .cache import MLACache, slots_for
from .cuda_graphs import decoder_step, graphs_enabled
from .errors import InputError
from .model import default_position_ids

if TYPE_CHECKING:
    from .config import TextConfig
    from .model import KimiVLForConditionalGeneration
    from .processing import KimiVLProcessor


@dataclass
class GenerationConfig:
    """temperature 0 is greedy; top_k 0 and top_p 1 disable those filters; seed fixes the sampling."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_strings: Sequence[str] = ()

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise InputError(f"temperature must be a number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:  # also false for NaN
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.stop_strings, str):
            raise InputError(f"stop_strings must be a list of strings, got the string {self.stop_strings!r}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InputError(f"seed must be in 0..2**63-1, got {self.seed}")


GENERATION_CONFIG_NAME = "generation_config.json"


@dataclass
class CheckpointGeneration:
    """A checkpoint's `generation_config.json`, read with transformers' GenerationConfig semantics: the ids that end
    generation, the padding id, and the sampling defaults (do_sample false or absent: greedy; true: temperature,
    top_k and top_p, each transformers' default 1.0 / 50 / 1.0 where the file leaves it out). `raw` is the file as
    read, written back unchanged by save_pretrained."""

    eos_token_ids: list[int]
    pad_token_id: int | None
    sampling: dict[str, Any]  # GenerationConfig fields
    raw: dict[str, Any]

    @classmethod
    def read(cls, path: str | os.PathLike) -> "CheckpointGeneration | None":
        """The checkpoint directory's generation_config.json, or None when it has none."""
        from .errors import CheckpointError

        file = Path(path) / GENERATION_CONFIG_NAME
        if not file.is_file():
            return None
        try:
            raw = json.loads(file.read_text(encoding="utf-8"))
            if not isinstance(raw, dict):
                raise ValueError("not a JSON object")
            eos = raw.get("eos_token_id")
            eos = [] if eos is None else [eos] if isinstance(eos, int) else eos
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in eos):
                raise ValueError(f"eos_token_id must be an id or a list of ids, got {raw.get('eos_token_id')!r}")
            sampling: dict[str, Any] = {"temperature": 0.0}
            if raw.get("do_sample"):
                sampling = {"temperature": float(raw.get("temperature", 1.0)), "top_k": int(raw.get("top_k", 50)),
                            "top_p": float(raw.get("top_p", 1.0))}
            GenerationConfig(**sampling).validate()
        except (ValueError, TypeError, UnicodeDecodeError, InputError, RecursionError) as e:
            raise CheckpointError(f"{file}: {e}") from None
        pad = raw.get("pad_token_id")
        return cls(list(eos), pad if isinstance(pad, int) else None, sampling, raw)

    def describe(self) -> str:
        """The sampling defaults in words, e.g. 'temperature 0.2, top_k 50, top_p 1'."""
        if not self.sampling["temperature"]:
            return "greedy"
        return ", ".join(f"{k} {v:g}" for k, v in self.sampling.items())


@dataclass
class GenerationStats:
    prompt_tokens: int = 0  # real (non-padding) prompt tokens over the batch
    prefill_seconds: float = 0.0
    new_tokens: int = 0  # tokens decoded over the batch, after the first (which prefill produces)
    decode_seconds: float = 0.0

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.new_tokens / self.decode_seconds if self.decode_seconds else 0.0


def sample(logits: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]: argmax at temperature 0, else a draw from softmax(logits / T) restricted to
    the top_k tokens and to the smallest set of most likely tokens whose probability reaches top_p."""
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    logits = tempered(logits, cfg.temperature)
    if 0 < cfg.top_k < logits.shape[-1]:
        kth = logits.topk(cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= cfg.top_p  # mass before this token already reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]


def check_context(prompt_tokens: int, max_new_tokens: int, config: "TextConfig") -> None:
    """Refuse a prompt that, with max_new_tokens more, would not fit the model's context."""
    limit = config.max_position_embeddings
    if prompt_tokens + max_new_tokens > limit:
        raise InputError(f"the prompt has {prompt_tokens} tokens and max_new_tokens is {max_new_tokens}: together "
                         f"{prompt_tokens + max_new_tokens}, beyond the model's context of {limit} tokens")


def tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """(logits - max) / temperature in float32: the same softmax as logits / temperature, without overflowing to
    inf (and NaN) at tiny temperatures."""
    logits = logits.float()
    return (logits - logits.amax(-1, keepdim=True)) / temperature


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature) at `tokens`: logits [..., V], tokens [...] -> [...] float32."""
    logits = tempered(logits, temperature or 1.0)
    return logits.gather(-1, tokens[..., None])[..., 0] - logits.logsumexp(-1)


@torch.no_grad()
def generate_tokens(model: "KimiVLForConditionalGeneration", input_ids: torch.Tensor,
                    attention_mask: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                    image_grid_hws: torch.Tensor | None = None, config: GenerationConfig | None = None,
                    stop_ids: Sequence[int] = (), pad_id: int = 0, stats: GenerationStats | None = None,
                    logprobs: list[torch.Tensor] | None = None, image_features: torch.Tensor | None = None,
                    cuda_graph: bool | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every row [B], step by step, until every row has produced a stop id or
    max_new_tokens are done; rows that have stopped yield pad_id. input_ids are left-padded (attention_mask 0).
    Given a list, `logprobs` gets one [B] tensor per yielded step: each token's log-probability under
    softmax(logits / temperature) (temperature 0: the plain softmax), before any top_k / top_p truncation.
    `image_features` may replace pixel_values (see `KimiVLForConditionalGeneration.embed`).

    Prefill runs the prompt once and fills the latent cache; each decode step runs one token per row against it.
    On CUDA the decode step is captured once in a CUDA graph and replayed (`kimivl.cuda_graphs`; `cuda_graph=False`
    or KIMIVL_CUDA_GRAPHS=0 runs it eagerly).
    """
    cfg = config or GenerationConfig()
    cfg.validate()
    model.check_ids(input_ids, attention_mask=attention_mask)
    lm = model.language_model
    B, T = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    elif not (bool(attention_mask[:, -1].all()) and bool((attention_mask.diff(dim=-1) >= 0).all())):
        raise InputError("generation needs left-padded prompts: attention_mask must be 0s then 1s in every row "
                         "(the processor pads on the left)")
    check_context(int(attention_mask.sum(-1).max()), cfg.max_new_tokens, model.config.text_config)
    stats = stats if stats is not None else GenerationStats()
    generator = None
    if cfg.seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(cfg.seed)
    stop = torch.tensor(sorted(set(stop_ids)), device=input_ids.device, dtype=torch.long)

    start = time.perf_counter()
    graphed = graphs_enabled(model.device) if cuda_graph is None else cuda_graph
    if graphed:
        step_fn = decoder_step(lm, B, T + cfg.max_new_tokens, model.device, model.dtype)
        cache = step_fn.cache
    else:
        limit = T + cfg.max_new_tokens  # grown as tokens come: an answer that stops early never pays for the rest
        cache = MLACache(lm.config, B, slots_for(T + 1, limit), device=model.device, dtype=model.dtype)
    positions = default_position_ids(input_ids, attention_mask)
    embeds = model.embed(input_ids, pixel_values, image_grid_hws, image_features)
    logits = lm.lm_head(lm.hidden_states(embeds, positions, attention_mask, cache)[:, -1]).float()  # [B, V]
    next_pos = positions[:, -1:] + 1  # [B, 1]
    token = sample(logits, cfg, generator)
    if logprobs is not None:
        logprobs.append(token_logprobs(logits, token, cfg.temperature))
    stats.prompt_tokens += int(attention_mask.sum())
    stats.prefill_seconds += time.perf_counter() - start

    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    for step in range(cfg.max_new_tokens):
        yield torch.where(finished, pad_id, token)
        finished |= torch.isin(token, stop)
        if step + 1 == cfg.max_new_tokens or bool(finished.all()):
            return
        start = time.perf_counter()
        if graphed:
            logits = step_fn(token, next_pos, cache.length)
            cache.advance(1)
        else:  # the same step, eager, over the whole cache buffer (one block per row: no copy of it per layer)
            if cache.length + 1 > cache.max_len:
                cache = cache.resized(slots_for(cache.length + 1, limit))
            logits = lm.decode_step(token[:, None], next_pos, cache,
                                    torch.tensor([cache.length], device=input_ids.device))
            cache.advance(1)
        token = sample(logits, cfg, generator)
        if logprobs is not None:
            logprobs.append(token_logprobs(logits, token, cfg.temperature))
        next_pos = next_pos + 1
        stats.new_tokens += int((~finished).sum())
        stats.decode_seconds += time.perf_counter() - start


def stop_string_at(text: str, stops: Sequence[str]) -> int | None:
    """Index where the earliest stop string starts in text, or None."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of text could still be the start of a stop string (so must not be shown yet)."""
    keep = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), keep, -1):
            if s.startswith(text[-k:]):
                keep = k
                break
    return keep


class RowText:
    """Detokenises one row incrementally: yields text deltas that are whole UTF-8 characters, holds back text that
    may be the start of a stop string, and stops at a stop id or stop string."""

    def __init__(self, tokenizer: Any, stop_ids: Sequence[int], stop_strings: Sequence[str]):
        self.tokenizer, self.stop_ids, self.stop_strings = tokenizer, set(stop_ids), list(stop_strings)
        self.decoder: Any = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text, self.shown, self.token_ids = "", 0, []
        self.finish_reason: str | None = None

    def push(self, token: int) -> str:
        """Take one generated token; -> the newly showable text."""
        if self.finish_reason:
            return ""
        if token in self.stop_ids:
            self.finish_reason = "stop"
            return self.flush()
        self.token_ids.append(token)
        if not self.tokenizer.is_skipped(token):  # as decode(skip_special_tokens=True)
            self.text += self.decoder.decode(self.tokenizer.decode_bytes([token]))
        cut = stop_string_at(self.text, self.stop_strings)
        if cut is not None:  # the text ends before the stop string: bytes still pending in the decoder are dropped
            self.text, self.finish_reason, self.decoder = self.text[:cut], "stop", None
            return self._show(len(self.text))
        return self._show(len(self.text) - held_back(self.text, self.stop_strings))

    def flush(self) -> str:
        """End of generation: show everything, with any incomplete trailing character as U+FFFD."""
        if self.decoder is not None:
            self.text += self.decoder.decode(b"", final=True)
        return self._show(len(self.text))

    def _show(self, upto: int) -> str:
        delta, self.shown = self.text[self.shown:upto], max(self.shown, upto)
        return delta


class ThinkingText:
    """Splits streamed text into a Thinking model's reasoning (between ◁think▷ and ◁/think▷) and its answer (the
    rest, markers dropped), holding back a tail that may be the start of a marker until more text or the end."""

    def __init__(self):
        self.text, self.shown = "", [0, 0]  # characters of (thinking, answer) given out so far

    def push(self, delta: str, final: bool = False) -> tuple[str, str]:
        """Take a text delta (final: the text is complete); -> the new (thinking, answer) text."""
        from .tokenizer import THINK_END, THINK_START

        self.text += delta
        ready = self.text if final else self.text[:len(self.text) - held_back(self.text, (THINK_START, THINK_END))]
        start = ready.find(THINK_START)
        if start < 0:
            parts = ("", ready)
        else:
            body = ready[start + len(THINK_START):]
            end = body.find(THINK_END)
            parts = (body, "") if end < 0 else (body[:end], ready[:start] + body[end + len(THINK_END):])
        new = tuple(part[shown:] for part, shown in zip(parts, self.shown))
        self.shown = [max(shown, len(part)) for part, shown in zip(parts, self.shown)]
        return new


class TextStream:
    """Iterate to get text deltas as they are generated; afterwards `text`, `token_ids`, `finish_reason` ("stop" or
    "length") and `stats` hold the result."""

    def __init__(self, tokens: Iterator[torch.Tensor], row: RowText, stats: GenerationStats):
        self._tokens, self._row, self.stats = tokens, row, stats

    def __iter__(self) -> Iterator[str]:
        for token in self._tokens:
            delta = self._row.push(int(token[0]))
            if delta:
                yield delta
            if self._row.finish_reason:
                self._tokens.close()
                return
        self._row.finish_reason = "length"
        tail = self._row.flush()
        if tail:
            yield tail

    @property
    def text(self) -> str:
        return self._row.text

    @property
    def token_ids(self) -> list[int]:
        return self._row.token_ids

    @property
    def finish_reason(self) -> str | None:
        return self._row.finish_reason


def checkpoint_settings(model: "KimiVLForConditionalGeneration", settings: dict) -> GenerationConfig:
    """GenerationConfig from `settings`, the model's checkpoint defaults (its generation_config.json) filling the
    sampling fields not given."""
    defaults = model.generation_config.sampling if model.generation_config else {}
    return GenerationConfig(**(defaults | settings))


def end_ids(model: "KimiVLForConditionalGeneration") -> list[int]:
    """The ids that end generation by default: the checkpoint's generation_config.json eos_token_id when it ships
    one, else config.json's."""
    gen = model.generation_config
    return gen.eos_token_ids if gen and gen.eos_token_ids else model.config.text_config.eos_token_ids


def answer_stop_ids(model: "KimiVLForConditionalGeneration", processor: "KimiVLProcessor") -> list[int]:
    """The ids that end an answer: the tokenizer's (`<|im_end|>`, EOS), config.json's and generation_config.json's
    EOS. Refuses a tokenizer with more ids than the model's vocabulary (they do not belong together)."""
    tok, text = processor.tokenizer, model.config.text_config
    if tok.vocab_size > text.vocab_size:
        raise InputError(f"the tokenizer has {tok.vocab_size} ids but the model's vocabulary is "
                         f"{text.vocab_size}: they do not belong together")
    return sorted(set(tok.stop_ids) | set(text.eos_token_ids) | set(end_ids(model)))


def config_or_settings(model: "KimiVLForConditionalGeneration", config: GenerationConfig | None,
                       settings: dict) -> GenerationConfig:
    """`config`, or one made from `settings` over the checkpoint's defaults; not both."""
    if config is not None and settings:
        raise InputError(f"give either config or settings ({', '.join(settings)}), not both")
    return config or checkpoint_settings(model, settings)


def _setup(model: "KimiVLForConditionalGeneration", processor: "KimiVLProcessor", messages: Any, images: Any,
           config: GenerationConfig | None, settings: dict) -> tuple[dict, GenerationConfig, list[int]]:
    stop_ids = answer_stop_ids(model, processor)
    cfg = config_or_settings(model, config, settings)
    inputs = processor(messages, images=images).to(model.device, dtype=model.dtype)
    return inputs, cfg, stop_ids


def stream(model: "KimiVLForConditionalGeneration", processor: "KimiVLProcessor", messages: Sequence[dict], *,
           images: Sequence[Any] | None = None, config: GenerationConfig | None = None, **settings: Any
           ) -> TextStream:
    """Answer one conversation, streaming: `for delta in stream(model, processor, messages, max_new_tokens=64)`.
    Settings are GenerationConfig fields; those not given come from the checkpoint's generation_config.json when it
    ships one (Instruct: temperature 0.2), else GenerationConfig's defaults (greedy)."""
    if not messages or not isinstance(messages[0], dict):
        raise InputError("stream takes one conversation (a list of messages); use generate for a batch")
    inputs, cfg, stop_ids = _setup(model, processor, messages, images, config, settings)
    stats = GenerationStats()
    tokens = generate_tokens(model, **inputs, config=cfg, stop_ids=stop_ids, pad_id=processor.tokenizer.pad_id,
                             stats=stats)
    return TextStream(tokens, RowText(processor.tokenizer, stop_ids, cfg.stop_strings), stats)


def generate(model: "KimiVLForConditionalGeneration", processor: "KimiVLProcessor",
             messages: Sequence[dict] | Sequence[Sequence[dict]], *, images: Any = None,
             config: GenerationConfig | None = None, stats: GenerationStats | None = None, **settings: Any
             ) -> str | list[str]:
    """Answer one conversation (-> str) or a batch of them (-> list[str], run together, left-padded). Settings as
    for `stream`."""
    single = bool(messages) and isinstance(messages[0], dict)
    inputs, cfg, stop_ids = _setup(model, processor, messages, images, config, settings)
    rows = [RowText(processor.tokenizer, stop_ids, cfg.stop_strings) for _ in range(inputs["input_ids"].shape[0])]
    tokens = generate_tokens(model, **inputs, config=cfg, stop_ids=stop_ids, pad_id=processor.tokenizer.pad_id,
                             stats=stats)
    for step in tokens:
        for row, token in zip(rows, step.tolist()):
            row.push(token)
        if all(row.finish_reason for row in rows):
            tokens.close()
            break
    for row in rows:
        row.flush()
        row.finish_reason = row.finish_reason or "length"
    texts = [row.text for row in rows]
    return texts[0] if single else texts
