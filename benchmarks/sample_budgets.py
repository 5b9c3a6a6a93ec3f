"""Elastic inference on the toy model: what tail dropping and Lite-CFG buy when sampling.

Samples the same images (fixed seeds) under each setting and reports, as ratios against
budget 0 with full CFG measured in the same run: wall time (median of --repeats runs, the
settings interleaved so that machine load drifts alike), kept tokens per forward (both CFG
halves) and spent TFLOPs (exact per-sample cost summed over steps and halves, docs/reference.md#flop-convention).

    python benchmarks/sample_budgets.py                         # trains toy for 200 steps first (~1 min)
    python benchmarks/sample_budgets.py --ckpt runs/toy --num 8 --steps 50
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SETTINGS = [  # name, cond budget, uncond budget
    ("budget 0 (full CFG)", 0.0, 0.0),
    ("budget 0.2", 0.2, 0.2),
    ("Lite-CFG 0.0 / 0.9", 0.0, 0.9),
]


def train_toy(out: Path, steps: int) -> Path:
    from dcdit_cli.config.recipe import load_recipe
    from dcdit_cli.training.loop import train

    train(load_recipe("toy", [f"train.max_steps={steps}"]), out)
    return out


def measure(model, recipe, opts, num: int):
    """(seconds, kept (steps, B, halves)) for one batch of ``num`` images."""
    from dcdit_cli.sampling.sampler import sample_batch

    start = time.perf_counter()
    _, _, log = sample_batch(model, recipe, list(range(num)), opts)
    return time.perf_counter() - start, log.as_array()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, default=None, help="DC-DiT run dir or weights (default: train toy)")
    parser.add_argument("--train-steps", type=int, default=200, help="toy training steps when no --ckpt is given")
    parser.add_argument("--num", type=int, default=8, help="images per batch")
    parser.add_argument("--steps", type=int, default=None, help="DDPM steps (default: the recipe's)")
    parser.add_argument("--cfg-scale", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: immune to the oversubscription stalls of a shared CPU)")
    args = parser.parse_args()

    from dcdit_cli.models.flops import per_image_flops
    from dcdit_cli.sampling.sampler import SampleOptions
    from dcdit_cli.training.checkpoint import load_weights

    with tempfile.TemporaryDirectory(prefix="dcdit-bench-") as tmp:
        ckpt = args.ckpt or train_toy(Path(tmp) / "toy", args.train_steps)
        model, recipe, step = load_weights(ckpt)
    if recipe.model.kind != "dcdit":
        raise SystemExit(f"{ckpt} is a {recipe.model.kind} checkpoint: budgets need a DC-DiT")
    steps = args.steps or recipe.diffusion.sampling_steps
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    options = {name: SampleOptions.from_recipe(recipe, cfg_scale=args.cfg_scale, steps=steps, budget=b, uncond_budget=u,
                                               seed=args.seed)
               for name, b, u in SETTINGS}

    measure(model, recipe, SampleOptions.from_recipe(recipe, cfg_scale=args.cfg_scale, steps=2, seed=args.seed), args.num)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in options}
    kept: dict[str, np.ndarray] = {}
    for _ in range(args.repeats):  # interleaved: every setting sees the same drift in machine load
        for name, opts in options.items():
            seconds, k = measure(model, recipe, opts, args.num)
            times[name].append(seconds)
            if name in kept:
                assert np.array_equal(kept[name], k), "fixed seeds must give the same kept counts on every repeat"
            kept[name] = k

    L = recipe.model.input_size ** 2
    print(f"\n{recipe.run.name} (weights step {step}, {L} tokens), {args.num} images, {steps} DDPM steps, "
          f"cfg {args.cfg_scale:g}, median of {args.repeats}, torch threads {torch.get_num_threads()}")
    head = (f"{'setting':<21} {'cond':>5} {'uncond':>6} {'time s':>8} {'min-max s':>11} {'kept c':>7} {'kept u':>7}"
            f" {'TFLOPs/img':>11} | {'time x':>6} {'kept x':>6} {'TFLOPs x':>8}")
    print(head)
    print("-" * len(head))
    base_name = SETTINGS[0][0]
    base_t = statistics.median(times[base_name])
    base_k = kept[base_name].mean()
    base_f = per_image_flops(recipe.model, kept[base_name]).mean() / 1e12
    for name, b, u in SETTINGS:
        t, k = statistics.median(times[name]), kept[name]  # k (steps, B, halves)
        f = per_image_flops(recipe.model, k).mean() / 1e12
        spread = f"{min(times[name]):.2f}-{max(times[name]):.2f}"
        print(f"{name:<21} {b:>5g} {u:>6g} {t:>8.2f} {spread:>11} {k[..., 0].mean():>7.1f} {k[..., 1].mean():>7.1f}"
              f" {f:>11.4g} | {t / base_t:>6.3f} {k.mean() / base_k:>6.3f} {f / base_f:>8.3f}")
    print("kept c / kept u: mean kept tokens per forward of the conditional / unconditional half; "
          "x: ratio to budget 0 (kept x over both halves).\nWall time includes the full-resolution scaffold and, "
          "in one batched CFG forward, padding to the batch's largest kept count; on a shared CPU it is noisy.")


if __name__ == "__main__":
    main()
