"""Many processes: PyTorch FSDP2 (`fully_shard`) and `torch.distributed.checkpoint`, applied from outside the model.

`torchrun --nproc-per-node N -m kimivl.train sft ...` sets RANK / WORLD_SIZE; the process group uses NCCL on GPUs
and gloo on CPUs. Each decoder block and each vision block is its own FSDP unit, the rest (embeddings, projector,
norms, lm_head) belongs to the root.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1

    @classmethod
    def from_env(cls) -> "Distributed":
        """The running process group, or a single process when WORLD_SIZE is unset or 1."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend)
        return cls(dist.get_rank(), dist.get_world_size())

    def all_reduce_sum(self, value: Any) -> Any:
        """Sum a float or a tensor over all processes (identity for one process)."""
        if self.world == 1:
            return value
        t = value.clone() if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=torch.float64)
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        t_dev = t.to(device)
        dist.all_reduce(t_dev)
        return t_dev.to(t.device) if isinstance(value, torch.Tensor) else float(t_dev)

    def broadcast_object(self, obj: Any) -> Any:
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def shard(model: torch.nn.Module) -> None:
    """FSDP2: each decoder and vision block sharded on its own, then the root. Gradients are summed, not averaged,
    over processes: each process's loss is already divided by the whole step's target count."""
    from torch.distributed.fsdp import fully_shard

    for block in (*model.language_model.model.layers, *model.vision_tower.encoder.blocks):
        fully_shard(block)
    fully_shard(model)
    for module in model.modules():
        if hasattr(module, "set_gradient_divide_factor"):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no pre-multiplied sum


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Clip the global gradient norm to max_norm (0: no clipping) and return the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


@contextlib.contextmanager
def vision_in_step(model: torch.nn.Module, needed: bool):
    """While `needed` (a micro-batch without images on one of several processes), the decoder's input gets zero
    times the vision tower's output on one blank 2x2-patch image. The vision blocks then run where they run for a
    batch with images (inside the model's forward, before the decoder), so every process joins the same FSDP
    collectives in the same order."""
    if not needed:
        yield
        return

    def add_blank_image(module, args):
        p = model.config.vision_config.patch_size
        pixels = torch.zeros(4, 3, p, p, device=model.device, dtype=model.dtype)
        blank = model.image_features(pixels, torch.tensor([[2, 2]], device=model.device)).sum() * 0.0
        return (args[0] + blank.to(args[0].dtype), *args[1:])

    handle = model.language_model.register_forward_pre_hook(add_blank_image)
    try:
        yield
    finally:
        handle.remove()


def save_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=path)


def load_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def export(checkpoint_dir: str | os.PathLike, out: str | os.PathLike) -> None:
    """A sharded training checkpoint (`dcp/`, config and tokenizer files, `trainer.pt`) -> an official checkpoint
    in `out`, in one process: the model is rebuilt from config.json (with the run's LoRA adapters, merged)."""
    import torch.distributed.checkpoint as dcp

    from ..checkpoint import KEEP_FLOAT32, save
    from ..config import KimiVLConfig
    from ..errors import CheckpointError
    from ..model import KimiVLForConditionalGeneration
    from ..processing import KimiVLProcessor
    from .lora import apply_lora, is_lora_parameter, merged_state_dict

    src = Path(checkpoint_dir)
    if not (src / "dcp").is_dir() or not (src / "trainer.pt").is_file():
        raise CheckpointError(f"{src} is not a sharded training checkpoint (no dcp/ folder or trainer.pt)")
    from .run import load_trainer_state

    saved = load_trainer_state(src / "trainer.pt")
    run = saved["config"]
    config = KimiVLConfig.from_json(src / "config.json")
    with torch.device("meta"):  # no random init of weights about to be overwritten
        model = KimiVLForConditionalGeneration(config)
    if run.get("lora_rank"):
        apply_lora(model, tuple(run["lora_targets"]), run["lora_rank"], run["lora_alpha"])
    dtype = getattr(torch, saved.get("dtype", "float32"))
    model.to_empty(device="cpu")
    for name, p in model.named_parameters():  # the training dtype; router biases stay float32 (as load keeps them)
        if not name.endswith(KEEP_FLOAT32) and not is_lora_parameter(name):
            p.data = p.data.to(dtype)
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=src / "dcp", no_dist=True)
    save(model, out, state_dict=merged_state_dict(model) if run.get("lora_rank") else None)
    KimiVLProcessor.from_pretrained(src).save_pretrained(out)
