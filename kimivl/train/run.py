"""What every training run shares (supervised and RL): the common settings, what trains (LoRA, freezing, gradient
checkpointing), the learning-rate schedule, the data order, and the run folder (recorded settings, atomic
checkpoints, exact resume, the published model, scores at checkpoints)."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from ..errors import InputError, TrainingError
from ..prepack import refuse_prepacked
from . import parallel
from .lora import apply_lora, is_lora_parameter, merged_state_dict

log = logging.getLogger(__name__)

PARTS = {"vision": "vision_tower", "projector": "multi_modal_projector", "decoder": "language_model"}
# Settings a resumed run may change; any other difference from the saved run is refused.
RESUMABLE = {"out", "steps", "save_every", "log_every", "keep_checkpoints", "progress", "resume", "eval_data",
             "eval_limit", "max_skipped_steps"}
SEED_LIMIT = 2**63  # seeds are 0 .. 2**63 - 1 (what torch's and Python's generators take whole)


@dataclass
class TrainConfig:
    """Settings shared by every trainer: optimizer and schedule, what trains, checkpoints and records."""

    out: str
    steps: int = 100
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
    save_every: int = 0  # checkpoint every N steps (and always at the end)
    keep_checkpoints: int = 2  # the newest N checkpoints are kept
    log_every: int = 1
    eval_data: str | None = None  # an eval file scored at every checkpoint and at the end
    eval_metric: str = "ocr"
    eval_limit: int | None = None
    resume: bool = False  # continue from the newest checkpoint in out (start fresh when there is none)
    progress: bool | None = None  # the progress bar; None: when stderr is a terminal
    max_skipped_steps: int = 3  # steps whose loss or gradient norm is not finite are skipped (no update); one more
    # than this stops the run with TrainingError, the last checkpoint untouched

    def problems(self, world: int) -> list[str]:
        """What is wrong with these settings for `world` processes (empty: nothing)."""
        problems = [f"{f.name} must be a finite number, got {getattr(self, f.name)}"
                    for f in dataclasses.fields(self) if not _finite(getattr(self, f.name))]
        if not isinstance(self.seed, int) or not 0 <= self.seed < SEED_LIMIT:
            problems.append(f"seed must be an integer in 0..2**63-1, got {self.seed}")
        if self.max_skipped_steps < 0:
            problems.append(f"max_skipped_steps must be >= 0, got {self.max_skipped_steps}")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            problems.append(f"out {self.out} is a file, not a folder")
        if self.steps < 1:
            problems.append(f"steps must be at least 1, got {self.steps}")
        if not 0 <= self.warmup_steps < self.steps + 1:
            problems.append(f"warmup_steps must be in 0..{self.steps}, got {self.warmup_steps}")
        problems += [f"freeze {p!r}: choose from {', '.join(PARTS)}" for p in self.freeze if p not in PARTS]
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            problems.append(f"lr must be > 0 and min_lr_ratio in [0, 1], got {self.lr}, {self.min_lr_ratio}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            problems.append(f"betas must be two numbers in [0, 1), got {list(self.betas)}")
        if self.log_every < 1 or self.save_every < 0 or self.keep_checkpoints < 1:
            problems.append("log_every and keep_checkpoints must be >= 1 and save_every >= 0")
        if world > 1 and self.eval_data:
            problems.append("eval_data is not supported with several processes: score OUT/model with `kimivl eval` "
                            "after training")
        if self.eval_data:
            from ..eval.metrics import get_metric
            get_metric(self.eval_metric)  # an unknown name fails now, not at the first checkpoint
            if not Path(self.eval_data).is_file():
                problems.append(f"eval_data {self.eval_data}: no such file")
        return problems

    def check(self, world: int) -> None:
        problems = self.problems(world)
        if problems:
            raise InputError("; ".join(problems))


def _finite(value: Any) -> bool:
    """False for a float (or a float in a tuple / list) that is NaN or infinite."""
    if isinstance(value, (tuple, list)):
        return all(_finite(v) for v in value)
    return not isinstance(value, float) or math.isfinite(value)


def step_is_finite(loss: float, grad_norm: float, step: int, skipped: list[int], config: TrainConfig) -> bool:
    """Whether optimizer step `step` (0-based) may be applied. A NaN / infinite loss or gradient norm skips it (the
    caller drops the gradients; the weights and the optimizer state stay as they were) and is logged; more than
    config.max_skipped_steps such steps in a run raise TrainingError, so nothing non-finite is saved or published."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return True
    skipped.append(step + 1)
    log.warning("step %d: loss %s, gradient norm %s: step skipped (%d of at most %d)", step + 1, loss, grad_norm,
                len(skipped), config.max_skipped_steps)
    if len(skipped) > config.max_skipped_steps:
        raise TrainingError(f"the loss or gradient norm was not finite at steps {skipped}: stopped (more than "
                            f"max_skipped_steps={config.max_skipped_steps}); the last checkpoint is the last good "
                            "state: lower the learning rate, check the data, then resume")
    return False


def checkpoint_due(done: int, skipped: list[int], config: TrainConfig) -> bool:
    """Whether to save a checkpoint after `done` steps: every config.save_every steps and at the end, except a
    periodic one right after a skipped (non-finite) step, so a diverging run's last checkpoint is its last good step."""
    if done == config.steps:
        return True
    return bool(config.save_every) and done % config.save_every == 0 and not (skipped and skipped[-1] == done)


# ---- what trains ----------------------------------------------------------------------------------------------------
def prepare(model: torch.nn.Module, config: TrainConfig) -> list[torch.nn.Parameter]:
    """Apply LoRA, freezing and gradient checkpointing to the model from outside; return the trainable parameters.
    Router correction biases never take gradients (only the balance update moves them)."""
    if getattr(model, "quantization", None) is not None:
        raise InputError(f"the model was loaded quantized ({model.quantization}): finetune its float checkpoint "
                         "(training over a frozen quantized base, QLoRA, is not supported yet)")
    refuse_prepacked(model, "training")
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


def optimizer_and_schedule(params: list[torch.nn.Parameter], config: TrainConfig
                           ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (weight decay on matrices only) and the warmup + cosine schedule of `lr_lambda`."""
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=config.lr, betas=config.betas)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))


def lr_lambda(config: TrainConfig):
    """Linear warmup over warmup_steps, then cosine from lr to lr * min_lr_ratio at the last step."""
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        span = max(config.steps - config.warmup_steps - 1, 1)
        progress = min((step - config.warmup_steps) / span, 1.0)
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def use_bf16(model: torch.nn.Module, config: TrainConfig) -> bool:
    if config.bf16 is not None:
        return config.bf16
    return model.device.type == "cuda" and torch.cuda.is_bf16_supported()


# ---- data order -----------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def step_indices(step: int, n: int, batch_size: int, seed: int) -> list[int]:
    """The items of optimizer step `step` (0-based): consecutive slices of per-epoch seeded permutations, so a
    resumed run sees what an uninterrupted one would."""
    return [_permutation(n, seed, p // n)[p % n] for p in range(step * batch_size, (step + 1) * batch_size)]


# ---- the run folder -------------------------------------------------------------------------------------------------
def prepare_out(out: Path, config: TrainConfig, identity: dict[str, Any], resumable: set[str] = RESUMABLE
                ) -> Path | None:
    """Create `out`, record the run's settings (the config plus `identity`: what else fixes the run, such as the
    data size), and return the checkpoint to resume from (None: a fresh start). Refuses to start over a folder
    holding checkpoints unless resuming, and to resume with settings outside `resumable` changed."""
    out.mkdir(parents=True, exist_ok=True)
    root = out / "checkpoints"
    for stale in root.glob(".tmp-*"):  # a save that was interrupted: never loadable, removed
        shutil.rmtree(stale, ignore_errors=True)
    last = newest_checkpoint(root)
    settings = {**dataclasses.asdict(config), **identity}
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
    differ = [k for k in settings if k not in resumable and json.dumps(before.get(k)) != json.dumps(settings[k])]
    if differ:
        raise InputError(f"cannot resume {out}: settings differ from the saved run in "
                         + ", ".join(f"{k} ({before.get(k)!r} -> {settings[k]!r})" for k in differ))
    step = int(last.name.split("-")[1])
    lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").is_file() else []
    kept = [ln for ln in lines if ln.strip() and json.loads(ln)["step"] <= step]
    (out / "metrics.jsonl").write_text("".join(ln + "\n" for ln in kept))
    return last


def newest_checkpoint(root: Path) -> Path | None:
    done = sorted(p for p in root.glob("step-*") if (p / "trainer.pt").is_file()) if root.is_dir() else []
    return done[-1] if done else None


def save_checkpoint(root: Path, step: int, model, processor, optimizer, scheduler, config: TrainConfig,
                    dist: "parallel.Distributed", elapsed: float, extra: dict[str, Any] | None = None) -> Path:
    """Write checkpoint `step-NNNNNNN` atomically: everything goes into a temporary folder that is renamed when
    complete, so an interrupted save leaves nothing loadable. Single process: `model/` in the official format
    (LoRA merged), `adapter.safetensors` (LoRA: the adapter and router biases) and `trainer.pt` (optimizer,
    scheduler, step, RNG states, and the trainer's `extra` state). Distributed: `dcp/` (sharded model and
    optimizer) instead of the first two."""
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
                     "config": dataclasses.asdict(config), "extra": extra or {}}
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


def restore(path: Path, model, optimizer, scheduler, config: TrainConfig, dist: "parallel.Distributed",
            before_optimizer=None) -> tuple[int, float, dict[str, Any]]:
    """Load a checkpoint written by `save_checkpoint` into the model, optimizer, scheduler and RNGs; -> (step,
    seconds elapsed, the trainer's extra state). `before_optimizer(extra)` runs before the optimizer state is loaded
    (a trainer restoring parameters of its own that the optimizer holds)."""
    state = load_trainer_state(path / "trainer.pt")
    extra = state.get("extra", {})
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
        if before_optimizer is not None:
            before_optimizer(extra)
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"].get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    random.setstate(state["rng"]["python"])
    return int(state["step"]), float(state["elapsed"]), extra


def load_trainer_state(file: Path) -> dict[str, Any]:
    """A checkpoint's `trainer.pt`, read with torch's weights-only unpickler: tensors, numbers, strings and
    containers only, so a crafted file cannot run code (it fails with CheckpointError instead)."""
    from ..errors import CheckpointError

    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{file}: no such file") from None
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{file} is not a trainer state this project wrote (refused by the weights-only "
                              f"loader, nothing in it was run): {first}") from None
    if not isinstance(state, dict) or not {"step", "scheduler", "rng"} <= state.keys():
        raise CheckpointError(f"{file} is not a trainer state this project wrote (no step, scheduler or rng)")
    return state


def publish(src: Path, dst: Path) -> None:
    """Copy a checkpoint's model folder to `dst` through a hidden sibling that replaces what was there in one atomic
    swap (the old model or the new one at every instant)."""
    from ..fsutil import clean_stale, publish_dir, remove, staging_name

    clean_stale(dst)
    tmp = staging_name(dst)
    try:
        shutil.copytree(src, tmp)
        publish_dir(tmp, dst)
    except BaseException:
        remove(tmp)
        raise


def evaluate_checkpoint(checkpoint_dir: Path, config: TrainConfig) -> float:
    """The headline score of `config.eval_data` under a checkpoint's model (`kimivl eval`, greedy)."""
    from ..eval.runner import run_benchmark

    report = run_benchmark(str(checkpoint_dir / "model"), config.eval_data, config.eval_metric,
                           checkpoint_dir / "eval", limit=config.eval_limit, progress=False)
    return float(report["headline"]["value"])


def read_metrics(metrics_file: Path) -> list[dict]:
    return [json.loads(ln) for ln in metrics_file.read_text().splitlines() if ln.strip()]
