"""Supervised finetuning: `train(model, processor, conversations, SFTConfig(...))`.

One optimizer step takes `batch_size` conversations (across all processes), in micro-batches of
`micro_batch_size` per forward/backward; the loss is the cross entropy of the assistant tokens summed over the step
and divided by their count, so any split into micro-batches or processes gives the same gradient. Data order is a
seeded permutation per epoch, a function of the step alone, so a resumed run sees what an uninterrupted one would.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from ..errors import InputError, KimiVLError
from ..model import next_token_loss
from ..processing import KimiVLProcessor
from . import parallel
from .balance import ExpertBalance, load_summary, moe_layers, update_bias
from .data import IGNORE, collate, encode
from .lora import merge_lora
from .plot import plot_curves
from .run import (TrainConfig, checkpoint_due, evaluate_checkpoint, newest_checkpoint, optimizer_and_schedule, prepare,
                  prepare_out, publish, read_metrics, restore, save_checkpoint, step_indices, step_is_finite, use_bf16)

log = logging.getLogger(__name__)

BALANCE = ("none", "bias", "aux")


@dataclass
class SFTConfig(TrainConfig):
    batch_size: int = 8  # conversations per optimizer step, all processes together
    micro_batch_size: int = 0  # conversations per forward/backward on one process; 0: all of its share at once
    balance: str = "none"  # "bias": auxiliary-loss-free bias update; "aux": sequence-level auxiliary loss
    bias_update_speed: float = 1e-3  # gamma of the bias update
    aux_loss_alpha: float | None = None  # None: the config's aux_loss_alpha
    max_length: int | None = None  # longest conversation in tokens; None: the model's context

    def problems(self, world: int) -> list[str]:
        problems = super().problems(world)
        if self.batch_size < 1 or self.batch_size % world:
            problems.append(f"batch_size {self.batch_size} must be a positive multiple of the {world} processes")
        elif self.micro_batch_size < 0 or (self.micro_batch_size and (self.batch_size // world) % self.micro_batch_size):
            problems.append(f"micro_batch_size {self.micro_batch_size} must divide the {self.batch_size // world} "
                            "conversations each process takes per step")
        if self.balance not in BALANCE:
            problems.append(f"balance {self.balance!r}: choose from {', '.join(BALANCE)}")
        if world > 1 and self.balance == "aux":
            problems.append("balance 'aux' is not supported with several processes (the balance loss is built after "
                            "FSDP has resharded the router); use balance 'bias'")
        return problems


@dataclass
class TrainResult:
    losses: list[float]  # per step of this call, the assistant-token cross entropy
    step: int  # the last step done
    model_dir: Path  # the final model in the official format (LoRA merged)
    checkpoints: list[Path] = field(default_factory=list)


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
    identity = {"world_size": dist.world, "data_size": len(data)}  # the data order depends on both
    resume_from = prepare_out(out, config, identity) if dist.rank == 0 else None
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
    optimizer, scheduler = optimizer_and_schedule(params, config)
    start, elapsed = 0, 0.0
    if resume_from is not None:
        start, elapsed, _ = restore(resume_from, model, optimizer, scheduler, config, dist)
        log.info("resumed from %s at step %d", resume_from, start)
    bf16 = use_bf16(model, config)
    per_rank = config.batch_size // dist.world
    micro = config.micro_batch_size or per_rank
    pad_id = processor.tokenizer.pad_id

    model.train()
    losses: list[float] = []
    saved: list[Path] = []
    skipped: list[int] = []  # steps whose loss or gradient norm was not finite
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
            loss_value = dist.all_reduce_sum(ce_total)
            if step_is_finite(loss_value, grad_norm, step, skipped, config):
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loads = None
            if balance is not None:
                loads = {i: dist.all_reduce_sum(t) for i, t in balance.step_loads().items()}
                if config.balance == "bias":
                    update_bias(model, loads, config.bias_update_speed)
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
            if checkpoint_due(done, skipped, config):
                saved.append(save_checkpoint(ckpt_root, done, model, processor, optimizer, scheduler, config, dist,
                                             time.perf_counter() - t_start))
                if config.eval_data and dist.rank == 0:
                    score = evaluate_checkpoint(saved[-1], config)
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
        last = newest_checkpoint(ckpt_root)
        if dist.world == 1:
            publish(last / "model", final)
        else:
            parallel.export(last, final)
        rows = read_metrics(out / "metrics.jsonl")
        plot_curves(out / "loss.png",
                    {"training loss (assistant tokens)": [(r["step"], r["loss"]) for r in rows if "loss" in r],
                     "held-out score": [(r["step"], r["eval"]) for r in rows if "eval" in r]})
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


def merge_and_save(model, processor: KimiVLProcessor, path: str | os.PathLike) -> None:
    """Fold LoRA adapters into the weights (in place) and save a plain official checkpoint with the processor."""
    merge_lora(model)
    model.save_pretrained(path)
    processor.save_pretrained(path)
