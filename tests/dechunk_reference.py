"""Direct formulations of the de-chunk layer (paper §3.4), kept as the tests' oracles.

``models/chunking.py`` runs smoothing as a separable blur of the grid (band-matrix products) and
plug-back as a two-pass distance transform; these are the same maps written the obvious way, at
O(M²), O(L·M) and O(L·√L) cost, and the blur as the depthwise convolutions it equals, which ``tests/test_chunking.py`` and ``benchmarks/dechunk_speed.py`` compare with.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dcdit_cli.models.chunking import kept_slots, nearest_kept_row, raster_to_rc


def smooth_reference(z, pos, p_kept, valid, sigma: float = 1.0) -> torch.Tensor:
    """Gaussian smoothing among kept tokens: z (B, M, D), pos (B, M, 2), p_kept (B, M), valid (B, M) → (B, M, D)."""
    d2 = torch.cdist(pos, pos).square()  # (B, M, M)
    w = torch.exp(-d2 / (2 * sigma**2)) * (p_kept * valid)[:, None, :]  # (B, M, M)
    w = w / w.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    p = p_kept[..., None]
    return p * z + (1 - p) * torch.bmm(w, z)


def plug_back_reference(pos, valid, side: int) -> torch.Tensor:
    """pos (B, M, 2), valid (B, M) → slot of the nearest kept token for each of the L positions (B, L)."""
    grid = raster_to_rc(torch.arange(side * side, device=pos.device), side)  # (L, 2)
    d2 = torch.cdist(grid.expand(pos.shape[0], -1, -1), pos).square()  # (B, L, M)
    d2 = d2.masked_fill(~valid[:, None, :], math.inf)
    return d2.argmin(dim=-1)  # first minimum = smallest raster index among ties


def plug_back_index_dense(order, valid, side: int) -> torch.Tensor:
    """The previous exact transform: pass 2 compares every column pair, a (B, H, W, W) tensor,
    O(L·√L) time and memory."""
    slot_of = kept_slots(order, valid, side)
    best_row, g2, has = nearest_kept_row(slot_of >= 0)
    B, L = order.shape[0], side * side
    device = order.device
    # Pass 2, per row: the best column c' for every c, keyed by (distance², raster index).
    cols = torch.arange(side, device=device)
    d2 = (cols.view(1, 1, side, 1) - cols.view(1, 1, 1, side)).square() + g2[:, :, None, :]  # (B, H, W, W')
    raster = best_row.clamp(0, side - 1) * side + cols.view(1, 1, side)  # (B, H, W')
    key = d2 * (L + 1) + raster[:, :, None, :]
    key = key.masked_fill(~has[:, :, None, :], torch.iinfo(torch.long).max)
    best = key.argmin(dim=-1)  # (B, H, W): the chosen column c'
    src_row = best_row.gather(2, best)  # (B, H, W)
    src = src_row.clamp(0, side - 1) * side + best
    return slot_of.view(B, L).gather(1, src.view(B, L))


def blur_reference(grid, kernel):
    """The de-chunk blur as two zero-padded depthwise convolutions: grid (H, W, K) → (H, W, K)."""
    K, r = grid.shape[-1], kernel.numel() // 2
    x = grid.permute(2, 0, 1)[None]  # (1, K, H, W)
    x = F.conv2d(x, kernel.view(1, 1, -1, 1).expand(K, 1, -1, 1), padding=(r, 0), groups=K)  # along the rows
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(K, 1, 1, -1), padding=(0, r), groups=K)  # along the columns
    return x[0].permute(1, 2, 0)
