"""The engine: continuous batching equals each request served alone; prefix reuse equals a full prefill."""

from __future__ import annotations

import random
import time

import pytest
import torch
from PIL import Image

from kimivl import InputError, KimiVLForConditionalGeneration, KimiVLProcessor, stream
from kimivl import cache as cache_module
from kimivl import engine as engine_module
from kimivl.engine import Engine, Filling, PrefixCache, QueueFull, common_prefix

from .helpers import rel_err


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    path = tiny_checkpoint()
    return KimiVLForConditionalGeneration.from_pretrained(path), KimiVLProcessor.from_pretrained(path)


def conversation(text: str, size: tuple[int, int] | None = None, colour: str = "red") -> list[dict]:
    if size is None:
        return [{"role": "user", "content": text}]
    return [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", size, colour)},
                                         {"type": "text", "text": text}]}]


def alone(model, processor, messages, **settings) -> tuple[list[int], str, str]:
    """The reference: the request answered by `kimivl.generation.stream` on its own (generate_tokens, no engine)."""
    out = stream(model, processor, messages, temperature=0, **settings)
    text = "".join(out)
    return out.token_ids, text, out.finish_reason


def collect(engine: Engine, prompt, n=1, **settings):
    deltas = {}
    seqs = engine.submit(prompt, engine.settings(temperature=0, **settings), n=n,
                         emit=lambda s, d: deltas.__setitem__(s, deltas.get(s, "") + d))
    return seqs, deltas


def prefill(engine: Engine, prompt, chunk: int | None = None) -> tuple:
    """(latent, k_pe, logits, tokens reused) of the prompt prefilled by the engine, `chunk` tokens at a time."""
    filling = Filling(engine, prompt, [])
    while filling.logits is None:
        filling.run(chunk)
    return filling.cache.latent[:, 0], filling.cache.k_pe[:, 0], filling.logits, filling.reused


def run(engine: Engine, limit: int = 500) -> None:
    for _ in range(limit):
        if not engine.step():
            return
    raise AssertionError("the engine did not finish")


REQUESTS = [("Describe it.", (56, 56), 12), ("hello there", None, 9), ("What colour is the square?", (84, 42), 16),
            ("a longer question about nothing in particular, to have a longer prompt", None, 5),
            ("Count the shapes.", (28, 112), 20), ("ok", None, 14), ("Read the text.", (70, 70), 7)]


def test_continuous_batch_equals_each_request_alone(loaded, monkeypatch):
    """Seven requests of different lengths and images through 3 rows: they queue, join the running batch between
    steps (each prefilled alone into a free row), leave when done (the last row moving into the freed one), and
    the rows grow (and shrink) in blocks of 8 slots mid-run. Every answer's tokens, text and finish reason equal the request
    answered alone by `stream`."""
    model, processor = loaded
    monkeypatch.setattr(cache_module, "BLOCK", 8)
    monkeypatch.setattr(engine_module, "BLOCK", 8)
    engine = Engine(model, processor, max_batch=3)
    expected, got, joined_mid_run = [], [], 0
    for k, (text, size, max_new) in enumerate(REQUESTS):
        conv = conversation(text, size, ["red", "navy", "olive"][k % 3])
        expected.append(alone(model, processor, conv, max_new_tokens=max_new))
        if k in (2, 5):  # the others are submitted while these run
            for _ in range(3):
                engine.step()
        joined_mid_run += bool(engine.running)
        got.append(collect(engine, engine.prepare(conv), max_new_tokens=max_new))
    run(engine)
    assert joined_mid_run >= 2 and engine.counters["steps"] < sum(r[2] for r in REQUESTS)  # really batched
    for (tokens, text, reason), ([seq], deltas) in zip(expected, got):
        assert seq.tokens[:len(seq.text.token_ids)] == seq.text.token_ids
        assert (seq.text.token_ids, deltas.get(seq, ""), seq.finish_reason) == (tokens, text, reason)
    assert engine.running == [] and engine.cache.max_len == 0  # idle: rows and memory given back
    assert engine.counters["resized"] >= 2


def test_n_choices_share_one_prefill_and_seeds_make_them_reproducible(loaded):
    model, processor = loaded
    engine = Engine(model, processor, max_batch=4)
    prompt = engine.prepare(conversation("Say something.", (56, 56)))
    first = engine.submit(prompt, engine.settings(temperature=1.0, seed=7, max_new_tokens=10), n=3)
    run(engine)
    again = engine.submit(prompt, engine.settings(temperature=1.0, seed=7, max_new_tokens=10), n=3)
    run(engine)
    assert [s.tokens for s in first] == [s.tokens for s in again]
    assert len({tuple(s.tokens) for s in first}) > 1  # choice i is seeded with seed + i
    assert engine.counters["requests"] == 2 and first[1].reused == 0  # one prefill for the three choices
    greedy, _ = collect(engine, prompt, n=2, max_new_tokens=6)
    run(engine)
    assert greedy[0].text.token_ids == greedy[1].text.token_ids == alone(
        model, processor, conversation("Say something.", (56, 56)), max_new_tokens=6)[0]


def test_prefix_reuse_equals_a_full_prefill(loaded):
    """The second turn of a chat about an image prefills only what follows the cached first turn (its image is not
    run again): its latents and first logits equal a full prefill (float32, relative 1e-5), its answer the same;
    a different image at the same place is not reused."""
    model, processor = loaded
    engine = Engine(model, processor)
    first = conversation("What is this?", (84, 56))
    [seq], _ = collect(engine, engine.prepare(first), max_new_tokens=6)
    run(engine)
    answer = seq.text.text
    second = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And the colour?"}]
    prompt = engine.prepare(second)
    calls = []
    original = model.image_features
    model.image_features = lambda *a: calls.append(a) or original(*a)
    try:
        latent, k_pe, logits, reused = prefill(engine, prompt)
    finally:
        del model.image_features
    full_latent, full_k_pe, full_logits, none = prefill(Engine(model, processor), prompt)
    first_prompt = len(engine.prepare(first).ids)
    assert none == 0 and reused >= first_prompt and calls == []
    assert rel_err(latent, full_latent) < 1e-5 and rel_err(k_pe, full_k_pe) < 1e-5
    assert rel_err(logits, full_logits) < 1e-5
    [turn2], deltas = collect(engine, prompt, max_new_tokens=8)
    run(engine)
    assert turn2.reused == reused and turn2.stats.prompt_tokens == len(prompt.ids) - reused
    assert (turn2.text.token_ids, deltas.get(turn2, "")) == alone(model, processor, second, max_new_tokens=8)[:2]

    other = [{**second[0], "content": [{"type": "image", "image": Image.new("RGB", (84, 56), "blue")},
                                       second[0]["content"][1]]}] + second[1:]
    changed = engine.prepare(other)
    image_start = changed.spans[0][0]
    assert changed.ids == prompt.ids and changed.key != prompt.key
    assert prefill(engine, changed)[3] == image_start  # the text before the image only


def test_prefix_cache_keeps_the_longest_entries_within_its_budget():
    latent = lambda n: torch.zeros(2, n, 4)  # 32 bytes a token, 64 with the k_pe of the same shape
    cache = PrefixCache(budget_bytes=64 * 10)
    cache.put([1, 2, 3], latent(3), latent(3))
    cache.put([1, 2, 3, 4, 5], latent(5), latent(5))  # extends [1, 2, 3]: replaces it
    assert [e[0] for e in cache.entries.values()] == [[1, 2, 3, 4, 5]] and cache.nbytes == 5 * 64
    cache.put([1, 2], latent(2), latent(2))  # already held as a prefix
    assert len(cache.entries) == 1
    cache.put([7, 8, 9, 10], latent(4), latent(4))
    assert cache.match([1, 2, 3, 9], limit=10)[1] == 3 and cache.match([1, 2, 3, 4, 5, 6], limit=4)[1] == 4
    cache.put([5, 5, 5], latent(3), latent(3))  # over budget: the least recently used ([7, 8, 9, 10]) goes
    assert [e[0] for e in cache.entries.values()] == [[1, 2, 3, 4, 5], [5, 5, 5]] and cache.nbytes == 8 * 64
    cache.put(list(range(11)), latent(11), latent(11))  # larger than the whole budget: not kept
    assert cache.nbytes == 8 * 64
    assert PrefixCache(0).match([1], 1) == (None, 0)
    rng = random.Random(0)
    for _ in range(300):
        a = [rng.randrange(3) for _ in range(rng.randrange(12))]
        b = [rng.randrange(3) for _ in range(rng.randrange(12))]
        limit = rng.randrange(14)
        brute = next((i for i in range(min(len(a), len(b), limit)) if a[i] != b[i]), min(len(a), len(b), limit))
        assert common_prefix(a, b, limit) == brute


def test_cancel_frees_the_row_and_the_others_go_on(loaded):
    model, processor = loaded
    engine = Engine(model, processor, max_batch=2)
    long_conv, short_conv = conversation("tell me a long story"), conversation("Describe it.", (56, 56))
    [long_seq] = engine.submit(engine.prepare(long_conv), engine.settings(temperature=0, max_new_tokens=40),
                               ignore_eos=True)
    [short], deltas = collect(engine, engine.prepare(short_conv), max_new_tokens=12)
    for _ in range(3):
        engine.step()
    engine.cancel([long_seq])
    run(engine)
    assert long_seq.finish_reason == "cancelled" and len(long_seq.tokens) < 10
    assert (short.text.token_ids, deltas.get(short, "")) == alone(model, processor, short_conv,
                                                                   max_new_tokens=12)[:2]


def test_bad_requests_are_refused_with_the_reason(loaded):
    model, processor = loaded
    engine = Engine(model, processor, max_batch=2, max_queue=1)
    prompt = engine.prepare(conversation("hi"))
    with pytest.raises(InputError, match="beyond the model's context of 2048 tokens"):
        engine.submit(prompt, engine.settings(max_new_tokens=2048))
    with pytest.raises(InputError, match="n must be between 1 and the batch size 2"):
        engine.submit(prompt, engine.settings(max_new_tokens=4), n=3)
    with pytest.raises(InputError, match="temperature"):
        engine.submit(prompt, engine.settings(temperature=-1))
    for _ in range(3):  # two get the free rows, one waits
        engine.submit(prompt, engine.settings(max_new_tokens=4))
    with pytest.raises(QueueFull, match="every batch row is taken and 1 requests are already waiting"):
        engine.submit(prompt, engine.settings(max_new_tokens=4))
    waiting = engine.waiting[-1]
    engine.cancel(waiting)  # a cancelled request leaves the queue at once
    assert waiting[0].finish_reason == "cancelled" and len(engine.waiting) == 2
    engine.submit(prompt, engine.settings(max_new_tokens=4))
    run(engine)
    with pytest.raises(InputError, match="one conversation"):
        engine.prepare([conversation("a"), conversation("b")])


def test_a_failing_request_fails_alone(loaded, monkeypatch):
    model, processor = loaded
    engine = Engine(model, processor)
    good = collect(engine, engine.prepare(conversation("fine")), max_new_tokens=5)[0][0]
    run(engine)
    original = Filling.run
    monkeypatch.setattr(Filling, "run", lambda self, budget: (_ for _ in ()).throw(RuntimeError("boom"))
                        if len(self.prompt.ids) > 30 else original(self, budget))
    bad = engine.submit(engine.prepare(conversation("x " * 40)), engine.settings(max_new_tokens=5))[0]
    again = collect(engine, engine.prepare(conversation("fine")), max_new_tokens=5)[0][0]
    run(engine)
    assert bad.finish_reason == "error" and str(bad.error) == "boom"
    assert again.tokens == good.tokens and again.finish_reason == good.finish_reason


def test_a_row_whose_sampling_fails_fails_alone(loaded, monkeypatch):
    """One row's sampling raising in a decode step ends that sequence with the error; the batch goes on. And a
    temperature near 0 samples like greedy instead of overflowing."""
    model, processor = loaded
    engine = Engine(model, processor)
    conv = conversation("Describe it.", (56, 56))
    [tiny_t] = engine.submit(engine.prepare(conv), engine.settings(temperature=1e-38, max_new_tokens=6, seed=1))
    [greedy], _ = collect(engine, engine.prepare(conv), max_new_tokens=6)
    [doomed] = engine.submit(engine.prepare(conversation("x")), engine.settings(temperature=1.0, max_new_tokens=6))
    engine.step()
    real_sample = engine_module.sample
    monkeypatch.setattr(engine_module, "sample", lambda logits, cfg, gen: (_ for _ in ()).throw(
        RuntimeError("bad row")) if cfg.temperature == 1.0 else real_sample(logits, cfg, gen))
    run(engine)
    assert doomed.finish_reason == "error" and str(doomed.error) == "bad row"
    assert tiny_t.tokens == greedy.tokens and greedy.finish_reason in ("stop", "length") and greedy.error is None


def test_chunked_prefill_equals_one_pass_and_lets_running_rows_decode(loaded):
    """A prompt prefilled 7 tokens at a time (its image's tokens cut across chunks) gives the latents and logits of
    one pass (float32, relative 1e-5). In the engine, while rows decode, a step prefills at most prefill_chunk
    tokens of a newcomer, so the running row gets a token every step meanwhile; the newcomer's answer equals the
    request answered alone."""
    model, processor = loaded
    engine = Engine(model, processor, prefill_chunk=8)
    conv = conversation("Read the text in this picture, please.", (84, 56))
    prompt = engine.prepare(conv)
    assert any(a % 7 and a // 7 != (b - 1) // 7 for a, b in prompt.spans)  # an image cut by a chunk boundary
    chunked, whole = prefill(engine, prompt, 7), prefill(engine, prompt)
    for a, b in zip(chunked[:3], whole[:3]):
        assert rel_err(a, b) < 1e-5
    [first] = engine.submit(engine.prepare(conversation("go on")), engine.settings(temperature=0, max_new_tokens=60),
                            ignore_eos=True)
    engine.step()
    [late], deltas = collect(engine, prompt, max_new_tokens=6)
    fill_steps, tokens_before = 0, len(first.tokens)
    while late.row < 0 and late.finish_reason is None:
        engine.step()
        fill_steps += 1
    assert late.reused > 0  # the system prompt, cached by the first request
    assert fill_steps == -(-(len(prompt.ids) - late.reused) // 8) > 2
    assert len(first.tokens) - tokens_before == fill_steps  # a token each step meanwhile
    run(engine)
    assert (late.text.token_ids, deltas.get(late, "")) == alone(model, processor, conv, max_new_tokens=6)[:2]


def test_the_engine_thread_finishes_a_prefill_left_half_done(loaded):
    """The last running row finishes while a long prompt is half prefilled: the background loop must go on with it
    (nothing running, nothing waiting, one request filling), not sleep."""
    model, processor = loaded
    engine = Engine(model, processor, prefill_chunk=4)
    [first] = engine.submit(engine.prepare(conversation("hi")), engine.settings(temperature=0, max_new_tokens=3),
                            ignore_eos=True)
    engine.step()  # admitted, one decode step: 2 of its 3 tokens
    [late] = engine.submit(engine.prepare(conversation("a longer question " * 4)),
                           engine.settings(temperature=0, max_new_tokens=2))
    engine.step()  # 4 of the late prompt's tokens, then the first request's last token
    assert first.finish_reason == "length" and engine._filling is not None and not engine.running
    engine.start()
    try:
        deadline = time.time() + 30
        while late.finish_reason is None and time.time() < deadline:
            time.sleep(0.01)
    finally:
        engine.stop()
    assert late.finish_reason in ("stop", "length")


def test_queue_limit_counts_rows_taken_by_running_filling_and_waiting_requests(loaded):
    model, processor = loaded
    engine = Engine(model, processor, max_batch=3, max_queue=0, prefill_chunk=4)
    short, long = engine.prepare(conversation("hi")), engine.prepare(conversation("a longer question " * 4))
    engine.submit(short, engine.settings(max_new_tokens=30), ignore_eos=True)
    engine.step()  # running: 1 row
    engine.submit(long, engine.settings(max_new_tokens=2))
    engine.step()  # the long prompt is half prefilled: its row is spoken for
    engine.submit(short, engine.settings(max_new_tokens=2))  # the last free row
    with pytest.raises(QueueFull, match="every batch row is taken and 0 requests"):
        engine.submit(short, engine.settings(max_new_tokens=2))
    with pytest.raises(QueueFull):
        engine.submit(short, engine.settings(max_new_tokens=2), n=2)
    run(engine)


def test_rows_shrink_after_a_long_request_leaves(loaded):
    """Decode steps attend over whole rows, so when the long sequence that stretched them leaves, the rows shrink
    to what the remaining ones need (a quarter more, in blocks)."""
    model, processor = loaded
    engine = Engine(model, processor, max_batch=2)
    [long_seq] = engine.submit(engine.prepare(conversation("tell me " * 200)), engine.settings(max_new_tokens=3),
                               ignore_eos=True)
    [short] = engine.submit(engine.prepare(conversation("hi")), engine.settings(temperature=0, max_new_tokens=30),
                            ignore_eos=True)
    engine.step()
    stretched = engine.cache.max_len
    while long_seq.finish_reason is None:
        engine.step()
    engine.step()
    assert stretched > 512 and engine.cache.max_len <= 256 and short.finish_reason is None
    run(engine)
    solo = Engine(model, processor, max_batch=1)
    [reference] = solo.submit(solo.prepare(conversation("hi")), solo.settings(temperature=0, max_new_tokens=30),
                              ignore_eos=True)
    run(solo)
    assert short.tokens == reference.tokens and len(short.tokens) == 30
