"""Fit the peak-training-memory model of dcdit_cli/training/memory.py and check it (docs/resolutions.md#memory).

Measures the peak of one training step (model, EMA, AdamW; forward at M = L/N, backward, step) on
CPU with MemTracker for DC-DiTs of reduced width, varying each term of the model independently;
fits the bytes per element of every term by non-negative least squares on relative residuals, once per precision and with and
without gradient checkpointing, and prints them as ``COEFFICIENTS``. Then it measures two held-out
models at grids 32² and 64² and prints predicted / measured.

    python benchmarks/memory_fit.py            # about 4 minutes on 2 busy cores
    python benchmarks/memory_fit.py --check    # only the held-out check, with the shipped coefficients
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
from scipy.optimize import nnls

from dcdit_cli.config.recipe import load_recipe
from dcdit_cli.models.flops import param_count
from dcdit_cli.training import memory

# (D, e, depth, heads, side, N, batch): each term of memory.FEATURES varies on its own somewhere.
FIT = [
    (32, 8, 1, 2, 8, 2, 2), (64, 16, 2, 4, 16, 4, 2), (64, 32, 1, 2, 16, 4, 1), (96, 16, 3, 4, 12, 2, 2),
    (128, 32, 2, 8, 16, 4, 2), (64, 16, 4, 4, 16, 8, 2), (32, 16, 2, 2, 24, 4, 1), (64, 8, 1, 8, 24, 2, 1),
    (128, 16, 1, 4, 8, 2, 4), (96, 48, 2, 2, 16, 8, 2), (160, 40, 1, 4, 12, 4, 1), (64, 16, 2, 4, 16, 4, 4),
    (32, 8, 4, 4, 20, 2, 2), (128, 64, 3, 8, 12, 4, 1),
]
CHECK = [(96, 24, 3, 4, 32, 4, 2), (96, 24, 3, 4, 64, 4, 2)]  # held out: grids 32² and 64²


def config(D, e, depth, heads, side, N):
    base = load_recipe("tiny").model
    return dataclasses.replace(base, hidden_size=D, scaffold_width=e, depth=depth, num_heads=heads, input_size=side,
                               target_ratio=float(N), norm_groups=4)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true", help="skip the fit: check the shipped coefficients")
    args = ap.parse_args()
    variants = [(p, c) for p in memory.PRECISIONS for c in (False, True)]
    if not args.check:
        rows = {v: ([], []) for v in variants}
        t0 = time.perf_counter()
        for D, e, depth, heads, side, N, batch in FIT:
            m = config(D, e, depth, heads, side, N)
            x = memory.features(m, batch, param_count(m), scores=True)
            for v in variants:
                rows[v][0].append(x)
                rows[v][1].append(memory.measure_peak_bytes(m, batch, *v))
        fitted = {}
        for v, (xs, ys) in rows.items():
            xs_, ys_ = np.array(xs), np.array(ys, dtype=np.float64)
            scale = 1 / ys_  # relative residuals; bytes per element cannot be negative
            coef, _ = nnls(xs_ * scale[:, None], ys_ * scale)
            worst = max(abs(x @ coef / y - 1) for x, y in zip(xs, ys))
            fitted[v] = tuple(float(f"{c:.4g}") for c in coef)
            print(f"{v}: worst fit residual {100 * worst:.1f}%")
        print(f"{len(FIT) * len(variants)} measurements in {time.perf_counter() - t0:.0f} s\n")
        print("COEFFICIENTS = {  # bytes per element of", ", ".join(memory.FEATURES))
        for v, c in fitted.items():
            print(f"    {v!r}: {c},")
        print("}\n")
        memory.COEFFICIENTS.update(fitted)
    print("held-out check (predicted with the CPU backend's attention scores):")
    print("grid  precision  checkpointing  measured MiB  predicted MiB  predicted/measured")
    for D, e, depth, heads, side, N, batch in CHECK:
        m = config(D, e, depth, heads, side, N)
        for v in variants:
            measured = memory.measure_peak_bytes(m, batch, *v)
            predicted = memory.predict_peak_bytes(m, batch, *v, scores=True)
            print(f"{side}²  {v[0]:>9}  {str(v[1]):>13}  {measured / 2**20:12.1f}  {predicted / 2**20:13.1f}  {predicted / measured:18.3f}")


if __name__ == "__main__":
    main()
