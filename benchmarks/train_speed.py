"""Real training steps of the toy DC-DiT against its FLOP-matched toy DiT: data, loss, backward and
AdamW, the router deciding the kept counts as it does in training (``benchmarks/perf.py train``
fixes them instead).

Both models train in one process, their steps timed interleaved (DiT, DC-DiT, DiT, …) after 5
warm-up steps each. Before each timed step an untimed copy of it (the same batch and noise) counts
its training FLOPs, so each step's FLOPs are those of what the router kept then, not of the target
L/N. The table gives the median step, the kept tokens, the FLOPs per image, the median over steps
of the FLOP rate, and each model's peak memory growth over 5 steps in a fresh process. The last
line: the DC-DiT's time per FLOP over the DiT's (1.0 = as fast per FLOP). Large tensors on huge
pages, as the dcdit command runs.

    python benchmarks/train_speed.py [--steps 30] [--batch 32]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time

from dcdit_cli.common.host_memory import peak_growth_mib, use_huge_pages

use_huge_pages()  # before torch's first tensor

import torch  # noqa: E402

from dcdit_cli.config.recipe import load_recipe  # noqa: E402
from dcdit_cli.data.datasets import batch_indices, make_dataset  # noqa: E402
from dcdit_cli.models import build_model  # noqa: E402
from dcdit_cli.models.flops import count_train_flops  # noqa: E402
from dcdit_cli.training.losses import loss_for_recipe  # noqa: E402

WARMUP = 5


class Trainer:
    """One model's training step on its recipe's data (seed 0)."""

    def __init__(self, recipe_name: str, batch: int):
        recipe = load_recipe(recipe_name)
        torch.manual_seed(0)
        self.model = build_model(recipe.model)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=recipe.train.lr)
        self.data = make_dataset(recipe.data)
        self.loss_fn = loss_for_recipe(recipe)  # the training step's loss object
        self.batch, self.step_index, self.kept = batch, 0, []

    def inputs(self):
        idx, flips = batch_indices(0, self.step_index, 0, self.batch, len(self.data))
        x, y = self.data.batch(idx, flips)[:2]
        return x, y, torch.randint(0, 1000, (self.batch,))

    def step(self, x, y, t) -> None:
        loss, logs, _ = self.loss_fn(self.model, x, y, t=t)
        if "kept_tokens" in logs:  # a DC-DiT
            self.kept.append(logs["kept_tokens"])
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.step_index += 1

    def warm_up(self) -> None:
        for _ in range(WARMUP):
            self.step(*self.inputs())

    def timed_step(self) -> tuple[float, int]:
        """(seconds, training FLOPs) of one step; the FLOPs from an untimed copy of it (same batch and noise)."""
        x, y, t = self.inputs()
        rng = torch.get_rng_state()
        flops = count_train_flops(lambda: self.loss_fn(self.model, x, y, t=t)[0])
        torch.set_rng_state(rng)  # the timed step draws the same noise
        start = time.perf_counter()
        self.step(x, y, t)
        return time.perf_counter() - start, flops


def peak_memory(recipe_name: str, batch: int, queue) -> None:
    """Peak resident growth over WARMUP steps of one model, in this (fresh) process."""
    trainer = Trainer(recipe_name, batch)
    queue.put(peak_growth_mib(trainer.warm_up)[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per model")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dcdit", default="toy")
    parser.add_argument("--dit", default="toy-dit")
    args = parser.parse_args()
    for option in ("steps", "batch"):
        if getattr(args, option) < 1:
            parser.error(f"--{option} must be at least 1, got {getattr(args, option)}")
    names = (args.dit, args.dcdit)
    ctx = mp.get_context("spawn")
    peaks = {}
    for name in names:  # one process per model, so that each peak is its own
        q = ctx.Queue()
        p = ctx.Process(target=peak_memory, args=(name, args.batch, q))
        p.start()
        peaks[name] = q.get()
        p.join()

    trainers = {name: Trainer(name, args.batch) for name in names}
    for trainer in trainers.values():
        trainer.warm_up()
    times, flops = {name: [] for name in names}, {name: [] for name in names}
    for _ in range(args.steps):
        for name, trainer in trainers.items():
            seconds, counted = trainer.timed_step()
            times[name].append(seconds)
            flops[name].append(counted)

    from rich.console import Console
    from rich.table import Table

    median = {name: statistics.median(v) for name, v in times.items()}
    rate = {name: statistics.median(f / t for t, f in zip(times[name], flops[name])) for name in names}  # FLOP/s
    table = Table(title=f"training step, batch {args.batch}, median of {args.steps} interleaved steps, "
                        f"{torch.get_num_threads()} torch thread(s)")
    for col in ("recipe", "kept tokens", "train GFLOP/img", "step ms", "step time / DiT", "GFLOP/s",
                "peak RSS growth MiB"):
        table.add_column(col, justify="right")
    for name, trainer in trainers.items():
        kept = f"{float(torch.stack(trainer.kept[-args.steps:]).mean()):.1f}" if trainer.kept else "-"  # timed steps
        table.add_row(name, kept, f"{statistics.mean(flops[name]) / args.batch / 1e9:.4f}", f"{median[name] * 1e3:.1f}",
                      f"{median[name] / median[args.dit]:.3f}", f"{rate[name] / 1e9:.1f}", f"{peaks[name]:.0f}")
    Console().print(table)
    print(f"DC-DiT time per FLOP / DiT's: {rate[args.dit] / rate[args.dcdit]:.3f} (the FLOP rates' medians over steps)")


if __name__ == "__main__":
    main()
