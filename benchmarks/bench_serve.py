"""`kimivl serve` under load: 1, 4 and 16 concurrent clients against the same requests answered one at a time, and a
5-turn chat with and without prefix reuse.

    .venv/bin/python benchmarks/bench_serve.py [--model DIR] [--requests 16] [--max-tokens 32] [--json OUT]

The server runs in this process (uvicorn in a thread, `kimivl.serve.in_thread`) and is driven over HTTP by the
official `openai` client, streaming, so each request's time to first token (TTFT: from sending to the first content
chunk) is seen as a client sees it. Every request is greedy with `ignore_eos`, so each makes exactly --max-tokens
tokens, and its answer is checked against the sequential run. The baseline is the same requests sent one after
another to a server with one batch row (what serving without continuous batching gives). Last, a long prompt
arriving while a client streams, prefilled whole or in --prefill-chunk pieces between decode steps. Without --model the
benchmark writes a random checkpoint of the `wide` shape (hidden 1024, 4 layers, 16 experts, float32; the tiny
tokenizer) to --work.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from bench_generate import wide_config  # noqa: E402

from kimivl import KimiVLForConditionalGeneration, KimiVLProcessor  # noqa: E402
from kimivl.engine import Engine  # noqa: E402
from kimivl.model import init_weights  # noqa: E402
from kimivl.prepack import prepack_for_inference  # noqa: E402
from kimivl.serve import create_app, in_thread  # noqa: E402


def write_wide(work: Path) -> Path:
    """A random `wide` checkpoint with the tiny tokenizer's files, written once."""
    from weights_tools.tiny import make_tiny

    out = work / "wide"
    if not (out / "config.json").is_file():
        make_tiny(work / "tokenizer", force=True)
        model = KimiVLForConditionalGeneration(wide_config())
        init_weights(model, seed=0)
        model.save_pretrained(out)
        KimiVLProcessor.from_pretrained(work / "tokenizer").save_pretrained(out)
    return out


def png_url(colour: str, size: tuple[int, int]) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def requests(n: int) -> list[list[dict]]:
    """n different conversations, every other one about an image (16 to 48 image tokens)."""
    out = []
    for k in range(n):
        text = f"Request {k}. " + "Describe what you see in careful detail. " * (1 + k % 3)
        if k % 2:
            url = png_url(["red", "navy", "olive", "teal"][k % 4], (112 + 56 * (k % 3), 112))
            out.append([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                     {"type": "text", "text": text}]}])
        else:
            out.append([{"role": "user", "content": text}])
    return out


def ask(client, messages: list[dict], max_tokens: int) -> tuple[str, float, float, int]:
    """One streamed request -> (text, TTFT seconds, total seconds, completion tokens)."""
    start = time.perf_counter()
    first, text, tokens = None, "", 0
    for chunk in client.chat.completions.create(model="bench", messages=messages, max_tokens=max_tokens,
                                                temperature=0, stream=True, stream_options={"include_usage": True},
                                                extra_body={"ignore_eos": True}):
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content is not None and first is None and \
                chunk.choices[0].delta.role is None:
            first = time.perf_counter() - start
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
    return text, first if first is not None else time.perf_counter() - start, time.perf_counter() - start, tokens


def load(model, processor, clients: int, convs: list[list[dict]], max_tokens: int, max_batch: int) -> dict:
    """All conversations through a fresh server with `max_batch` rows, `clients` at a time."""
    import openai

    engine = Engine(model, processor, max_batch=max_batch, prefix_cache_bytes=0)  # no reuse across requests here
    with in_thread(create_app(engine, "bench")) as url:
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=3600)
        ask(client, convs[0], 2)  # warm-up
        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(lambda c: ask(client, c, max_tokens), convs))
        wall = time.perf_counter() - start
    steps = engine.counters["steps"]
    ttfts = sorted(r[1] for r in results)
    return {"clients": clients, "max_batch": max_batch, "wall_s": wall, "texts": [r[0] for r in results],
            "tokens": sum(r[3] for r in results), "tokens_per_s": sum(r[3] for r in results) / wall,
            "ttft_p50_s": statistics.median(ttfts), "ttft_p99_s": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
            "mean_batch": engine.counters["batch_rows"] / steps if steps else 0.0}


def chat(model, processor, turns: int, max_tokens: int, reuse: bool) -> list[dict]:
    """A conversation of `turns` turns about one image, each turn sending the whole history."""
    import openai

    engine = Engine(model, processor, max_batch=1, prefix_cache_bytes=(1 << 30) if reuse else 0)
    history: list[dict] = []
    rows = []
    with in_thread(create_app(engine, "bench")) as url:
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=3600)
        ask(client, [{"role": "user", "content": "warm up"}], 2)
        for turn in range(turns):
            content = f"Turn {turn + 1}: and what else can you tell me about it?"
            if turn == 0:
                content = [{"type": "image_url", "image_url": {"url": png_url("navy", (448, 336))}},
                           {"type": "text", "text": "What is in this picture? Describe it carefully."}]
            history.append({"role": "user", "content": content})
            before = dict(engine.counters)
            text, ttft, total, _ = ask(client, history, max_tokens)
            history.append({"role": "assistant", "content": text})
            rows.append({"turn": turn + 1, "ttft_s": ttft, "total_s": total, "text": text,
                         "prompt_tokens": engine.counters["prompt_tokens"] - before["prompt_tokens"],
                         "reused": engine.counters["reused_tokens"] - before.get("reused_tokens", 0)})
    return rows


def stall(model, processor, chunk: int, prompt_words: int, max_tokens: int) -> dict:
    """A client streaming its answer while a request with a long prompt arrives: the longest gap between two of the
    first client's tokens, and the newcomer's time to first token."""
    import openai

    engine = Engine(model, processor, max_batch=2, prefix_cache_bytes=0, prefill_chunk=chunk)
    long_prompt = [{"role": "user", "content": "Summarise: " + "the quick brown fox jumps over a lazy dog " * (
        prompt_words // 9)}]
    with in_thread(create_app(engine, "bench")) as url:
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=3600)
        ask(client, [{"role": "user", "content": "warm up"}], 2)
        stamps, newcomer = [], {}

        def newcomer_request():
            newcomer["result"] = ask(client, long_prompt, 4)

        with ThreadPoolExecutor(1) as pool:
            future = None
            for chunk_ in client.chat.completions.create(
                    model="bench", messages=[{"role": "user", "content": "Tell me a long story."}],
                    max_tokens=max_tokens, temperature=0, stream=True, extra_body={"ignore_eos": True}):
                if chunk_.choices and chunk_.choices[0].delta.content:
                    stamps.append(time.perf_counter())
                    if len(stamps) == 5:
                        future = pool.submit(newcomer_request)
            future.result()
        prompt_tokens = engine.counters["prompt_tokens"]
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"chunk": chunk, "max_gap_s": max(gaps), "median_gap_s": statistics.median(gaps),
            "newcomer_ttft_s": newcomer["result"][1], "prompt_tokens": prompt_tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="checkpoint directory (default: a random `wide` one in --work)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/kimivl-bench-serve"))
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--long-prompt", type=int, default=1000, help="words of the late request's prompt")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    path = args.model or write_wide(args.work)
    model, processor = KimiVLForConditionalGeneration.from_pretrained(path), KimiVLProcessor.from_pretrained(path)
    packed = prepack_for_inference(model)  # as `kimivl serve` does (KIMIVL_PREPACK=0: the plain layout)
    convs = requests(args.requests)
    print(f"{path}: {args.requests} requests of {args.max_tokens} tokens, greedy, {model.dtype}"
          f"{', prepacked' if packed else ''}, {torch.get_num_threads()} threads")

    sequential = load(model, processor, 1, convs, args.max_tokens, max_batch=1)
    rows = [("one at a time (1 client, 1 row)", sequential)]
    for clients in args.clients:
        result = load(model, processor, clients, convs, args.max_tokens, max_batch=max(args.clients))
        if result["texts"] != sequential["texts"]:
            raise SystemExit(f"{clients} clients: the answers differ from the sequential run")
        rows.append((f"{clients} concurrent clients, {max(args.clients)} rows", result))
    print("\n| run | wall | output tokens/s | x sequential | TTFT p50 | TTFT p99 | mean batch |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['wall_s']:.1f} s | {r['tokens_per_s']:.1f} | "
              f"{r['tokens_per_s'] / sequential['tokens_per_s']:.2f} | {r['ttft_p50_s'] * 1e3:.0f} ms | "
              f"{r['ttft_p99_s'] * 1e3:.0f} ms | {r['mean_batch']:.1f} |")

    chats = {reuse: chat(model, processor, args.turns, args.max_tokens, reuse) for reuse in (False, True)}
    if [r["text"] for r in chats[True]] != [r["text"] for r in chats[False]]:
        raise SystemExit("the chat's answers differ with prefix reuse")
    print(f"\n{args.turns}-turn chat about one 448 x 336 image, {args.max_tokens} tokens a turn; each turn sends the "
          "whole history")
    print("\n| turn | prompt tokens | reused | TTFT, no reuse | TTFT, reuse | turn, no reuse | turn, reuse |")
    print("|---|---|---|---|---|---|---|")
    for off, on in zip(chats[False], chats[True]):
        print(f"| {off['turn']} | {off['prompt_tokens']} | {on['reused']} | {off['ttft_s'] * 1e3:.0f} ms | "
              f"{on['ttft_s'] * 1e3:.0f} ms | {off['total_s']:.2f} s | {on['total_s']:.2f} s |")
    stalls = [stall(model, processor, chunk, args.long_prompt, 64) for chunk in (10**9, 512)]
    print(f"\nA client streams 64 tokens; after its 5th, a request with a {args.long_prompt}-word prompt arrives")
    print("\n| prefill per step | longest gap between the first client's tokens | median gap | newcomer's TTFT |")
    print("|---|---|---|---|")
    for r in stalls:
        name = "whole prompt" if r["chunk"] >= 10**9 else f"{r['chunk']} tokens (--prefill-chunk)"
        print(f"| {name} | {r['max_gap_s'] * 1e3:.0f} ms | {r['median_gap_s'] * 1e3:.0f} ms | "
              f"{r['newcomer_ttft_s'] * 1e3:.0f} ms |")
    if args.json:
        args.json.write_text(json.dumps({"load": [{k: v for k, v in r.items() if k != "texts"} | {"run": name}
                                                  for name, r in rows],
                                         "chat": {str(k): v for k, v in chats.items()}, "stall": stalls},
                                        indent=1))


if __name__ == "__main__":
    main()
