"""Where should the kept tokens go? The swap test: the same model, the same kept count per image,
different placements, and the validation ε-MSE each placement gives.

A model is trained (``router_study.train_variant``: batch 32, AdamW 3e-4, uniform t, the recipe's
loss through ``loss_for_recipe``) with the paper's cosine router, the authors' predictive router,
or random boundaries (paper §4.3). The model trained on random boundaries has seen every placement
of every density while training, so it is the neutral reference: whatever placement it prefers
is what the loss prefers, not what one router taught it.

At t = 0, 50, 100, 250 and with the kept count m of every image fixed (the count its own router
keeps at that t), the held-out ε-MSE is measured with boundaries placed by:

- ``router``: the model's own router (for a random-boundary model: its random draw);
- ``random``: m tokens uniformly at random;
- ``1:1``, ``2:1``, ``4:1``, ``8:1``: a graded density, object (shapes) or high-detail (photos)
  pixels weighted w against 1 for the rest, spread by stratified sampling along a Hilbert curve
  (systematic sampling of the cumulative weight: the density follows the weights and no region
  is left without tokens); ``1:1`` is an even spread, the blue-noise counterpart of ``random``;
- ``object first`` and ``background first``: the two extremes (every object pixel before any
  background pixel, or the reverse, random within each).

Forced boundaries keep the router's confidence on the forced side of 0.5 (``DCDiT.forward``).
Relative differences are against ``random``; a setting passes when a content-weighted density
beats it by at least 2% at some t ≤ 250 on both seeds.

    OMP_NUM_THREADS=1 python benchmarks/router_swap.py run --name s32 --router random --data shapes \\
        --set model.input_size=32 --set data.image_size=32 --steps 800 --seed 0
    python benchmarks/router_swap.py table     # the markdown table of docs/router-swap.jsonl

Results are appended as JSON lines to ``docs/router-swap.jsonl`` (``--results``).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch

from dcdit_cli.diffusion.gaussian import make_diffusion
from dcdit_cli.models.flops import dcdit_cost
from dcdit_cli.models.routers import RandomRouter
from router_study import FACTORS, load_rows, study_recipe, train_variant, validation

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "router-swap.jsonl"
SWAP_T = (0, 50, 100, 250)
RATIOS = (1, 2, 4, 8)
PLACEMENTS = ("router", "random", *(f"{w}:1" for w in RATIOS), "object first", "background first")


@functools.lru_cache(maxsize=None)
def hilbert_order(side: int) -> torch.Tensor:
    """(L,) raster index of the k-th cell along a Hilbert curve over a side × side grid (side a power of 2)."""
    if side & (side - 1):
        raise ValueError(f"the Hilbert curve needs a power-of-2 side, got {side}")
    order = []
    for d in range(side * side):  # the classic index → (x, y) walk, once per side
        x = y = 0
        s, t = 1, d
        while s < side:
            rx, ry = 1 & (t // 2), 1 & (t ^ (t // 2))
            if ry == 0:
                if rx == 1:
                    x, y = s - 1 - x, s - 1 - y
                x, y = y, x
            x, y = x + s * rx, y + s * ry
            t //= 4
            s *= 2
        order.append(y * side + x)
    return torch.tensor(order)


def graded(obj: torch.Tensor, m: torch.Tensor, ratio: float, g: torch.Generator) -> torch.Tensor:
    """(B, L) bool: exactly m[b] tokens per row, density ∝ ratio on ``obj`` and 1 elsewhere,
    stratified along the Hilbert curve. Where the object cannot absorb its share (a small object at
    a high ratio), the remaining tokens are drawn by weight (Gumbel top-k) from the rest."""
    B, L = obj.shape
    order = hilbert_order(int(L**0.5))
    w = torch.where(obj, float(ratio), 1.0)[:, order]  # (B, L) along the curve
    cum = w.cumsum(1)  # (B, L)
    k = torch.arange(L)
    u = torch.rand(B, 1, generator=g)
    targets = (k[None] + u) / m[:, None].double() * cum[:, -1:].double()  # (B, L): the k-th stratum's point
    hit = torch.searchsorted(cum.double(), targets).clamp(max=L - 1)  # (B, L) curve positions
    picked = torch.zeros(B, L).scatter_add_(1, hit, (k[None] < m[:, None]).float()) > 0  # (B, L) on the curve
    key = w.log() - torch.log(-torch.log(torch.rand(B, L, generator=g).clamp_min(1e-12)))  # Gumbel top-k by weight
    key = key.masked_fill(picked, float("inf"))
    rank = key.argsort(1, descending=True).argsort(1)
    on_curve = rank < m[:, None]
    out = torch.empty_like(on_curve)
    out[:, order] = on_curve
    return out


def placement(name: str, obj: torch.Tensor, m: torch.Tensor, router_mask: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """(B, L) bool boundaries with m[b] per row for one of :data:`PLACEMENTS`."""
    if name == "router":
        return router_mask
    if ":" in name:
        return graded(obj, m, float(name.split(":")[0]), g)
    jitter = torch.rand(obj.shape, generator=g)
    score = {"random": jitter, "object first": obj.float() + jitter, "background first": (~obj).float() + jitter}[name]
    return score.argsort(1, descending=True).argsort(1) < m[:, None]


@torch.no_grad()
def swap(model, diffusion, val, seed: int = 0) -> dict:
    """{t: {placement: ε-MSE}} plus the kept count and the object share of the kept tokens."""
    model.eval()
    x0, y, mask, noise = val
    obj = mask.flatten(1)  # (B, L)
    C = x0.shape[1]
    out = {}
    for t_val in SWAP_T:
        g = torch.Generator().manual_seed(seed * 7919 + t_val)
        t = torch.full((x0.shape[0],), t_val)
        x_t = diffusion.q_sample(x0, t, noise[t_val])
        if isinstance(model.router, RandomRouter):
            torch.manual_seed(seed * 7919 + t_val)  # the random router's own draw
        _, stats = model(x_t, t, y)
        m = stats.mask.sum(1)
        row = {"kept": m.float().mean().item(), "object share": {}}
        for name in PLACEMENTS:
            boundary = placement(name, obj, m, stats.mask, g)
            pred, _ = model(x_t, t, y, boundary=boundary)
            row[name] = (pred[:, :C] - noise[t_val]).square().mean().item()
            row["object share"][name] = (boundary & obj).sum().item() / boundary.sum().item()
        out[t_val] = row
    model.train()
    return out


def run(args) -> dict:
    factors = {k: v[0] for k, v in FACTORS.items()}
    recipe = study_recipe(factors, args.data, args.router, args.set)
    torch.set_num_threads(1)
    model, _, kept_log, seconds = train_variant(factors, args.data, args.steps, args.seed, router=args.router,
                                                recipe=recipe, log=lambda s: print(s, file=sys.stderr, flush=True))
    diffusion = make_diffusion(num_timesteps=recipe.diffusion.num_timesteps)
    result = swap(model, diffusion, validation(args.data, recipe, args.num, timesteps=SWAP_T), args.seed)
    cost = dcdit_cost(recipe.model)
    L = recipe.model.input_size**2
    M = torch.tensor([L / recipe.model.target_ratio], dtype=torch.float64)
    inner = 1 - float(cost(torch.zeros(1, dtype=torch.float64))) / float(cost(M))
    return {"name": args.name, "router": args.router, "data": args.data, "set": args.set, "steps": args.steps,
            "seed": args.seed, "seconds": round(seconds), "inner_share": inner, "swap": result}


def table(rows: list[dict]) -> str:
    """One line per run and t: ε-MSE of random, then each placement relative to random (negative = better)."""
    head = ("| setting | router | data | steps | seed | t | kept | ε-MSE random | "
            + " | ".join(p for p in PLACEMENTS if p != "random") + " | best density vs random |")
    lines = [head, "| " + " | ".join(["---"] * (head.count("|") - 1)) + " |"]
    for r in rows:
        for t, s in r["swap"].items():
            rel = {p: 100 * (s[p] / s["random"] - 1) for p in PLACEMENTS if p != "random"}
            best = min((f"{w}:1" for w in RATIOS[1:]), key=lambda p: rel[p])
            lines.append(f"| {r['name']} | {r['router']} | {r['data']} | {r['steps']} | {r['seed']} | {t} | {s['kept']:.0f} "
                         f"| {s['random']:.4f} | " + " | ".join(f"{v:+.2f}%" for v in rel.values()) + f" | {best} {rel[best]:+.2f}% |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["run", "table"])
    parser.add_argument("--name", default="toy")
    parser.add_argument("--router", default="random", choices=["random", "cosine", "predictive"])
    parser.add_argument("--data", default="shapes", choices=["shapes", "flat", "photos"])
    parser.add_argument("--set", action="append", default=[], help="recipe override on top of toy, e.g. model.input_size=32")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num", type=int, default=256, help="held-out images")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.command == "run":
        row = run(args)
        with open(args.results, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        print(table([json.loads(json.dumps(row))]))
        return
    print(table(load_rows(args.results)))


if __name__ == "__main__":
    main()
