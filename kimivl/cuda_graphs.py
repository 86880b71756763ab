"""Decode steps captured in CUDA graphs: one launch per generated token instead of thousands.

A decode step of the A3B decoder is ~60 small kernels per layer; launched one by one from Python, batch-1 decoding is
bound by the launches, not by the GPU. `DecoderStep` runs `DeepseekV3ForCausalLM.decode_step` (fixed shapes, the
cache position read on the device, no host synchronisation) once eagerly, which also compiles the Triton kernels,
then captures it and replays the graph for every later token. Each graph owns its cache buffers, so the graphs are
kept per (batch size, cache length bucket) on the model and reused by later calls: a graph per batch-size bucket,
`MAX_GRAPHS` at most (the least recently used is dropped). `KIMIVL_CUDA_GRAPHS=0` turns the graphs off.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import torch

from .cache import MLACache
from .decoder import DeepseekV3ForCausalLM

ENV = "KIMIVL_CUDA_GRAPHS"
LENGTH_BUCKET = 1024  # cache lengths are rounded up to a multiple of this, so nearby prompt sizes share a graph
MAX_GRAPHS = 4


def graphs_enabled(device: torch.device) -> bool:
    """Graphs are used on CUDA devices unless KIMIVL_CUDA_GRAPHS is 0 / false / off."""
    return device.type == "cuda" and os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "off", "no")


class DecoderStep:
    """One decode step for `cache`'s batch size, replayed from a CUDA graph (or run eagerly when `capture` is
    False: the same code path, used to test it on CPU). Call it with token [B], position_ids [B, 1] and the slot
    (a Python int); it returns logits [B, vocab] float32, valid until the next call."""

    def __init__(self, lm: DeepseekV3ForCausalLM, cache: MLACache, capture: bool = True):
        B, device = cache.valid.shape[0], cache.valid.device
        self.lm, self.cache, self.capture = lm, cache, capture
        self.token = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def _run(self) -> torch.Tensor:
        return self.lm.decode_step(self.token, self.position, self.cache, self.slot)

    @torch.no_grad()
    def __call__(self, token: torch.Tensor, position_ids: torch.Tensor, slot: int) -> torch.Tensor:
        if slot >= self.cache.max_len:
            raise ValueError(f"slot {slot} is past the cache's {self.cache.max_len} slots")
        self.token.copy_(token.view(-1, 1))
        self.position.copy_(position_ids.view(-1, 1))
        self.slot.fill_(slot)
        if not self.capture:
            return self._run()
        if self.graph is not None:
            self.graph.replay()
            return self.logits
        # first call: run eagerly on a side stream (compiles the kernels, warms the allocator; its result is this
        # step's), then capture the same step; capturing runs nothing, so the cache is written once
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            logits = self._run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self._run()
        self.graph = graph
        return logits


def decoder_step(lm: DeepseekV3ForCausalLM, batch: int, length: int, device: torch.device,
                 dtype: torch.dtype) -> DecoderStep:
    """The model's captured step for `batch` rows and at least `length` cache slots, emptied for a new generation:
    reused when one was made before, else made (and the least recently used dropped beyond MAX_GRAPHS)."""
    graphs: OrderedDict = lm.__dict__.setdefault("_decode_graphs", OrderedDict())
    max_len = -(-length // LENGTH_BUCKET) * LENGTH_BUCKET
    key = (batch, max_len, torch.device(device), dtype)
    step = graphs.pop(key, None)
    if step is None:
        while len(graphs) >= MAX_GRAPHS:
            graphs.popitem(last=False)
        cache = MLACache(lm.config, batch, max_len, device=device, dtype=dtype)
        step = DecoderStep(lm, cache, capture=torch.device(device).type == "cuda")  # elsewhere: the same step, eager
    graphs[key] = step
    step.cache.reset()
    return step


def release_graphs(lm: DeepseekV3ForCausalLM) -> None:
    """Drop the model's captured steps and their caches (their GPU memory returns to torch's allocator)."""
    lm.__dict__.pop("_decode_graphs", None)
