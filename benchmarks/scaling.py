"""How a training step scales with resolution: DC-DiT (N = 4), its scaffold alone, and a DiT/2 (docs/resolutions.md#scaling).

At latent grids 32², 64², 128² (256, 512, 1024 px) and a reduced width, one training step (forward
at M = L/4, backward, AdamW step) of:

- ``dcdit``: the whole DC-DiT;
- ``scaffold``: the same DC-DiT without inner blocks (stem, encoder, router, chunk, de-chunk,
  decoder, final layer): the part that runs on all L tokens;
- ``dit``: a DiT/2 of the same width whose depth makes its FLOPs per image equal to the DC-DiT's
  at 32² (the isoflop pairing of paper Table 1); it runs on L/4 tokens, as the DC-DiT's inner network.

Time: the median of --repeats steps, the three models interleaved within each repeat, so machine
load drifts alike (ratios are what to read). Peak memory: MemTracker over one step
(dcdit_cli/training/memory.py). FLOPs: exact forward counts (dcdit_cli/models/flops.py). Then the
exact FLOPs per image of the XL pair (xl-n4 against DiT-XL/2 with 34 blocks, matched at 256 px) at
every grid, and where their curves cross.

    python benchmarks/scaling.py                 # about 4 minutes on 2 busy cores
    python benchmarks/scaling.py --grids 32 64 --repeats 2
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from dcdit_cli.config.recipe import load_recipe
from dcdit_cli.models.flops import dcdit_cost, dit_forward_flops
from dcdit_cli.training import memory


def configs(width: int, depth: int):
    """DC-DiT, its scaffold and the DiT/2 FLOP-matched to it at 32², for a grid side."""
    base = load_recipe("xl-n4").model
    scale = dict(hidden_size=width, scaffold_width=width // 4, num_heads=width // 64, num_classes=1000, norm_groups=8)
    dcdit = dataclasses.replace(base, depth=depth, **scale)
    dit_base = dataclasses.replace(load_recipe("dit-xl-p2").model, **scale)
    per_block = dit_forward_flops(dataclasses.replace(dit_base, depth=2)) - dit_forward_flops(dataclasses.replace(dit_base, depth=1))
    target = dcdit_cost(dcdit)(32 * 32 / 4)
    dit_depth = max(1, round((target - dit_forward_flops(dataclasses.replace(dit_base, depth=1))) / per_block) + 1)

    def at(side: int):
        return {"dcdit": dataclasses.replace(dcdit, input_size=side),
                "scaffold": dataclasses.replace(dcdit, input_size=side, depth=0),
                "dit": dataclasses.replace(dit_base, input_size=side, depth=dit_depth)}

    return at, dit_depth


def forward_flops(m) -> float:
    if m.kind == "dit":
        return dit_forward_flops(m)
    return dcdit_cost(m)(m.input_size**2 / 4)


def xl_crossing(grids) -> list[tuple[int, float, float]]:
    """Exact forward GFLOPs of xl-n4 and DiT-XL/2 with 34 blocks at each grid (M = L/4)."""
    rows = []
    for side in grids:
        dc = dataclasses.replace(load_recipe("xl-n4").model, input_size=side)
        # The DC-DiT's cost at a grid: its scaffold grows with L, its inner network is exactly quadratic in M.
        rows.append((side, dcdit_cost(dc)(side * side / 4) / 1e9,
                     dit_forward_flops(dataclasses.replace(load_recipe("dit-xl-p2-isoflop").model, input_size=side)) / 1e9))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--grids", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--xl", action="store_true", help="also count XL's exact FLOPs per grid (slow: builds XL on CPU)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    at, dit_depth = configs(args.width, args.depth)
    names = ("dcdit", "scaffold", "dit")
    print(f"width {args.width}, DC-DiT depth {args.depth}, N = 4; DiT/2 depth {dit_depth} (FLOP-matched at 32²); batch {args.batch}")
    results = {}
    for side in args.grids:
        cfgs = at(side)
        steps = {n: memory.training_step(cfgs[n], args.batch)[0] for n in names}
        for n in names:
            steps[n]()  # warm-up: optimizer state, allocator
        times = {n: [] for n in names}
        for _ in range(args.repeats):
            for n in names:  # interleaved
                t0 = time.perf_counter()
                steps[n]()
                times[n].append(time.perf_counter() - t0)
        peaks = {n: memory.measure_peak_bytes(cfgs[n], args.batch, "no", False) for n in names}
        results[side] = {n: (statistics.median(times[n]), peaks[n] / 2**20, forward_flops(cfgs[n]) / 1e9) for n in names}
        print(f"  {side}² done", flush=True)

    print("\ngrid   model      step s   peak MiB   fwd GFLOPs   ×time/doubling  ×peak/doubling  ×FLOPs/doubling")
    for i, side in enumerate(args.grids):
        for n in names:
            t, p, f = results[side][n]
            if i:
                t0, p0, f0 = results[args.grids[i - 1]][n]
                ratio = f"{t / t0:14.2f}  {p / p0:14.2f}  {f / f0:15.2f}"
            else:
                ratio = f"{'':14}  {'':14}  {'':15}"
            print(f"{side:>4}²  {n:<9} {t:7.3f}  {p:9.1f}  {f:11.2f}   {ratio}")
    print("\nDC-DiT / DiT at each grid (time, peak, FLOPs):")
    for side in args.grids:
        (t1, p1, f1), (t2, p2, f2) = results[side]["dcdit"], results[side]["dit"]
        print(f"  {side}²: time {t1 / t2:.2f}, peak {p1 / p2:.2f}, FLOPs {f1 / f2:.2f}; scaffold share of DC-DiT time "
              f"{results[side]['scaffold'][0] / t1:.2f}")
    if args.xl:
        rows = xl_crossing(args.grids)
        print("\nXL, exact forward GFLOPs at M = L/4: xl-n4 against DiT-XL/2 with 34 blocks (matched at 32²)")
        for side, dc, dit in rows:
            print(f"  {side}²: DC-DiT {dc:.1f}, DiT {dit:.1f}, ratio {dc / dit:.3f}")
        crossings = [(s0, s1) for (s0, a0, b0), (s1, a1, b1) in zip(rows, rows[1:]) if (a0 - b0) * (a1 - b1) < 0]
        print("  the curves cross between " + ", ".join(f"{a}² and {b}²" for a, b in crossings) if crossings
              else "  the curves do not cross on these grids")


if __name__ == "__main__":
    main()
