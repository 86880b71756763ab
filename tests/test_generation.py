"""Generation: the latent cache against full recomputation, batching, sampling filters, stopping, streaming text."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from kimivl import (GenerationConfig, InputError, KimiVLConfig, KimiVLForConditionalGeneration, KimiVLProcessor,
                    MLACache, generate, split_thinking, stream)
from kimivl.generation import RowText, generate_tokens, sample
from kimivl.model import default_position_ids

from .helpers import image_batch, prompt_with_images


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    cache = {}

    def get(preset: str = "tiny"):
        if preset not in cache:
            path = tiny_checkpoint(preset)
            cache[preset] = (KimiVLForConditionalGeneration.from_pretrained(path),
                             KimiVLProcessor.from_pretrained(path))
        return cache[preset]

    return get


def image_conversation(size, text, n_images=1):
    colours = ["red", "green", "navy"]
    content = [{"type": "image", "image": Image.new("RGB", size, colours[i % 3])} for i in range(n_images)]
    return [{"role": "user", "content": content + [{"type": "text", "text": text}]}]


# ---- the cache -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["tiny", "tiny-qlora"])
def test_cached_decoding_matches_full_recompute(loaded, preset, report):
    """Prefill a prompt holding an image, then 20 one-token steps through the absorbed path, then a 5-token chunk
    after cached tokens; every step's logits equal those of one forward pass over the whole sequence."""
    model, _ = loaded(preset)
    lm = model.language_model
    grids = [(4, 6)]
    pixel_values, grid_hws = image_batch(grids)
    prompt = prompt_with_images(model.config, grids)
    steps, chunk = 20, torch.randint(0, 1000, (1, 5))
    cache = MLACache(lm.config, 1, prompt.shape[1] + steps + chunk.shape[1])
    with torch.no_grad():
        embeds = model.embed(prompt, pixel_values, grid_hws)
        positions = default_position_ids(prompt, None)
        logits = [lm(embeds, positions, None, cache)[:, -1]]
        tokens = prompt
        for _ in range(steps):
            nxt = logits[-1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, nxt], 1)
            logits.append(lm(lm.model.embed_tokens(nxt), positions[:, -1:] + len(logits), None, cache)[:, -1])
        n = tokens.shape[1]
        tokens = torch.cat([tokens, chunk], 1)
        chunk_logits = lm(lm.model.embed_tokens(chunk), torch.arange(n, n + 5)[None], None, cache)
        full = model(tokens, pixel_values=pixel_values, image_grid_hws=grid_hws).logits
    cached = torch.cat([torch.stack(logits, 1), chunk_logits], 1)  # positions prompt-1 .. end
    reference = full[:, prompt.shape[1] - 1:]
    err = (cached - reference).abs().max().item()
    report(f"{preset} cached vs full logits ({steps} steps + 5-token chunk), max abs diff", f"{err:.2e}")
    assert cache.length == tokens.shape[1]
    assert err <= 1e-4


def test_decode_never_expands_keys_and_values(loaded):
    """kv_b_proj (the per-head key/value expansion) runs as a module only at prefill; decode uses its weight in
    the absorbed form."""
    model, processor = loaded()
    calls = []
    hooks = [layer.self_attn.kv_b_proj.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[1]))
             for layer in model.language_model.model.layers]
    try:
        inputs = processor([{"role": "user", "content": "hello"}])
        out = model.generate(**inputs, max_new_tokens=8, stop_ids=[])
    finally:
        for h in hooks:
            h.remove()
    assert out.shape == (1, 8)
    layers = model.config.text_config.num_hidden_layers
    assert calls == [inputs.input_ids.shape[1]] * layers  # once per layer, over the prompt only


def test_cache_bytes_per_token():
    for preset, dtype in (("a3b", torch.bfloat16), ("tiny", torch.float32)):
        cfg = KimiVLConfig.preset(preset).text_config
        cache = MLACache(cfg, batch=2, max_len=3, device="meta", dtype=dtype)
        per_token_layer = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * dtype.itemsize
        assert cache.bytes_per_token_per_layer() == per_token_layer
        assert cache.latent.nbytes + cache.k_pe.nbytes == per_token_layer * 2 * 3 * cfg.num_hidden_layers
    a3b = KimiVLConfig.preset("a3b").text_config
    assert MLACache(a3b, 1, 1, device="meta", dtype=torch.bfloat16).bytes_per_token_per_layer() == 1152  # 576 x 2


def test_fixed_shape_decode_step_matches_cached_decoding(loaded):
    """decode_step (the step CUDA graphs capture: whole-buffer attention, position on the device) gives the logits of
    the ordinary cached step, teacher-forced over a left-padded batch with images, in a cache longer than needed
    whose unused slots hold garbage."""
    model, processor = loaded()
    lm = model.language_model
    inputs = processor([image_conversation((84, 56), "What is this?"),
                        [{"role": "user", "content": "Say something long about nothing in particular, please."}]])
    B, T = inputs.input_ids.shape
    forced = torch.randint(0, 1000, (B, 8))
    positions = default_position_ids(inputs.input_ids, inputs.attention_mask)
    runs = []
    with torch.no_grad():
        for fixed in (False, True):
            cache = MLACache(lm.config, B, T + 8 + 13)
            cache.latent.normal_()  # garbage past the filled slots: must stay unseen
            cache.k_pe.normal_()
            embeds = model.embed(inputs.input_ids, inputs.pixel_values, inputs.image_grid_hws)
            lm(embeds, positions, inputs.attention_mask, cache)
            steps = []
            for i in range(8):
                token, pos = forced[:, i:i + 1], positions[:, -1:] + 1 + i
                if fixed:
                    steps.append(lm.decode_step(token, pos, cache, torch.tensor([cache.length])))
                    cache.advance(1)
                else:
                    steps.append(lm(lm.model.embed_tokens(token), pos, None, cache)[:, -1])
            runs.append(torch.stack(steps, 1))
    assert runs[0].std() > 0.1
    torch.testing.assert_close(runs[1], runs[0], rtol=0, atol=1e-5)


def test_graphed_generation_reuses_its_step_and_matches_eager(loaded, monkeypatch):
    """cuda_graph=True (on CPU: the fixed-shape step without capture) gives eager generation's tokens and
    log-probabilities; a second call of the same batch size reuses the step and its cache, a new batch size adds
    one, and at most MAX_GRAPHS are kept."""
    from kimivl import cuda_graphs

    model, processor = loaded()
    lm = model.language_model
    inputs = processor([image_conversation((84, 56), "What is this?"), [{"role": "user", "content": "Hi"}]])
    config = GenerationConfig(max_new_tokens=10)
    results = {}
    for graphed in (False, True, True):
        logprobs = []
        tokens = torch.stack(list(generate_tokens(model, **inputs, config=config, stop_ids=[], logprobs=logprobs,
                                                  cuda_graph=graphed)), 1)
        results.setdefault(graphed, []).append((tokens, torch.stack(logprobs, 1)))
    (eager_tokens, eager_lp), = results[False]
    for tokens, lp in results[True]:
        assert tokens.tolist() == eager_tokens.tolist()
        torch.testing.assert_close(lp, eager_lp, rtol=0, atol=1e-5)
    assert len(lm._decode_graphs) == 1  # the second call reused the first one's step
    monkeypatch.setattr(cuda_graphs, "MAX_GRAPHS", 2)
    for rows in (1, 3, 4):
        list(generate_tokens(model, inputs.input_ids[1:].repeat(rows, 1), inputs.attention_mask[1:].repeat(rows, 1),
                             config=GenerationConfig(max_new_tokens=2), cuda_graph=True))
    assert [key[0] for key in lm._decode_graphs] == [3, 4]  # least recently used dropped
    cuda_graphs.release_graphs(lm)
    assert not hasattr(lm, "_decode_graphs") or not lm._decode_graphs


# ---- batching ------------------------------------------------------------------------------------------------
def test_left_padded_batch_matches_each_alone(loaded):
    model, processor = loaded()
    batch = [image_conversation((84, 56), "What is this?", n_images=2),
             [{"role": "user", "content": "Say something long about nothing in particular, please."}],
             image_conversation((140, 28), "Colour?")]
    config = GenerationConfig(max_new_tokens=12)
    together = model.generate(**processor(batch), stop_ids=[], **vars(config))
    for row, conv in enumerate(batch):
        alone = model.generate(**processor(conv), stop_ids=[], **vars(config))
        assert together[row].tolist() == alone[0].tolist(), f"conversation {row}"


def test_left_padded_cached_logits_match_each_alone(loaded):
    """Teacher-forced: three prompts of different lengths (two with images) left-padded into one batch, prefilled
    and continued for 16 one-token steps through the cache; every row's logits equal those of the row alone."""
    model, processor = loaded()
    lm = model.language_model
    batch = [image_conversation((84, 56), "What is this?", n_images=2),
             [{"role": "user", "content": "Say something long about nothing in particular, please."}],
             image_conversation((140, 28), "Colour?")]
    forced = torch.randint(0, 1000, (3, 16))

    def run(inputs, tokens):
        B, T = inputs.input_ids.shape
        cache = MLACache(lm.config, B, T + tokens.shape[1])
        positions = default_position_ids(inputs.input_ids, inputs.attention_mask)
        embeds = model.embed(inputs.input_ids, inputs.get("pixel_values"), inputs.get("image_grid_hws"))
        logits = [lm(embeds, positions, inputs.attention_mask, cache)[:, -1]]
        for step in range(tokens.shape[1]):
            logits.append(lm(lm.model.embed_tokens(tokens[:, step:step + 1]), positions[:, -1:] + step + 1, None,
                             cache)[:, -1])
        return torch.stack(logits, 1)  # [B, 17, vocab]

    with torch.no_grad():
        together = run(processor(batch), forced)
        for row, conv in enumerate(batch):
            alone = run(processor(conv), forced[row:row + 1])
            torch.testing.assert_close(together[row:row + 1], alone, rtol=0, atol=1e-4)


def test_rows_stop_independently_and_are_padded(loaded):
    model, processor = loaded()
    inputs = processor([[{"role": "user", "content": "one"}], [{"role": "user", "content": "two two"}]])
    free = model.generate(**inputs, max_new_tokens=10, stop_ids=[])
    stop = int(free[0, 3])  # make row 0's fourth token a stop token
    assert stop not in free[0, :3].tolist()
    out = model.generate(**inputs, max_new_tokens=10, stop_ids=[stop], pad_id=-1)
    assert out[0, :4].tolist() == free[0, :4].tolist() and (out[0, 4:] == -1).all()
    first_stop = next((i for i, t in enumerate(free[1].tolist()) if t == stop), None)
    end = 10 if first_stop is None else first_stop + 1
    assert out[1, :end].tolist() == free[1, :end].tolist()


# ---- sampling ------------------------------------------------------------------------------------------------
def test_greedy_and_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0], [3.0, 0.0, 0.0, 0.0]])
    assert sample(logits, GenerationConfig()).tolist() == [3, 0]
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(logits, GenerationConfig(temperature=1.0, top_k=2), gen) for _ in range(300)])
    assert set(draws[:, 0].tolist()) == {2, 3}  # only the two best of row 0
    # top_p: probabilities [0.5, 0.3, 0.15, 0.05]; the smallest most-likely set reaching p
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    for top_p, allowed in ((0.5, {0}), (0.7, {0, 1}), (0.8, {0, 1}), (0.81, {0, 1, 2}), (1.0, {0, 1, 2, 3})):
        cfg = GenerationConfig(temperature=1.0, top_p=top_p)
        seen = {sample(probs.log(), cfg, gen).item() for _ in range(400)}
        assert seen == allowed, top_p


def test_temperature_sampling_follows_softmax():
    logits = torch.tensor([[1.0, 2.0, 0.5]])
    gen = torch.Generator().manual_seed(1)
    n = 20_000
    draws = sample(logits.expand(n, 3), GenerationConfig(temperature=2.0), gen)
    freq = torch.bincount(draws, minlength=3).float() / n
    expected = (logits[0] / 2).softmax(-1)  # [0.2986, 0.4923, 0.2091]
    assert (freq - expected).abs().max() < 0.015  # ~4 standard errors at n = 20,000


def test_seed_reproduces_sampling(loaded):
    model, processor = loaded()
    msgs = [{"role": "user", "content": "tell me"}]
    a = generate(model, processor, msgs, max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    b = generate(model, processor, msgs, max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    c = generate(model, processor, msgs, max_new_tokens=12, temperature=1.0, top_p=0.9, seed=8)
    assert a == b and a != c


# ---- text, stopping, streaming -------------------------------------------------------------------------------
def byte_ids(tokenizer, text: str) -> list[int]:
    """One token per UTF-8 byte: a multi-byte character spans several tokens."""
    return [tokenizer.encoding.encode_single_token(bytes([b])) for b in text.encode()]


def test_stream_deltas_are_whole_characters(loaded):
    tok = loaded()[1].tokenizer
    row = RowText(tok, stop_ids=tok.stop_ids, stop_strings=())
    deltas = [row.push(i) for i in byte_ids(tok, "é🙂你")]
    assert deltas == ["", "é", "", "", "", "🙂", "", "", "你"]
    assert row.push(tok.token_id("<|im_end|>")) == "" and row.finish_reason == "stop" and row.text == "é🙂你"
    cut = RowText(tok, stop_ids=[], stop_strings=())
    assert [cut.push(i) for i in byte_ids(tok, "a🙂")[:3]] == ["a", "", ""]
    assert cut.flush() == "\ufffd"  # generation ended inside a character


def test_stop_strings_are_held_back_and_cut(loaded):
    tok = loaded()[1].tokenizer
    row = RowText(tok, stop_ids=[], stop_strings=["END", "###"])
    deltas = [row.push(i) for i in byte_ids(tok, "The answer is 42. EN")]
    assert "".join(deltas) == "The answer is 42. "  # "EN" may begin "END": held back
    deltas.append(row.push(byte_ids(tok, "D")[0]))
    assert row.finish_reason == "stop" and row.text == "The answer is 42. " and deltas[-1] == ""
    row = RowText(tok, stop_ids=[], stop_strings=["END"])
    assert "".join(row.push(i) for i in byte_ids(tok, "ENough")) + row.flush() == "ENough"  # a false start is shown


def test_stream_matches_generate_and_reports_speed(loaded):
    model, processor = loaded()
    msgs = image_conversation((56, 56), "Describe the image")
    out = stream(model, processor, msgs, max_new_tokens=16)
    deltas = list(out)
    assert "".join(deltas) == out.text == generate(model, processor, msgs, max_new_tokens=16)
    assert out.finish_reason in ("stop", "length") and len(out.token_ids) <= 16
    assert out.stats.prompt_tokens == processor(msgs).input_ids.shape[1] and out.stats.decode_tokens_per_second > 0


def test_stop_string_stops_generation(loaded):
    model, processor = loaded()
    msgs = [{"role": "user", "content": "go"}]
    free = generate(model, processor, msgs, max_new_tokens=20)
    stop = free[3:5]
    assert generate(model, processor, msgs, max_new_tokens=20, stop_strings=[stop]) == free[:free.index(stop)]


@pytest.mark.parametrize("text, expected", [
    ("◁think▷ step 1, step 2 ◁/think▷ The answer is 4.", ("step 1, step 2", "The answer is 4.")),
    ("Just an answer.", ("", "Just an answer.")),
    ("◁think▷ cut short", ("cut short", "")),
])
def test_split_thinking(text, expected):
    assert split_thinking(text) == expected


# ---- bad input -----------------------------------------------------------------------------------------------
def test_bad_generation_input(loaded):
    model, processor = loaded()
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(InputError, match=r"together .* beyond the model's context of 2048"):
        generate(model, processor, msgs, max_new_tokens=2048)
    with pytest.raises(InputError, match="max_new_tokens must be >= 1"):
        generate(model, processor, msgs, max_new_tokens=0)
    with pytest.raises(InputError, match="top_p"):
        generate(model, processor, msgs, temperature=1.0, top_p=0.0)
    with pytest.raises(InputError, match="1 image slots in the prompt but 0 images"):
        generate(model, processor, [{"role": "user", "content": [{"type": "image"}]}], images=[])
    with pytest.raises(InputError, match="outside the vocabulary"):
        list(generate_tokens(model, torch.tensor([[5000]])))
    with pytest.raises(InputError, match="temperature must be a number >= 0, got nan"):
        generate(model, processor, msgs, temperature=float("nan"))
    with pytest.raises(InputError, match="stop_strings must be a list"):
        generate(model, processor, msgs, stop_strings="END")
    with pytest.raises(InputError, match="either config or settings"):
        generate(model, processor, msgs, config=GenerationConfig(), max_new_tokens=3)
    with pytest.raises(InputError, match="one conversation"):
        stream(model, processor, [msgs, msgs])
    with pytest.raises(InputError, match="no conversations"):
        generate(model, processor, [])
    right_padded = torch.tensor([[5, 6, 7, 0]]), torch.tensor([[1, 1, 1, 0]])
    with pytest.raises(InputError, match="left-padded"):
        model.generate(*right_padded, max_new_tokens=2)


def test_generation_grows_its_cache_in_blocks_with_the_same_tokens(loaded, monkeypatch):
    """On CPU the cache starts at the prompt plus a block and grows by a quarter as tokens come (decode steps
    attend over the whole buffer, so an answer that stops early never pays for max_new_tokens): with 8-slot blocks
    (many regrowths) a left-padded batch decodes the same tokens and log-probabilities as with one buffer."""
    from kimivl import cache as cache_module

    model, processor = loaded()
    inputs = processor([image_conversation((56, 56), "Describe it."), [{"role": "user", "content": "hi"}]])
    config = GenerationConfig(max_new_tokens=40)

    def run():
        logprobs = []
        tokens = torch.stack(list(generate_tokens(model, **inputs, config=config, logprobs=logprobs)), 1)
        return tokens, torch.stack(logprobs, 1)

    tokens, logprobs = run()
    monkeypatch.setattr(cache_module, "BLOCK", 8)
    grown_tokens, grown_logprobs = run()
    assert torch.equal(tokens, grown_tokens) and tokens.shape[1] == 40
    assert (grown_logprobs - logprobs).abs().max() < 1e-5
