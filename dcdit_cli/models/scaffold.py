"""The isotropic encoder and decoder of the DC-DiT scaffold (paper §3.2, docs/reference.md#stem-and-encoder, docs/reference.md#decoder).

Conv residual blocks in the style of the Stable Diffusion VAE / LDM ResnetBlock: the
condition is added after the first convolution, the skip after the second. They run on
the uncompressed L-token grid, so they work at the narrow scaffold width e = D/4 and only
lift to D at the encoder output (where routing happens) and drop back at the decoder input.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from dcdit_cli.config.recipe import norm_group_count
from dcdit_cli.models.norms import RMSNorm


def group_norm(channels: int, max_groups: int = 32, eps: float = 1e-5) -> nn.GroupNorm:
    """GroupNorm(32) as in the paper (``max_groups`` = model.norm_groups); fewer groups for tiny widths."""
    return nn.GroupNorm(norm_group_count(channels, max_groups), channels, eps=eps)


class ResBlock(nn.Module):
    """GN → SiLU → Conv3×3(in→inner) → + Linear(SiLU(c)) → GN → SiLU → Conv3×3(inner→out) → + skip.

    ``cond_adaptor`` inserts a trainable LayerNorm on c before the conditioning projection
    (used when upcycling a DiT whose condition embedders are frozen, docs/reference.md#upcycling).
    ``eps``: the GroupNorms' epsilon (``model.norm_eps``; the authors use 1e-5).
    """

    def __init__(self, in_ch: int, out_ch: int, inner_ch: int, cond_size: int, cond_adaptor: bool = False,
                 eps: float = 1e-5, norm_groups: int = 32):
        super().__init__()
        self.norm1 = group_norm(in_ch, norm_groups, eps)
        self.conv1 = nn.Conv2d(in_ch, inner_ch, 3, padding=1)
        self.cond_norm = nn.LayerNorm(cond_size) if cond_adaptor else nn.Identity()
        self.cond_proj = nn.Linear(cond_size, inner_ch)
        self.norm2 = group_norm(inner_ch, norm_groups, eps)
        self.conv2 = nn.Conv2d(inner_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)))  # (B, inner, H, W)
        h = h + self.cond_proj(self.act(self.cond_norm(c)))[:, :, None, None]
        h = self.conv2(self.act(self.norm2(h)))  # (B, out, H, W)
        return h + self.skip(x)


def _widths(n_blocks: int, start: int, end: int) -> list[tuple[int, int]]:
    """(in, out) per block: the width changes at the end for the encoder, at the start for the decoder."""
    assert n_blocks >= 1
    if start <= end:  # encoder: e → … → e → D
        return [(start, start)] * (n_blocks - 1) + [(start, end)]
    return [(start, end)] + [(end, end)] * (n_blocks - 1)  # decoder: D → e → … → e


class Encoder(nn.Module):
    """Stem Conv3×3(C·P² → e) on the token grid (the patch stem's pixel-unshuffle comes first in DCDiT;
    P = 1 in the paper), res-blocks e→…→D, RMSNorm(D)."""

    def __init__(self, in_channels: int, width: int, hidden_size: int, n_blocks: int, cond_adaptor: bool = False,
                 eps: float = 1e-5, norm_groups: int = 32):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1)
        self.blocks = nn.ModuleList(
            [ResBlock(i, o, width, hidden_size, cond_adaptor, eps, norm_groups) for i, o in _widths(n_blocks, width, hidden_size)]
        )
        self.norm = RMSNorm(hidden_size, eps=eps)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.stem(x.contiguous(memory_format=torch.channels_last))  # (B, e, H, W), channels last
        for block in self.blocks:
            h = block(h, c)  # (B, D, H, W) after the last block
        return self.norm(h.flatten(2).transpose(1, 2))  # (B, L, D)


class Decoder(nn.Module):
    """Res-blocks D→e→…→e on the restored grid, then RMSNorm(e) (docs/reference.md#decoder, as in the
    authors' decoder); the final layer follows in DCDiT."""

    def __init__(self, width: int, hidden_size: int, n_blocks: int, cond_adaptor: bool = False, eps: float = 1e-5,
                 norm_groups: int = 32):
        super().__init__()
        self.blocks = nn.ModuleList(
            [ResBlock(i, o, width, hidden_size, cond_adaptor, eps, norm_groups) for i, o in _widths(n_blocks, hidden_size, width)]
        )
        self.norm = RMSNorm(width, eps=eps)

    def forward(self, z: torch.Tensor, c: torch.Tensor, side: int) -> torch.Tensor:
        h = z.view(z.shape[0], side, side, z.shape[2]).permute(0, 3, 1, 2)  # (B, D, H, W), channels last: no copy
        for block in self.blocks:
            h = block(h, c)  # (B, e, H, W)
        return self.norm(h.flatten(2).transpose(1, 2))  # (B, L, e)
