"""Activation distillation: the warm-up before diffusion training of an upcycled DC-DiT.

Paper §4.4: "a frozen copy of the pretrained DiT serves as the teacher, and the full DC-DiT
student is trained for a brief warm-up (5K steps) with an MSE loss between student and
teacher block outputs … before switching to the standard diffusion objective" (after the
grafting approach of Chandrasegaran et al. 2025). docs/reference.md#activation-distillation fixes the pairing:

    [choice] block i of the student at each kept token is compared with block i of the
    teacher at the patch holding that token's position, (r // P, c // P), and the squared
    error (mean over channels) is averaged over the kept tokens of the batch and the blocks.

Both networks see the same (x_t, t, y): those of the diffusion step, which the training
:class:`DistillLoss` draws through the diffusion loss it wraps. During the warm-up the diffusion
loss is weighted
0 ([choice]: the paper trains the warm-up "with an MSE loss", nothing else) and is still
logged; the ratio loss stays on so the router keeps its target compression. The switch is
a function of the step (``Objective.until_step``), so a run resumes on either side of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from dcdit_cli.config.recipe import ModelConfig, Recipe
from dcdit_cli.models.dcdit import RouterStats
from dcdit_cli.models.dit import DiT, grid_positions, sincos_2d
from dcdit_cli.training.loop import Objective
from dcdit_cli.training.losses import ComposableLoss, Loss, loss_for_recipe
from dcdit_cli.training.released_checkpoints import inspect_dit
from dcdit_cli.training.upcycle import upcycle


def build_teacher(source: Mapping[str, torch.Tensor], recipe: Recipe) -> DiT:
    """The frozen teacher: the pretrained DiT itself (eval mode, no gradients, in no optimizer)."""
    shape = inspect_dit(source)
    m = recipe.model
    with torch.device("meta"):  # sizes only; the weights come from ``source``
        teacher = DiT(ModelConfig(
            kind="dit",
            input_size=recipe.upcycle.source_input_size,
            patch_size=shape.patch_size,
            in_channels=shape.in_channels,
            hidden_size=shape.hidden_size,
            depth=shape.depth,
            num_heads=m.num_heads,
            mlp_ratio=shape.mlp_hidden / shape.hidden_size,
            num_classes=shape.num_classes,
            learn_sigma=shape.learn_sigma,
        ))
    missing, unexpected = teacher.load_state_dict(source, strict=False, assign=True)  # shares the loaded tensors
    if "pos_embed" in missing:  # a checkpoint without the fixed table: compute it
        side = recipe.upcycle.source_input_size // shape.patch_size
        teacher.pos_embed = torch.nn.Parameter(sincos_2d(grid_positions(side), shape.hidden_size)[None], requires_grad=False)
        missing = [k for k in missing if k != "pos_embed"]
    if missing or unexpected:
        raise ValueError(f"teacher DiT does not match its checkpoint: missing {missing[:3]}, unexpected {unexpected[:3]}")
    teacher.requires_grad_(False)
    return teacher.float().eval()


def teacher_index(order: torch.Tensor, side: int, patch_size: int) -> torch.Tensor:
    """Raster index on the P = 1 grid (B, M) → index of the teacher's patch (B, M) holding it."""
    r, c = torch.div(order, side, rounding_mode="floor"), order % side
    return torch.div(r, patch_size, rounding_mode="floor") * (side // patch_size) + torch.div(c, patch_size, rounding_mode="floor")


def activation_distillation_loss(
    student: list[torch.Tensor], teacher: list[torch.Tensor], order: torch.Tensor, valid: torch.Tensor, side: int, patch_size: int
) -> torch.Tensor:
    """docs/reference.md#activation-distillation: mean over blocks and kept tokens of ‖s_i − T_i[patch(token)]‖² / D.

    student: per block (B, M_max, D) at the chunk slots; teacher: per block (B, T, D) on the
    patch grid; order, valid (B, M_max) from RouterStats (padding slots are excluded).
    """
    index = teacher_index(order, side, patch_size)[..., None]  # (B, M_max, 1)
    weight = valid.float()  # (B, M_max)
    losses = []
    for s, t in zip(student, teacher, strict=True):
        target = t.gather(1, index.expand(-1, -1, t.shape[-1]))  # (B, M_max, D)
        per_token = (s.float() - target.float()).square().mean(dim=-1)  # (B, M_max)
        losses.append((per_token * weight).sum() / weight.sum())
    return torch.stack(losses).mean()


class DistillLoss(ComposableLoss):
    """The warm-up's loss: the recipe's :class:`~dcdit_cli.training.losses.Loss` (its diffusion term
    weighted 0 during the warm-up, still logged) + weight · activation-distillation MSE, same interface.

    Asks the student for its block outputs (``record_blocks=True``, read from ``stats.block_outputs``),
    runs the teacher on the same (x_t, t, y) and hands ``step`` on to the loss it wraps, whose terms
    may have a schedule (DyDiT's FLOPs target).
    """

    def __init__(self, base: Loss, teacher: DiT, weight: float = 1.0):
        self.base = base
        self.teacher = teacher
        self.patch_size = teacher.config.patch_size
        self.weight = weight

    @property
    def diffusion(self):
        return self.base.diffusion

    def forward(self, model, x: torch.Tensor, y: torch.Tensor, t=None, budget=None, noise=None, step=None, **model_kwargs):
        loss, logs, stats, x_t, t = self.base.forward(model, x, y, t, budget, noise, step, record_blocks=True, **model_kwargs)
        if not isinstance(stats, RouterStats) or stats.block_outputs is None:
            raise RuntimeError("activation distillation needs a DC-DiT student that returns its block outputs")
        if next(self.teacher.parameters()).device != x_t.device:
            self.teacher.to(x_t.device)
        with torch.no_grad():
            teacher_blocks = self.teacher.forward_blocks(x_t, self.base.diffusion.model_timesteps(t), y)  # per block (B, T, D)
        distill = activation_distillation_loss(stats.block_outputs, teacher_blocks, stats.order, stats.valid, x_t.shape[-1], self.patch_size)
        loss = loss + self.weight * distill
        logs.update(distill_loss=distill.detach(), loss=loss.detach())
        return loss, logs, stats, x_t, t


def distill_objectives(source: Mapping[str, torch.Tensor], recipe: Recipe) -> list[Objective]:
    """The two phases: distillation for ``distill.steps`` steps, then diffusion to the end."""
    teacher = build_teacher(source, recipe)
    warmup = DistillLoss(loss_for_recipe(recipe, diffusion_weight=0.0), teacher, recipe.distill.weight)
    return [Objective("distill", loss=warmup, until_step=recipe.distill.steps), Objective("diffusion")]


def distill(recipe: Recipe, source: Path, out_dir: Path, *, resume: Path | None = None, command: str = "",
            torch_compile: bool = False) -> Path | None:
    """`dcdit distill`: upcycle ``source`` into a DC-DiT, distillation warm-up, then diffusion, in one run."""
    return upcycle(recipe, source, out_dir, resume=resume, command=command, torch_compile=torch_compile,
                   distill_objectives=distill_objectives)
