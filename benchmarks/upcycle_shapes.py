"""Does upcycling help? A DiT/2 pretrained on the shapes set, upcycled into a DC-DiT, against
a DC-DiT trained from scratch, on the same validation loss (paper §4.4, Table 3 in miniature).

    OMP_NUM_THREADS=1 python benchmarks/upcycle_shapes.py     # 7 min on one core (docs/upcycling.md)

1. Pretrain a DiT/2 (width 64, 3 blocks, 4 heads; the toy-dit recipe at width 64) for
   --dit-steps steps with `dcdit train`'s loop; its last raw weights are the source (its
   EMA, decay 0.999, still holds 0.999^1500 ≈ 22 % of the random init after 1500 steps).
2. Train three DC-DiTs of the same inner size (toy recipe at width 64, scaffold 16) for
   --steps steps each, with the same data, seed and learning rate: from scratch
   (`train`), upcycled (`upcycle`), upcycled with a --distill-steps warm-up (`distill`).
3. Every --eval-every steps, evaluate each run's raw (non-EMA) weights on fixed validation
   data: 64 shapes images from a seed the training never draws, each at 8 fixed timesteps
   (t = 62, 187, …, 937) with fixed noise; the metric is the ε-MSE of the diffusion loss.

Printed: the validation curves, then the steps each run needs to reach the from-scratch
run's final validation loss and the ratio to the from-scratch steps, all measured in this run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from dcdit_cli.config.recipe import load_recipe
from dcdit_cli.data.datasets import ShapesDataset
from dcdit_cli.diffusion.gaussian import make_diffusion
from dcdit_cli.models import build_model
from dcdit_cli.training.checkpoint import complete_checkpoints, find_latest
from dcdit_cli.training.distill import distill
from dcdit_cli.training.loop import train
from dcdit_cli.training.released_checkpoints import load_dit_checkpoint
from dcdit_cli.training.upcycle import prepare_student, upcycle

SIZE = ["model.hidden_size=64", "model.num_heads=4", "model.depth=3"]


def recipes(args):
    common = [*SIZE, "train.log_every_steps=50", "train.keep_last=1000"]
    dit = load_recipe("toy-dit", [*common, "run.name=upcycle-shapes-dit", f"train.max_steps={args.dit_steps}",
                                  f"train.ckpt_every_steps={args.dit_steps}"])
    runs = [*common, "model.scaffold_width=16", f"train.max_steps={args.steps}", f"train.ckpt_every_steps={args.eval_every}"]
    scratch = load_recipe("toy", [*runs, "run.name=upcycle-shapes-scratch"])
    # What the xl-n4-upcycle recipes set, at this size: source grid 8×8 of a 16×16 input → scale 0.5.
    up = [*runs, "model.pos_grid_scale=0.5", "model.cond_adaptor=true", "upcycle.source_input_size=16", "upcycle.source_patch_size=2"]
    upcycled = load_recipe("toy", [*up, "run.name=upcycle-shapes-upcycled"])
    distilled = load_recipe("toy", [*up, "run.name=upcycle-shapes-distilled", f"distill.steps={args.distill_steps}"])
    return dit, scratch, upcycled, distilled


def validation_set(n_images: int = 64, n_t: int = 8, seed: int = 12345):
    """[(x0, y, t, noise)] per timestep: held-out images (another dataset seed), fixed t grid and noise."""
    x, y, _ = ShapesDataset(image_size=16, num_classes=6, seed=seed).batch(range(n_images))
    g = torch.Generator().manual_seed(seed)
    grid = ((torch.arange(n_t) + 0.5) * 1000 / n_t).long()
    return [(x, y, torch.full((n_images,), int(t)), torch.randn(x.shape, generator=g)) for t in grid]


@torch.no_grad()
def val_loss(model, data, diffusion) -> float:
    model.eval()
    total = 0.0
    for x, y, t, noise in data:
        terms = diffusion.training_losses(lambda x_t, t_: model(x_t, t_, y)[0], x, t, noise)
        total += terms["mse"].mean().item()
    return total / len(data)


def initial_model(recipe, source=None):
    """The model a run starts from (the loop's seeding), evaluated as step 0."""
    from accelerate.utils import set_seed

    set_seed(recipe.run.seed)
    model = build_model(recipe.model)
    if source is not None:
        prepare_student(model, source, recipe)
    return model


def curve(run: Path, recipe, data, diffusion, start) -> dict[int, float]:
    points = {0: val_loss(start, data, diffusion)}
    for ckpt in complete_checkpoints(run / "checkpoints"):
        model = build_model(recipe.model)
        model.load_state_dict(load_file(str(ckpt / "model.safetensors")))
        points[int(ckpt.name.split("-")[1])] = val_loss(model, data, diffusion)
    return points


def steps_to_reach(points: dict[int, float], target: float) -> int | None:
    return next((s for s in sorted(points) if points[s] <= target), None)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dit-steps", type=int, default=1500, help="DiT/2 pretraining steps (the source)")
    parser.add_argument("--steps", type=int, default=600, help="training steps of each DC-DiT run")
    parser.add_argument("--distill-steps", type=int, default=60, help="warm-up steps of the distilled run")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary dir)")
    args = parser.parse_args(argv)
    root = args.out or Path(tempfile.mkdtemp(prefix="upcycle-shapes-"))
    dit_recipe, scratch, up, distilled = recipes(args)
    data, diffusion = validation_set(), make_diffusion(num_timesteps=1000)
    clock = {}

    t0 = time.perf_counter()
    train(dit_recipe, root / "dit")
    clock["DiT/2 pretraining"] = time.perf_counter() - t0
    weights = find_latest(root / "dit") / "model.safetensors"  # raw weights, like every evaluation here
    source = load_dit_checkpoint(weights)
    dit_model = build_model(dit_recipe.model)
    dit_model.load_state_dict(source)
    dit_val = val_loss(dit_model, data, diffusion)

    curves = {}
    for name, recipe, run in (
        ("scratch", scratch, lambda r, out: train(r, out)),
        ("upcycled", up, lambda r, out: upcycle(r, weights, out)),
        ("upcycled + distilled", distilled, lambda r, out: distill(r, weights, out)),
    ):
        t0 = time.perf_counter()
        out = root / name.replace(" + ", "-")
        run(recipe, out)
        clock[name] = time.perf_counter() - t0
        start = initial_model(recipe, None if name == "scratch" else source)
        curves[name] = curve(out, recipe, data, diffusion, start)

    names = list(curves)
    print(f"\nvalidation ε-MSE (raw weights; 64 held-out images × 8 fixed t; the source DiT/2 after {args.dit_steps} steps: {dit_val:.4f})\n")
    print("| step | " + " | ".join(names) + " |")
    print("|---:|" + "---:|" * len(names))
    for step in sorted(curves["scratch"]):
        print(f"| {step} | " + " | ".join(f"{curves[n].get(step, float('nan')):.4f}" for n in names) + " |")

    target = curves["scratch"][args.steps]
    base = steps_to_reach(curves["scratch"], target)
    print(f"\nsteps to reach the from-scratch final validation loss {target:.4f} (eval every {args.eval_every} steps)\n")
    print("| run | steps | ratio to scratch | wall time |")
    print("|---|---:|---:|---:|")
    for n in names:
        s = steps_to_reach(curves[n], target)
        shown, ratio = (str(s), f"{s / base:.2f}") if s is not None else (f"> {args.steps}", f"> {args.steps / base:.2f}")
        print(f"| {n} | {shown} | {ratio} | {clock[n]:.0f} s |")
    print(f"\nDiT/2 pretraining: {args.dit_steps} steps, {clock['DiT/2 pretraining']:.0f} s; runs in {root}")


if __name__ == "__main__":
    sys.exit(main())
