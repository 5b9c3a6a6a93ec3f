"""Training-step speed of the toy DC-DiT against its FLOP-matched toy DiT, measured in one run.

Prints, for each model: median step time, inference FLOPs per image (paper convention) and
peak memory; then the ratios DC-DiT / DiT and "time ratio ÷ FLOP ratio" (1.0 = the DC-DiT
runs as fast per FLOP as the plain DiT; above 1 = scaffold overhead not seen by FLOPs).

    python benchmarks/train_speed.py [--steps 30] [--batch 32]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import time


def measure(recipe_name: str, steps: int, batch: int, queue) -> None:
    import torch

    from dcdit_cli.config.recipe import load_recipe
    from dcdit_cli.data.datasets import batch_indices, make_dataset
    from dcdit_cli.models import build_model
    from dcdit_cli.models.flops import flops_row
    from dcdit_cli.training.losses import loss_for_recipe

    recipe = load_recipe(recipe_name)
    torch.manual_seed(0)
    model = build_model(recipe.model)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.train.lr)
    data = make_dataset(recipe.data)
    loss_fn = loss_for_recipe(recipe)  # the training step's loss object
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, kept = [], []
    for step in range(steps + 5):  # 5 warm-up steps
        idx, flips = batch_indices(0, step, 0, batch, len(data))
        x, y = data.batch(idx, flips)[:2]
        t = torch.randint(0, 1000, (batch,))
        start = time.perf_counter()
        loss, logs, _ = loss_fn(model, x, y, t=t)
        if "kept_tokens" in logs:  # a DC-DiT
            kept.append(logs["kept_tokens"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step >= 5:
            times.append(time.perf_counter() - start)
    row = flops_row(recipe_name, recipe)
    queue.put({
        "recipe": recipe_name,
        "step_s": statistics.median(times),
        "tflops_per_img": row.tflops_per_img,
        "peak_rss_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024,
        "kept": float(torch.stack(kept).mean()) if kept else None,
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dcdit", default="toy")
    parser.add_argument("--dit", default="toy-dit")
    args = parser.parse_args()
    ctx = mp.get_context("spawn")  # one process per model: separate peak-memory readings
    results = {}
    for name in (args.dit, args.dcdit):
        q = ctx.Queue()
        p = ctx.Process(target=measure, args=(name, args.steps, args.batch, q))
        p.start()
        results[name] = q.get()
        p.join()
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"training step, batch {args.batch}, median of {args.steps} steps (same run)")
    for col in ("recipe", "kept tokens", "TFLOPs/img (inference)", "step time / DiT", "peak RSS growth MB"):
        table.add_column(col, justify="right")
    base = results[args.dit]
    for name, r in results.items():
        table.add_row(name, f"{r['kept']:.1f}" if r["kept"] else "-", f"{r['tflops_per_img']:.4g}",
                      f"{r['step_s'] / base['step_s']:.2f}", f"{r['peak_rss_mb']:.0f}")
    Console().print(table)
    dc = results[args.dcdit]
    time_ratio, flop_ratio = dc["step_s"] / base["step_s"], dc["tflops_per_img"] / base["tflops_per_img"]
    print(f"time ratio {time_ratio:.2f} / FLOP ratio {flop_ratio:.2f} = {time_ratio / flop_ratio:.2f} (DC-DiT cost per FLOP relative to DiT)")


if __name__ == "__main__":
    main()
