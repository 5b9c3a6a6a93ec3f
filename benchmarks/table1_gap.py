"""Paper Table 1's DC-DiT rows against both counters (docs/flops.md#the-gap-to-table-1).

For each DC-DiT row: dcdit's and the authors' count of one forward at M = L/N and at M = L/CR
with the paper's printed CR, and the kept count M at which the authors' counter reaches the
paper's TFLOPs/img (the cost is quadratic in M, so the inverse is exact). No checkpoint needed.

    python benchmarks/table1_gap.py
"""

from __future__ import annotations

import math

from rich.table import Table

from dcdit_cli.common.console import print_table
from dcdit_cli.config.recipe import load_recipe
from dcdit_cli.models.flops import authors_delta, build_for_counting, dcdit_cost

PAPER = {"b-n4": (32.72, 4.49), "b-n16": (12.98, 17.2), "xl-n4": (147.50, 4.4), "xl-n16": (50.89, 15.61)}


def main() -> None:
    table = Table(title="DC-DiT rows of paper Table 1: GFLOPs per forward, and the M that matches the paper")
    for col in ("recipe", "M = L/N", "dcdit", "authors", "M = L/CR", "dcdit", "authors", "paper", "authors' M for paper", "÷ L/CR"):
        table.add_column(col, justify="left" if col == "recipe" else "right")
    for name, (tflops, cr) in PAPER.items():
        recipe = load_recipe(name)
        m_cfg = recipe.model
        model = build_for_counting(m_cfg, "cpu")
        cost, delta = dcdit_cost(m_cfg, model), authors_delta(m_cfg, model)
        L, steps = m_cfg.input_size**2, recipe.diffusion.sampling_steps
        forward = tflops * 1e12 / (2 * (steps - 1))  # the paper's figure per forward
        # authors' forward at M (all samples alike, M_max = M): a + b·M + (c + 2D)·M² − dechunk − residual_proj
        c2 = cost.c + 2 * delta.hidden_size
        a2 = cost.a - delta.dechunk - delta.residual_proj - forward
        m_paper = (-cost.b + math.sqrt(cost.b**2 - 4 * c2 * a2)) / (2 * c2)
        g = 1e9
        row = []
        for m in (L / m_cfg.target_ratio, L / cr):
            row += [f"{m:.1f}", f"{cost(m) / g:.2f}", f"{(cost(m) + delta(m)) / g:.2f}"]
        table.add_row(name, *row, f"{forward / g:.2f}", f"{m_paper:.0f}", f"{m_paper * cr / L:.2f}")
        del model
    print_table(table)


if __name__ == "__main__":
    main()
