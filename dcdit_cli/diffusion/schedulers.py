"""diffusers' schedulers over DiT's diffusion: the fast samplers beyond the paper's DDPM and DDIM.

dcdit's own ADM loop (``gaussian.py``) stays the sampler of ``ddpm`` and ``ddim``: it is the exact
sampler the paper reports. The other names build a diffusers scheduler configured for the same
process (linear β from 1e-4 to 0.02 scaled by 1000/T, ε prediction) and run it through
:func:`scheduler_sample_loop`, which the diffusers pipeline (``pipelines/pipeline.py``) also uses.

Learned σ is handled as diffusers' ``DiTPipeline`` does: a scheduler with a learned variance
(``DDPMScheduler(variance_type="learned_range")``) gets the whole [ε | v] output; every other
scheduler gets ε alone and uses its own variance.
"""

from __future__ import annotations

import inspect
from typing import Callable, Sequence

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import Tensor

from dcdit_cli.common.console import DcditError
from dcdit_cli.diffusion.gaussian import ModelOutFn, space_timesteps

ADM_METHODS = ("ddpm", "ddim")
"""Samplers that ``dcdit sample`` runs with its own ADM loop (the paper's)."""

DIFFUSERS_SCHEDULERS: dict[str, tuple[type, dict]] = {
    "ddpm": (DDPMScheduler, {"variance_type": "learned_range"}),
    "ddim": (DDIMScheduler, {"set_alpha_to_one": False}),
    "dpm-solver": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "unipc": (UniPCMultistepScheduler, {"solver_order": 2}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler-a": (EulerAncestralDiscreteScheduler, {}),
}
"""Sampler name → diffusers class and its settings on top of DiT's β schedule. ``dcdit sample``
runs ``ddpm`` and ``ddim`` with dcdit's ADM loop; their diffusers twins here are what an exported
pipeline carries (``DDPMScheduler`` with the learned-range variance). DPM-Solver is DPM-Solver++
of order 2 (diffusers' choice for guided sampling)."""

METHODS = tuple(DIFFUSERS_SCHEDULERS)
"""Every ``--scheduler`` name (the recipe's ``sample.method`` lists the same, tests/test_pipelines.py)."""


def make_scheduler(name: str, num_timesteps: int = 1000, clip_sample: bool = False) -> SchedulerMixin:
    """A diffusers scheduler for DiT's linear-β diffusion over ``num_timesteps`` steps.
    ``clip_sample`` clamps the predicted x_0 to [−1, 1], as ADM does for pixel-space runs, where the
    scheduler can (every one here but the Euler samplers, which never form x_0's clamp)."""
    if name not in DIFFUSERS_SCHEDULERS:
        raise DcditError(f"unknown scheduler {name!r}: use one of {', '.join(METHODS)}")
    cls, extra = DIFFUSERS_SCHEDULERS[name]
    scale = 1000.0 / num_timesteps
    config = dict(num_train_timesteps=num_timesteps, beta_start=scale * 1e-4, beta_end=scale * 0.02,
                  beta_schedule="linear", prediction_type="epsilon", **extra)
    keys = cls._get_init_keys(cls)
    if "clip_sample" in keys:
        config["clip_sample"] = clip_sample
    elif clip_sample and "thresholding" in keys:  # DPM-Solver++, UniPC: "dynamic" thresholding with its
        config.update(thresholding=True, sample_max_value=1.0)  # bound s clamped to [1, 1] is clipping to [−1, 1]
    return cls(**config)


def adm_timesteps(steps: int, num_timesteps: int = 1000) -> list[int]:
    """ADM's respaced timesteps, descending (``space_timesteps``; 250 of 1000 → 999, 995, …, 4, 0).
    diffusers' "leading" and "trailing" spacings differ from it, so a scheduler that is to
    reproduce dcdit's DDPM gets these through ``set_timesteps(timesteps=…)``."""
    return sorted(space_timesteps(num_timesteps, str(steps)), reverse=True)


def learns_variance(scheduler: SchedulerMixin) -> bool:
    """Whether the scheduler reads the model's variance channels (as diffusers' DiTPipeline decides)."""
    return getattr(scheduler.config, "variance_type", None) in ("learned", "learned_range")


@torch.no_grad()
def scheduler_sample_loop(scheduler: SchedulerMixin, model_out_fn: ModelOutFn, noise: Tensor, steps: int, *,
                          timesteps: Sequence[int] | None = None, generator=None,
                          on_step: Callable[[int, int], None] | None = None) -> Tensor:
    """x_0 from the initial noise (B, C, H, W) in ``steps`` scheduler steps (or at the given
    ``timesteps``, descending). ``model_out_fn(x, t)`` returns [ε | v] (B, 2C, H, W);
    ``generator`` is one ``torch.Generator`` or one per batch row (the noise of stochastic schedulers)."""
    if timesteps is not None:
        scheduler.set_timesteps(timesteps=list(timesteps), device=noise.device)
    else:
        scheduler.set_timesteps(steps, device=noise.device)
    C, learned = noise.shape[1], learns_variance(scheduler)
    noise_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    x = noise * scheduler.init_noise_sigma
    total = len(scheduler.timesteps)
    for done, t in enumerate(scheduler.timesteps, start=1):
        out = model_out_fn(scheduler.scale_model_input(x, t), t.expand(x.shape[0]))  # (B, 2C, H, W)
        x = scheduler.step(out if learned else out[:, :C], t, x, **noise_kwargs).prev_sample
        if on_step is not None:
            on_step(done, total)
    return x
