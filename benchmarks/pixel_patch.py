"""Training-step time of a pixel-space DC-DiT with a P×P patch stem against the same model at P = 1.

Both models route the same 16×16 token grid: the photos set at 64×64 pixels with P = 4, and at
16×16 pixels (crops of the same photographs) with P = 1. Everything else is the recipe's model
(default: the toy DC-DiT's widths, 4 photo classes). Each is trained twice: with its router's own
boundaries (their count differs between the two models, and drifts while they learn), and with the
boundaries forced to every N-th token in raster order (M = L / N kept tokens, the same for both), which
isolates what the patch stem costs; and once more on forced boundaries with the diffusion loss replaced
by the mean square of the model's output ("model only": no q_sample, no loss terms over the pixels),
which separates the model's own cost from the per-pixel work around it. The training steps are
interleaved in one process (one step of each in turn, same batch indices), so machine load hits all
alike; the table gives medians and the
ratio to P = 1, with the kept tokens and the FLOPs per image (paper convention, at the router's
target) beside them (docs/pixels.md).

    OMP_NUM_THREADS=1 python benchmarks/pixel_patch.py [--steps 20] [--batch 16] [--recipe toy]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from dcdit_cli.config.recipe import load_recipe
from dcdit_cli.data.datasets import batch_indices, make_dataset
from dcdit_cli.models import build_model
from dcdit_cli.models.flops import flops_row
from dcdit_cli.training.losses import loss_for_recipe

SETTINGS = {"P = 4, 64×64 px": (64, 4), "P = 1, 16×16 px": (16, 1)}
MODES = ("router", "forced M = L/N", "model only, forced")


def setting(recipe_name: str, side: int, patch: int):
    """The recipe on the photos set at ``side`` pixels with patch size ``patch``."""
    return load_recipe(recipe_name, [
        "data.kind=photos", f"data.image_size={side}", "data.num_classes=4", "model.num_classes=4",
        f"model.input_size={side}", f"model.patch_size={patch}", "model.in_channels=3", "sample.guided_channels=0",
    ])


class Trainer:
    """One model, its optimizer, data and loss: ``step(k)`` runs training step k and returns its seconds.
    ``mode``: one of :data:`MODES`; forced modes train on boundaries at every N-th token instead of the
    router's, "model only" on mean(output²) instead of the diffusion loss."""

    def __init__(self, recipe, batch: int, mode: str):
        torch.manual_seed(0)
        self.recipe, self.batch = recipe, batch
        m = recipe.model
        tokens = (m.input_size // m.patch_size) ** 2
        every = torch.arange(tokens) % round(m.target_ratio) == 0  # (L,) M = L / N
        self.kwargs = {"boundary": every.expand(batch, tokens)} if mode != "router" else {}
        self.model_only = mode.startswith("model only")
        self.model = build_model(recipe.model)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=recipe.train.lr)
        self.data = make_dataset(recipe.data)
        self.loss_fn = loss_for_recipe(recipe)
        self.kept: list[float] = []

    def step(self, k: int) -> float:
        idx, flips = batch_indices(0, k, 0, self.batch, len(self.data))
        x, y = self.data.batch(idx, flips)[:2]
        t = torch.randint(0, self.recipe.diffusion.num_timesteps, (self.batch,), generator=torch.Generator().manual_seed(k))
        start = time.perf_counter()
        if self.model_only:
            out, stats = self.model(x, t, y, **self.kwargs)
            loss, kept = out.square().mean(), stats.num_kept.float().mean()
        else:
            loss, logs, _, _, _ = self.loss_fn.forward(self.model, x, y, t=t, **self.kwargs)
            kept = logs["kept_tokens"]
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        elapsed = time.perf_counter() - start
        self.kept.append(float(kept))
        return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per model (after 3 warm-up steps)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--recipe", default="toy", help="the DC-DiT whose widths both models use")
    args = parser.parse_args()
    recipes = {name: setting(args.recipe, side, patch) for name, (side, patch) in SETTINGS.items()}
    trainers = {f"{name}: {mode}": Trainer(recipe, args.batch, mode) for mode in MODES for name, recipe in recipes.items()}
    times = {name: [] for name in trainers}
    for k in range(args.steps + 3):
        for name, trainer in trainers.items():  # interleaved: one step of each in turn
            seconds = trainer.step(k)
            if k >= 3:
                times[name].append(seconds)

    base = {mode: statistics.median(times[f"P = 1, 16×16 px: {mode}"]) for mode in MODES}
    table = Table(title=f"training step, batch {args.batch}, median of {args.steps} interleaved steps, "
                        f"{torch.get_num_threads()} thread(s)")
    for col in ("setting", "tokens L", "mean kept", "params", "TFLOPs/img at N", "median step s", "step / P = 1"):
        table.add_column(col, justify="right")
    for name, trainer in trainers.items():
        mode = name.split(": ", 1)[1]
        m = trainer.recipe.model
        row = flops_row(name, trainer.recipe)
        median = statistics.median(times[name])
        table.add_row(name, str((m.input_size // m.patch_size) ** 2), f"{statistics.mean(trainer.kept):.1f}",
                      f"{row.params / 1e6:.3f}M", f"{row.tflops_per_img:.4g}", f"{median:.4f}", f"{median / base[mode]:.2f}")
    Console(width=150).print(table)


if __name__ == "__main__":
    main()
