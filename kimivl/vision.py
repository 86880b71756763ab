"""MoonViT: the native-resolution vision encoder, and the 2x2 patch merge.

Images arrive packed: `pixel_values` [L, 3, p, p] holds every image's patches one after another (row-major within
an image) and `image_grid_hws` [N, 2] gives each image's (h, w) in patches. Attention is block-diagonal: a patch
only sees patches of its own image. No L x L mask is ever built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig
from .decoder import normal_parameter
from .errors import InputError
from .kernels.attention import varlen_attention
from .rope import apply_rope, rope_2d_angles

ROPE_THETA = 10000.0
ROPE_MAX_SIDE = 512  # the official 2D RoPE table covers 512 x 512 patches
LN_EPS = 1e-5


class Learnable2DInterpPosEmb(nn.Module):
    """A learned [H0, W0, C] position table, bicubically resampled to each image's grid."""

    def __init__(self, height: int, width: int, dim: int):
        super().__init__()
        self.weight = normal_parameter(height, width, dim, std=0.02)

    def forward(self, grid_hws: list[tuple[int, int]]) -> torch.Tensor:
        table = self.weight.permute(2, 0, 1)[None]  # [1, C, H0, W0]
        pos = [F.interpolate(table, size=hw, mode="bicubic", align_corners=False)[0].flatten(1).T
               for hw in grid_hws]  # each [h*w, C], row-major
        return torch.cat(pos)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.pos_emb = Learnable2DInterpPosEmb(cfg.init_pos_emb_height, cfg.init_pos_emb_width, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor, grid_hws: list[tuple[int, int]]) -> torch.Tensor:
        # A stride-p conv over one p x p patch is a linear map of its 3*p*p values.
        x = F.linear(pixel_values.flatten(1), self.proj.weight.flatten(1), self.proj.bias)  # [L, C]
        return x + self.pos_emb(grid_hws)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc0 = nn.Linear(dim, hidden)
        self.fc1 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc1(F.gelu(self.fc0(x), approximate="tanh"))


class EncoderBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.norm0 = nn.LayerNorm(cfg.hidden_size, eps=LN_EPS)
        self.wqkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.wo = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=LN_EPS)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        L = x.shape[0]
        q, k, v = self.wqkv(self.norm0(x)).view(L, 3, self.num_heads, -1).unbind(1)  # each [L, heads, head_dim]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        attn = varlen_attention(q, k, v, cu_seqlens, causal=False)  # [L, heads, head_dim]
        x = x + self.wo(attn.flatten(1))
        return x + self.mlp(self.norm1(x))


class Encoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(cfg.hidden_size, eps=LN_EPS)


def patch_merge(x: torch.Tensor, grid_hws: list[tuple[int, int]], kernel: tuple[int, int]) -> list[torch.Tensor]:
    """Group each kh x kw block of patches into one token: per image [(h/kh)*(w/kw), kh*kw, C].

    Merged tokens are row-major over the coarse grid; inside one, sub-patches are row-major ((0,0), (0,1), ...).
    """
    kh, kw = kernel
    out = []
    for img, (h, w) in zip(x.split([h * w for h, w in grid_hws]), grid_hws):
        img = img.view(h // kh, kh, w // kw, kw, -1).permute(0, 2, 1, 3, 4)  # [h/kh, w/kw, kh, kw, C]
        out.append(img.reshape((h // kh) * (w // kw), kh * kw, -1))
    return out


class MoonViT(nn.Module):
    """Vision tower: patch embedding + interpolated position table, pre-norm blocks with 2D RoPE, final norm."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.encoder = Encoder(cfg)

    def forward(self, pixel_values: torch.Tensor, image_grid_hws: torch.Tensor) -> list[torch.Tensor]:
        """pixel_values [L, 3, p, p], image_grid_hws [N, 2] -> one [(h/2)*(w/2), 4, C] tensor per image."""
        grid_hws = check_grids(pixel_values, image_grid_hws, self.config)
        x = self.patch_embed(pixel_values.to(self.patch_embed.proj.weight.dtype), grid_hws)  # [L, C]
        angles = rope_2d_angles(grid_hws, self.config.head_dim, ROPE_THETA, device=x.device)  # [L, head_dim/2]
        cos, sin = angles.cos(), angles.sin()
        lengths = torch.tensor([h * w for h, w in grid_hws], device=x.device)
        cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        for block in self.encoder.blocks:
            x = block(x, cos, sin, cu_seqlens)
        x = self.encoder.final_layernorm(x)
        return patch_merge(x, grid_hws, tuple(self.config.merge_kernel_size))


def check_grids(pixel_values: torch.Tensor, image_grid_hws: torch.Tensor, cfg: VisionConfig) -> list[tuple[int, int]]:
    """Validate packed-image inputs against each other and the config; return the grids as Python ints."""
    p = cfg.patch_size
    if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, p, p):
        raise InputError(f"pixel_values must have shape [patches, 3, {p}, {p}], got {list(pixel_values.shape)}")
    if image_grid_hws.dim() != 2 or image_grid_hws.shape[1] != 2 or image_grid_hws.shape[0] == 0:
        raise InputError(f"image_grid_hws must have shape [images, 2], got {list(image_grid_hws.shape)}")
    if image_grid_hws.dtype.is_floating_point or image_grid_hws.dtype == torch.bool:
        raise InputError(f"image_grid_hws must hold integers (patch counts), got {image_grid_hws.dtype}")
    grids = [(int(h), int(w)) for h, w in image_grid_hws.tolist()]
    kh, kw = cfg.merge_kernel_size
    for i, (h, w) in enumerate(grids):
        if not (1 <= h <= ROPE_MAX_SIDE and 1 <= w <= ROPE_MAX_SIDE):
            raise InputError(f"image {i}: grid {h}x{w} patches is outside 1..{ROPE_MAX_SIDE} per side")
        if h % kh or w % kw:
            raise InputError(f"image {i}: grid {h}x{w} is not a multiple of the merge kernel {kh}x{kw} "
                             "(the image processor pads images to make it so)")
    total = sum(h * w for h, w in grids)
    if total != pixel_values.shape[0]:
        raise InputError(f"image_grid_hws describes {total} patches but pixel_values holds {pixel_values.shape[0]}")
    return grids
