"""The `kimivl` command: `generate` (one answer, streamed), `chat` (interactive), `serve` (the OpenAI API), `eval`
(benchmarks) and `train` (finetuning)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from .errors import InputError, KimiVLError

EVAL_LINE = "score a model on a benchmark file; `kimivl eval make-synthetic` writes the offline suite"
TRAIN_LINE = "finetune a model: `kimivl train sft|grpo|dapo|ppo|export`"


def _add_eval(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from .eval.metrics import METRICS
    from .eval.runner import STUBS
    p = sub.add_parser(
        "eval", help=EVAL_LINE,
        description="Predict every sample of --data with --model (appending to OUT/predictions.jsonl, so an "
                    "interrupted run resumes where it stopped when rerun with the same arguments), then score with "
                    "--metric into OUT/report.json and OUT/report.md. Metrics: "
                    + "; ".join(f"{k}: {title}, {what}" for k, (title, what) in METRICS.items()) + ".")
    p.add_argument("--model", help=f"checkpoint directory, or a pipeline-check stub: {', '.join(STUBS)}")
    p.add_argument("--data", help="benchmark file: .tsv (VLMEvalKit layout) or .jsonl (image paths relative to it)")
    p.add_argument("--metric", choices=list(METRICS), help="how to score the predictions")
    p.add_argument("--out", help="output directory (predictions, scores, report)")
    p.add_argument("--limit", type=int, help="only the first N rows of --data")
    p.add_argument("--batch-size", type=int, default=8, help="samples per predict call (default 8)")
    p.add_argument("--circular", action="store_true",
                   help="MMBench circular evaluation (multiple-choice metrics): every rotation of the options must "
                        "be answered right")
    p.add_argument("--seed", type=int, default=42,
                   help="seed of the random option picked for an unparsable multiple-choice answer (default 42)")
    p.add_argument("--max-new-tokens", type=int, default=128,
                   help="answer length limit, greedy decoding (default 128; Thinking models need thousands)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="weights dtype (default: the checkpoint's; float32 on a CPU without fast bfloat16)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    _add_quantize_args(p)
    p.add_argument("--system", help="system prompt (default: the chat format's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    evsub = p.add_subparsers(dest="eval_command", title="subcommand", metavar="make-synthetic")
    m = evsub.add_parser("make-synthetic", help="write the offline OCR / image-QA suite as a TSV",
                         description="Render a deterministic OCR and simple image-QA suite with Pillow into a TSV "
                                     "(VLMEvalKit layout, one ground-truth answer per row).")
    m.add_argument("out", help="output .tsv file")
    m.add_argument("--n", type=int, default=200, help="number of samples (default 200)")
    m.add_argument("--seed", dest="synthetic_seed", type=int, default=0, help="seed (default 0)")
    m.add_argument("--split", choices=["train", "test"], default="test",
                   help="train and test hold disjoint words and numbers (default test)")
    return p


def _eval(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.eval_command == "make-synthetic":
        from .eval.synthetic import write_synthetic
        path = write_synthetic(args.out, n=args.n, seed=args.synthetic_seed, split=args.split)
        print(f"wrote {args.n} samples (split {args.split}, seed {args.synthetic_seed}) to {path}")
        return
    missing = [f"--{k}" for k in ("model", "data", "metric", "out") if getattr(args, k) is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    from .eval.runner import format_report, run_benchmark
    report = run_benchmark(args.model, args.data, args.metric, args.out, limit=args.limit,
                           batch_size=args.batch_size, circular=args.circular, seed=args.seed,
                           progress=not args.no_progress, max_new_tokens=args.max_new_tokens, dtype=args.dtype,
                           device=args.device, system=args.system, quantize=args.quantize,
                           group_size=args.group_size)
    print(format_report(report))
    print(f"report: {args.out}/report.json, {args.out}/report.md; per-sample scores: {args.out}/scores.jsonl")


def _add_quantize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantize", choices=["int8", "int4"],
                   help="quantize the decoder's weights while loading (int8 per channel, int4 in groups): about 1/4 "
                        "or 1/7 of the float32 memory; a compressed-tensors checkpoint loads quantized without it")
    p.add_argument("--group-size", type=int, choices=[32, 64, 128], help="int4 group size (default 128)")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory (config.json, safetensors, tokenizer files)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="at most this many new tokens (default 512)")
    p.add_argument("--temperature", type=float, help="0 = greedy (default: the checkpoint's generation_config.json, "
                   "e.g. 0.2 for Instruct; greedy without one)")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass (1 = off; default as --temperature)")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens (0 = off; default as "
                   "--temperature)")
    p.add_argument("--seed", type=int, help="seed for sampling")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop at this text (repeatable)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="weights dtype (default: the checkpoint's; float32 on a CPU without fast bfloat16)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    _add_quantize_args(p)
    p.add_argument("--system", help="system prompt (default: the chat format's 'You are a helpful assistant')")
    p.add_argument("--exif-orientation", action="store_true",
                   help="turn images by their EXIF orientation tag (the published processor does not)")


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="answer one prompt about zero or more images, streaming the answer",
                       description="Answer --prompt about the --image files with the checkpoint in --model. The "
                                   "answer streams to stdout; prefill and decode speed go to stderr.")
    _add_model_args(p)
    p.add_argument("--image", action="append", default=[], metavar="PATH", help="an image file (repeatable)")
    p.add_argument("--prompt", required=True, help="the question or instruction")
    p.add_argument("--no-stream", action="store_true", help="print the answer once it is complete")


def _add_chat(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="interactive chat; `/image PATH` attaches an image to your next message",
                       description="Chat with the checkpoint in --model. Commands: /image PATH (attach an image to "
                                   "the next message), /reset (forget the conversation), /exit (or Ctrl-D).")
    _add_model_args(p)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the OpenAI chat-completions API (continuous batching, prefix reuse)",
                       description="Serve --model over HTTP: POST /v1/chat/completions (streaming, images, n, stop, "
                                   "seed), GET /v1/models, /health and /metrics. Needs the serve extra: pip install "
                                   "'kimivl[serve]'.")
    p.add_argument("--model", required=True, help="checkpoint directory (config.json, safetensors, tokenizer files)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--served-model-name", help="the model id clients name (default: the directory's name)")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together at most (default 8)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting for a batch row at most; beyond, 429 (default 64)")
    p.add_argument("--prefix-cache-mb", type=int, default=1024,
                   help="memory for cached conversation prefixes, reused by requests that extend them (default "
                        "1024; 0: off)")
    p.add_argument("--api-key", default=os.environ.get("KIMIVL_API_KEY"),
                   help="require Authorization: Bearer KEY (default: $KIMIVL_API_KEY; none: open)")
    p.add_argument("--prefill-chunk", type=int, default=512,
                   help="prompt tokens prefilled per decode step while other requests decode (default 512); "
                        "smaller keeps the running answers smoother, at some cost to the newcomer's prefill")
    p.add_argument("--max-request-mb", type=int, default=64,
                   help="largest request body, base64 images included; beyond, 413 (default 64)")
    p.add_argument("--allowed-local-media", metavar="DIR",
                   help="let image_url name local files under DIR (default: base64 data: URLs only)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="weights dtype (default: the checkpoint's; float32 on a CPU without fast bfloat16)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    _add_quantize_args(p)


def _serve(args: argparse.Namespace) -> None:
    from .serve import serve
    for flag, value, low in (("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 0),
                             ("--prefix-cache-mb", args.prefix_cache_mb, 0), ("--port", args.port, 0),
                             ("--max-request-mb", args.max_request_mb, 1), ("--prefill-chunk", args.prefill_chunk, 1)):
        if value < low:
            raise InputError(f"{flag} must be >= {low}, got {value}")
    serve(args.model, host=args.host, port=args.port, max_batch=args.max_batch, max_queue=args.max_queue,
          api_key=args.api_key, allowed_local_media=args.allowed_local_media,
          served_model_name=args.served_model_name, prefix_cache_mb=args.prefix_cache_mb, dtype=args.dtype,
          device=args.device, quantize=args.quantize, group_size=args.group_size,
          max_request_mb=args.max_request_mb, prefill_chunk=args.prefill_chunk)


def _load(args: argparse.Namespace):
    from .generation import CheckpointGeneration, GenerationConfig
    from .model import KimiVLForConditionalGeneration
    from .prepack import prepack_for_inference
    from .processing import KimiVLProcessor

    if not Path(args.model).is_dir():
        raise InputError(f"--model {args.model} is not a directory")
    checkpoint = CheckpointGeneration.read(args.model)  # its sampling defaults; explicit flags win
    given = {k: v for k, v in (("temperature", args.temperature), ("top_k", args.top_k), ("top_p", args.top_p))
             if v is not None}
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, seed=args.seed, stop_strings=args.stop,
                              **((checkpoint.sampling if checkpoint else {}) | given))
    config.validate()  # before the (slow) model load
    processor = KimiVLProcessor.from_pretrained(args.model)
    model = KimiVLForConditionalGeneration.from_pretrained(args.model, dtype=args.dtype, device=args.device,
                                                           quantize=args.quantize, group_size=args.group_size)
    start = time.perf_counter()
    if prepack_for_inference(model) and time.perf_counter() - start >= 1:
        print(f"[weights prepacked for CPU inference in {time.perf_counter() - start:.1f} s; KIMIVL_PREPACK=0 skips "
              "it]", file=sys.stderr)
    if checkpoint and not given:
        print(f"[sampling as the checkpoint's generation_config.json says: {checkpoint.describe()}; --temperature 0 "
              "for greedy]", file=sys.stderr)
    return model, processor, config


class ThinkingSplit:
    """Streams a Thinking model's ◁think▷...◁/think▷ part to stderr and the answer to stdout (text without the
    markers goes to stdout)."""

    def __init__(self):
        from .generation import ThinkingText
        self.split = ThinkingText()
        self.printed_thinking = False

    def push(self, delta: str, final: bool = False) -> None:
        thinking, answer = self.split.push(delta, final)
        for part, stream in ((thinking, sys.stderr), (answer, sys.stdout)):
            if part:
                print(part, end="", flush=True, file=stream)
        self.printed_thinking |= bool(thinking)


def _answer(model, processor, messages: list[dict], config, no_stream: bool = False, engine=None) -> str:
    """Run one turn, printing the answer (streamed unless no_stream; a Thinking model's reasoning to stderr) and the
    speed on stderr. With an engine (chat), the conversation's earlier turns come from its prefix cache."""
    from .generation import stream

    out = engine.stream(messages, config=config) if engine else stream(model, processor, messages, config=config)
    split = ThinkingSplit()
    for delta in out:
        if not no_stream:
            split.push(delta)
    split.push(out.text if no_stream else "", final=True)
    if split.printed_thinking:
        print(file=sys.stderr)
    print(flush=True)
    s = out.stats
    reused = f" ({out.reused} more reused from the cache)" if getattr(out, "reused", 0) else ""
    print(f"[prefill {s.prompt_tokens} tokens{reused} at {s.prefill_tokens_per_second:.1f} tok/s, "
          f"decode {s.new_tokens} tokens at {s.decode_tokens_per_second:.1f} tok/s, stopped: {out.finish_reason}]",
          file=sys.stderr)
    return out.text


def _user_message(text: str, images: list) -> dict:
    if not images:
        return {"role": "user", "content": text}
    items = [{"type": "image", "image": image} for image in images]
    return {"role": "user", "content": items + [{"type": "text", "text": text}]}


def _system(args: argparse.Namespace) -> list[dict]:
    return [{"role": "system", "content": args.system}] if args.system else []


def _generate(args: argparse.Namespace) -> None:
    from .processing import load_image

    if not args.prompt.strip():
        raise InputError("--prompt is empty")
    images = [load_image(path, args.exif_orientation) for path in args.image]  # decoded before the model loads
    model, processor, config = _load(args)
    _answer(model, processor, _system(args) + [_user_message(args.prompt, images)], config, args.no_stream)


def _chat(args: argparse.Namespace) -> None:
    from .processing import load_image

    from .engine import Engine

    model, processor, config = _load(args)
    # on CPU each turn prefills only what follows the cached conversation; on CUDA decoding replays a captured graph
    # (`generate`'s path), which the engine's changing batch does not have, and prefill there is cheap
    engine = Engine(model, processor, max_batch=1) if model.device.type == "cpu" else None
    print("chat: /image PATH attaches an image to your next message, /reset forgets, /exit quits", file=sys.stderr)
    history, images = _system(args), []
    if hasattr(sys.stdin, "reconfigure"):  # undecodable bytes arrive as lone surrogates, refused line by line below
        sys.stdin.reconfigure(errors="surrogateescape")
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return
        if not line:
            continue
        if any("\udc80" <= ch <= "\udcff" for ch in line):
            print("error: that line is not valid UTF-8; it was ignored", file=sys.stderr)
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            history, images = _system(args), []
            continue
        if line.startswith("/") and line.split()[0] not in ("/image",):
            print(f"unknown command {line.split()[0]}: /image PATH, /reset or /exit", file=sys.stderr)
            continue
        if line.startswith("/image"):
            path = line[len("/image"):].strip()
            try:
                images.append(load_image(path, args.exif_orientation, processor.image_processor.check_size))
            except InputError as e:
                print(f"error: {e}", file=sys.stderr)
            continue
        message = _user_message(line, images)
        try:
            answer = _answer(model, processor, history + [message], config, engine=engine)
        except InputError as e:  # e.g. too long a conversation: say so and keep the session
            print(f"error: {e} (/reset starts a new conversation)", file=sys.stderr)
            images = []
            continue
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the session
            print("\n[interrupted]", file=sys.stderr)
            images = []
            continue
        history += [message, {"role": "assistant", "content": answer}]
        images = []


TRAIN_HELP = {
    "steps": "optimizer steps", "batch_size": "conversations per step, all processes together",
    "micro_batch_size": "conversations per forward/backward on one process (0: its whole share)",
    "lr": "peak learning rate (AdamW)", "min_lr_ratio": "the cosine ends at lr * this",
    "warmup_steps": "linear warmup steps", "weight_decay": "AdamW weight decay on matrices",
    "betas": "AdamW betas", "grad_clip": "max gradient norm (0: off)", "seed": "seed of data order and init",
    "freeze": "parts that do not train", "lora_rank": "LoRA rank (0: full finetuning)",
    "lora_alpha": "LoRA alpha", "lora_dropout": "LoRA dropout", "lora_targets": "layer groups given adapters",
    "gradient_checkpointing": "recompute each block in the backward (less memory)",
    "bf16": "bfloat16 autocast (default: on where the device supports it, never on CPU)",
    "balance": "expert balance: bias (aux-loss-free update), aux (sequence-level loss) or none",
    "bias_update_speed": "gamma of the bias update", "aux_loss_alpha": "weight of the aux loss (default: config)",
    "max_length": "refuse conversations longer than this (default: the context)",
    "save_every": "checkpoint every N steps (always at the end)", "keep_checkpoints": "newest N kept",
    "log_every": "metrics every N steps", "eval_data": "eval file scored at each checkpoint",
    "eval_metric": "metric for --eval-data", "eval_limit": "first N rows of --eval-data",
    "resume": "continue from the newest checkpoint in --out",
    "max_skipped_steps": "steps with a NaN / infinite loss or gradient norm skipped before the run stops",
}


RL_HELP = {
    "prompts_per_step": "prompts per step", "group_size": "responses sampled per prompt",
    "max_new_tokens": "response length limit", "temperature": "sampling temperature (> 0)",
    "top_k": "sample from the k most likely tokens (0: all)", "top_p": "nucleus sampling mass (1: off)",
    "epochs": "optimizer steps over each step's rollouts", "micro_batch_size": "responses per forward/backward (0: all)",
    "clip_eps": "ratio clip below 1 (and above, unless --clip-eps-high)", "clip_eps_high": "ratio clip above 1",
    "kl_coef": "weight of the KL to the reference (0: no reference held)",
    "loss_agg": "loss averaging: per sequence then over sequences, or over all tokens",
    "dynamic_sampling": "drop groups with equal rewards and refill them", "max_sampling_rounds":
    "generation rounds per step at most when refilling", "overlong_buffer": "penalise the last N tokens of the "
    "length limit (0: off; default for dapo: a fifth)", "overlong_penalty": "scale of the overlong penalty",
    "gamma": "discount", "lam": "GAE lambda", "value_coef": "weight of the value loss",
    "value_clip": "value clip range", "normalize_advantages": "whiten advantages",
    "reward_norm": "standardise rewards by their running mean and std", "reward_clip": "clip rewards (0: off)",
}


def _add_config_flags(parser: argparse.ArgumentParser, config_class, choices: dict[str, list[str]],
                      helps: dict[str, str]) -> None:
    """One flag per field of a trainer config dataclass (`--out` required), defaults from the class."""
    import dataclasses
    for f in dataclasses.fields(config_class):
        if f.name == "progress":
            continue
        flag, default = "--" + f.name.replace("_", "-"), f.default
        if f.name == "out":
            parser.add_argument(flag, required=True, help="output directory")
        elif isinstance(default, bool) or f.name == "bf16":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=helps[f.name])
        elif isinstance(default, tuple):
            kind = type(default[0]) if default else str
            parser.add_argument(flag, nargs="*" if f.name == "freeze" else "+", type=kind, default=default,
                                choices=choices.get(f.name),
                                help=f"{helps[f.name]} (default: {' '.join(map(str, default)) or 'none'})")
        else:
            kind = {"max_length": int, "eval_data": str, "aux_loss_alpha": float, "eval_limit": int,
                    "clip_eps_high": float, "overlong_buffer": int}.get(f.name, type(default))
            parser.add_argument(flag, type=kind, default=default, choices=choices.get(f.name),
                                help=f"{helps[f.name]} (default: {default})")


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory to start from")
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when present)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="weights (and optimizer) dtype; default float32, with --bf16 autocast for speed on GPUs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_train(sub: argparse._SubParsersAction) -> None:
    from .train.lora import LORA_TARGETS
    from .train.rl import ALGORITHMS, LOSS_AGGREGATION
    from .train.rewards import REWARDS
    from .train.run import PARTS
    from .train.sft import BALANCE, SFTConfig

    p = sub.add_parser("train", help=TRAIN_LINE)
    tsub = p.add_subparsers(dest="train_command", required=True, metavar="sft|grpo|dapo|ppo|export")
    s = tsub.add_parser(
        "sft", help="supervised finetuning on conversations",
        description="Finetune --model on --data (JSONL of {\"messages\": [...]} or an eval .tsv/.jsonl, each sample a "
                    "user turn and its answer); the loss counts assistant tokens only. Checkpoints, metrics.jsonl, "
                    "loss.png and the final model (OUT/model, official format, LoRA merged) go to --out. Under "
                    "`torchrun --nproc-per-node N -m kimivl.train sft ...` the model is sharded with FSDP2.")
    _add_model_flags(s)
    s.add_argument("--data", required=True, help="training conversations")
    choices = {"freeze": list(PARTS), "lora_targets": list(LORA_TARGETS), "balance": list(BALANCE),
               "loss_agg": list(LOSS_AGGREGATION)}
    _add_config_flags(s, SFTConfig, choices, TRAIN_HELP)
    titles = {"grpo": "GRPO (group-normalised advantages, clipped ratio, KL to the reference)",
              "dapo": "DAPO (decoupled clip, token-level loss, dynamic sampling, overlong shaping)",
              "ppo": "PPO (value head, GAE, clipped policy and value losses, KL in the rewards)"}
    for name, config_class in ALGORITHMS.items():
        r = tsub.add_parser(
            name, help=f"reinforcement learning: {titles[name]}",
            description=f"{titles[name]} on the prompts of --data (an eval .tsv/.jsonl: images, question, answers), "
                        "responses scored by --reward. Checkpoints, metrics.jsonl, reward.png and the final model "
                        "(OUT/model, official format, LoRA merged) go to --out.")
        _add_model_flags(r)
        r.add_argument("--data", required=True, help="prompts with their answers (eval file)")
        r.add_argument("--reward", required=True,
                       help=f"{', '.join(REWARDS)}; names joined by + are summed; or package.module:function")
        _add_config_flags(r, config_class, choices, {**TRAIN_HELP, **RL_HELP})
    e = tsub.add_parser("export", help="a sharded (multi-process) training checkpoint -> an official checkpoint")
    e.add_argument("checkpoint", help="OUT/checkpoints/step-NNNNNNN of a torchrun run")
    e.add_argument("--out", required=True, help="directory for the official checkpoint")


def _train(args: argparse.Namespace) -> None:
    import dataclasses
    from .train import parallel
    if args.train_command == "export":
        parallel.export(args.checkpoint, args.out)
        print(f"wrote {args.out}")
        return
    import torch
    from .model import KimiVLForConditionalGeneration
    from .processing import KimiVLProcessor
    from .train import SFTConfig, read_conversations
    from .train.rl import ALGORITHMS

    dist = parallel.Distributed.from_env()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and dist.world > 1:
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    config_class = SFTConfig if args.train_command == "sft" else ALGORITHMS[args.train_command]
    settings = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class) if hasattr(args, f.name)}
    settings = {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()}
    config = config_class(**settings, progress=False if args.no_progress else None)
    if args.train_command == "sft":
        data = read_conversations(args.data)
    else:
        from .eval.data import read_dataset
        from .train.rewards import get_reward
        get_reward(args.reward)  # an unknown reward fails before the model loads
        data = read_dataset(args.data)
    processor = KimiVLProcessor.from_pretrained(args.model)
    model = KimiVLForConditionalGeneration.from_pretrained(args.model, dtype=args.dtype, device=device,
                                                           progress=False if args.no_progress else None)
    if args.train_command == "sft":
        from .train import train
        result = train(model, processor, data, config)
        if dist.rank == 0:
            print(f"trained {result.step} steps; final loss {result.losses[-1]:.4f}" if result.losses else
                  f"nothing to do: {args.out} is already at step {result.step}")
            print(f"model: {result.model_dir}; metrics: {args.out}/metrics.jsonl; curve: {args.out}/loss.png")
        return
    from .train.rl import train as train_rl
    result = train_rl(model, processor, data, args.reward, config)
    print(f"trained {result.step} steps; mean reward of the last step {result.rewards[-1]:.4f}" if result.rewards
          else f"nothing to do: {args.out} is already at step {result.step}")
    print(f"model: {result.model_dir}; metrics: {args.out}/metrics.jsonl; curve: {args.out}/reward.png")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = argparse.ArgumentParser(prog="kimivl", description="Kimi-VL in plain PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_generate(sub)
    _add_chat(sub)
    _add_serve(sub)
    # eval's and train's flags import their modules (metrics, trainer configs): built only when asked for, so that
    # `generate` and `chat` start without them
    eval_parser = _add_eval(sub) if command in (None, "eval") else sub.add_parser("eval", help=EVAL_LINE)
    if command in (None, "train"):
        _add_train(sub)
    else:
        sub.add_parser("train", help=TRAIN_LINE)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        if args.command == "generate":
            _generate(args)
        elif args.command == "chat":
            _chat(args)
        elif args.command == "serve":
            _serve(args)
        elif args.command == "eval":
            _eval(args, eval_parser)
        elif args.command == "train":
            _train(args)
    except KimiVLError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # e.g. `kimivl generate ... | head`: the reader has gone, nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:  # a full disk, a permission, a vanished folder: the file and the reason, no traceback
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        if args.command in ("eval", "train"):
            print("what was saved before the failure is kept; rerun the same command to continue", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if args.command == "eval":
            print("interrupted: the predictions so far are saved; rerun the same command to resume", file=sys.stderr)
        elif args.command == "train":
            print("interrupted: the last complete checkpoint is kept; rerun with --resume to continue",
                  file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
