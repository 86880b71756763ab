"""`kimivl serve`: the real server on a free port with a tiny checkpoint, driven by the official `openai` client."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
from PIL import Image

from kimivl import KimiVLForConditionalGeneration, KimiVLProcessor, generate
from kimivl.engine import Engine
from kimivl.serve import create_app, in_thread
from kimivl.train import SFTConfig, train

KEY = "test-key"
THINK = [{"role": "user", "content": "Think, then answer."}]
THINK_ANSWER = "◁think▷Two and two.◁/think▷Four."


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    path = tiny_checkpoint()
    return KimiVLForConditionalGeneration.from_pretrained(path), KimiVLProcessor.from_pretrained(path)


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("media")
    Image.new("RGB", (56, 42), "navy").save(root / "navy.png")
    return root


@pytest.fixture(scope="module")
def server(loaded, media):
    """(base_url, engine) of a server with 4 batch rows, an API key and local images allowed under `media`."""
    engine = Engine(*loaded, max_batch=4, max_queue=64)
    with in_thread(create_app(engine, "tiny", api_key=KEY, allowed_local_media=media,
                              max_request_bytes=1 << 20)) as url:
        yield url, engine


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0], api_key=KEY, max_retries=0, timeout=60)


def png_url(colour: str = "red", size=(56, 56)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_message(text: str, url: str) -> dict:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                        {"type": "text", "text": text}]}


def reference(loaded, messages, max_new_tokens, **settings) -> str:
    """The same request answered alone in process (`kimivl.generate`, no engine), greedy."""
    model, processor = loaded
    return generate(model, processor, messages, max_new_tokens=max_new_tokens, temperature=0, **settings)


def as_processor_messages(messages: list[dict]) -> list[dict]:
    """OpenAI messages with data: URLs -> the processor's messages with PIL images (for the reference)."""
    out = []
    for m in messages:
        if isinstance(m["content"], str):
            out.append(m)
            continue
        items = []
        for part in m["content"]:
            if part["type"] == "text":
                items.append(part)
            else:
                raw = base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
                items.append({"type": "image", "image": Image.open(io.BytesIO(raw))})
        out.append({"role": m["role"], "content": items})
    return out


def test_plain_answer_and_usage(client, loaded):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a square?"}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.model == "tiny" and len(r.choices) == 1
    assert r.choices[0].message.content == reference(loaded, messages, 12)
    assert r.choices[0].finish_reason in ("stop", "length")
    prompt_tokens = len(loaded[1](messages)["input_ids"][0])
    assert r.usage.prompt_tokens == prompt_tokens and 1 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == prompt_tokens + r.usage.completion_tokens
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_streaming_gives_the_same_text_with_usage(client, loaded):
    messages = [image_message("Describe the picture.", png_url("green", (70, 42)))]
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reference(loaded, as_processor_messages(messages), 10)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    assert all(c.usage is None for c in chunks[:-1])


def test_local_images_only_under_the_allowed_directory(client, loaded, media, tmp_path):
    local = client.chat.completions.create(
        model="tiny", max_tokens=6, temperature=0,
        messages=[image_message("What colour?", f"file://{media / 'navy.png'}")])
    inline = client.chat.completions.create(
        model="tiny", max_tokens=6, temperature=0,
        messages=[image_message("What colour?", "data:image/png;base64," +
                                base64.b64encode((media / "navy.png").read_bytes()).decode())])
    assert local.choices[0].message.content == inline.choices[0].message.content
    Image.new("RGB", (28, 28)).save(tmp_path / "outside.png")
    for url, message in ((str(tmp_path / "outside.png"), "outside the directory allowed"),
                         (f"file://{media}/../{tmp_path.name}/outside.png", "outside the directory allowed"),
                         ("https://example.com/cat.png", "remote image URLs are not fetched"),
                         ("data:image/png;base64,@@@", "not valid base64"),
                         ("data:image/png;base64," + base64.b64encode(b"not a png").decode(), "cannot decode image"),
                         (f"file://{media / 'missing.png'}", "image file not found")):
        with pytest.raises(openai.BadRequestError, match=message) as e:
            client.chat.completions.create(model="tiny", max_tokens=4, messages=[image_message("hi", url)])
        assert e.value.status_code == 400 and e.value.body["type"] == "invalid_request_error"


def test_n_choices_with_a_seed(client):
    ask = lambda seed: client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                      max_tokens=8, temperature=1.0, n=3, seed=seed)
    first, again = ask(11), ask(11)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2] and len(set(texts)) > 1
    assert texts == [c.message.content for c in again.choices]


def test_stop_strings_cut_the_answer(client, loaded):
    messages = [{"role": "user", "content": "Tell me something."}]
    full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0,
                                          extra_body={"ignore_eos": True}).choices[0]
    assert full.finish_reason == "length" and len(full.message.content) > 6
    stop = full.message.content[4:6]
    cut = full.message.content[:full.message.content.index(stop)]
    for stream in (False, True):
        r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0,
                                           stop=[stop], stream=stream, extra_body={"ignore_eos": True})
        if stream:
            chunks = list(r)
            text = "".join(c.choices[0].delta.content or "" for c in chunks)
            reason = chunks[-1].choices[0].finish_reason
        else:
            text, reason = r.choices[0].message.content, r.choices[0].finish_reason
        assert (text, reason) == (cut, "stop")


def test_sixteen_concurrent_clients_get_what_each_gets_alone(client, server, loaded):
    """16 clients at once over 4 batch rows (requests queue, join and leave the running batch), some with images
    and different lengths: every answer equals the request answered alone in process."""
    requests = []
    for k in range(16):
        text = f"Question {k}: " + "tell me more " * (k % 5)
        messages = [image_message(text, png_url(["red", "blue", "olive"][k % 3], (28 * (1 + k % 3), 56)))
                    if k % 2 else {"role": "user", "content": text}]
        requests.append((messages, 4 + k % 7))
    expected = [reference(loaded, as_processor_messages(m), n) for m, n in requests]
    steps_before = server[1].counters["steps"]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda r: client.chat.completions.create(
            model="tiny", messages=r[0], max_tokens=r[1], temperature=0).choices[0].message.content, requests))
    assert answers == expected
    assert server[1].counters["steps"] - steps_before < sum(n for _, n in requests)  # they shared decode steps


def test_errors_in_the_openai_shape(client, server):
    url, engine = server
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).chat.completions.create(model="tiny",
                                                                                            messages=messages)
    assert e.value.status_code == 401
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=messages)
    with pytest.raises(openai.BadRequestError, match="beyond the model's context of 2048 tokens"):
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=2040)
    with pytest.raises(openai.BadRequestError, match="temperature must be in"):
        client.chat.completions.create(model="tiny", messages=messages, temperature=3)
    with pytest.raises(openai.BadRequestError, match="n must be in"):
        client.chat.completions.create(model="tiny", messages=messages, n=9)
    with pytest.raises(openai.BadRequestError, match="messages must be a non-empty list"):
        client.chat.completions.create(model="tiny", messages=[])
    with pytest.raises(openai.BadRequestError, match="role 'tool' is not supported"):
        client.chat.completions.create(model="tiny", messages=[{"role": "tool", "content": "x",
                                                                "tool_call_id": "1"}])
    request = urllib.request.Request(f"{url}/chat/completions", data=b"{not json", method="POST",
                                     headers={"Authorization": f"Bearer {KEY}"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request)
    assert e.value.code == 400 and "not valid JSON" in json.loads(e.value.read())["error"]["message"]
    request = urllib.request.Request(f"{url}/chat/completions", data=b'{"messages": []}', method="POST",
                                     headers={"Authorization": f"Bearer {KEY}"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request)
    assert e.value.code == 400 and "model must be given" in json.loads(e.value.read())["error"]["message"]
    with pytest.raises(openai.NotFoundError, match="GET /v1/nowhere: Not Found"):
        client.get("/nowhere", cast_to=object)
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(urllib.request.Request(f"{url}/chat/completions", method="GET"))
    assert e.value.code == 405 and e.value.headers["allow"] == "POST"
    assert json.loads(e.value.read())["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.APIStatusError, match="over 1 MiB") as e:  # a 1.5 MB image, over this server's 1 MiB
        client.chat.completions.create(model="tiny", messages=[image_message("hi", "data:image/png;base64," +
                                                                             "A" * 1_500_000)])
    assert e.value.status_code == 413
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("gpt-4o")

    engine.max_queue = 0  # no request may wait beyond the free rows
    hog = client.chat.completions.create(model="tiny", messages=messages, max_tokens=1500, n=4, stream=True,
                                         extra_body={"ignore_eos": True})
    try:
        next(iter(hog))
        while len(engine.running) < 4:
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError, match="every batch row is taken"):
            client.chat.completions.create(model="tiny", messages=messages)
    finally:
        hog.close()
        engine.max_queue = 64


def test_a_client_that_goes_away_frees_its_row(client, server):
    url, engine = server
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "go on"}],
                                            max_tokens=1500, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True})
    received = [next(iter(stream)) for _ in range(3)]
    assert received[0].choices[0].delta.role == "assistant"
    assert len(engine.running) == 1
    stream.close()
    deadline = time.time() + 20
    while engine.running and time.time() < deadline:
        time.sleep(0.05)
    assert engine.running == [] and engine.cache.max_len == 0


def test_a_waiting_client_that_goes_away_frees_its_row(server):
    """Without streaming too: a client that times out while its answer is being generated stops it."""
    url, engine = server
    impatient = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=1.0)
    before = engine.counters["generated_tokens"]
    with pytest.raises(openai.APITimeoutError):
        impatient.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "go on"}],
                                          max_tokens=1500, temperature=0, extra_body={"ignore_eos": True})
    deadline = time.time() + 20
    while engine.running and time.time() < deadline:
        time.sleep(0.05)
    assert engine.running == [] and 0 < engine.counters["generated_tokens"] - before < 1500  # stopped early


def test_health_and_metrics(server, client):
    url = server[0].removesuffix("/v1")
    assert json.loads(urllib.request.urlopen(f"{url}/health").read()) == {"status": "ok"}
    client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    text = urllib.request.urlopen(f"{url}/metrics").read().decode()
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if not line.startswith("#")}
    assert values["kimivl_requests_total"] >= 1 and values["kimivl_generation_tokens_total"] >= 1
    assert values['kimivl_http_responses_total{code="200"}'] >= 1
    assert values["kimivl_queue_depth"] == 0 and "kimivl_batch_size" in values
    assert values['kimivl_time_to_first_token_seconds_bucket{le="+Inf"}'] == \
        values["kimivl_time_to_first_token_seconds_count"] >= 1


@pytest.fixture(scope="module")
def thinking(tiny_checkpoint, tmp_path_factory):
    """A tiny model taught (60 SFT steps through kimivl.train, ~2 s) to answer THINK with THINK_ANSWER."""
    path = tiny_checkpoint()
    model, processor = KimiVLForConditionalGeneration.from_pretrained(path), KimiVLProcessor.from_pretrained(path)
    out = tmp_path_factory.mktemp("thinking")
    train(model, processor, [THINK + [{"role": "assistant", "content": THINK_ANSWER}]],
          SFTConfig(out=str(out), steps=60, batch_size=1, lr=1e-2, warmup_steps=5, progress=False, save_every=1000))
    assert generate(model, processor, THINK, max_new_tokens=40, temperature=0) == THINK_ANSWER
    return model, processor


def test_reasoning_goes_apart_from_the_answer(thinking):
    with in_thread(create_app(Engine(*thinking), "thinking")) as url:
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0)
        r = client.chat.completions.create(model="thinking", messages=THINK, max_tokens=40, temperature=0)
        message = r.choices[0].message
        assert (message.reasoning_content, message.content, r.choices[0].finish_reason) == \
            ("Two and two.", "Four.", "stop")
        chunks = list(client.chat.completions.create(model="thinking", messages=THINK, max_tokens=40,
                                                     temperature=0, stream=True))
        deltas = [c.choices[0].delta for c in chunks]
        assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "Two and two."
        assert "".join(d.content or "" for d in deltas) == "Four."
        assert not any(getattr(d, "reasoning_content", None) and d.content for d in deltas)


def test_serve_command_refuses_bad_flags(tmp_path, capsys):
    from kimivl.cli import main

    assert main(["serve", "--model", str(tmp_path / "missing")]) == 1
    assert "is not a directory" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path), "--max-batch", "0"]) == 1
    assert "--max-batch must be >= 1" in capsys.readouterr().err
