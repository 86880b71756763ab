"""Supervised finetuning: `train(model, processor, conversations, SFTConfig(...))`.

One optimizer step takes `batch_size` conversations (across all processes), in micro-batches of
`micro_batch_size` per forward/backward; the loss is the cross entropy of the assistant tokens summed over the step
and divided by their count, so any split into micro-batches or processes gives the same gradient. Data order is a
seeded permutation per epoch, a function of the step alone, so a resumed run sees what an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from ..errors import InputError, KimiVLError
from ..model import next_token_loss
from ..processing import KimiVLProcessor
from . import parallel
from .balance import ExpertBalance, load_summary, moe_layers, update_bias
from .data import IGNORE, collate, encode
from .lora import apply_lora, is_lora_parameter, merge_lora, merged_state_dict
from .plot import plot_curves

log = logging.getLogger(__name__)

PARTS = {"vision": "vision_tower", "projector": "multi_modal_projector", "decoder": "language_model"}
BALANCE = ("none", "bias", "aux")
# Settings a resumed run may change; any other difference from the saved run is refused.
RESUMABLE = {"out", "steps", "save_every", "log_every", "keep_checkpoints", "progress", "resume", "eval_data",
             "eval_limit"}


@dataclass
class SFTConfig:
    out: str
    steps: int = 100
    batch_size: int = 8  # conversations per optimizer step, all processes together
    micro_batch_size: int = 0  # conversations per forward/backward on one process; 0: all of its share at once
    lr: float = 1e-4
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio at the last step
    warmup_steps: int = 0
    weight_decay: float = 0.0  # applied to matrices only, not to norms and biases
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    seed: int = 0
    freeze: tuple[str, ...] = ()  # any of "vision", "projector", "decoder"
    lora_rank: int = 0  # 0: full finetuning; > 0: LoRA adapters on lora_targets, everything else frozen
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("attention", "mlp", "shared_experts", "projector")
    gradient_checkpointing: bool = False  # recompute each decoder / vision block in the backward
    bf16: bool | None = None  # bfloat16 autocast; None: on where the device supports it (not on CPU: slow there)
    balance: str = "none"  # "bias": auxiliary-loss-free bias update; "aux": sequence-level auxiliary loss
    bias_update_speed: float = 1e-3  # gamma of the bias update
    aux_loss_alpha: float | None = None  # None: the config's aux_loss_alpha
    max_length: int | None = None  # longest conversation in tokens; None: the model's context
    save_every: int = 0  # checkpoint every N steps (and always at the end)
    keep_checkpoints: int = 2  # the newest N checkpoints are kept
    log_every: int = 1
    eval_data: str | None = None  # an eval file scored at every checkpoint and at the end
    eval_metric: str = "ocr"
    eval_limit: int | None = None
    resume: bool = False  # continue from the newest checkpoint in out (start fresh when there is none)
    progress: bool | None = None  # the progress bar; None: when stderr is a terminal

    def check(self, world: int) -> None:
        problems = []
        if self.steps < 1:
            problems.append(f"steps must be at least 1, got {self.steps}")
        if self.batch_size < 1 or self.batch_size % world:
            problems.append(f"batch_size {self.batch_size} must be a positive multiple of the {world} processes")
        elif self.micro_batch_size < 0 or (self.micro_batch_size and (self.batch_size // world) % self.micro_batch_size):
            problems.append(f"micro_batch_size {self.micro_batch_size} must divide the {self.batch_size // world} "
                            "conversations each process takes per step")
        if not 0 <= self.warmup_steps < self.steps + 1:
            problems.append(f"warmup_steps must be in 0..{self.steps}, got {self.warmup_steps}")
        problems += [f"freeze {p!r}: choose from {', '.join(PARTS)}" for p in self.freeze if p not in PARTS]
        if self.balance not in BALANCE:
            problems.append(f"balance {self.balance!r}: choose from {', '.join(BALANCE)}")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            problems.append(f"lr must be > 0 and min_lr_ratio in [0, 1], got {self.lr}, {self.min_lr_ratio}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            problems.append(f"betas must be two numbers in [0, 1), got {list(self.betas)}")
        if self.log_every < 1 or self.save_every < 0 or self.keep_checkpoints < 1:
            problems.append("log_every and keep_checkpoints must be >= 1 and save_every >= 0")
        if world > 1 and self.balance == "aux":
            problems.append("balance 'aux' is not supported with several processes (the balance loss is built after "
                            "FSDP has resharded the router); use balance 'bias'")
        if world > 1 and self.eval_data:
            problems.append("eval_data is not supported with several processes: score OUT/model with `kimivl eval` "
                            "after training")
        if self.eval_data:
            from ..eval.metrics import get_metric
            get_metric(self.eval_metric)  # an unknown name fails now, not at the first checkpoint
            if not Path(self.eval_data).is_file():
                problems.append(f"eval_data {self.eval_data}: no such file")
        if problems:
            raise InputError("; ".join(problems))


@dataclass
class TrainResult:
    losses: list[float]  # per step of this call, the assistant-token cross entropy
    step: int  # the last step done
    model_dir: Path  # the final model in the official format (LoRA merged)
    checkpoints: list[Path] = field(default_factory=list)


# ---- what trains ----------------------------------------------------------------------------------------------------
def prepare(model: torch.nn.Module, config: SFTConfig) -> list[torch.nn.Parameter]:
    """Apply LoRA, freezing and gradient checkpointing to the model from outside; return the trainable parameters.
    Router correction biases never take gradients (only the balance update moves them)."""
    if config.lora_rank:
        apply_lora(model, tuple(config.lora_targets), config.lora_rank, config.lora_alpha, config.lora_dropout)
    frozen = tuple(PARTS[p] + "." for p in config.freeze)
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith(frozen) and not name.endswith("e_score_correction_bias")
                         and (not config.lora_rank or is_lora_parameter(name)))
    if config.gradient_checkpointing:
        for block in (*model.language_model.model.layers, *model.vision_tower.encoder.blocks):
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise InputError("nothing to train: every parameter is frozen")
    return params


def lr_lambda(config: SFTConfig):
    """Linear warmup over warmup_steps, then cosine from lr to lr * min_lr_ratio at the last step."""
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        span = max(config.steps - config.warmup_steps - 1, 1)
        progress = min((step - config.warmup_steps) / span, 1.0)
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


# ---- data order -----------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def step_indices(step: int, n: int, batch_size: int, seed: int) -> list[int]:
    """The conversations of optimizer step `step` (0-based): consecutive slices of per-epoch seeded permutations."""
    return [_permutation(n, seed, p // n)[p % n] for p in range(step * batch_size, (step + 1) * batch_size)]


# ---- the loop -------------------------------------------------------------------------------------------------------
def train(model: torch.nn.Module, processor: KimiVLProcessor, data: Sequence[list[dict]], config: SFTConfig
          ) -> TrainResult:
    """Finetune `model` on `data` (conversations) as `config` says; checkpoints and records go to `config.out`.

    Under torchrun (WORLD_SIZE > 1) the model is sharded with FSDP2 and checkpoints are sharded
    (torch.distributed.checkpoint); `kimivl train export` turns one into an official checkpoint.
    """
    dist = parallel.Distributed.from_env()
    config.check(dist.world)
    if len(data) == 0:
        raise InputError("no conversations to train on")
    out = Path(config.out)
    ckpt_root = out / "checkpoints"
    resume_from = _prepare_out(out, config, dist, len(data)) if dist.rank == 0 else None
    resume_from = dist.broadcast_object(resume_from)

    torch.manual_seed(config.seed)
    random.seed(config.seed)
    text_cfg = model.config.text_config
    max_length = config.max_length or text_cfg.max_position_embeddings
    params = prepare(model, config)
    aux_alpha = (text_cfg.aux_loss_alpha if config.aux_loss_alpha is None else config.aux_loss_alpha
                 ) if config.balance == "aux" else 0.0
    balance = ExpertBalance(model, aux_alpha) if moe_layers(model) else None
    if dist.world > 1:
        parallel.shard(model)
        params = [p for p in model.parameters() if p.requires_grad]  # the sharded parameters replace the old ones
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=config.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    start, elapsed = 0, 0.0
    if resume_from is not None:
        start, elapsed = _restore(resume_from, model, optimizer, scheduler, config, dist)
        log.info("resumed from %s at step %d", resume_from, start)
    bf16 = config.bf16 if config.bf16 is not None else (model.device.type == "cuda" and torch.cuda.is_bf16_supported())
    per_rank = config.batch_size // dist.world
    micro = config.micro_batch_size or per_rank
    pad_id = processor.tokenizer.pad_id

    model.train()
    losses: list[float] = []
    saved: list[Path] = []
    metrics = open(out / "metrics.jsonl", "a", encoding="utf-8") if dist.rank == 0 else None
    bar = tqdm(total=config.steps, initial=start, desc="sft", unit="step",
               disable=(dist.rank != 0) or (None if config.progress is None else not config.progress))
    t_start = time.perf_counter() - elapsed  # seconds count from the run's first step, across resumes
    try:
        for step in range(start, config.steps):
            t0 = time.perf_counter()
            indices = step_indices(step, len(data), config.batch_size, config.seed)
            mine = indices[dist.rank * per_rank:(dist.rank + 1) * per_rank]
            examples = [_encode(processor, data, i, max_length) for i in mine]
            n_targets = dist.all_reduce_sum(float(sum(int((e.labels[1:] != IGNORE).sum()) for e in examples)))
            tokens = dist.all_reduce_sum(float(sum(len(e.input_ids) for e in examples)))
            ce_total, aux_total = _accumulate(model, examples, micro, pad_id, n_targets, balance, config.batch_size,
                                              bf16, dist)
            grad_norm = parallel.clip_grad_norm(params, config.grad_clip)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loads = None
            if balance is not None:
                loads = {i: dist.all_reduce_sum(t) for i, t in balance.step_loads().items()}
                if config.balance == "bias":
                    update_bias(model, loads, config.bias_update_speed)
            loss_value = dist.all_reduce_sum(ce_total)
            aux_value = dist.all_reduce_sum(aux_total)
            losses.append(loss_value)
            seconds = time.perf_counter() - t0
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / seconds:.0f}")
            bar.update(1)
            done = step + 1
            if metrics is not None and (done % config.log_every == 0 or done == config.steps):
                record = {"step": done, "loss": loss_value, "lr": lr, "grad_norm": grad_norm, "tokens": int(tokens),
                          "tokens_per_s": tokens / seconds, "seconds": time.perf_counter() - t_start}
                if aux_alpha:
                    record["aux_loss"] = aux_value
                if loads is not None:
                    record["expert_load"] = load_summary(loads)
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            if done == config.steps or (config.save_every and done % config.save_every == 0):
                saved.append(_save(ckpt_root, done, model, processor, optimizer, scheduler, config, dist,
                                   time.perf_counter() - t_start))
                if config.eval_data and dist.rank == 0:
                    score = _evaluate(saved[-1], config)
                    metrics.write(json.dumps({"step": done, "eval": score}) + "\n")
                    metrics.flush()
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
        if balance is not None:
            balance.remove()
    model.eval()
    final = out / "model"
    dist.barrier()  # the last collective: rank 0's export below may take long, the others need not wait for it
    if dist.rank == 0:
        last = _newest_checkpoint(ckpt_root)
        if dist.world == 1:
            _publish(last / "model", final)
        else:
            parallel.export(last, final)
        plot_curves(out / "loss.png", _curves(out / "metrics.jsonl"))
    return TrainResult(losses=losses, step=config.steps, model_dir=final, checkpoints=saved)


def _accumulate(model, examples: list, micro: int, pad_id: int, n_targets: float, balance: ExpertBalance | None,
                batch_size: int, bf16: bool, dist: "parallel.Distributed") -> tuple[float, float]:
    """Forward and backward this process's share of a step in micro-batches, gradients accumulating. The loss of
    each is its targets' summed cross entropy over the whole step's target count (plus the balance loss of its
    sequences over the step's batch size), so the accumulated gradient is the step's mean. Returns the summed
    cross entropy and balance loss of this process's share."""
    ce_total = aux_total = 0.0
    for b in range(0, len(examples), micro):
        batch = {k: v.to(model.device) for k, v in collate(examples[b:b + micro], pad_id).items()}
        labels = batch.pop("labels")
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16), \
                parallel.vision_in_step(model, dist.world > 1 and "pixel_values" not in batch):
            if balance is not None:
                balance.observe(batch["attention_mask"])
            logits = model(**batch).logits
            ce = next_token_loss(logits, labels, IGNORE, reduction="sum") / max(n_targets, 1.0)
            aux = balance.take_aux_loss() if balance is not None else None
            aux = aux.sum() / batch_size if aux is not None else None
            loss = ce if aux is None else ce + aux
        loss.backward()
        ce_total += float(ce.detach())
        aux_total += float(aux.detach()) if aux is not None else 0.0
    return ce_total, aux_total


def _encode(processor: KimiVLProcessor, data: Sequence[list[dict]], i: int, max_length: int):
    try:
        return encode(processor, data[i], max_length)
    except KimiVLError as e:  # a bad message, an unreadable image, a conversation too long
        raise InputError(f"conversation {i}: {e}") from None


# ---- checkpoints ----------------------------------------------------------------------------------------------------
def _prepare_out(out: Path, config: SFTConfig, dist: "parallel.Distributed", n_data: int) -> Path | None:
    """Create `out`, record the run's settings, and return the checkpoint to resume from (None: a fresh start).
    Refuses to start over a folder holding checkpoints unless resuming, and to resume with other settings."""
    out.mkdir(parents=True, exist_ok=True)
    root = out / "checkpoints"
    for stale in root.glob(".tmp-*"):  # a save that was interrupted: never loadable, removed
        shutil.rmtree(stale, ignore_errors=True)
    last = _newest_checkpoint(root)
    settings = {**dataclasses.asdict(config), "world_size": dist.world, "data_size": n_data}  # order depends on both
    settings_file = out / "train_config.json"
    if last is None:
        if config.resume:
            log.info("no checkpoint in %s: starting from step 0", root)
        (out / "metrics.jsonl").unlink(missing_ok=True)
        settings_file.write_text(json.dumps(settings, indent=2) + "\n")
        return None
    if not config.resume:
        raise InputError(f"{out} holds checkpoints of an earlier run ({last.name}); pass resume=True (--resume) to "
                         "continue it, or choose another out folder")
    before = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
    differ = [k for k in settings if k not in RESUMABLE and json.dumps(before.get(k)) != json.dumps(settings[k])]
    if differ:
        raise InputError(f"cannot resume {out}: settings differ from the saved run in "
                         + ", ".join(f"{k} ({before.get(k)!r} -> {settings[k]!r})" for k in differ))
    step = int(last.name.split("-")[1])
    lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").is_file() else []
    kept = [ln for ln in lines if ln.strip() and json.loads(ln)["step"] <= step]
    (out / "metrics.jsonl").write_text("".join(ln + "\n" for ln in kept))
    return last


def _newest_checkpoint(root: Path) -> Path | None:
    done = sorted(p for p in root.glob("step-*") if (p / "trainer.pt").is_file()) if root.is_dir() else []
    return done[-1] if done else None


def _save(root: Path, step: int, model, processor, optimizer, scheduler, config: SFTConfig,
          dist: "parallel.Distributed", elapsed: float) -> Path:
    """Write checkpoint `step-NNNNNNN` atomically: everything goes into a temporary folder that is renamed when
    complete, so an interrupted save leaves nothing loadable. Single process: `model/` in the official format
    (LoRA merged), `adapter.safetensors` (LoRA: the adapter and router biases) and `trainer.pt` (optimizer,
    scheduler, step, RNG states). Distributed: `dcp/` (sharded model and optimizer) instead of the first two."""
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    if dist.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    try:
        if dist.world > 1:
            parallel.save_sharded(tmp / "dcp", model, optimizer)
            optim_state = None
        else:
            optim_state = optimizer.state_dict()
        if dist.rank == 0:
            if dist.world == 1:
                from safetensors.torch import save_file
                from ..checkpoint import save
                save(model, tmp / "model", state_dict=merged_state_dict(model) if config.lora_rank else None)
                processor.save_pretrained(tmp / "model")
                if config.lora_rank:
                    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()
                               if is_lora_parameter(k) or k.endswith("e_score_correction_bias")},
                              tmp / "adapter.safetensors")
            else:
                model.config.to_json(tmp / "config.json")
                processor.save_pretrained(tmp)
            state = {"step": step, "elapsed": elapsed, "dtype": str(model.dtype).removeprefix("torch."),
                     "optimizer": optim_state, "scheduler": scheduler.state_dict(),
                     "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                             "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                     "config": dataclasses.asdict(config)}
            torch.save(state, tmp / "trainer.pt")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in sorted(root.glob("step-*"))[:-max(config.keep_checkpoints, 1)]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
    finally:
        if dist.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _restore(path: Path, model, optimizer, scheduler, config: SFTConfig, dist: "parallel.Distributed"
             ) -> tuple[int, float]:
    state = torch.load(path / "trainer.pt", weights_only=False)
    if dist.world > 1:
        parallel.load_sharded(path / "dcp", model, optimizer)
    else:
        if config.lora_rank:
            from safetensors.torch import load_file
            missing = model.load_state_dict(load_file(path / "adapter.safetensors"), strict=False)
            if missing.unexpected_keys:
                raise InputError(f"{path}: adapter tensors the model does not have: {missing.unexpected_keys[:5]}")
        else:
            from ..checkpoint import read_into, read_layout
            layout = read_layout(path / "model")
            layout.raise_problems("cannot be resumed from")
            read_into(model.state_dict(), layout, f"resume {path.name}")
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"].get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    random.setstate(state["rng"]["python"])
    return int(state["step"]), float(state["elapsed"])


def _publish(src: Path, dst: Path) -> None:
    """Copy a checkpoint's model folder to `dst` through a temporary name, replacing what was there."""
    tmp = dst.with_name(f".tmp-{dst.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)


def _evaluate(checkpoint_dir: Path, config: SFTConfig) -> float:
    from ..eval.runner import run_benchmark

    model_dir = checkpoint_dir / "model"
    report = run_benchmark(str(model_dir), config.eval_data, config.eval_metric, checkpoint_dir / "eval",
                           limit=config.eval_limit, progress=False)
    return float(report["headline"]["value"])


def _curves(metrics_file: Path) -> dict[str, list[tuple[float, float]]]:
    rows = [json.loads(ln) for ln in metrics_file.read_text().splitlines() if ln.strip()]
    return {"training loss (assistant tokens)": [(r["step"], r["loss"]) for r in rows if "loss" in r],
            "held-out score": [(r["step"], r["eval"]) for r in rows if "eval" in r]}


def merge_and_save(model, processor: KimiVLProcessor, path: str | os.PathLike) -> None:
    """Fold LoRA adapters into the weights (in place) and save a plain official checkpoint with the processor."""
    merge_lora(model)
    model.save_pretrained(path)
    processor.save_pretrained(path)
