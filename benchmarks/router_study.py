"""Which design choice decides where the DC-DiT router puts its boundaries? A bisection on a CPU.

A throwaway single-file prototype (outside this repository) kept its boundaries on the
textured objects of 16×16 shapes (AUROC ≈ 0.9 at t ≤ 250); the project's DCDiT, trained on
the same kind of images, kept the flat background instead (AUROC ≈ 0.05 at t = 0). This script
builds the project's DCDiT (the ``toy`` recipe's size: D 96, depth 3, e 32, N 4, with the package's
default ``model.init = "dit"`` and ``model.norm_groups = 32``) and changes one
group of design choices at a time *inside the built model* (the package stays as it is), trains
it for a fixed number of steps, and scores the router on fixed held-out images.

Factors (first value = the project as shipped, second = the prototype's choice):

  init        dit | torch    DiT init (xavier linears, N(0, .02) label table and t-MLP) vs
                             PyTorch's defaults (label table N(0, 1)); identity / averaging /
                             zero / adaLN-zero inits are kept in both. Also torch-cond (only
                             the label table and t-MLP) and torch-linear (only the other linears)
  norm_eps    1e-6 | 1e-5    epsilon of the scaffold GroupNorms and every RMSNorm (authors: 1e-5)
  gn_groups   32 | 8         GroupNorm groups in the scaffold (paper: 32)
  enc_norm    rms | plain    encoder output RMSNorm with a learnable weight vs weightless ℓ2·√D
  inner_norm  on | off       RMSNorm(D) after the last DiT block (authors' code: on)
  final       adaln | conv   DiT final layer (LN + adaLN + Linear, per token) vs a zero-init 3×3 conv
  sigma       learned | eps  [ε | v] output and MSE + VB (DiT, paper) vs ε only and ε-MSE
  dec_norm    off | on       RMSNorm(e) at the decoder end (authors' code: on; neither model has it)

Data (``--data``): ``shapes`` (the project's set: anti-aliased shapes with 2.4–4.8 px, low
contrast textures, half of them on graded backgrounds), ``flat`` (the prototype's kind of
image drawn by the project's renderer: flat backgrounds, 1-pixel high-contrast stripes or
checkers) or ``photos`` (crops of real photographs, ground truth = high-detail pixels).

Training: batch 32, AdamW 3e-4 (no weight decay), grad clip 1, label dropout 0.1, uniform t, the
package's loss (``loss_for_recipe``: DiT's MSE + VB and λ = 0.03 times the ratio loss), fixed step
count, one thread; evaluation on the raw weights (no EMA).
Evaluation: 128 held-out images, fixed noise, at t = 0/50/250/500/999: AUROC of p for object
(or high-detail) pixels vs the rest, kept tokens, validation ε-MSE; and, to test whether
keeping background tokens is loss-optimal, the ε-MSE at t = 0/50/250 with the router's
boundaries replaced by the same number per image placed on the object first, on the
background first, or at random (rows stored before that test moved to ``router_swap.py``).

    OMP_NUM_THREADS=1 python benchmarks/router_study.py run --name project --data flat --steps 600
    OMP_NUM_THREADS=1 python benchmarks/router_study.py run --name proto --proto --data flat --steps 600
    OMP_NUM_THREADS=1 python benchmarks/router_study.py run --name final --set final=conv --data flat
    python benchmarks/router_study.py table                   # the markdown tables of docs/router-study.md
    python benchmarks/router_study.py figure                  # docs/figures/router-study.png

Results are appended as JSON lines to ``docs/router-study.jsonl`` (``--results``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from dcdit_cli.data.datasets import batch_indices, make_dataset
from dcdit_cli.diffusion.gaussian import make_diffusion
from dcdit_cli.models import RouterStats, build_model
from dcdit_cli.models.dit import zero_adaln
from dcdit_cli.config.recipe import load_recipe
from dcdit_cli.training.losses import loss_for_recipe
from router_science import auroc, auroc_at_equal_position

FACTORS = {  # name: (project as shipped, prototype)
    "init": ("dit", "torch"),
    "norm_eps": ("1e-6", "1e-5"),
    "gn_groups": ("32", "8"),
    "enc_norm": ("rms", "plain"),
    "inner_norm": ("on", "off"),
    "final": ("adaln", "conv"),
    "sigma": ("learned", "eps"),
    "dec_norm": ("off", "off"),
}
FAITHFUL = {  # the value the paper / the authors' code uses (docs/reference.md#paper-architecture, docs/reference.md#adm-diffusion)
    "init": "dit", "norm_eps": "1e-5", "gn_groups": "32", "enc_norm": "rms", "inner_norm": "on",
    "final": "adaln", "sigma": "learned", "dec_norm": "on",
}
TIMESTEPS = (0, 50, 250, 500, 999)
RESULTS = Path(__file__).resolve().parents[1] / "docs" / "router-study.jsonl"
WEIGHTS = Path("runs") / "router-study"  # final raw weights of every run, for ``maps``


#################################################################################
#                     The project's model with one factor changed               #
#################################################################################


class PlainRMS(nn.Module):
    """ℓ2-normalise each token and scale by √D: an RMSNorm without weight or epsilon."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) * math.sqrt(x.shape[-1])


class ConvFinal(nn.Module):
    """A zero-initialised 3×3 conv from the decoder's e channels to the output, on the grid."""

    def __init__(self, width: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(width, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        B, L, e = x.shape
        side = math.isqrt(L)
        grid = x.transpose(1, 2).reshape(B, e, side, side)  # (B, e, H, W)
        return self.conv(grid).flatten(2).transpose(1, 2)  # (B, L, out)


class NormedDecoder(nn.Module):
    """The project's decoder followed by RMSNorm(e) (the authors' code)."""

    def __init__(self, decoder: nn.Module, width: int, eps: float):
        super().__init__()
        self.decoder = decoder
        self.norm = nn.RMSNorm(width, eps=eps)

    def forward(self, z: torch.Tensor, c: torch.Tensor, side: int) -> torch.Tensor:
        return self.norm(self.decoder(z, c, side))  # (B, L, e)


def torch_default_init(model: nn.Module, part: str = "torch") -> None:
    """PyTorch's default init for the linears and embeddings, then the structural inits again.

    part: "torch" all of them; "torch-cond" only the label table and the timestep MLP (the
    condition c); "torch-linear" only the other linears.
    """
    cond = {id(m) for m in [*model.t_embedder.modules(), *model.y_embedder.modules()]}
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)) and (part == "torch" or (id(m) in cond) == (part == "torch-cond")):
            m.reset_parameters()
    zero_adaln(model)
    model.router.initialize_weights()
    nn.init.zeros_(model.residual_proj.weight)
    nn.init.zeros_(model.residual_proj.bias)


def build_variant(factors: dict, recipe, seed: int) -> nn.Module:
    """The toy DCDiT with ``factors`` applied; the same seed gives the same shared weights."""
    torch.manual_seed(seed)
    model = build_model(recipe.model)
    if factors["init"] != "dit":
        torch_default_init(model, factors["init"])
    eps = float(factors["norm_eps"])
    for m in model.modules():
        if isinstance(m, (nn.GroupNorm, nn.RMSNorm)):
            m.eps = eps
    if factors["gn_groups"] != "32":
        for m in model.modules():
            for name in ("norm1", "norm2"):
                gn = getattr(m, name, None)
                if isinstance(gn, nn.GroupNorm):
                    setattr(m, name, nn.GroupNorm(int(factors["gn_groups"]), gn.num_channels, eps=eps))
    if factors["enc_norm"] == "plain":
        model.encoder.norm = PlainRMS()
    if factors["inner_norm"] == "off":
        model.inner_norm = nn.Identity()
    if factors["final"] == "conv":
        model.final_layer = ConvFinal(recipe.model.scaffold_width, model.out_channels)
    if factors["dec_norm"] == "on":
        model.decoder = NormedDecoder(model.decoder, recipe.model.scaffold_width, eps)
    return model


def study_recipe(factors: dict, data: str, router: str = "cosine", extra: list[str] | tuple[str, ...] = ()):
    """The toy recipe with the package defaults (factors change them in the built model) and ``extra``
    recipe overrides (``section.key=value``) on top."""
    kind = "shapes" if data in ("shapes", "flat") else data
    sets = [f"model.learn_sigma={'false' if factors['sigma'] == 'eps' else 'true'}", f"model.router={router}",
            f"data.kind={kind}", "model.init=dit", "model.norm_groups=32"]  # the package defaults; factors change them
    if data == "photos":
        sets += ["data.num_classes=4", "model.num_classes=4"]
    return load_recipe("toy", [*sets, *extra])


#################################################################################
#                                      Data                                     #
#################################################################################


class FlatShapes:
    """The project's shapes with the prototype's image statistics: flat backgrounds and
    1-pixel, high-contrast stripes or checkers (axis-aligned, so they stay 1 pixel wide)."""

    def __init__(self, base):
        self.base = base
        self.num_classes, self.sample_shape = base.num_classes, base.sample_shape
        size = base.image_size

        def params(index, _orig=base._params):
            p = _orig(index)
            rng = torch.Generator().manual_seed(base.seed * 1_000_003 + int(index))
            p.update(bg_slope=0.0, angle=0.0, tex_angle=0.0 if torch.rand(1, generator=rng) < 0.5 else math.pi / 2,
                     texture=int(torch.randint(0, 2, (1,), generator=rng)),  # stripes or checker
                     tex_period=2.0 / size, tex_cell=1.0 / size, tex_amp=0.25 + 0.15 * float(torch.rand(1, generator=rng)))
            return p

        base._params = params

    def __len__(self):
        return len(self.base)

    def batch(self, indices, flip_bits=None):
        return self.base.batch(indices, flip_bits)


def study_dataset(data: str, recipe, seed: int, held_out: bool = False):
    """The training set, or with ``held_out`` another seed (shapes) or the held-out columns (photos)."""
    if data == "photos" and held_out:
        from dcdit_cli.data.photos import PhotosDataset

        return PhotosDataset(recipe.data.image_size, recipe.data.num_classes, seed=seed, split="val")
    ds = make_dataset(recipe.data, seed=seed)
    return FlatShapes(ds) if data == "flat" else ds


def validation(data: str, recipe, n: int = 128, seed: int = 12345, timesteps=TIMESTEPS):
    """Held-out images, labels, ground-truth masks (B, H, W) and fixed noise per t of ``timesteps``."""
    x, y, mask = study_dataset(data, recipe, seed, held_out=True).batch(torch.arange(n))
    g = torch.Generator().manual_seed(seed)
    noise = {t: torch.randn(x.shape, generator=g) for t in timesteps}
    return x, y, mask, noise


#################################################################################
#                               Train and evaluate                              #
#################################################################################


def eps_only_loss(diffusion, model, x0, t, y, noise):
    """The prototype's loss for the ``sigma = eps`` factor: ε-MSE of an ε-only model, no VB and no
    ratio term (the package's loss needs the learned-σ output; this is the study's one variant)."""
    eps, stats = model(diffusion.q_sample(x0, t, noise), t, y)
    mse = (eps - noise).square().mean(dim=(1, 2, 3))
    return mse.mean(), mse, stats


@torch.no_grad()
def evaluate(model, diffusion, val) -> dict:
    """AUROC of p vs the mask, kept tokens and ε-MSE per t (the swap test is ``router_swap.py``)."""
    model.eval()
    x0, y, mask, noise = val
    C = x0.shape[1]
    obj = mask.flatten(1)  # (B, L)
    out = {"auroc": {}, "auroc_equal_position": {}, "kept": {}, "mse": {}}
    for t_val in TIMESTEPS:
        t = torch.full((x0.shape[0],), t_val)
        x_t = diffusion.q_sample(x0, t, noise[t_val])
        pred, stats = model(x_t, t, y)
        out["auroc"][t_val] = auroc(stats.p, obj)
        out["auroc_equal_position"][t_val] = auroc_at_equal_position(stats.p, obj)  # place cannot help (router_science.py)
        out["kept"][t_val] = stats.num_kept.float().mean().item()
        out["mse"][t_val] = (pred[:, :C] - noise[t_val]).square().mean().item()
    model.train()
    return out


def train_variant(factors: dict, data: str, steps: int, seed: int, router: str = "cosine", trace_every: int = 100,
                  model=None, recipe=None, log=print, lr: float = 3e-4):
    """Trains one variant with fixed steps at AdamW ``lr``; returns (model, trace [(step, AUROC t=0,
    AUROC t=250)], training FLOP log)."""
    recipe = recipe or study_recipe(factors, data, router)
    model = model if model is not None else build_variant(factors, recipe, seed)
    dataset = study_dataset(data, recipe, seed)
    loss_fn = loss_for_recipe(recipe)  # the package's loss: DiT's MSE + VB and λ · ratio loss
    diffusion = loss_fn.diffusion
    learn_sigma = recipe.model.learn_sigma
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    trace_val = validation(data, recipe, n=64, seed=54321)
    trace, kept_log = [], []
    null_class = recipe.model.num_classes
    start = time.time()
    for step in range(steps):
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        idx, _ = batch_indices(seed, step, 0, 32, len(dataset))
        x0, y = dataset.batch(idx)[:2]
        t = torch.randint(0, diffusion.num_timesteps, (x0.shape[0],), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        y = torch.where(torch.rand(x0.shape[0], generator=g) < 0.1, torch.full_like(y, null_class), y)
        if router == "random":
            torch.manual_seed(seed * 1_000_003 + step)  # the random router's draws
        if learn_sigma:
            loss, logs, stats = loss_fn(model, x0, y, t=t, noise=noise, step=step)
            mse = logs["mse"]
        else:
            loss, mse, stats = eps_only_loss(diffusion, model, x0, t, y, noise)
        if isinstance(stats, RouterStats):
            kept_log.append(stats.num_kept)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if isinstance(stats, RouterStats) and (step + 1) % trace_every == 0:
            ev = evaluate_trace(model, diffusion, trace_val)
            trace.append((step + 1, *ev))
            log(f"step {step + 1}/{steps}  mse {mse.mean():.4f}  kept {stats.num_kept.float().mean():.1f}  "
                f"AUROC t=0 {ev[0]:.3f} t=250 {ev[1]:.3f}  {time.time() - start:.0f}s")
    return model, trace, kept_log, time.time() - start


@torch.no_grad()
def evaluate_trace(model, diffusion, val) -> tuple[float, float]:
    model.eval()
    x0, y, mask, noise = val
    res = []
    for t_val in (0, 250):
        t = torch.full((x0.shape[0],), t_val)
        _, stats = model(diffusion.q_sample(x0, t, noise[t_val]), t, y)
        res.append(auroc(stats.p, mask.flatten(1)))
    model.train()
    return tuple(res)


#################################################################################
#                                Report                                         #
#################################################################################


def changed(factors: dict) -> str:
    diff = [f"{k}={v}" for k, v in factors.items() if v != FACTORS[k][0]]
    return ", ".join(diff) or "none (as shipped)"


def table(rows: list[dict]) -> str:
    head = ("| run | changed from the project | data | steps | seed | AUROC t=0 / 50 / 250 / 500 / 999 "
            "| kept t=0 / 50 / 250 / 500 / 999 | val ε-MSE t=0 / 250 / mean |\n| --- | --- | --- | --- | --- | --- | --- | --- |")
    lines = [head]
    for r in rows:
        e = r["eval"]
        au = " / ".join(f"{e['auroc'][str(t)]:.2f}" for t in TIMESTEPS)
        kept = " / ".join(f"{e['kept'][str(t)]:.0f}" for t in TIMESTEPS)
        mse = e["mse"]
        mean = sum(mse.values()) / len(mse)
        lines.append(f"| {r['name']} | {changed(r['factors'])} | {r['data']} | {r['steps']} | {r['seed']} | {au} | {kept} "
                     f"| {mse['0']:.3f} / {mse['250']:.3f} / {mean:.3f} |")
    return "\n".join(lines)


def swap_table(rows: list[dict]) -> str:
    lines = ["| run | data | t | ε-MSE, router's boundaries | object first | background first | random |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        for t, s in r["eval"].get("swap", {}).items():  # rows stored before the swap test moved to router_swap.py
            lines.append(f"| {r['name']} (seed {r['seed']}) | {r['data']} | {t} | {s['router']:.4f} | {s['object']:.4f} "
                         f"| {s['background']:.4f} | {s['random']:.4f} |")
    return "\n".join(lines)


def load_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def figure(rows: list[dict], out: Path) -> None:
    """AUROC at t = 0 against the training step for every run (the ``trace``)."""
    from PIL import Image, ImageDraw

    from dcdit_cli.common.plots import Axes, font, nice_ticks

    img = Image.new("RGB", (980, 520), "white")
    draw = ImageDraw.Draw(img)
    steps = max((r["trace"][-1][0] for r in rows if r["trace"]), default=1)
    xt = nice_ticks(0.0, float(steps))
    ax = Axes(img, (90, 50, 600, 450), (0, xt[-1]), (0.0, 1.0), font(13))
    ax.frame(xt, [0, 0.25, 0.5, 0.75, 1.0], "training step", "AUROC of p, t = 0", "router study: AUROC at t = 0 while training")
    palette = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
               (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
    for k, r in enumerate(rows):
        colour = palette[k % len(palette)]
        ax.line([s for s, _, _ in r["trace"]], [a for _, a, _ in r["trace"]], colour, 2)
        draw.text((620, 50 + 17 * k), f"{r['name']} s{r['seed']} ({r['data']})", fill=colour, font=font(12))
    img.save(out, format="PNG")


@torch.no_grad()
def noise_probe(name: str, model, diffusion, val) -> None:
    """Is p at t = 0 driven by the noise? AUROC and p on object / rest with the noise, and with it removed."""
    x0, y, mask, noise = val
    t = torch.zeros(x0.shape[0], dtype=torch.long)
    obj = mask.flatten(1)
    for label, eps in (("with noise", noise[0]), ("noise removed", torch.zeros_like(x0))):
        _, stats = model(diffusion.q_sample(x0, t, eps), t, y)
        print(f"{name}: t = 0, {label}: AUROC {auroc(stats.p, obj):.3f}, mean p object {stats.p[obj].mean():.3f}, "
              f"rest {stats.p[~obj].mean():.3f}, kept {stats.num_kept.float().mean():.1f}")


@torch.no_grad()
def maps(names: list[str], data: str, seed: int, out: Path, n: int = 6) -> None:
    """Held-out images, their ground truth and p at t = 0 and 250 for each stored run (rows)."""
    import numpy as np
    from PIL import Image, ImageDraw

    from dcdit_cli.common.plots import font, viridis

    from safetensors import safe_open

    cell, pad = 64, 4
    panels, first = [], None
    for name in names:
        path = WEIGHTS / f"{name}-{data}-{seed}.safetensors"
        with safe_open(str(path), "pt") as f:
            factors = json.loads(f.metadata()["factors"])
        recipe = study_recipe(factors, data)
        model = build_variant(factors, recipe, seed)
        model.load_state_dict(load_file(str(path)))
        model.eval()
        x0, y, mask, noise = validation(data, recipe, n=n)
        diffusion = make_diffusion(num_timesteps=recipe.diffusion.num_timesteps)
        ps = []
        for t_val in (0, 250):
            t = torch.full((n,), t_val)
            _, stats = model(diffusion.q_sample(x0, t, noise[t_val]), t, y)
            ps.append(stats.p.view(n, x0.shape[-2], x0.shape[-1]).numpy())
        noise_probe(name, model, diffusion, validation(data, recipe))
        first = (x0, mask)
        panels.append((name, ps))
    x0, mask = first
    W = 140 + n * (cell + pad)
    H = 30 + (2 + 2 * len(panels)) * (cell + pad)
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    big = lambda a: Image.fromarray(a).resize((cell, cell), Image.NEAREST)
    labels = [("image", [((x0[i].permute(1, 2, 0).numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8) for i in range(n)]),
              ("ground truth", [np.repeat(mask[i].numpy()[..., None] * 255, 3, -1).astype(np.uint8) for i in range(n)])]
    for name, ps in panels:
        for t_val, p in zip((0, 250), ps):
            labels.append((f"{name}, p t={t_val}", [viridis(p[i]) for i in range(n)]))
    for r, (label, tiles) in enumerate(labels):
        y0 = 30 + r * (cell + pad)
        draw.text((4, y0 + cell // 2 - 7), label, fill=(0, 0, 0), font=font(11))
        for i, tile in enumerate(tiles):
            img.paste(big(tile), (140 + i * (cell + pad), y0))
    draw.text((4, 6), f"router p on held-out {data} images (viridis: 0 dark, 1 yellow), seed {seed}", fill=(0, 0, 0), font=font(13))
    img.save(out, format="PNG")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["run", "table", "figure", "maps"])
    parser.add_argument("--runs", nargs="+", default=[], help="maps: stored run names, one row pair each")
    parser.add_argument("--name", default="project")
    parser.add_argument("--proto", action="store_true", help="start from the prototype's value of every factor")
    parser.add_argument("--set", default="", help="factor=value,... applied after --proto")
    parser.add_argument("--data", default="flat", choices=["flat", "shapes", "photos"])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--out", type=Path, default=RESULTS.parent / "figures" / "router-study.png")
    args = parser.parse_args()
    if args.command == "table":
        rows = load_rows(args.results)
        print(table(rows) + "\n\n" + swap_table(rows))
        return
    if args.command == "maps":
        maps(args.runs, args.data, args.seed, args.out)
        print(f"wrote {args.out}")
        return
    if args.command == "figure":
        figure(load_rows(args.results), args.out)
        print(f"wrote {args.out}")
        return
    factors = {k: v[1] if args.proto else v[0] for k, v in FACTORS.items()}
    for item in filter(None, args.set.split(",")):
        key, value = item.split("=")
        if key not in FACTORS:
            raise SystemExit(f"unknown factor {key!r}: one of {', '.join(FACTORS)}")
        factors[key] = value
    torch.set_num_threads(1)
    model, trace, _, seconds = train_variant(factors, args.data, args.steps, args.seed,
                                             log=lambda s: print(s, file=sys.stderr, flush=True))
    recipe = study_recipe(factors, args.data)
    ev = evaluate(model, make_diffusion(num_timesteps=recipe.diffusion.num_timesteps), validation(args.data, recipe))
    row = {"name": args.name, "factors": factors, "data": args.data, "steps": args.steps, "seed": args.seed,
           "seconds": round(seconds), "trace": trace, "eval": json.loads(json.dumps(ev))}
    with open(args.results, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    WEIGHTS.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), WEIGHTS / f"{args.name}-{args.data}-{args.seed}.safetensors",
              metadata={"factors": json.dumps(factors)})
    print(table([row]) + "\n\n" + swap_table([row]))


if __name__ == "__main__":
    main()
