"""Dynamic chunking on a 2-D grid: boundary mask, ChunkLayer, DeChunkLayer, STE and the ratio loss.

The routers that score the boundaries live in ``models/routers.py``.

Paper §3.3 (routing and chunking), §3.4 (de-chunking), §3.5 (ratio loss); H-Net (Hwang et
al. 2025) for the STE gate. The exact choices where the paper is silent are docs/reference.md#border-correction,
docs/reference.md#at-least-one-token, docs/reference.md#batch-padding and docs/reference.md#smoothing,
and each is named below where it is made.

Conventions: L = H·W tokens in raster order, M = kept tokens of a sample, M_max = the
largest M in the batch; ``order`` (B, M_max) holds the raster index of each chunk slot and
``valid`` (B, M_max) marks real kept tokens (False = batch padding).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from dcdit_cli.models.attention import FALLBACK, PackedLayout, samples_alone

#################################################################################
#                          Boundary mask and tail dropping                      #
#################################################################################


def keep_at_least_one(mask: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """[choice, docs/reference.md#at-least-one-token] A sample with no p > 0.5 keeps its highest-p token."""
    empty = ~mask.any(dim=1)  # (B,)
    top = F.one_hot(p.argmax(dim=1), p.shape[1]).bool()  # (B, L)
    return mask | (top & empty[:, None])


def tail_drop(mask: torch.Tensor, p: torch.Tensor, fraction: torch.Tensor) -> torch.Tensor:
    """Elastic inference (docs/reference.md#tail-dropping): drop floor(n·f) lowest-p boundaries, never the last one.

    mask (B, L) bool, p (B, L), fraction (B,) in [0, 1) → the reduced mask (B, L).
    """
    n = mask.sum(dim=1)  # (B,)
    n_drop = torch.minimum(torch.floor(n * fraction.to(p.dtype)).long(), (n - 1).clamp(min=0))  # (B,)
    key = torch.where(mask, p.double(), math.inf)  # non-boundaries sort last
    order = key.argsort(dim=1, stable=True)  # lowest-p boundaries first
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(p.shape[1], device=p.device).expand_as(order))
    return mask & (rank >= n_drop[:, None])


#################################################################################
#                               Chunk / de-chunk                                #
#################################################################################


class ChunkLayer(nn.Module):
    """Keeps the boundary tokens in raster order, packed over the batch (paper §3.3).

    The inner network runs on exactly the kept tokens: tokens (N, D), N = Σ_b M_b, with a
    :class:`PackedLayout`. ``order``/``valid`` (B, M_max) describe the same tokens per sample
    for de-chunking and the statistics; their padding slots take each sample's highest-p
    non-boundary tokens, as the paper does, and [choice, docs/reference.md#batch-padding] are marked invalid
    so smoothing and plug-back ignore them and a sample's output never depends on its batch.
    """

    @staticmethod
    def sizes(mask: torch.Tensor, side: int, width: int) -> torch.Tensor:
        """mask (B, L = side²) → device (3 + groups,) long: N, M_max, the plug-back radius and the lengths
        the attention groups are padded to (their number set by the inner ``width``,
        :func:`samples_alone`), everything the host must know to fix the shapes and loops after."""
        B = mask.shape[0]
        n = mask.sum(dim=1)  # (B,)
        alone = samples_alone(mask.device, width, side * side)
        return torch.cat([torch.stack([n.sum(), n.max(), plug_back_radius(mask.view(B, side, side))]),
                          PackedLayout.sorted_group_len(n, alone)])

    def forward(self, h: torch.Tensor, mask: torch.Tensor, p: torch.Tensor, backend: str = FALLBACK, sizes=None):
        """h (B, L, D), mask (B, L), p (B, L) → tokens (N, D), order (B, M_max), valid (B, M_max), layout,
        and the plug-back search radius (a host int, :func:`plug_back_radius`).

        sizes: :meth:`sizes` of ``mask`` already read on the host (a list of ints); None reads them
        here, the forward's one host synchronisation.
        """
        B, L, D = h.shape
        n = mask.sum(dim=1)  # (B,)
        total, m_max, radius, *group_len = self.sizes(mask, math.isqrt(L), D).tolist() if sizes is None else sizes
        raster = torch.arange(L, device=h.device, dtype=torch.float64).expand(B, L)
        key = torch.where(mask, raster, L + 1.0 - p.double())  # boundaries by raster index, then by descending p
        order = key.argsort(dim=1, stable=True)[:, :m_max]  # (B, M_max)
        valid = torch.arange(m_max, device=h.device)[None] < n[:, None]  # (B, M_max)
        layout = PackedLayout.from_valid(valid, total, backend, group_len)
        flat = layout.unpad(order + L * torch.arange(B, device=h.device)[:, None])  # (N,) rows of h.flatten(0, 1)
        tokens = h.reshape(B * L, D).index_select(0, flat)  # (N, D)
        return tokens, order, valid, layout, radius


def bucket_radius(radius: int) -> int:
    """The plug-back radius rounded up to a power of two (at least 2): any radius at or above the
    bound gives the same plug-back, and a compiled model sees few distinct values (and never the
    0 or 1 that torch.compile specialises on)."""
    return max(2, 1 << (radius - 1).bit_length())


def raster_to_rc(index: torch.Tensor, side: int) -> torch.Tensor:
    """Raster indices (...) → float (row, col) positions (..., 2)."""
    return torch.stack([torch.div(index, side, rounding_mode="floor"), index % side], dim=-1).float()


def kept_slots(order, valid, side: int) -> torch.Tensor:
    """(B, H, W): the chunk slot of each kept grid position, −1 elsewhere."""
    B, M = order.shape
    L = side * side
    slot_of = torch.full((B, L + 1), -1, dtype=torch.long, device=order.device)
    slot_of.scatter_(1, order.masked_fill(~valid, L), torch.arange(M, device=order.device).expand(B, M))
    return slot_of[:, :L].view(B, side, side)


def nearest_kept_row(kept: torch.Tensor):
    """Pass 1 of plug-back, per column of a kept grid (B, H, W) bool: the nearest kept row.

    → best_row (B, H, W) (ties → above: the smaller raster index), g2 (B, H, W) its squared
    vertical distance, has (B, H, W) whether the column holds a kept token at all.
    """
    B, H, W = kept.shape
    rows = torch.arange(H, device=kept.device).view(1, H, 1).expand(B, H, W)
    above = torch.where(kept, rows, -4 * H).cummax(dim=1).values
    below = torch.where(kept, rows, 8 * H).flip(1).cummin(dim=1).values.flip(1)
    best_row = torch.where((rows - above) <= (below - rows), above, below)  # (B, H, W)
    has = (best_row >= 0) & (best_row < H)
    return best_row, (rows - best_row).square(), has


def plug_back_radius(kept: torch.Tensor, window: int = 2) -> torch.Tensor:
    """Device scalar: the largest |c − c'| the nearest kept token of any position can have.

    kept (B, H, W) bool. For each position, the nearest token among the columns within ``window``
    of its own and the nearest column with a token on either side bounds the squared distance
    D_up; the nearest token overall has (c − c')² ≤ D_up, so ⌊√max D_up⌋ bounds |c − c'|.
    """
    _, g2, has = nearest_kept_row(kept)
    B, H, W = g2.shape
    cols = torch.arange(W, device=g2.device)
    big = torch.iinfo(torch.long).max // 4
    g2 = torch.where(has, g2, big)
    has = has[:, 0]  # (B, W)
    left = torch.where(has, cols, -4 * W).cummax(dim=1).values  # (B, W) nearest column ≤ c with a token
    right = torch.where(has, cols, 8 * W).flip(1).cummin(dim=1).values.flip(1)
    d_up = torch.full_like(g2, big)
    for c_near in (left, right):
        inside = (c_near >= 0) & (c_near < W)
        g_near = g2.gather(2, c_near.clamp(0, W - 1)[:, None, :].expand(B, H, W))
        d_up = torch.where(inside[:, None, :], torch.minimum(d_up, (cols - c_near).square()[:, None, :] + g_near), d_up)
    padded = F.pad(g2, (window, window), value=big)
    for delta in range(-window, window + 1):
        d_up = torch.minimum(d_up, padded[..., window + delta : window + delta + W] + delta * delta)
    return d_up.max().double().sqrt().floor().long().clamp(max=W - 1)


# Up to this grid side the smoothing's blur runs as band-matrix products, above it as depthwise
# convolutions (`python benchmarks/perf.py smoothing`, docs/performance.md): a product costs `side`
# multiply-adds per element against the convolution's 2r + 1, but runs at matmul speed; the
# convolutions keep large grids linear in L.
BAND_MAX_SIDE = 64


def band_matrix(kernel: torch.Tensor, side: int) -> torch.Tensor:
    """(side, side) T with T[i, j] = kernel[r + j − i] for |j − i| ≤ r, 0 beyond: T @ x is the
    zero-padded 1-D convolution of x with the (symmetric) kernel of 2r + 1 taps, and T = Tᵀ."""
    r = kernel.numel() // 2
    offset = torch.arange(side, device=kernel.device)[None, :] - torch.arange(side, device=kernel.device)[:, None]
    return torch.where(offset.abs() <= r, kernel[(offset + r).clamp(0, 2 * r)], 0.0)


@torch.library.custom_op("dcdit::gaussian_blur", mutates_args=())
def gaussian_blur(grid: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Separable zero-padded blur of a grid (H, W, K) along its first two axes with a symmetric kernel
    (2r + 1,) → (H, W, K), as band-matrix products: K holds every channel of every image, so the row
    pass is one product. One op so that its FLOPs are counted as the two depthwise convolutions it
    equals (models/flops.py): the cost of the smoothing, not of a kernel."""
    H, W, K = grid.shape
    T = band_matrix(kernel, H)
    grid = T @ grid.view(H, W * K)  # along the rows
    return torch.matmul(T, grid.view(H, W, K))  # along the columns, batched over the rows


@gaussian_blur.register_fake
def _(grid, kernel):
    return torch.empty_like(grid, memory_format=torch.contiguous_format)


def _blur_grads(ctx, grad):
    # The blur is linear and self-adjoint (a symmetric kernel, zero padding): its gradient is the blur.
    return gaussian_blur(grad.contiguous(), ctx.kernel), None


def _keep_kernel(ctx, inputs, output):
    ctx.kernel = inputs[1]


gaussian_blur.register_autograd(_blur_grads, setup_context=_keep_kernel)


class DeChunkLayer(nn.Module):
    """Gaussian smoothing among kept tokens, then nearest-kept plug-back (paper §3.4), in fp32.

    Smoothing: W_ij = exp(−d_ij²/2σ²)·p_j over the sample's kept tokens (j = i included),
    normalised over j; h_i ← p_i·h_i + (1 − p_i)·Σ_j W̃_ij h_j with p clamped to [1e-4, 1 − 1e-4].
    Plug-back: every grid position takes the smoothed feature of its nearest kept token
    (Euclidean on the grid, ties → the smallest raster index, i.e. the earliest chunk slot).

    Both run on the grid so the cost grows with L, not with L·M or M²: smoothing is a
    separable Gaussian blur of the scattered p·h and p, truncated at 6σ (the dropped weights are
    below e^−18 of the token's own), run as band-matrix products up to a side of
    :data:`BAND_MAX_SIDE` and as depthwise convolutions above; plug-back is an exact two-pass distance
    transform (nearest kept row per column by cumulative max/min, then per row the best column
    within the device-bounded radius r), O(L·r). The direct O(M²) and O(L·M) formulations and the
    previous O(L·√L) transform are the tests' oracles (tests/dechunk_reference.py).
    """

    def __init__(self, sigma: float = 1.0):
        super().__init__()
        self.sigma = sigma
        radius = max(1, math.ceil(6 * sigma))
        offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
        self.register_buffer("kernel_1d", torch.exp(-offsets.square() / (2 * sigma**2)), persistent=False)

    def smooth(self, z, order, valid, p_kept, side: int) -> torch.Tensor:
        """The smoothing above, on the grid: z (B, M, D), order/valid/p_kept (B, M) → (B, M, D)."""
        B, M, D = z.shape
        w = p_kept * valid  # (B, M): padding slots carry no weight
        weighted = torch.cat([z * w[..., None], w[..., None]], dim=-1)  # (B, M, D + 1): p·h and p
        # A padding slot's position is a non-kept cell and its weight 0: adding it changes nothing.
        if side <= BAND_MAX_SIDE:
            # An (H, W, B, D + 1) grid, raster-major: the blur's row pass is one matrix product over
            # every image and channel, and each chunk slot is one row of the table.
            rows = (order * B + torch.arange(B, device=z.device)[:, None]).flatten()  # (B·M,)
            grid = z.new_zeros(side * side * B, D + 1).index_add_(0, rows, weighted.flatten(0, 1))
            grid = gaussian_blur(grid.view(side, side, B * (D + 1)), self.kernel_1d.to(z.dtype))
            at_kept = grid.view(-1, D + 1).index_select(0, rows).view(B, M, D + 1)
        else:  # the (B, D + 1, H, W) grid of two depthwise convolutions
            index = order[..., None].expand(-1, -1, D + 1)
            grid = z.new_zeros(B, side * side, D + 1).scatter_add_(1, index, weighted)
            grid = grid.transpose(1, 2).reshape(B, D + 1, side, side)
            k, r = self.kernel_1d.to(z.dtype), self.kernel_1d.numel() // 2
            grid = F.conv2d(grid, k.view(1, 1, -1, 1).expand(D + 1, 1, -1, 1), padding=(r, 0), groups=D + 1)  # rows
            grid = F.conv2d(grid, k.view(1, 1, 1, -1).expand(D + 1, 1, 1, -1), padding=(0, r), groups=D + 1)  # columns
            at_kept = grid.flatten(2).transpose(1, 2).gather(1, index)  # (B, M, D + 1)
        smoothed = at_kept[..., :D] / at_kept[..., D:].clamp_min(1e-30)
        p = p_kept[..., None]
        return p * z + (1 - p) * smoothed

    @staticmethod
    def plug_back_index(order, valid, side: int, radius: int | None = None) -> torch.Tensor:
        """Exact nearest kept slot for each grid position (ties → smallest raster index): (B, L).

        A separable exact transform. Pass 1, per column: the nearest kept row (cumulative max/min).
        Pass 2, per row: min over columns c' of a·((c − c')² + g²(c')) + raster(c'), a = L + 1, so
        the minimum is the nearest token and ties go to the smallest raster index. The optimal c'
        lies within ``radius`` = max ⌊√D_up⌋ columns of c (:func:`plug_back_radius`), so pass 2 takes
        the minimum over a window of 2·radius + 1 columns (one unfolded view, a gather under
        torch.compile; no Python loop over the radius, so a compiled graph keeps it symbolic): O(L·radius) work and memory, linear in
        L at a given kept density. Any radius at or above the bound gives the same result.
        ``radius`` is a host int (the forward's one synchronisation reads it); None reads it here.
        """
        slot_of = kept_slots(order, valid, side)
        best_row, g2, has = nearest_kept_row(slot_of >= 0)
        B, L, W = order.shape[0], side * side, side
        if radius is None:
            radius = int(plug_back_radius(slot_of >= 0))
        cols = torch.arange(W, device=order.device)
        a = L + 1
        far = torch.iinfo(torch.long).max // 2
        base = torch.where(has, a * g2 + best_row.clamp(0, side - 1) * side + cols, far)
        base = F.pad(base, (radius, radius), value=far)  # (B, H, W + 2·radius)
        deltas = torch.arange(-radius, radius + 1, device=order.device)  # candidate column c' = c + delta
        if torch.compiler.is_compiling():  # a gather: unfold's size check would make a graph per radius
            window = base[..., cols[:, None] + radius + deltas]  # (B, H, W, 2·radius + 1)
        else:  # a view, twice as fast as the gather in eager
            window = base.unfold(2, 2 * radius + 1, 1)  # (B, H, W, 2·radius + 1)
        key = window + a * deltas.square()
        best = cols + key.argmin(dim=-1) - radius  # (B, H, W); real keys are distinct, ties among empties → leftmost
        src = best_row.gather(2, best).clamp(0, side - 1) * side + best  # (B, H, W) raster index of the source
        return slot_of.view(B, L).gather(1, src.view(B, L))

    def forward(self, z, order, valid, p, side: int, radius: int | None = None) -> torch.Tensor:
        """z (B, M, D) inner output, order/valid (B, M), p (B, L), plug-back radius → (B, L, D)."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            p_kept = p.float().gather(1, order).clamp(1e-4, 1 - 1e-4)  # (B, M)
            z = self.smooth(z, order, valid, p_kept, side)  # (B, M, D)
            nearest = self.plug_back_index(order, valid, side, radius)  # (B, L)
            B, M, D = z.shape
            rows = (nearest + M * torch.arange(B, device=z.device)[:, None]).flatten()  # rows of z.flatten(0, 1)
            return z.flatten(0, 1).index_select(0, rows).view(B, -1, D)  # (B, L, D)


#################################################################################
#                             STE gate and ratio loss                           #
#################################################################################


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def ste(x: torch.Tensor) -> torch.Tensor:
    """H-Net's straight-through gate: exactly 1 in the forward pass, identity gradient."""
    return _StraightThrough.apply(x)


def ratio_loss(mask: torch.Tensor, p: torch.Tensor, target_ratio: float) -> torch.Tensor:
    """Paper §3.5: N/(N−1)·((N−1)·F·G + (1−F)(1−G)), F = mean(mask) (no gradient), G = mean(p).

    Minimal (= 1) at F = G = 1/N, over the whole local batch.
    """
    n = target_ratio
    f = mask.float().mean().detach()
    g = p.float().mean()
    return n / (n - 1) * ((n - 1) * f * g + (1 - f) * (1 - g))
