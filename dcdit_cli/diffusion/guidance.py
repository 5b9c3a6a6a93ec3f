"""The sampler's model function: CFG and Lite-CFG in one batched forward, kept tokens logged.

Every sampler calls the network through this function: dcdit's own ADM loop
(``GaussianDiffusion.sample_loop``), diffusers' schedulers (``diffusion/schedulers.py``) and
the diffusers pipeline (``pipelines/pipeline.py``), so guidance and budgets mean the same in each.
CFG follows DiT (docs/reference.md#classifier-free-guidance); Lite-CFG gives the unconditional half its own
tail-dropping budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from dcdit_cli.diffusion.gaussian import classifier_free_guidance
from dcdit_cli.models.dcdit import RouterStats
from dcdit_cli.models.dydit import saved_flops


@dataclass
class KeptLog:
    """Kept-token counts per sampler step: a list of (halves, B) tensors; ``saved``: the FLOPs that
    DyDiT's gates skipped (net of their routers) per step, the same shape (0 without gates);
    ``maps``: with ``record_maps``, the (B, L) tokens the conditional half ran on, per step.
    Everything stays on the device and is read once, at the end."""

    per_step: list = field(default_factory=list)
    saved: list = field(default_factory=list)
    record_maps: bool = False
    maps: list = field(default_factory=list)

    def as_array(self) -> np.ndarray:
        """(steps, B, halves)."""
        return torch.stack(self.per_step).permute(0, 2, 1).cpu().numpy() if self.per_step else np.zeros((0, 0, 0))

    def saved_array(self) -> np.ndarray:
        """(steps, B, halves) FLOPs skipped by the gates."""
        return torch.stack(self.saved).permute(0, 2, 1).double().cpu().numpy() if self.saved else np.zeros((0, 0, 0))

    def maps_tensor(self, side: int) -> torch.Tensor | None:
        """(steps, B, side, side) bool on the host, None when not recorded or the model has no router."""
        return torch.stack(self.maps).view(len(self.maps), -1, side, side).cpu() if self.maps else None


def guided_model_fn(model, y: torch.Tensor, *, cfg_scale: float, budget: float, uncond_budget: float,
                    guided_channels: int, log: KeptLog):
    """(x (B, C, H, W), t (B,)) → the guided output (B, 2C, H, W) of a dcdit network (``DiT`` or
    ``DCDiT``) for labels ``y`` (B,). ``cfg_scale`` ≤ 1: one conditional forward; otherwise both
    halves run as one forward, the conditional at ``budget`` and the unconditional at
    ``uncond_budget``; ``guided_channels`` 0 guides every ε channel."""
    B = y.shape[0]
    use_cfg = cfg_scale > 1.0
    y_cfg = torch.cat([y, torch.full_like(y, model.config.num_classes)])  # [cond; uncond] labels
    budgets = torch.cat([torch.full((B,), budget), torch.full((B,), uncond_budget)]).to(y.device)  # once, not per step

    def model_fn(x, t):
        if not use_cfg:
            out, stats = model(x, t, y, budget=budget)
        else:  # both halves in one forward, each at its own kept count (the inner network is packed)
            out, stats = model(torch.cat([x, x]), torch.cat([t, t]), y_cfg, budget=budgets)
            out = classifier_free_guidance(out, cfg_scale, guided_channels or None)[:B]
        if isinstance(stats, RouterStats):
            log.per_step.append(stats.num_kept.detach().view(-1, B))
            if log.record_maps:
                log.maps.append(stats.kept[:B].detach())
        else:  # a DiT runs every patch token, in each CFG half
            tokens = (model.config.input_size // model.config.patch_size) ** 2
            log.per_step.append(torch.full((2 if use_cfg else 1, B), tokens, device=x.device))
        saved = saved_flops(stats.gates, model.config)
        log.saved.append(torch.zeros_like(log.per_step[-1], dtype=torch.float64) if saved is None
                         else saved.detach().double().view(-1, B))
        return out

    return model_fn
