"""The generation engine: one model, one latent cache of `max_batch` rows that requests join and leave between decode
steps (continuous batching), and an LRU of cached prefixes that a request extending an earlier one (the next turn of
a chat, or the other choices of an n > 1 request) reuses instead of prefilling it again.

Each decode step runs one token for every running row, each row at its own cache slot (`decode_step` with a slot
per row). A new request is prefilled alone (from the longest cached prefix of its tokens, images included) and its
latents are copied into a free row; a finished one leaves at once, the last row moving into its place so that the
running rows stay the first rows of the cache. Greedy results equal the request served alone.

Threads: `submit` and `cancel` may be called from any thread; `step` does all the model work, either called in a
loop by the caller (`stream`, `kimivl chat`) or by the thread `start` runs (`kimivl serve`). Each sequence reports
through its `emit(sequence, text_delta)` callback, called on the engine's thread; `sequence.finish_reason` is set
before the last call.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence as Seq

import torch

from .cache import BLOCK, MLACache, slots_for
from .errors import InputError, KimiVLError
from .generation import (GenerationConfig, GenerationStats, RowText, answer_stop_ids, check_context,
                         checkpoint_settings, config_or_settings, sample)

if TYPE_CHECKING:
    from .model import KimiVLForConditionalGeneration
    from .processing import KimiVLProcessor

log = logging.getLogger(__name__)


class QueueFull(KimiVLError):
    """More requests are waiting than the engine was told to queue."""


@dataclass
class Prompt:
    """One conversation, tokenized: `ids` with each image's placeholder expanded, the images' packed patches, and
    `key`, the ids with every image's tokens replaced by one negative number drawn from a digest of its pixels, so
    that equal keys mean equal inputs (what the prefix cache matches)."""

    ids: list[int]
    key: list[int]
    pixel_values: torch.Tensor | None = None  # [patches, 3, p, p], images in order
    image_grid_hws: torch.Tensor | None = None  # [images, 2]
    spans: list[tuple[int, int]] = field(default_factory=list)  # each image's token range [start, end) in ids

    @classmethod
    def from_inputs(cls, inputs: dict, media_pad_id: int) -> "Prompt":
        """From the processor's output for one conversation."""
        ids = inputs["input_ids"][0].tolist()
        pixels, grids = inputs.get("pixel_values"), inputs.get("image_grid_hws")
        key, spans, i = list(ids), [], 0
        patch = 0
        for h, w in (grids.tolist() if grids is not None else []):
            while ids[i] != media_pad_id:
                i += 1
            n = h * w // 4
            digest = hashlib.blake2b(pixels[patch:patch + h * w].float().numpy().tobytes(), digest_size=8,
                                     person=f"{h}x{w}".encode())
            key[i:i + n] = [-1 - (int.from_bytes(digest.digest(), "little") >> 2)] * n
            spans.append((i, i + n))
            i, patch = i + n, patch + h * w
        return cls(ids, key, pixels, grids, spans)

    def images_from(self, start: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Patches and grids of the images whose tokens lie at or after token `start`."""
        if self.image_grid_hws is None:
            return None, None
        counts = self.image_grid_hws.prod(-1).tolist()
        first = next((k for k, (a, _) in enumerate(self.spans) if a >= start), len(self.spans))
        if first == len(self.spans):
            return None, None
        return self.pixel_values[sum(counts[:first]):], self.image_grid_hws[first:]

    def cut(self, m: int) -> int:
        """m moved back to the start of the image it falls inside (an image is reused whole or not at all)."""
        return next((a for a, b in self.spans if a < m < b), m)


class Histogram:
    """Counts of observations at or below each bound (cumulative, as Prometheus histograms are), their sum and
    number."""

    BOUNDS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

    def __init__(self):
        self.buckets = [0] * len(self.BOUNDS)
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.BOUNDS):
            self.buckets[i] += value <= bound
        self.sum += value
        self.count += 1


class Sequence:
    """One answer being generated (a request with n choices has n). `tokens` are the sampled ids, stop id included;
    `row` is its cache row while running (-1 otherwise); `length` the cache slots it fills."""

    def __init__(self, prompt: Prompt, config: GenerationConfig, text: RowText, emit: Callable | None, index: int):
        self.prompt, self.config, self.text, self.emit, self.index = prompt, config, text, emit, index
        self.generator = None  # made on the model's device when the sequence is admitted
        self.tokens: list[int] = []
        self.finish_reason: str | None = None  # stop | length | cancelled | error
        self.error: BaseException | None = None
        self.row, self.length, self.reused = -1, 0, 0
        self.cancelled = False
        self.stats = GenerationStats()
        self.submitted, self.first_token_at = time.perf_counter(), None


class PrefixCache:
    """An LRU of cached token sequences (their latents and rope keys for every layer) under a byte budget. `match`
    finds the entry sharing the longest prefix with a key; an entry whose key extends an older one replaces it."""

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self.entries: collections.OrderedDict[int, tuple[list[int], torch.Tensor, torch.Tensor]] = \
            collections.OrderedDict()
        self.nbytes, self._next = 0, 0

    def match(self, key: list[int], limit: int) -> tuple[tuple[list[int], torch.Tensor, torch.Tensor] | None, int]:
        """(entry, m): the entry whose key shares the longest prefix with `key`, at most `limit` tokens."""
        best, best_m, best_id = None, 0, None
        for entry_id, entry in self.entries.items():
            m = common_prefix(entry[0], key, limit)
            if m > best_m:
                best, best_m, best_id = entry, m, entry_id
        if best_id is not None:
            self.entries.move_to_end(best_id)
        return best, best_m

    def put(self, key: list[int], latent: torch.Tensor, k_pe: torch.Tensor) -> None:
        """Keep latent [layers, len(key), C] and k_pe [layers, len(key), rope] for `key`, evicting the least recently
        used entries beyond the budget."""
        size = latent.nbytes + k_pe.nbytes
        if not key or size > self.budget:
            return
        for entry_id, (old, _, _) in list(self.entries.items()):
            if len(old) >= len(key) and old[:len(key)] == key:  # already held
                self.entries.move_to_end(entry_id)
                return
            if old == key[:len(old)]:  # the new one extends it
                self._drop(entry_id)
        self.entries[self._next] = (list(key), latent, k_pe)
        self._next += 1
        self.nbytes += size
        while self.nbytes > self.budget:
            self._drop(next(iter(self.entries)))

    def _drop(self, entry_id: int) -> None:
        _, latent, k_pe = self.entries.pop(entry_id)
        self.nbytes -= latent.nbytes + k_pe.nbytes


def common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """Length of the longest common prefix of a and b, at most limit."""
    n = min(len(a), len(b), limit)
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if a[:mid] == b[:mid] else (lo, mid)
    return lo


class Engine:
    """Continuous batching over one model: `submit` prompts, call `step` (or `start` a thread that does), read each
    sequence's text through its `emit` callback. `max_batch` rows decode together; `max_queue` requests may wait
    for a row (None: unbounded; beyond it `submit` raises QueueFull); `prefix_cache_bytes` is the prefix LRU's budget
    (0: no reuse); `prefill_chunk` the prompt tokens a step prefills while other rows decode."""

    def __init__(self, model: "KimiVLForConditionalGeneration", processor: "KimiVLProcessor", max_batch: int = 8,
                 max_queue: int | None = None, prefix_cache_bytes: int = 1 << 30, prefill_chunk: int = 512):
        if max_batch < 1 or prefill_chunk < 1:
            raise InputError(f"max_batch and prefill_chunk must be >= 1, got {max_batch} and {prefill_chunk}")
        self.model, self.processor, self.lm = model, processor, model.language_model
        self.max_batch, self.max_queue = max_batch, max_queue
        self.stop_ids = answer_stop_ids(model, processor)
        self.context = model.config.text_config.max_position_embeddings
        self.prefixes = PrefixCache(prefix_cache_bytes)
        self.cache = self._new_cache(0)
        self.prefill_chunk = prefill_chunk
        self.running: list[Sequence] = []
        self._filling: Filling | None = None  # the request being prefilled, chunk by chunk
        self.waiting: collections.deque[list[Sequence]] = collections.deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.counters = collections.Counter()  # requests, prompt_tokens, reused_tokens, generated_tokens, steps
        self.ttft = Histogram()  # seconds from submit to first token, per sequence (the server's metrics)

    # ---- requests ----------------------------------------------------------------------------------------------
    def prepare(self, messages: Seq[dict], images: Seq[Any] | None = None) -> Prompt:
        """One conversation (messages as for `KimiVLProcessor`) -> a Prompt. Decodes the images: call it off the
        engine's thread."""
        if not messages or not isinstance(messages[0], dict):
            raise InputError("a request is one conversation: a list of messages")
        return Prompt.from_inputs(self.processor(messages, images=images), self.processor.media_pad_id)

    def settings(self, **settings: Any) -> GenerationConfig:
        """GenerationConfig from settings, the checkpoint's defaults filling the sampling fields not given."""
        return checkpoint_settings(self.model, settings)

    def submit(self, prompt: Prompt, config: GenerationConfig, n: int = 1, emit: Callable | None = None,
               ignore_eos: bool = False) -> list[Sequence]:
        """Queue a prompt for n answers (sampled apart, choice i seeded with seed + i); -> its n sequences."""
        config.validate()
        if not 1 <= n <= self.max_batch:
            raise InputError(f"n must be between 1 and the batch size {self.max_batch}, got {n}")
        check_context(len(prompt.ids), config.max_new_tokens, self.lm.config)
        stops = () if ignore_eos else self.stop_ids
        group = [Sequence(prompt, config, RowText(self.processor.tokenizer, stops, config.stop_strings), emit, i)
                 for i in range(n)]
        with self._cond:
            free = self.max_batch - len(self.running) - (len(self._filling.group) if self._filling else 0)
            queued = 0  # waiting requests that will not find rows when the free ones are handed out in order
            for g in self.waiting:
                if queued or len(g) > free:
                    queued += 1
                else:
                    free -= len(g)
            if self.max_queue is not None and (queued or n > free) and queued >= self.max_queue:
                raise QueueFull(f"every batch row is taken and {queued} requests are already waiting (--max-queue "
                                f"{self.max_queue}); try again later")
            self.waiting.append(group)
            self._cond.notify()
        return group

    def cancel(self, sequences: Seq[Sequence]) -> None:
        """Stop these sequences (a client that went away): a waiting request leaves the queue now, a running one
        frees its row at the next step."""
        with self._cond:
            for s in sequences:
                s.cancelled = True
            gone = [g for g in self.waiting if all(s.cancelled for s in g)]
            self.waiting = collections.deque(g for g in self.waiting if not all(s.cancelled for s in g))
            self._cond.notify()
        for s in [s for g in gone for s in g]:
            self._end(s, "cancelled", "")

    # ---- the loop ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> bool:
        """Drop cancelled sequences, prefill waiting requests into free rows, and run one decode step for every
        running row. -> whether work remains.

        While rows are decoding, a step prefills at most `prefill_chunk` prompt tokens (a long prompt takes several
        steps, its chunks between the decode steps), so the running answers keep coming; an idle engine prefills
        everything waiting at once."""
        for s in [s for s in self.running if s.cancelled]:
            self._finish(s, "cancelled")
        budget = self.prefill_chunk if self.running else None
        while budget is None or budget > 0:
            if self._filling is None:
                with self._cond:
                    if not self.waiting or len(self.waiting[0]) > self.max_batch - len(self.running):
                        break
                    group = self.waiting.popleft()  # (cancel() has taken wholly cancelled ones out)
                try:
                    self._filling = Filling(self, group[0].prompt, group)
                except Exception as e:  # this request fails; the others go on
                    self._fail(group, e)
                    continue
            filling = self._filling
            if all(s.cancelled for s in filling.group):
                self._filling = None
                for s in filling.group:
                    self._finish(s, "cancelled")
                continue
            try:
                done = filling.run(budget)
                if filling.logits is not None:
                    self._filling = None
                    self._admit(filling)
            except Exception as e:
                self._filling = None
                self._fail(filling.group, e)
                continue
            budget = None if budget is None else budget - done
        if self.running:
            try:
                self._decode()
            except Exception as e:
                self._fail(list(self.running), e)
        if not self.running and self.cache.max_len:
            self.cache = self._new_cache(0)  # idle: give the memory back
        with self._cond:
            return bool(self.running or self.waiting or self._filling)

    def start(self) -> None:
        """Run `step` in a background thread until `stop`."""
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="kimivl-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the background thread; sequences still running or waiting end as cancelled."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.reset()

    def reset(self) -> None:
        """End every running and waiting sequence as cancelled and empty the batch (the prefix cache is kept)."""
        for s in self._drain() + self.running:
            s.row = -1
            self._end(s, "cancelled", "")
        self.running = []
        self.cache = self._new_cache(0)

    def _drain(self) -> list[Sequence]:
        """Take every waiting sequence and the one being prefilled out of the engine."""
        with self._cond:
            taken, self.waiting = [s for g in self.waiting for s in g], collections.deque()
        if self._filling is not None:
            taken += self._filling.group
            self._filling = None
        return taken

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self.waiting or self.running or self._filling or self._stopping):
                    self._cond.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as e:  # a bug must not leave every client waiting on a dead thread
                self._fail(list(self.running) + self._drain(), e)

    def stream(self, messages: Seq[dict], *, images: Seq[Any] | None = None,
               config: GenerationConfig | None = None, **settings: Any) -> "SequenceStream":
        """Answer one conversation, streaming, stepping the engine on the caller's thread (not with `start`): as
        `kimivl.generation.stream`, but the conversation's cached prefix (the earlier turns) is reused."""
        if self._thread is not None:
            raise InputError("the engine runs in its own thread: submit requests instead")
        config = config_or_settings(self.model, config, settings)
        prompt = self.prepare(messages, images)
        deltas: collections.deque[str] = collections.deque()
        seq = self.submit(prompt, config, emit=lambda s, d: deltas.append(d))[0]
        return SequenceStream(self, seq, deltas)

    # ---- inside a step -----------------------------------------------------------------------------------------
    def _new_cache(self, slots: int) -> MLACache:
        return MLACache(self.lm.config, self.max_batch, slots, device=self.model.device, dtype=self.model.dtype)

    def _fit_slots(self, needed: int) -> None:
        """Make every row hold at least `needed` slots; also shrink the rows when the running sequences use under
        half of them (after a long request has left), since every decode step attends over whole rows."""
        if needed <= self.cache.max_len and (needed * 2 > self.cache.max_len or self.cache.max_len <= BLOCK):
            return
        self.cache = self.cache.resized(slots_for(needed, self.context + 1))
        self.counters.update(resized=1)

    def _admit(self, filling: "Filling") -> None:
        """A prefilled request's rows join the batch, and its first tokens are sampled."""
        group, prompt, P = filling.group, filling.prompt, len(filling.prompt.ids)
        latent, k_pe = filling.cache.latent[:, 0], filling.cache.k_pe[:, 0]
        self._fit_slots(max([P + 1] + [r.length + 1 for r in self.running]))
        for s in group:
            r = s.row = len(self.running)
            self.cache.latent[:, r, :P], self.cache.k_pe[:, r, :P] = latent, k_pe
            self.cache.valid[r] = False
            self.cache.valid[r, :P] = True
            s.length, s.reused = P, filling.reused
            s.stats.prompt_tokens, s.stats.prefill_seconds = P - filling.reused, filling.seconds
            if s.config.seed is not None:
                s.generator = torch.Generator(device=self.model.device).manual_seed(s.config.seed + s.index)
            self.running.append(s)
        self.prefixes.put(prompt.key, latent, k_pe)
        self.counters.update(requests=1, prompt_tokens=P, reused_tokens=filling.reused)
        for s, token in zip(group, self._sample(group, filling.logits.expand(len(group), -1))):
            self._push(s, token)

    def _decode(self) -> None:
        start = time.perf_counter()
        rows = list(self.running)
        slots = torch.tensor([s.length for s in rows])
        self._fit_slots(int(slots.max()) + 1)
        device = self.model.device
        tokens = torch.tensor([[s.tokens[-1]] for s in rows], device=device)
        slots = slots.to(device)
        # whole rows, not just the slots in use: each row's latents then stay one block, which the CPU's bfloat16
        # batched matmul needs not to copy the cache every layer (9x slower at 32 rows x 2k slots); kv_lens and
        # the valid mask hide the empty slots
        view = self.cache.rows(len(rows))
        logits = self.lm.decode_step(tokens, slots[:, None], view, slots)  # a token's position is its slot
        self.counters.update(steps=1, batch_rows=len(rows))
        new = self._sample(rows, logits)
        seconds = time.perf_counter() - start
        for s in rows:  # every row's slot is filled before any row leaves (a leaving row's place takes the last's)
            s.length += 1
            s.stats.new_tokens += 1
            s.stats.decode_seconds += seconds
        for s, token in zip(rows, new):
            self._push(s, token)

    def _sample(self, rows: list[Sequence], logits: torch.Tensor) -> list[int | Exception]:
        """The next token of each row, or the exception its sampling raised (that row fails alone)."""
        greedy = logits.argmax(-1).tolist()
        out: list[int | Exception] = []
        for i, s in enumerate(rows):
            try:
                out.append(greedy[i] if s.config.temperature == 0 else
                           int(sample(logits[i:i + 1], s.config, s.generator)[0]))
            except Exception as e:
                out.append(e)
        return out

    def _push(self, s: Sequence, token: int | Exception) -> None:
        if isinstance(token, Exception):
            self._fail([s], token)
            return
        if s.first_token_at is None:
            s.first_token_at = time.perf_counter()
            self.ttft.observe(s.first_token_at - s.submitted)
        s.tokens.append(token)
        self.counters.update(generated_tokens=1)
        delta = s.text.push(token)
        if s.text.finish_reason:
            self._finish(s, s.text.finish_reason, delta)
        elif len(s.tokens) == s.config.max_new_tokens:
            self._finish(s, "length", delta + s.text.flush())
        elif delta:
            self._emit(s, delta)

    def _finish(self, s: Sequence, reason: str, delta: str = "") -> None:
        """Keep a finished sequence's latents as a prefix (the next chat turn starts with it), free its row (the last
        running row moves into it) and report."""
        if s.row >= 0:
            i, last = s.row, len(self.running) - 1
            if reason in ("stop", "length"):
                n = s.length  # the prompt and every sampled token but the last, which was never fed
                self.prefixes.put(s.prompt.key + s.tokens[:n - len(s.prompt.ids)],
                                  self.cache.latent[:, i, :n].clone(), self.cache.k_pe[:, i, :n].clone())
            moved = self.running[last]
            if moved is not s:
                n = moved.length
                self.cache.latent[:, i, :n], self.cache.k_pe[:, i, :n] = (self.cache.latent[:, last, :n],
                                                                          self.cache.k_pe[:, last, :n])
                self.cache.valid[i] = self.cache.valid[last]
                moved.row, self.running[i] = i, moved
            self.running.pop()
            s.row = -1
        self._end(s, reason, delta)

    def _end(self, s: Sequence, reason: str, delta: str) -> None:
        s.finish_reason = s.finish_reason or reason
        self._emit(s, delta)

    @staticmethod
    def _emit(s: Sequence, delta: str) -> None:
        if s.emit is None:
            return
        try:
            s.emit(s, delta)
        except Exception as e:  # e.g. the server's event loop has closed: that reader is gone, the engine goes on
            log.warning("could not deliver a sequence's text: %s", e)

    def _fail(self, group: list[Sequence], error: Exception) -> None:
        log.error("generation failed: %s", error, exc_info=not isinstance(error, KimiVLError))
        for s in group:
            if s.finish_reason is None:
                s.error = error
                self._finish(s, "error")


class Filling:
    """A request being prefilled: from the longest cached prefix of its prompt (an image is reused whole or not at
    all, and at least the last token is computed, for the logits), its remaining images through the vision tower
    once, then its tokens chunk by chunk into a one-row cache. `logits` [1, vocab] float32 is set when done."""

    def __init__(self, engine: Engine, prompt: Prompt, group: list[Sequence]):
        self.engine, self.prompt, self.group = engine, prompt, group
        started = time.perf_counter()
        model, P = engine.model, len(self.prompt.ids)
        entry, m = engine.prefixes.match(self.prompt.key, P - 1)
        m = self.prompt.cut(m)
        self.cache = MLACache(engine.lm.config, 1, P, device=model.device, dtype=model.dtype)
        if m:
            self.cache.latent[:, 0, :m], self.cache.k_pe[:, 0, :m] = entry[1][:, :m], entry[2][:, :m]
            self.cache.valid[0, :m] = True
            self.cache.advance(m)
        self.reused = m
        pixels, grids = self.prompt.images_from(m)
        self.features = None if pixels is None else model.image_features(  # [image tokens after m, hidden]
            pixels.to(model.device, model.dtype), grids.to(model.device))
        self.features_used = 0
        self.logits: torch.Tensor | None = None
        self.seconds = time.perf_counter() - started  # spent prefilling (not in the decode steps between chunks)

    def run(self, budget: int | None) -> int:
        """Prefill the next `budget` prompt tokens (None: all the rest); -> how many were run."""
        started = time.perf_counter()
        engine, prompt, device = self.engine, self.prompt, self.engine.model.device
        start, P = self.cache.length, len(prompt.ids)
        end = P if budget is None else min(P, start + budget)
        ids = torch.tensor([prompt.ids[start:end]], device=device)
        n_media = int((ids == engine.model.config.media_placeholder_token_id).sum())
        feats = None
        if n_media:
            feats = self.features[self.features_used:self.features_used + n_media]
            self.features_used += n_media
        hidden = engine.lm.hidden_states(engine.model.embed(ids, image_features=feats),
                                         torch.arange(start, end, device=device)[None], None, self.cache)
        if end == P:
            self.logits = engine.lm.lm_head(hidden[:, -1]).float()
        self.seconds += time.perf_counter() - started
        return end - start


class SequenceStream:
    """`Engine.stream`'s result: iterate for text deltas; then `text`, `token_ids`, `finish_reason` and `stats`
    (its `prompt_tokens` are those prefilled; `reused` those taken from the prefix cache)."""

    def __init__(self, engine: Engine, seq: Sequence, deltas: collections.deque):
        self.engine, self.seq, self._deltas = engine, seq, deltas

    def __iter__(self) -> Iterator[str]:
        try:
            while True:
                while self._deltas:
                    delta = self._deltas.popleft()
                    if delta:
                        yield delta
                if self.seq.finish_reason:
                    break
                self.engine.step()
        finally:
            if not self.seq.finish_reason:  # interrupted or abandoned: nothing half-done stays in the batch
                self.engine.reset()
        if self.seq.error is not None:
            raise self.seq.error

    @property
    def text(self) -> str:
        return self.seq.text.text

    @property
    def token_ids(self) -> list[int]:
        return self.seq.text.token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.seq.finish_reason

    @property
    def stats(self) -> GenerationStats:
        return self.seq.stats

    @property
    def reused(self) -> int:
        return self.seq.reused
