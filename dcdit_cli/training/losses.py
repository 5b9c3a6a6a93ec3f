"""The training loss as an object, as EDM2's ``loss_fn(net, images, labels)``.

``loss_fn(model, x, y, t=None, budget=None, step=None) -> (loss, logs, stats)``: the scalar to minimise,
its terms as detached device tensors (the loop averages them on the device and reads them
only when it logs, so a step costs no host synchronisation), and the router's statistics
(None for a DiT). ``step`` is the optimizer step, for the terms with a schedule (the FLOPs
loss's target warm-up); None means the end of any schedule. The training step, distillation
(``distill.py`` wraps it) and the benchmarks call the same object. :class:`Loss` declares the
interface; the diffusion loss itself is computed in one place, ``GaussianDiffusion.loss_terms``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from dcdit_cli.diffusion.gaussian import GaussianDiffusion, make_diffusion
from dcdit_cli.models.dcdit import RouterStats
from dcdit_cli.models.chunking import ratio_loss
from dcdit_cli.models.dydit import flops_loss
from dcdit_cli.models.flops import dynamic_flops, static_cost


@runtime_checkable
class Loss(Protocol):
    """What every training loss is: the loop, distillation and the benchmarks call only this.

    ``forward`` also returns the model's input (x_t, t), for a loss that wraps another one and
    must see what the model saw (the FLOPs loss, distillation); ``model_kwargs`` reach the model's
    forward (distillation asks for ``record_blocks=True``). ``__call__`` drops (x_t, t).
    """

    diffusion: GaussianDiffusion

    def forward(self, model, x: torch.Tensor, y: torch.Tensor, t=None, budget=None, noise=None, step=None,
                **model_kwargs) -> tuple[torch.Tensor, dict, object, torch.Tensor, torch.Tensor]: ...

    def __call__(self, model, x: torch.Tensor, y: torch.Tensor, t=None, budget=None, noise=None,
                 step=None) -> tuple[torch.Tensor, dict, object]: ...


class ComposableLoss:
    """``__call__`` from ``forward``, shared by every loss here and by ``DistillLoss``."""

    def __call__(self, model, x: torch.Tensor, y: torch.Tensor, t=None, budget=None, noise=None, step=None):
        loss, logs, stats, _, _ = self.forward(model, x, y, t, budget, noise, step)
        return loss, logs, stats


class DiffusionLoss(ComposableLoss):
    """DiT's diffusion loss (MSE(ε, ε̂) + VB, docs/reference.md#training-loss) × ``diffusion_weight`` + λ · ratio loss
    (paper §3.5, DC-DiT only; the router's boundaries before tail dropping)."""

    def __init__(self, diffusion, ratio_loss_weight: float = 0.0, target_ratio: float = 4.0, diffusion_weight: float = 1.0):
        self.diffusion = diffusion
        self.ratio_loss_weight = ratio_loss_weight
        self.target_ratio = target_ratio
        self.diffusion_weight = diffusion_weight

    def forward(self, model, x: torch.Tensor, y: torch.Tensor, t=None, budget=None, noise=None, step=None, **model_kwargs):
        """(loss, logs, stats, x_t, t): the terms plus the model's input, for losses that compose this one.
        No term here has a schedule, so ``step`` is unused."""
        d = self.diffusion
        if t is None:
            t = torch.randint(0, d.num_timesteps, (x.shape[0],), device=x.device)
        if noise is None:
            noise = torch.randn_like(x)
        x_t = d.q_sample(x, t, noise)  # (B, C, H, W)
        out, stats = model(x_t, d.model_timesteps(t), y, budget=budget, **model_kwargs)  # (B, 2C, H, W)
        terms = d.loss_terms(d.check_output(out, x_t), x, x_t, t, noise)
        loss = self.diffusion_weight * terms["loss"].mean()
        logs = {"mse": terms["mse"].mean().detach(), "vb": terms["vb"].mean().detach()}
        if isinstance(stats, RouterStats):  # a DC-DiT
            if self.ratio_loss_weight > 0:
                r_loss = ratio_loss(stats.mask, stats.p, self.target_ratio)
                loss = loss + self.ratio_loss_weight * r_loss
                logs["ratio_loss"] = r_loss.detach()
            logs["compression"] = stats.compression.mean().detach()
            logs["kept_tokens"] = stats.num_kept.float().mean()
        logs["loss"] = loss.detach()
        return loss, logs, stats, x_t, t


FLOPS_TARGET_HOLD_STEPS = 100
"""DyDiT's train.py trains its first 100 steps toward F_dynamic/F_static = 1 (the full model)."""


class FlopsLoss(ComposableLoss):
    """DyDiT's FLOPs loss on top of a base loss (paper §4.5, docs/reference.md#flops-loss): base + weight ·
    (mean_b F_dynamic/F_static − λ)², with F counted from the masks the gates actually used and
    each sample's kept tokens (models/dydit.py, flops.py); same interface as the loss it wraps.

    With ``warmup_steps`` W > 0 the target follows DyDiT's train.py (``--warmup``): 1 for the
    first 100 steps, then 1 − (1 − λ)·step/W until step W, then λ.
    """

    def __init__(self, base: Loss, static_cost, target: float, weight: float = 2.0, warmup_steps: int = 0):
        self.base = base
        self.static_cost = static_cost  # the ungated per-sample FLOPs as a function of M
        self.target = target
        self.weight = weight
        self.warmup_steps = warmup_steps

    def target_at(self, step: int | None) -> float:
        """λ at an optimizer step (None: after the warm-up)."""
        if step is None or self.warmup_steps == 0:
            return self.target
        if step < FLOPS_TARGET_HOLD_STEPS:
            return 1.0
        return 1.0 - (1.0 - self.target) * min(step / self.warmup_steps, 1.0)

    @property
    def diffusion(self):
        return self.base.diffusion

    def forward(self, model, x: torch.Tensor, y: torch.Tensor, t=None, budget=None, noise=None, step=None, **model_kwargs):
        loss, logs, stats, x_t, t = self.base.forward(model, x, y, t, budget, noise, step, **model_kwargs)
        f_dyn, f_static = dynamic_flops(stats.gates, getattr(model, "module", model).config, self.static_cost)  # (B,) each
        target = self.target_at(step)
        f_loss = flops_loss(f_dyn, f_static, target)
        loss = loss + self.weight * f_loss
        logs.update(flops_loss=f_loss.detach(), flops_ratio=(f_dyn / f_static).mean().detach(),
                    flops_target=f_loss.new_full((), target), loss=loss.detach())  # new_full: no host copy
        return loss, logs, stats, x_t, t


def loss_for_recipe(recipe, diffusion_weight: float = 1.0) -> Loss:
    """The loss a recipe trains with: its diffusion and ``train.ratio_loss_weight``, plus DyDiT's
    FLOPs loss (``train.flops_target``, ``flops_loss_weight``, ``flops_target_warmup_steps``) when
    ``model.dynamic = "dydit"``."""
    loss = DiffusionLoss(make_diffusion(num_timesteps=recipe.diffusion.num_timesteps), recipe.train.ratio_loss_weight,
                         recipe.model.target_ratio, diffusion_weight)
    if recipe.model.dynamic == "dydit":
        t_cfg = recipe.train
        loss = FlopsLoss(loss, static_cost(recipe.model), t_cfg.flops_target, t_cfg.flops_loss_weight, t_cfg.flops_target_warmup_steps)
    return loss
