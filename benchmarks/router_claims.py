"""The paper's four router claims, measured at toy scale on held-out images, two seeds.

    OMP_NUM_THREADS=1 python benchmarks/router_claims.py --data shapes --seeds 0 1
    OMP_NUM_THREADS=1 python benchmarks/router_claims.py --data photos --seeds 0 1   # needs dcdit[photos]
    python benchmarks/router_claims.py --table            # the closing table of every stored result

For each data set and seed, three models are trained with the same data order, optimiser and
loop as ``router_study.py`` (batch 32, AdamW 3e-4, uniform t):

- the ``toy`` recipe's DC-DiT (learned cosine router) for ``--steps`` steps;
- the same with ``model.router = "random"`` (paper §4.3) for the same steps;
- the FLOP-matched DiT/2 (``toy-dit``) for as many steps as give the DC-DiT's training FLOPs:
  the DC-DiT's forward cost at each sample's kept count (``dcdit_cli.flops.dcdit_cost``),
  summed over its training, divided by the DiT's forward cost per image and the batch.

Claims, on 128 held-out images (another seed for shapes, the held-out columns for photos):

(a) spatial: AUROC of the boundary probability p for object (shapes) or high-detail (photos)
    pixels against the rest, at t = 0, 50, 250 (target ≥ 0.85);
(b) temporal: kept(999) / kept(0) (target ≤ 0.5);
(c) learned vs random boundaries at matched compression: the ε-MSE on a fixed set of
    (x0, t, noise), t = 62, 187, …, 937; the random model is evaluated with random boundaries
    of exactly the learned router's count per image and t (target: learned below random);
(d) DC-DiT vs the FLOP-matched DiT at equal training FLOPs, same fixed set (target: DC-DiT at
    or below the DiT).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from dcdit_cli.diffusion.gaussian import make_diffusion
from dcdit_cli.models.flops import dcdit_cost, dit_forward_flops
from dcdit_cli.models import build_model
from dcdit_cli.config.recipe import load_recipe
from router_study import FACTORS, evaluate, train_variant, validation

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "router-claims.jsonl"
LOSS_T = tuple(int((k + 0.5) * 1000 / 8) for k in range(8))  # 62, 187, …, 937


def recipes(data: str, router: str = "cosine"):
    sets = [f"data.kind={data}", f"model.router={router}"]
    if data == "photos":
        sets += ["data.num_classes=4", "model.num_classes=4"]
    return load_recipe("toy", sets), load_recipe("toy-dit", sets[:1] + sets[2:])


@torch.no_grad()
def fixed_loss(model, diffusion, val, counts=None) -> float:
    """ε-MSE over the fixed (x0, t, noise) set; ``counts[t]`` (B,) forces random boundaries of that size."""
    model.eval()
    x0, y = val[0], val[1]
    g = torch.Generator().manual_seed(777)
    total = 0.0
    for t_val in LOSS_T:
        t = torch.full((x0.shape[0],), t_val)
        noise = torch.randn(x0.shape, generator=g)
        boundary = None
        if counts is not None:
            rank = torch.rand(x0.shape[0], x0.shape[2] * x0.shape[3], generator=g).argsort(1).argsort(1)
            boundary = rank < counts[t_val][:, None]
        pred, _ = model(diffusion.q_sample(x0, t, noise), t, y, boundary=boundary)
        total += (pred[:, : x0.shape[1]] - noise).square().mean().item()
    return total / len(LOSS_T)


@torch.no_grad()
def kept_counts(model, diffusion, val) -> dict:
    """The learned router's kept count per image at every t of the fixed set (same noise stream)."""
    model.eval()
    x0, y = val[0], val[1]
    g = torch.Generator().manual_seed(777)
    out = {}
    for t_val in LOSS_T:
        t = torch.full((x0.shape[0],), t_val)
        _, stats = model(diffusion.q_sample(x0, t, torch.randn(x0.shape, generator=g)), t, y)
        out[t_val] = stats.num_kept
    return out


def run(data: str, seed: int, steps: int, log) -> dict:
    factors = {k: v[0] for k, v in FACTORS.items()}
    toy, dit_recipe = recipes(data)
    diffusion = make_diffusion("", toy.diffusion.num_timesteps)
    val = validation(data, toy)
    study_data = data  # router_study names the project's data kinds the same way

    log(f"[{data} seed {seed}] DC-DiT, learned router")
    torch.manual_seed(seed)
    learned, _, kept_log, secs = train_variant(factors, study_data, steps, seed, model=build_model(toy.model), recipe=toy, log=log)
    ev = evaluate(learned, diffusion, val, swap=False)
    counts = kept_counts(learned, diffusion, val)
    loss_learned = fixed_loss(learned, diffusion, val)

    log(f"[{data} seed {seed}] DC-DiT, random boundaries")
    rand_recipe = recipes(data, "random")[0]
    torch.manual_seed(seed)
    rand_model, _, _, _ = train_variant(factors, study_data, steps, seed, router="random", model=build_model(rand_recipe.model),
                                        recipe=rand_recipe, log=log)
    loss_random = fixed_loss(rand_model, diffusion, val, counts)

    cost = dcdit_cost(toy.model)
    dcdit_flops = float(sum(cost(k.double()).sum() for k in kept_log))
    dit_fwd = dit_forward_flops(dit_recipe.model)
    dit_steps = max(1, round(dcdit_flops / (dit_fwd * 32)))
    log(f"[{data} seed {seed}] DiT/2, {dit_steps} steps for equal training FLOPs")
    torch.manual_seed(seed)
    dit, _, _, _ = train_variant(factors, study_data, dit_steps, seed, model=build_model(dit_recipe.model), recipe=dit_recipe,
                                 log=log)
    loss_dit = fixed_loss(dit, diffusion, val)
    return {"data": data, "seed": seed, "steps": steps, "dit_steps": dit_steps, "seconds": round(secs),
            "auroc": ev["auroc"], "kept": ev["kept"], "mse": ev["mse"],
            "loss_learned": loss_learned, "loss_random": loss_random, "loss_dit": loss_dit,
            "train_flops_dcdit": dcdit_flops, "train_flops_dit": dit_fwd * 32 * dit_steps}


def table(rows: list[dict]) -> str:
    lines = ["| data | seed | steps (DiT) | (a) AUROC t=0 / 50 / 250 | (b) kept 0 → 999, ratio | (c) ε-MSE learned / random "
             "| (d) ε-MSE DC-DiT / DiT | met (a b c d) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        au = [r["auroc"][k] for k in ("0", "50", "250")]
        k0, k999 = r["kept"]["0"], r["kept"]["999"]
        met = [min(au) >= 0.85, k999 <= 0.5 * k0, r["loss_learned"] < r["loss_random"], r["loss_learned"] <= r["loss_dit"]]
        lines.append(f"| {r['data']} | {r['seed']} | {r['steps']} ({r['dit_steps']}) | {' / '.join(f'{a:.2f}' for a in au)} "
                     f"| {k0:.0f} → {k999:.0f}, {k999 / k0:.2f} | {r['loss_learned']:.4f} / {r['loss_random']:.4f} "
                     f"| {r['loss_learned']:.4f} / {r['loss_dit']:.4f} | {' '.join('yes' if m else 'no' for m in met)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="shapes", choices=["shapes", "photos"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=0, help="DC-DiT steps (default: the toy recipe's train.max_steps)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--table", action="store_true", help="print the table of the stored results and exit")
    args = parser.parse_args()
    if not args.table:
        torch.set_num_threads(1)
        steps = args.steps or load_recipe("toy").train.max_steps
        for seed in args.seeds:
            row = run(args.data, seed, steps, lambda s: print(s, file=sys.stderr, flush=True))
            with open(args.results, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
    rows = [json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]
    print(table(rows))


if __name__ == "__main__":
    main()
