"""Cost of the trackers' router probe (training/tracking.py) against the training step, in one run.

Interleaves rounds of training steps and probes on the same model, so that a loaded machine
slows both alike, and prints the medians: seconds per step, seconds per probe (the batched
forward over PROBE_TIMESTEPS t, the sampling run of the recipe's diffusion.sampling_steps, the
pictures, and the TensorBoard writes when tensorboard is installed), the probe in steps, and
its share of training time at the recipe's train.image_every_steps; and the time to hand one
metrics.jsonl record to TensorBoard (what a log step adds).

    python benchmarks/tracking_probe.py [--recipe toy] [--rounds 7] [--steps 10] [--device cpu] [--set KEY=VALUE]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from dcdit_cli.config.recipe import load_recipe
from dcdit_cli.data.datasets import batch_indices, make_dataset
from dcdit_cli.models import build_model
from dcdit_cli.training.losses import loss_for_recipe
from dcdit_cli.training.tracking import RouterProbe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="toy")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10, help="training steps per round")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--set", action="append", default=[], help="recipe override, e.g. data.path=features/imagenet256")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe, args.set)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(recipe.model).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.train.lr)
    data = make_dataset(recipe.data)
    loss_fn = loss_for_recipe(recipe)
    probe = RouterProbe(recipe, data, device)
    batch = recipe.train.global_batch
    try:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(tempfile.mkdtemp(prefix="probe-bench-"))
    except ImportError:
        writer = None

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def train_step(step: int) -> None:
        model.train()
        idx, flips = batch_indices(0, step, 0, batch, len(data))
        x, y = (v.to(device) for v in data.batch(idx, flips)[:2])
        loss, _, _ = loss_fn(model, x, y, t=torch.randint(0, 1000, (batch,), device=device))
        opt.zero_grad()
        loss.backward()
        opt.step()

    def probe_once(step: int) -> None:
        model.eval()
        images, histograms, _ = probe(model)
        if writer is not None:
            for tag, image in images.items():
                writer.add_image(tag, image, step, dataformats="HWC")
            for tag, values in histograms.items():
                writer.add_histogram(tag, values, step)
            writer.flush()

    for step in range(3):  # warm-up
        train_step(step)
    probe_once(0)
    record = {k: 1.0 for k in ("loss", "mse", "vb", "ratio_loss", "compression", "kept_tokens", "grad_norm", "lr",
                                "images_per_s", "budget")}  # a metrics.jsonl record's numbers

    def log_once(step: int) -> None:
        for key, value in record.items():
            writer.add_scalar(key, value, step)

    step_s, probe_s, log_s = [], [], []
    for r in range(args.rounds):
        sync()
        start = time.perf_counter()
        for s in range(args.steps):
            train_step(3 + r * args.steps + s)
        sync()
        step_s.append((time.perf_counter() - start) / args.steps)
        start = time.perf_counter()
        probe_once(r + 1)
        sync()
        probe_s.append(time.perf_counter() - start)
        if writer is not None:
            start = time.perf_counter()
            log_once(r)
            log_s.append(time.perf_counter() - start)
    step, cost = statistics.median(step_s), statistics.median(probe_s)
    every = recipe.train.image_every_steps
    print(f"recipe {args.recipe} on {device}, batch {batch}, probe of {len(probe.y)} images at {len(probe.ts)} t and "
          f"{recipe.diffusion.sampling_steps} sampling steps; medians of {args.rounds} interleaved rounds "
          f"({args.steps} steps each); TensorBoard writes {'included' if writer else 'not measured (not installed)'}")
    print(f"  training step      {step:.4f} s")
    print(f"  probe              {cost:.4f} s  = {cost / step:.1f} training steps")
    if every:
        print(f"  share of training at train.image_every_steps = {every}: {cost / (cost + every * step):.2%}")
    if log_s:
        log = statistics.median(log_s)
        print(f"  one metrics record to TensorBoard {log * 1e3:.2f} ms = {log / step:.2%} of a training step "
              f"(at log steps only)")


if __name__ == "__main__":
    main()
