"""Routers: the boundary probability p (B, L) of every token of the encoder output.

- ``cosine`` (:class:`Router`, paper §3.3, the default): p from the cosine dissimilarity of a
  token and its 3×3 neighbourhood;
- ``random`` (:class:`RandomRouter`, paper §4.3): the random-boundary ablation;
- ``predictive`` (:class:`PredictiveRouter`, docs/reference.md#predictive-router): the
  router of the authors' released code and checkpoints, a small conv net that scores how badly
  a token is predicted from its neighbours.

All three return p in [0, 1] in fp32; threshold (p > 0.5), chunking, de-chunking, the STE gate
and the ratio loss are shared (models/chunking.py). :func:`force_endpoints` is the release's
p = 1 at raster positions 0 and L − 1 (``model.force_endpoints``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dcdit_cli.models.scaffold import group_norm


# F.normalize's ε: a norm below it is clamped (and passes no gradient through the norm).
NORM_EPS = 1e-12


class _CosineScore(torch.autograd.Function):
    """s_i = (q_i · k̄_i) · c_i / ‖q_i‖, k̄ = depthwise 3×3 convolution of k̂ = k / ‖k‖ (fp32).

    q, k (B, L, D), weight (D, 1, 3, 3), border c (1, L) → s (B, L). The forward is the router's
    formula op for op; the backward is its derivative written out, in about half the elementwise
    passes over (B, L, D) tensors that autograd makes through the two normalisations and the dot
    product (the toy training step: 0.985× its time, `benchmarks/ab.py`, docs/performance.md). With
    a = q · k̄ and g = ∂L/∂s:
      ∂L/∂q = g·c/‖q‖ · k̄ − g·s/‖q‖² · q,   ∂L/∂k̄ = g·c/‖q‖ · q,
      ∂L/∂k = (∂L/∂k̂ − k̂ (k̂ · ∂L/∂k̂)) / ‖k‖   (the normalisation removes the component along k̂);
    where a norm is below :data:`NORM_EPS` its second term is dropped, as the clamp's zero slope does.
    """

    @staticmethod
    def forward(ctx, q, k, weight, border, side: int):
        B, _, D = k.shape
        k_norm = k.norm(dim=-1, keepdim=True)  # (B, L, 1)
        k_hat = k / k_norm.clamp_min(NORM_EPS)
        grid = k_hat.transpose(1, 2).reshape(B, D, side, side)  # (B, D, H, W)
        k_bar = F.conv2d(grid, weight, padding=1, groups=D).flatten(2).transpose(1, 2)  # (B, L, D)
        q_norm = q.norm(dim=-1)  # (B, L)
        scale = border / q_norm.clamp_min(NORM_EPS)  # (B, L) = c / ‖q‖
        s = (q * k_bar).sum(-1) * scale  # (B, L)
        ctx.save_for_backward(q, k_hat, k_norm, grid, k_bar, q_norm, scale, s, weight)
        return s

    @staticmethod
    def backward(ctx, grad):
        q, k_hat, k_norm, grid, k_bar, q_norm, scale, s, weight = ctx.saved_tensors
        D = q.shape[-1]
        g = grad * scale  # (B, L) = ∂L/∂a
        inverse_square = torch.where(q_norm > NORM_EPS, q_norm.clamp_min(NORM_EPS) ** -2, 0.0)  # (B, L)
        grad_q = torch.addcmul(g[..., None] * k_bar, (grad * s * inverse_square)[..., None], q, value=-1.0)
        grad_bar = (g[..., None] * q).transpose(1, 2).reshape(grid.shape)  # (B, D, H, W)
        grad_hat, grad_weight, _ = torch.ops.aten.convolution_backward(
            grad_bar, grid, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], D, [True, ctx.needs_input_grad[2], False])
        grad_hat = grad_hat.flatten(2).transpose(1, 2)  # (B, L, D)
        along = (k_hat * grad_hat).sum(-1, keepdim=True) * (k_norm > NORM_EPS)  # (B, L, 1)
        grad_k = torch.addcmul(grad_hat, k_hat, along, value=-1.0) / k_norm.clamp_min(NORM_EPS)
        return grad_q, grad_k, grad_weight, None, None


class Router(nn.Module):
    """Cosine-similarity router (paper §3.3): p_i = (1 − q_i · k̄_i) / 2.

    q and k are ℓ2-normalised projections of the encoder output (W_Q, W_K initialised to the
    identity); k̄ is a depthwise 3×3 convolution of k, initialised to a uniform average.
    [choice, docs/reference.md#border-correction] At the border the average is rescaled by 9 / (in-grid
    neighbours) so a constant image gives the same p everywhere; the router runs in fp32.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_avg = nn.Conv2d(hidden_size, hidden_size, 3, padding=1, groups=hidden_size, bias=False)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        nn.init.eye_(self.q_proj.weight)
        nn.init.eye_(self.k_proj.weight)
        nn.init.constant_(self.k_avg.weight, 1.0 / 9.0)

    @staticmethod
    def border_correction(side: int, device) -> torch.Tensor:
        """(1, 1, side, side): 9 / number of in-grid positions in each 3×3 window."""
        ones = torch.ones(1, 1, side, side, device=device)
        count = F.conv2d(ones, torch.ones(1, 1, 3, 3, device=device), padding=1)
        return 9.0 / count

    def forward(self, h: torch.Tensor, side: int) -> torch.Tensor:
        """h (B, L, D) → p (B, L) in [0, 1], fp32.

        q_i · (k̄_i · c_i) with q_i normalised is (q_i · k̄_i) · c_i / ‖q_i‖: q's norm and the border
        rescale c_i multiply the (B, L) dot products instead of two (B, L, D) tensors, the same value
        for fewer passes over the features (forward and backward, :class:`_CosineScore`).
        """
        with torch.autocast(device_type=h.device.type, enabled=False):
            h = h.float()
            # W_Q and W_K in one product: one pass over h, forward and backward
            q, k = F.linear(h, torch.cat([self.q_proj.weight, self.k_proj.weight])).chunk(2, dim=-1)  # (B, L, D) each
            border = self.border_correction(side, h.device).view(1, -1)  # (1, L)
            s = _CosineScore.apply(q, k, self.k_avg.weight, border, side)  # (B, L) = q̂ · (k̄ · border correction)
            return ((1.0 - s) / 2.0).clamp(0.0, 1.0)


class RandomRouter(nn.Module):
    """The random-boundary ablation (paper §4.3): a uniformly random subset of expected size L/N.

    Scores p = clamp(1 − u·N/2, 0, 1) with u ~ U(0, 1), so P(p > 0.5) = 1/N; every other layer
    (chunk, smoothing with these p, plug-back, STE gate) is the same code as the cosine router.
    """

    def __init__(self, target_ratio: float):
        super().__init__()
        self.target_ratio = target_ratio

    def forward(self, h: torch.Tensor, side: int) -> torch.Tensor:
        u = torch.rand(h.shape[:2], device=h.device)  # (B, L)
        return (1.0 - u * self.target_ratio / 2.0).clamp(0.0, 1.0)


class PredictiveRouter(nn.Module):
    """The authors' released router ("spatial predictability"), for their checkpoints.

    On the encoder output as a grid x (B, D, H, W), in fp32:
    a = Conv1×1(D → D/4)(x); r = a − Conv3×3(a) (the context predictor's error);
    logit = Conv1×1(D/4 → 1)(SiLU(GroupNorm(8)(Conv3×3(r)))); p = sigmoid(logit).
    Every conv zero-pads and has a bias; the last bias starts at −1.1, so p ≈ 0.25 = 1/N at
    initialisation. Module names match the release (``proj``, ``context_predictor``,
    ``residual_scorer.{0,1,3}``), so its weights map one to one.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        bottleneck = hidden_size // 4
        self.proj = nn.Conv2d(hidden_size, bottleneck, 1)
        self.context_predictor = nn.Conv2d(bottleneck, bottleneck, 3, padding=1)
        self.residual_scorer = nn.Sequential(
            nn.Conv2d(bottleneck, bottleneck, 3, padding=1),
            group_norm(bottleneck, max_groups=8, eps=eps),
            nn.SiLU(),
            nn.Conv2d(bottleneck, 1, 1),
        )
        self.initialize_weights()

    def initialize_weights(self) -> None:
        nn.init.constant_(self.residual_scorer[-1].bias, -1.1)  # sigmoid(−1.1) ≈ 0.25

    def forward(self, h: torch.Tensor, side: int) -> torch.Tensor:
        """h (B, L, D) → p (B, L) in (0, 1), fp32."""
        with torch.autocast(device_type=h.device.type, enabled=False):
            B, L, D = h.shape
            x = h.float().transpose(1, 2).reshape(B, D, side, side)  # (B, D, H, W)
            a = self.proj(x)  # (B, D/4, H, W)
            residual = a - self.context_predictor(a)  # what the neighbourhood does not predict
            logit = self.residual_scorer(residual)  # (B, 1, H, W)
            return torch.sigmoid(logit).view(B, L)


def force_endpoints(p: torch.Tensor) -> torch.Tensor:
    """p (B, L) with p = 1 at raster positions 0 and L − 1 (no gradient there), as the release does."""
    ends = torch.arange(0, p.shape[1], max(p.shape[1] - 1, 1), device=p.device)  # [0, L − 1], made on the device
    return p.index_fill(1, ends, 1.0)


def make_router(kind: str, hidden_size: int, target_ratio: float, eps: float = 1e-5) -> nn.Module:
    """The router named by ``model.router``."""
    if kind == "cosine":
        return Router(hidden_size)
    if kind == "random":
        return RandomRouter(target_ratio)
    if kind == "predictive":
        return PredictiveRouter(hidden_size, eps)
    raise ValueError(f"unknown router {kind!r}: use 'cosine', 'random' or 'predictive'")
