"""The MLA latent KV cache: per token and layer only the normalised latent (kv_lora_rank) and the rotated rope key
(qk_rope_head_dim), never per-head keys or values."""

from __future__ import annotations

import torch

from .config import TextConfig
from .errors import InputError


BLOCK = 256  # caches that grow as sequences lengthen do so in whole blocks of this many slots


def slots_for(needed: int, limit: int) -> int:
    """Cache slots to allocate for `needed`: a quarter more, in whole blocks, at most `limit` (and at least
    `needed`). Decode steps attend over whole buffers (see `decode_step`), so a buffer much longer than its
    sequences costs every step; growing by a quarter keeps that small and the copies rare."""
    return max(needed, min(-(-needed * 5 // 4 // BLOCK) * BLOCK, limit))


class MLACache:
    """Preallocated for `batch` rows of up to `max_len` tokens. `valid` marks real (non-padding) slots; `length` is
    the number of slots filled (the same for every row: batches are left-padded)."""

    def __init__(self, cfg: TextConfig, batch: int, max_len: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        layers = cfg.num_hidden_layers
        self.latent = torch.zeros(layers, batch, max_len, cfg.kv_lora_rank, device=device, dtype=dtype)
        self.k_pe = torch.zeros(layers, batch, max_len, cfg.qk_rope_head_dim, device=device, dtype=dtype)
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.valid.shape[1]

    def bytes_per_token_per_layer(self) -> int:
        return (self.latent.shape[-1] + self.k_pe.shape[-1]) * self.latent.element_size()

    def nbytes(self) -> int:
        return self.latent.nbytes + self.k_pe.nbytes + self.valid.nbytes

    def write(self, layer: int, latent: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a chunk [B, T, ...] at slots length..length+T of `layer`; -> everything cached so far for it."""
        end = self.length + latent.shape[1]
        self.latent[layer, :, self.length:end] = latent
        self.k_pe[layer, :, self.length:end] = k_pe
        return self.latent[layer, :, :end], self.k_pe[layer, :, :end]

    def write_at(self, layer: int, slot: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one token per row ([B, 1, ...]) at `slot`: an int64 tensor on the cache's device, one element (every
        row's slot) or [B] (a slot per row, as rows of a continuous batch hold sequences of different lengths), so
        the host never reads it and a captured CUDA graph replays at every position; -> the layer's whole buffers."""
        rows = torch.arange(latent.shape[0], device=slot.device)
        self.latent[layer][rows, slot] = latent[:, 0]
        self.k_pe[layer][rows, slot] = k_pe[:, 0]
        return self.latent[layer], self.k_pe[layer]

    def rows(self, n: int) -> "MLACache":
        """A view of the first n rows, whole, sharing this cache's memory (writes land here too)."""
        view = object.__new__(MLACache)
        view.latent, view.k_pe, view.valid = self.latent[:, :n], self.k_pe[:, :n], self.valid[:n]
        view.length = self.length
        return view

    def resized(self, max_len: int) -> "MLACache":
        """A new cache of max_len slots a row, holding what fits of this one."""
        new = MLACache.__new__(MLACache)
        keep = min(max_len, self.max_len)
        new.latent = self.latent.new_zeros(*self.latent.shape[:2], max_len, self.latent.shape[-1])
        new.k_pe = self.k_pe.new_zeros(*self.k_pe.shape[:2], max_len, self.k_pe.shape[-1])
        new.valid = self.valid.new_zeros(self.valid.shape[0], max_len)
        new.latent[:, :, :keep], new.k_pe[:, :, :keep] = self.latent[:, :, :keep], self.k_pe[:, :, :keep]
        new.valid[:, :keep] = self.valid[:, :keep]
        new.length = min(self.length, max_len)
        return new

    def reset(self) -> None:
        """Empty the cache for reuse (the buffers stay where they are)."""
        self.valid.zero_()
        self.length = 0

    def attention_mask(self, new_mask: torch.Tensor | None, T: int) -> torch.Tensor | None:
        """Record which of the next T slots are real and return the bool mask [B, 1, T, length+T] (True = attend)
        for queries at those slots: causal, real keys only, and always the query's own slot. None when nothing is
        padded and the chunk is the first (plain causal) or a single token (sees everything)."""
        start, end = self.length, self.length + T
        if end > self.max_len:
            raise InputError(f"the cache holds {self.max_len} tokens; {end} needed: allocate it for the prompt plus "
                             "every token to be generated")
        self.valid[:, start:end] = True if new_mask is None else new_mask.bool()
        if (start == 0 or T == 1) and bool(self.valid[:, :end].all()):
            return None
        pos = torch.arange(end, device=self.valid.device)
        query = pos[start:, None]
        mask = (pos[None, :] <= query) & self.valid[:, None, :end]  # [B, T, end]
        return (mask | (pos[None, :] == query))[:, None]

    def advance(self, T: int) -> None:
        self.length += T
