"""`kimivl serve`: the OpenAI chat-completions API over `kimivl.engine` (FastAPI + uvicorn: `pip install
'kimivl[serve]'`). This layer only parses and validates requests, streams answers (SSE) and maps errors to the OpenAI
error shape; batching, caching and generation are the engine's.

Images come as `image_url` parts holding a base64 `data:` URL, or a local path (`file://` or plain) under the
directory the operator allows with `--allowed-local-media`; remote URLs are refused (a server must not fetch
addresses a client names). A Thinking model's ◁think▷...◁/think▷ text goes to `reasoning_content`, the rest to
`content`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import os
import threading
import time
import uuid
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

from .engine import Engine, QueueFull, Sequence
from .errors import InputError, KimiVLError

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
except ImportError as e:  # an optional extra: say how to get it
    raise InputError(f"kimivl serve needs FastAPI and uvicorn ({e}): pip install 'kimivl[serve]'") from None
from .generation import ThinkingText
from .processing import load_image

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error answered in the OpenAI shape: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
             500: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


# ---- request parsing -------------------------------------------------------------------------------------------
def _number(body: dict, name: str, kind: type, low: float | None = None, high: float | None = None) -> Any:
    value = body.get(name)
    if value is None:
        return None
    ok = isinstance(value, (int, float)) if kind is float else isinstance(value, int)
    if not ok or isinstance(value, bool):
        raise APIError(400, f"{name} must be {'a number' if kind is float else 'an integer'}, got {value!r}", name)
    if (low is not None and value < low) or (high is not None and value > high):
        raise APIError(400, f"{name} must be in [{low}, {high}], got {value}", name)
    return kind(value)


def read_image(url: Any, allowed_local_media: Path | None) -> Any:
    """An image_url's url -> a PIL image: base64 data: URLs always, local paths under allowed_local_media only."""
    if not isinstance(url, str) or not url:
        raise APIError(400, "image_url.url must be a non-empty string", "messages")
    if url.startswith("data:"):
        header, _, data = url.partition(",")
        if not header.endswith(";base64"):
            raise APIError(400, "an image data: URL must be base64 (data:image/png;base64,...)", "messages")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, "the image data: URL is not valid base64", "messages") from None
        return _decode(raw)
    if url.startswith(("http://", "https://")):
        raise APIError(400, "remote image URLs are not fetched by this server: send the image as a base64 data: URL",
                       "messages")
    path = url.removeprefix("file://")
    if allowed_local_media is None:
        raise APIError(400, f"local image paths are not allowed ({url}): send a base64 data: URL, or start the server "
                            "with --allowed-local-media DIR", "messages")
    resolved = Path(path).resolve()
    if not resolved.is_relative_to(allowed_local_media):
        raise APIError(400, f"{url} is outside the directory allowed for local images", "messages")
    return _decode(resolved)


def _decode(source: Any) -> Any:
    try:
        return load_image(source)
    except InputError as e:
        raise APIError(400, str(e), "messages") from None


def parse_messages(messages: Any, allowed_local_media: Path | None) -> list[dict]:
    """OpenAI chat messages -> the processor's conversation (text items and PIL images)."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", "messages")
    out = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{k}] must be an object", "messages")
        role = {"developer": "system"}.get(m.get("role"), m.get("role"))
        if role not in ("system", "user", "assistant"):
            raise APIError(400, f"messages[{k}].role {m.get('role')!r} is not supported: system, user or assistant",
                           "messages")
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise APIError(400, f"messages[{k}].content must be a string or a list of parts", "messages")
        items = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                items.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                image_url = part.get("image_url")
                url = image_url.get("url") if isinstance(image_url, dict) else image_url
                items.append({"type": "image", "image": read_image(url, allowed_local_media)})
            else:
                raise APIError(400, f"messages[{k}] has a part of type {kind!r}: text and image_url are supported",
                               "messages")
        out.append({"role": role, "content": items})
    return out


def parse_settings(body: dict, engine: Engine) -> tuple[dict, int, bool, bool]:
    """-> (GenerationConfig fields given, n, stream, include_usage)."""
    for name in ("tools", "functions"):
        if body.get(name):
            raise APIError(400, f"{name} are not supported by this server", name)
    if body.get("logprobs"):
        raise APIError(400, "logprobs are not supported by this server", "logprobs")
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") not in (None, "text"):
        raise APIError(400, f"response_format {fmt.get('type')!r} is not supported: text only", "response_format")
    settings: dict[str, Any] = {}
    for name, field, kind, low, high in (("temperature", "temperature", float, 0, 2), ("top_p", "top_p", float, 0, 1),
                                         ("top_k", "top_k", int, 0, None), ("seed", "seed", int, -2**63, 2**64 - 1),
                                         ("max_tokens", "max_new_tokens", int, 1, None),
                                         ("max_completion_tokens", "max_new_tokens", int, 1, None)):
        value = _number(body, name, kind, low, high)
        if value is not None:
            settings[field] = value
    if "seed" in settings:  # OpenAI takes any 64-bit seed; torch's generators take 0..2**63-1
        settings["seed"] %= 2**63
    if settings.get("top_p") == 0:
        raise APIError(400, "top_p must be > 0", "top_p")
    stop = body.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise APIError(400, "stop must be a non-empty string or a list of them", "stop")
        settings["stop_strings"] = stop
    n = _number(body, "n", int, 1, engine.max_batch)
    stream = body.get("stream") or False
    options = body.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise APIError(400, "stream must be a boolean and stream_options an object", "stream")
    return settings, n or 1, stream, bool(options.get("include_usage"))


# ---- the app ---------------------------------------------------------------------------------------------------
class Choice:
    """One answer's text as it arrives, split into reasoning and content."""

    def __init__(self, seq: Sequence):
        self.seq, self.split = seq, ThinkingText()
        self.reasoning = self.content = ""

    def push(self, delta: str, last: bool) -> tuple[str, str]:
        reasoning, content = self.split.push(delta, final=last)
        self.reasoning += reasoning
        self.content += content
        return reasoning, content


def create_app(engine: Engine, model_name: str, api_key: str | None = None,
               allowed_local_media: str | os.PathLike | None = None, max_request_bytes: int = 64 << 20):
    """The FastAPI app serving `engine` as `model_name`; the engine's thread runs while the app does. Request bodies
    over max_request_bytes (base64 images included) are refused with 413 before they are held whole."""
    media_root = Path(allowed_local_media).resolve() if allowed_local_media else None
    created = int(time.time())
    responses: dict[int, int] = {}

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="kimivl", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        if request.url.path == "/v1/chat/completions":
            responses[e.status] = responses.get(e.status, 0) + 1
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):  # unknown paths, wrong methods: the same shape
        return await api_error(request, APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                                                 headers=getattr(e, "headers", None)))

    def authorize(request: Request) -> None:
        given = request.headers.get("authorization", "").encode()
        if api_key is not None and not hmac.compare_digest(given, f"Bearer {api_key}".encode()):
            raise APIError(401, "invalid or missing API key (Authorization: Bearer KEY)", code="invalid_api_key")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    card = {"id": model_name, "object": "model", "created": created, "owned_by": "kimivl"}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):
        authorize(request)
        if name != model_name:
            raise APIError(404, f"the model {name!r} does not exist: this server serves {model_name!r}", "model",
                           "model_not_found")
        return card

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(render_metrics(engine, responses))

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        authorize(request)
        try:
            body = json.loads(await read_body(request, max_request_bytes))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise APIError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        if not isinstance(body.get("model"), str):
            raise APIError(400, "model must be given: the name GET /v1/models lists", "model")
        if body.get("model") != model_name:
            raise APIError(404, f"the model {body.get('model')!r} does not exist: this server serves {model_name!r}",
                           "model", "model_not_found")
        settings, n, stream, include_usage = parse_settings(body, engine)
        ignore_eos = bool(body.get("ignore_eos"))
        try:
            prompt = await run_in_threadpool(
                lambda: engine.prepare(parse_messages(body.get("messages"), media_root)))
            settings.setdefault("max_new_tokens", max(1, engine.context - len(prompt.ids)))
            config = engine.settings(**settings)
            loop, queue = asyncio.get_running_loop(), asyncio.Queue()
            seqs = engine.submit(prompt, config, n, ignore_eos=ignore_eos,
                                 emit=lambda s, d: loop.call_soon_threadsafe(
                                     queue.put_nowait, (s, d, s.finish_reason is not None)))
        except QueueFull as e:
            raise APIError(429, str(e), code="queue_full") from None
        except KimiVLError as e:
            raise APIError(400, str(e)) from None
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        choices = [Choice(s) for s in seqs]
        def usage() -> dict:
            completion = sum(len(s.tokens) for s in seqs)
            return {"prompt_tokens": len(prompt.ids), "completion_tokens": completion,
                    "total_tokens": len(prompt.ids) + completion}

        if stream:
            responses[200] = responses.get(200, 0) + 1
            return StreamingResponse(sse(head, choices, queue, usage, include_usage, engine),
                                     media_type="text/event-stream")
        try:
            done, checked = 0, time.monotonic()
            while done < len(seqs):
                try:
                    seq, delta, last = await asyncio.wait_for(queue.get(), timeout=0.5)
                    choices[seq.index].push(delta, last)
                    done += last
                except asyncio.TimeoutError:
                    pass
                if time.monotonic() - checked > 0.5:  # twice a second, tokens arriving or not
                    checked = time.monotonic()
                    if await request.is_disconnected():  # nobody to answer: free the rows
                        return Response(status_code=499)
        finally:
            engine.cancel([s for s in seqs if not s.finish_reason])
        failed = next((s.error for s in seqs if s.error is not None), None)
        if failed is not None:
            raise APIError(500, f"generation failed: {failed}")
        responses[200] = responses.get(200, 0) + 1
        return {**head, "object": "chat.completion", "usage": usage(), "choices": [
            {"index": c.seq.index, "finish_reason": c.seq.finish_reason, "logprobs": None,
             "message": {"role": "assistant", "content": c.content,
                         **({"reasoning_content": c.reasoning} if c.reasoning else {})}} for c in choices]}

    return app


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, read in chunks and refused (413) as soon as it passes `limit` bytes."""
    too_large = APIError(413, f"the request body is over {limit >> 20} MiB (--max-request-mb)")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


async def sse(head: dict, choices: list[Choice], queue: asyncio.Queue, usage, include_usage: bool, engine: Engine
              ) -> AsyncIterator[str]:
    """The streamed answer: a role chunk per choice, content / reasoning deltas, a finish chunk per choice, the usage
    chunk when asked for, then [DONE]. A client that goes away cancels its sequences (the rows are freed)."""
    seqs = [c.seq for c in choices]

    def chunk(index: int | None, delta: dict | None = None, finish: str | None = None, **extra) -> str:
        body = {**head, "object": "chat.completion.chunk",
                "choices": [] if index is None else [{"index": index, "delta": delta or {}, "logprobs": None,
                                                      "finish_reason": finish}], **extra}
        if include_usage and "usage" not in extra:
            body["usage"] = None
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        for c in choices:
            yield chunk(c.seq.index, {"role": "assistant", "content": ""})
        done = 0
        while done < len(seqs):
            seq, delta, last = await queue.get()
            done += last
            reasoning, content = choices[seq.index].push(delta, last)
            if reasoning:
                yield chunk(seq.index, {"reasoning_content": reasoning})
            if content:
                yield chunk(seq.index, {"content": content})
            if last:
                if seq.error is not None:
                    yield f"data: {json.dumps(APIError(500, f'generation failed: {seq.error}').body())}\n\n"
                yield chunk(seq.index, finish=seq.finish_reason if seq.finish_reason in ("stop", "length") else None)
        if include_usage:
            yield chunk(None, usage=usage())
        yield "data: [DONE]\n\n"
    finally:
        engine.cancel([s for s in seqs if not s.finish_reason])


def render_metrics(engine: Engine, responses: dict[int, int]) -> str:
    """The engine's counters in the Prometheus text format."""
    c = engine.counters
    lines = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.extend([f"# HELP kimivl_{name} {help_text}", f"# TYPE kimivl_{name} {kind}"])
        lines.extend(f"kimivl_{name}{labels} {value:g}" for labels, value in samples)

    metric("requests_total", "counter", "Requests admitted into the batch (prefilled).", [("", c["requests"])])
    metric("http_responses_total", "counter", "Chat completion responses (POST /v1/chat/completions) by status.",
           [(f'{{code="{code}"}}', n) for code, n in sorted(responses.items())])
    metric("prompt_tokens_total", "counter", "Prompt tokens of admitted requests.", [("", c["prompt_tokens"])])
    metric("prompt_tokens_reused_total", "counter", "Prompt tokens taken from the prefix cache.",
           [("", c["reused_tokens"])])
    metric("generation_tokens_total", "counter", "Tokens generated.", [("", c["generated_tokens"])])
    metric("decode_steps_total", "counter", "Decode steps run.", [("", c["steps"])])
    metric("queue_depth", "gauge", "Requests waiting for a batch row.", [("", len(engine.waiting))])
    metric("batch_size", "gauge", "Sequences in the running batch.", [("", len(engine.running))])
    metric("mean_batch_size", "gauge", "Mean rows per decode step so far.",
           [("", c["batch_rows"] / c["steps"] if c["steps"] else 0)])
    h = engine.ttft
    metric("time_to_first_token_seconds", "histogram", "Seconds from a request's arrival to its first token.",
           [(f'_bucket{{le="{b:g}"}}', n) for b, n in zip(h.BOUNDS, h.buckets)]
           + [('_bucket{le="+Inf"}', h.count), ("_sum", h.sum), ("_count", h.count)])
    metric("prefix_cache_bytes", "gauge", "Bytes held by the prefix cache.", [("", engine.prefixes.nbytes)])
    return "\n".join(lines) + "\n"


@contextmanager
def in_thread(app: Any, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run the app with uvicorn in a background thread (tests, benchmarks; port 0: a free one); yields its base URL
    (http://host:port/v1) once it accepts connections, and shuts it down after."""
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="kimivl-serve", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise KimiVLError(f"the server did not start on {host}:{port}")
        time.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}/v1"
    finally:
        server.should_exit = True
        thread.join()


def serve(model_dir: str, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8, max_queue: int = 64,
          api_key: str | None = None, allowed_local_media: str | None = None, served_model_name: str | None = None,
          prefix_cache_mb: int = 1024, dtype: str | None = None, device: str = "cpu", quantize: str | None = None,
          group_size: int | None = None, max_request_mb: int = 64, prefill_chunk: int = 512) -> None:
    """Load the checkpoint and serve it until interrupted."""
    from .model import KimiVLForConditionalGeneration
    from .prepack import prepack_for_inference
    from .processing import KimiVLProcessor

    if not Path(model_dir).is_dir():
        raise InputError(f"--model {model_dir} is not a directory")
    if allowed_local_media is not None and not Path(allowed_local_media).is_dir():
        raise InputError(f"--allowed-local-media {allowed_local_media} is not a directory")
    processor = KimiVLProcessor.from_pretrained(model_dir)
    model = KimiVLForConditionalGeneration.from_pretrained(model_dir, dtype=dtype, device=device, quantize=quantize,
                                                           group_size=group_size)
    prepack_for_inference(model)
    engine = Engine(model, processor, max_batch=max_batch, max_queue=max_queue,
                    prefix_cache_bytes=prefix_cache_mb << 20, prefill_chunk=prefill_chunk)
    name = served_model_name or Path(model_dir).resolve().name
    log.info("serving %s as %r on http://%s:%d/v1", model_dir, name, host, port)
    uvicorn.run(create_app(engine, name, api_key, allowed_local_media, max_request_mb << 20), host=host, port=port,
                log_level="info")
