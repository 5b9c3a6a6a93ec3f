"""The paper's four router claims, measured at small scale on held-out images, for both routers.

    OMP_NUM_THREADS=1 python benchmarks/router_claims.py --data shapes --seeds 0 1
    OMP_NUM_THREADS=1 python benchmarks/router_claims.py --data photos --seeds 0 1   # needs dcdit[photos]
    OMP_NUM_THREADS=1 python benchmarks/router_claims.py --name s32 --routers cosine predictive \
        --set model.input_size=32 --set data.image_size=32 --set model.norm_groups=8 --steps 800
    OMP_NUM_THREADS=1 python benchmarks/router_claims.py --name demo --routers cosine predictive \
        --set data.shapes=fixed --set model.norm_groups=8 --lr 0.003 --steps 1200   # the README demo's setting
    python benchmarks/router_claims.py --table            # the closing table of every stored result
    python benchmarks/router_claims.py --figure docs/figures/router-p-hist.png   # p's histograms

For each data set and seed the same data order, optimiser and loop as ``router_study.py`` (batch 32,
AdamW at ``--lr``, 3e-4 unless given, uniform t, ``loss_for_recipe``) trains, on the ``toy`` recipe
with ``--set`` on top:

- one DC-DiT per router in ``--routers``: the paper's ``cosine`` router, or the authors'
  ``predictive`` router (with ``model.force_endpoints = true``, as their release) for ``--steps``;
- the same DC-DiT with ``model.router = "random"`` (paper §4.3) for the same steps;
- the DiT/2 (``toy-dit`` with the same ``--set``, then ``--dit-set``) for as many steps as give the
  first learned router's training FLOPs: the DC-DiT's forward cost at each sample's kept count
  (``dcdit_cli.models.flops.dcdit_cost``), summed over its training, divided by the DiT's forward cost per
  image and the batch.

Claims, on 128 held-out images (another seed for shapes, the held-out columns for photos):

(a) spatial: AUROC of the boundary probability p for object (shapes) or high-detail (photos)
    pixels against the rest, at t = 0, 50, 250 (target ≥ 0.85 and ≥ 0.2 above the t = 999
    AUROC: at pure noise only position can inform p, so that is the positional baseline);
(b) temporal: kept(999) / kept(0) (target ≤ 0.5);
(c) learned vs random boundaries at matched compression: the ε-MSE on a fixed set of
    (x0, t, noise), t = 62, 187, …, 937; the random model is evaluated with random boundaries
    of exactly the learned router's count per image and t (target: learned below random);
(d) DC-DiT vs the FLOP-matched DiT at equal training FLOPs, same fixed set (target: DC-DiT at
    or below the DiT).

Where objects sit at the same places in every image (``data.shapes = "fixed"``) a router that keeps
the centre meets (a) without looking at the image; the table also gives the AUROC at equal position
(``router_science.auroc_at_equal_position``: p compared between images at the same pixel, 0.5 for
place alone) for the rows that stored it.

Also p's histogram at t = 0 and 250 (H-Net users report p collapsing to 0.5): the share of
tokens within 0.05 of 0.5 and the 5–95% range.
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


def recipes(data: str, router: str, sets: list[str], dit_sets: list[str]):
    """(DC-DiT recipe, DiT recipe) for a data set, a router and the setting's overrides."""
    data_sets = [f"data.kind={data}"] + (["data.num_classes=4", "model.num_classes=4"] if data == "photos" else [])
    router_sets = [f"model.router={router}"] + (["model.force_endpoints=true"] if router == "predictive" else [])
    return (load_recipe("toy", [*data_sets, *router_sets, *sets]),
            load_recipe("toy-dit", [*data_sets, *sets, *dit_sets]))


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


HIST_T = (0, 250)


@torch.no_grad()
def p_histogram(model, diffusion, val) -> dict:
    """{t: {"hist": 20-bin counts of p on [0, 1], "near_half": share within 0.05 of 0.5, "p5", "p95"}}."""
    model.eval()
    x0, y, _, noise = val
    out = {}
    for t_val in HIST_T:
        t = torch.full((x0.shape[0],), t_val)
        _, stats = model(diffusion.q_sample(x0, t, noise[t_val]), t, y)
        p = stats.p.flatten().double()
        q = torch.quantile(p, torch.tensor([0.05, 0.95], dtype=torch.float64))
        out[t_val] = {"hist": torch.histc(p, bins=20, min=0.0, max=1.0).tolist(),
                      "near_half": ((p - 0.5).abs() < 0.05).double().mean().item(), "p5": q[0].item(), "p95": q[1].item()}
    model.train()
    return out


def run(data: str, seed: int, steps: int, routers: list[str], sets: list[str], dit_sets: list[str], name: str, log,
        lr: float = 3e-4) -> list[dict]:
    """One row per learned router; the random-boundary model and the DiT are trained once and shared."""
    factors = {k: v[0] for k, v in FACTORS.items()}
    rand_recipe, dit_recipe = recipes(data, "random", sets, dit_sets)
    diffusion = make_diffusion(num_timesteps=rand_recipe.diffusion.num_timesteps)
    val = validation(data, rand_recipe)  # the data section is the same for every router
    learned_rows, dcdit_flops = [], None
    for router in routers:
        recipe = recipes(data, router, sets, dit_sets)[0]
        log(f"[{name} {data} seed {seed}] DC-DiT, {router} router")
        torch.manual_seed(seed)
        learned, _, kept_log, secs = train_variant(factors, data, steps, seed, router=router, model=build_model(recipe.model),
                                                   recipe=recipe, log=log, lr=lr)
        if dcdit_flops is None:  # the DiT matches the first router's training FLOPs
            cost = dcdit_cost(recipe.model)
            dcdit_flops = float(sum(cost(k.double()).sum() for k in kept_log))
        learned_rows.append({"name": name, "set": sets, "router": router, "data": data, "seed": seed, "steps": steps, "lr": lr,
                             "seconds": round(secs), **evaluate(learned, diffusion, val),
                             "p_hist": p_histogram(learned, diffusion, val),
                             "counts": kept_counts(learned, diffusion, val), "loss_learned": fixed_loss(learned, diffusion, val)})

    log(f"[{name} {data} seed {seed}] DC-DiT, random boundaries")
    torch.manual_seed(seed)
    rand_model, _, _, _ = train_variant(factors, data, steps, seed, router="random", model=build_model(rand_recipe.model),
                                        recipe=rand_recipe, log=log, lr=lr)
    dit_fwd = dit_forward_flops(dit_recipe.model)
    dit_steps = max(1, round(dcdit_flops / (dit_fwd * 32)))
    log(f"[{name} {data} seed {seed}] DiT/2, {dit_steps} steps for equal training FLOPs")
    torch.manual_seed(seed)
    dit, _, _, _ = train_variant(factors, data, dit_steps, seed, model=build_model(dit_recipe.model), recipe=dit_recipe, log=log,
                                 lr=lr)
    loss_dit = fixed_loss(dit, diffusion, val)
    for row in learned_rows:
        counts = row.pop("counts")
        row.update(loss_random=fixed_loss(rand_model, diffusion, val, counts), loss_dit=loss_dit, dit_steps=dit_steps,
                   train_flops_dcdit=dcdit_flops, train_flops_dit=dit_fwd * 32 * dit_steps)
    return learned_rows


def met(r: dict) -> list[bool]:
    """Targets (a) to (d); rows stored before the predictive router was added count as cosine."""
    au = [r["auroc"][k] for k in ("0", "50", "250")]
    return [min(au) >= 0.85 and min(au) >= r["auroc"]["999"] + 0.2, r["kept"]["999"] <= 0.5 * r["kept"]["0"],
            r["loss_learned"] < r["loss_random"], r["loss_learned"] <= r["loss_dit"]]


def table(rows: list[dict]) -> str:
    lines = ["| setting | router | data | seed | steps (DiT) | (a) AUROC t=0 / 50 / 250 (t=999) | (b) kept 0 → 999, ratio "
             "| (c) ε-MSE learned / random | (d) ε-MSE DC-DiT / DiT | p within 0.05 of ½, t=0 / 250 | met (a b c d) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        au = " / ".join(f"{r['auroc'][k]:.2f}" for k in ("0", "50", "250")) + f" ({r['auroc']['999']:.2f})"
        if "auroc_equal_position" in r:  # rows stored since the reading exists
            eq = r["auroc_equal_position"]
            au += "; at equal position " + " / ".join(f"{eq[k]:.2f}" for k in ("0", "50", "250")) + f" ({eq['999']:.2f})"
        k0, k999 = r["kept"]["0"], r["kept"]["999"]
        hist = r.get("p_hist")
        near = f"{100 * hist['0']['near_half']:.0f}% / {100 * hist['250']['near_half']:.0f}%" if hist else "not stored"
        steps = f"{r['steps']} ({r['dit_steps']})" + (f", lr {r['lr']:g}" if "lr" in r else "")
        lines.append(f"| {r.get('name', 'toy')} | {r.get('router', 'cosine')} | {r['data']} | {r['seed']} | {steps} "
                     f"| {au} | {k0:.0f} → {k999:.0f}, {k999 / k0:.2f} "
                     f"| {r['loss_learned']:.4f} / {r['loss_random']:.4f} | {r['loss_learned']:.4f} / {r['loss_dit']:.4f} "
                     f"| {near} | {' '.join('yes' if m else 'no' for m in met(r))} |")
    return "\n".join(lines)


def figure(rows: list[dict], out: Path) -> None:
    """p's histogram at t = 0 and 250 for every stored row that has one (one panel per row)."""
    from PIL import Image, ImageDraw

    from dcdit_cli.common.plots import Axes, font

    rows = [r for r in rows if r.get("p_hist")]
    cols = 4
    W, H = 300, 220
    img = Image.new("RGB", (cols * W, 40 + H * ((len(rows) + cols - 1) // cols)), "white")
    ImageDraw.Draw(img).text((10, 10), "router p on held-out images: share of tokens per bin, t = 0 (blue) and t = 250 (orange)",
                             fill=(0, 0, 0), font=font(14))
    for i, r in enumerate(rows):
        x0, y0 = (i % cols) * W, 40 + (i // cols) * H
        peak = max(max(h["hist"]) / sum(h["hist"]) for h in r["p_hist"].values())
        ax = Axes(img, (x0 + 62, y0 + 30, x0 + W - 15, y0 + H - 40), (0.0, 1.0), (0.0, peak * 1.05), font(11))
        ax.frame([0, 0.5, 1.0], [0, round(peak, 2)], "p", "share",
                 f"{r.get('name', 'toy')} {r.get('router', 'cosine')} {r['data']} s{r['seed']}")
        for t_key, colour in (("0", (31, 119, 180)), ("250", (255, 127, 14))):
            h = r["p_hist"][t_key]["hist"]
            total = sum(h)
            ax.line([(k + 0.5) / 20 for k in range(20)], [c / total for c in h], colour, 2)
    img.save(out, format="PNG")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="shapes", choices=["shapes", "photos"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=0, help="DC-DiT steps (default: the toy recipe's train.max_steps)")
    parser.add_argument("--routers", nargs="+", default=["cosine"], choices=["cosine", "predictive"])
    parser.add_argument("--set", action="append", default=[], help="recipe override for every model, e.g. model.input_size=32")
    parser.add_argument("--dit-set", action="append", default=[], help="recipe override for the DiT only, e.g. model.depth=12")
    parser.add_argument("--name", default="toy", help="the setting's name in the table")
    parser.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate of every model (the study's 3e-4)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--table", action="store_true", help="print the table of the stored results and exit")
    parser.add_argument("--figure", type=Path, default=None, help="draw p's histograms of the stored results to this PNG and exit")
    args = parser.parse_args()
    if args.lr <= 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    rows = [json.loads(line) for line in args.results.read_text().splitlines() if line.strip()] if args.results.is_file() else []
    if args.figure:
        figure(rows, args.figure)
        print(f"wrote {args.figure}")
        return
    if not args.table:
        torch.set_num_threads(1)
        steps = args.steps or load_recipe("toy").train.max_steps
        for seed in args.seeds:
            new = run(args.data, seed, steps, args.routers, args.set, args.dit_set, args.name,
                      lambda s: print(s, file=sys.stderr, flush=True), lr=args.lr)
            with open(args.results, "a", encoding="utf-8") as f:
                f.writelines(json.dumps(row) + "\n" for row in new)
            rows += json.loads(json.dumps(new))
    print(table(rows))


if __name__ == "__main__":
    main()
