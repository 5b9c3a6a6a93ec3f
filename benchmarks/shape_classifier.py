"""Are a model's samples recognisable? A small shape classifier, trained on the real shapes set,
labels class-conditional samples; the share it labels with the class they were drawn for is the
recognition rate (chance: 1 / number of classes).

The classifier (three conv layers, global pooling, a linear head) trains on shapes of another
seed than any diffusion run uses (seed 777) and is scored on held-out shapes (seed 4242), so it
knows the classes, not the training images. It is a benchmark instrument, not part of the model;
It learns the shapes set the run trained on (``data.shapes``: varied, or fixed for the ``demo``
recipe); its weights are cached in ``runs/shape-classifier-<size>-<classes>[-fixed][-robust].safetensors``.

The ``robust`` classifier (the default) also sees each training shape degraded the way a young
model's samples are: blurred (σ up to 1 px) and with pixel noise (σ up to 0.3 of the [−1, 1]
range), so it judges the outline and not the rendering: the ``plain`` one (earlier sessions' figures,
``--classifier plain``) labels 72 % of real shapes with noise σ 0.1 and 26 % after a 1 px Gaussian
blur (``--robustness`` prints both).

    python benchmarks/shape_classifier.py --ckpt runs/demo                # 96 cfg-4 samples, 100 steps
    python benchmarks/shape_classifier.py --ckpt runs/toy
    python benchmarks/shape_classifier.py --ckpt runs/toy --num 192 --cfg-scale 4 --steps 100
    python benchmarks/shape_classifier.py --ckpt runs/toy --scheduler ddim
    python benchmarks/shape_classifier.py --ckpt runs/toy --from-real   # which noise level loses the shape?

``--from-real`` noises real held-out shapes to t0 = 200, 400, 600, 800 and 999 and denoises them from
there with the same guidance (their own class): a model that keeps the shape from t0 on is recognised
as often as the real images (SDEdit's test of a denoiser). It reports three readings per t0: the
model's one-step prediction of x_0, the DDPM chain (the samples' sampler) and the DDIM chain, so a
lost shape is traced to the denoiser or to the chain.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from dcdit_cli.training.checkpoint import load_weights
from dcdit_cli.data.datasets import SHAPE_CLASSES, ShapesDataset
from dcdit_cli.diffusion.gaussian import make_diffusion
from dcdit_cli.diffusion.schedulers import METHODS
from dcdit_cli.sampling.sampler import KeptLog, SampleOptions, make_model_fn, sample_batch, save_grid, to_uint8

TRAIN_SEED, TEST_SEED, DENOISE_SEED = 777, 4242, 4243


class ShapeClassifier(nn.Module):
    """(B, 3, H, W) in [-1, 1] → class logits (B, K)."""

    def __init__(self, num_classes: int, width: int = 48):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.GroupNorm(8, width), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.GroupNorm(8, 2 * width), nn.SiLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.GroupNorm(8, 2 * width), nn.SiLU(),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model.eval()(x).argmax(1) == y).float().mean().item()


def blurred(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x (B, C, H, W) blurred by a Gaussian of σ (B,) pixels each (σ = 0: unchanged), edges replicated."""
    B, C, H, W = x.shape
    offsets = torch.arange(-2, 3, dtype=x.dtype)
    k = torch.exp(-offsets.square() / (2 * sigma.clamp_min(1e-3)[:, None] ** 2))  # (B, 5)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (B·C, 5)
    y = F.pad(x.reshape(1, B * C, H, W), (2, 2, 2, 2), mode="replicate")
    y = F.conv2d(y, k[:, None, :, None], groups=B * C)  # rows
    return F.conv2d(y, k[:, None, None, :], groups=B * C).view(B, C, H, W)  # columns


def degraded(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The robust classifier's training view: each image blurred (σ ~ U(0, 1) px) and noised (σ ~ U(0, 0.3))."""
    B = x.shape[0]
    x = blurred(x, torch.rand(B, generator=g))
    return (x + 0.3 * torch.rand(B, 1, 1, 1, generator=g) * torch.randn(x.shape, generator=g)).clamp(-1, 1)


def trained_classifier(image_size: int, num_classes: int, steps: int = 1500, batch: int = 128,
                       cache: Path = Path("runs"), robust: bool = True, variety: str = "varied") -> tuple[nn.Module, float]:
    """The cached classifier for this size and shapes set (``data.shapes``; trained on first use) and
    its held-out accuracy on clean shapes of that set."""
    name = f"{image_size}-{num_classes}{'' if variety == 'varied' else '-' + variety}{'-robust' if robust else ''}"
    path = cache / f"shape-classifier-{name}.safetensors"
    model = ShapeClassifier(num_classes)
    test = ShapesDataset(image_size, num_classes, seed=TEST_SEED, variety=variety)
    x_test, y_test, _ = test.batch(torch.arange(1024))
    if path.is_file():
        model.load_state_dict(load_file(str(path)))
        return model, accuracy(model, x_test, y_test)
    torch.manual_seed(0)
    data = ShapesDataset(image_size, num_classes, seed=TRAIN_SEED, variety=variety)
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    for step in range(steps):
        x, y, _ = data.batch(torch.arange(step * batch, (step + 1) * batch))
        x = degraded(x, g) if robust else x
        loss = F.cross_entropy(model.train()(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    cache.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), str(path))
    return model, accuracy(model, x_test, y_test)


def recognition(ckpt: Path, num: int = 96, cfg_scale: float = 4.0, steps: int = 100, seed: int = 0,
                grid: Path | None = None, cache: Path = Path("runs"), robust: bool = True, method: str | None = None) -> dict:
    """Samples ``num`` images, the classes cycling, and the classifier's verdict on them; ``grid``
    saves the samples, one column per class; ``cache``: where the classifier's weights are kept;
    ``method``: the sampler (``dcdit sample --scheduler``; None: the recipe's)."""
    model, recipe, _ = load_weights(ckpt)
    if recipe.data.kind != "shapes":
        raise SystemExit(f"{ckpt} was trained on data.kind = {recipe.data.kind!r}: the classifier knows the shapes set only")
    K = recipe.model.num_classes
    classifier, real_acc = trained_classifier(recipe.data.image_size, K, cache=cache, robust=robust, variety=recipe.data.shapes)
    opts = SampleOptions.from_recipe(recipe, cfg_scale=cfg_scale, steps=steps, seed=seed, method=method)
    start = time.perf_counter()
    x0, y, _ = sample_batch(model, recipe, list(range(num)), opts, classes=list(range(K)))
    seconds = time.perf_counter() - start
    with torch.no_grad():
        pred = classifier.eval()(x0.clamp(-1, 1)).argmax(1)
    per_class = {c: (pred[y == c] == c).float().mean().item() for c in range(K)}
    if grid is not None:
        save_grid(to_uint8(x0), grid, nrow=K)
    return {"ckpt": str(ckpt), "classifier": "robust" if robust else "plain", "num": num, "cfg_scale": cfg_scale,
            "steps": steps, "method": opts.method, "real_accuracy": real_acc, "recognised": (pred == y).float().mean().item(),
            "per_class": per_class, "chance": 1 / K, "sampling_seconds": round(seconds, 1)}


def held_out_shapes(image_size: int, num_classes: int, num: int, variety: str = "varied"):
    """(x (num, 3, H, W), labels (num,)): real shapes of the set ``variety`` (``data.shapes``), of a
    seed no run trains on (DENOISE_SEED)."""
    x, y, _ = ShapesDataset(image_size, num_classes, seed=DENOISE_SEED, variety=variety).batch(torch.arange(num))
    return x, y


def denoised_recognition(ckpt: Path, starts=(200, 400, 600, 800, 999), num: int = 96, cfg_scale: float = 4.0,
                         steps: int = 100, seed: int = 0, cache: Path = Path("runs"), robust: bool = True,
                         grid: Path | None = None, columns: int = 12) -> dict:
    """Real held-out shapes noised to each start t0, then denoised towards their own class three ways
    → the share the classifier recognises after each:

    - ``one_step_from_t0``: the model's own prediction of x_0 from x_t0 (one call, no chain);
    - ``recognised_from_t0``: the DDPM chain from t0 (``steps`` spaced steps over the whole chain, the
      learned variance, fresh noise at each step: the sampler the samples use);
    - ``ddim_from_t0``: the deterministic DDIM chain over the same steps (no noise added).

    If the one-step prediction keeps the shape and the chains lose it, the chain is to blame; if
    the one-step prediction already loses it, the denoiser is. ``grid`` saves the first ``columns``
    shapes: the real row, then per t0 the rows x_t0, one-step x_0, DDPM chain, DDIM chain."""
    model, recipe, _ = load_weights(ckpt)
    d = recipe.data
    classifier, real_acc = trained_classifier(d.image_size, recipe.model.num_classes, cache=cache, robust=robust, variety=d.shapes)
    x0, y = held_out_shapes(d.image_size, recipe.model.num_classes, num, d.shapes)
    model_fn = make_model_fn(model, y, SampleOptions.from_recipe(recipe, cfg_scale=cfg_scale, steps=steps, seed=seed), KeptLog())
    diffusion = make_diffusion(respacing=str(steps), num_timesteps=recipe.diffusion.num_timesteps, clip_denoised=True)
    spaced = diffusion.timestep_map  # (steps,) original t of each spaced step
    g = torch.Generator().manual_seed(seed)
    readings = {"one_step_from_t0": {}, "recognised_from_t0": {}, "ddim_from_t0": {}}
    columns = min(columns, num)
    rows = [x0[:columns]]
    for t0 in starts:
        k0 = int((spaced - t0).abs().argmin())  # the spaced step nearest to t0
        k = torch.full((num,), k0)
        x = diffusion.q_sample(x0, k, torch.randn(x0.shape, generator=g))
        with torch.no_grad():
            one_step = diffusion.p_mean_variance(diffusion._call(model_fn, x, k), x, k)["pred_xstart"]
            ddpm = ddim = x
            for step in range(k0, -1, -1):
                k = torch.full((num,), step)
                ddpm = diffusion.p_sample(model_fn, ddpm, k, generator=g)
                ddim = diffusion.ddim_sample(model_fn, ddim, k)
        for name, image in zip(readings, (one_step, ddpm, ddim)):
            readings[name][int(spaced[k0])] = accuracy(classifier, image.clamp(-1, 1), y)
        rows += [image[:columns].clamp(-1, 1) for image in (x, one_step, ddpm, ddim)]
    if grid is not None:
        save_grid(to_uint8(torch.cat(rows)), grid, nrow=columns)
    return {"ckpt": str(ckpt), "classifier": "robust" if robust else "plain", "num": num, "cfg_scale": cfg_scale,
            "steps": steps, "real_accuracy": real_acc, **readings}


def noise_error(ckpt: Path, ts=(50, 200, 400, 600, 800), num: int = 96, seed: int = 0) -> dict:
    """The model's ε-MSE on real held-out shapes noised to each t, given their own class: with its
    own boundaries (``router``) and, for a DC-DiT, with every token kept (``all_kept``). If keeping
    every token barely lowers the error, the kept count is not what limits the denoiser."""
    model, recipe, _ = load_weights(ckpt)
    x0, y = held_out_shapes(recipe.data.image_size, recipe.model.num_classes, num, recipe.data.shapes)
    diffusion = make_diffusion(respacing="", num_timesteps=recipe.diffusion.num_timesteps)
    side = recipe.model.input_size // recipe.model.patch_size
    forced = {"router": None}
    if recipe.model.kind == "dcdit":
        forced["all_kept"] = torch.ones(num, side * side, dtype=torch.bool)
    g = torch.Generator().manual_seed(seed)
    errors = {name: {} for name in forced}
    for t in ts:
        tt = torch.full((num,), t)
        noise = torch.randn(x0.shape, generator=g)
        x = diffusion.q_sample(x0, tt, noise)
        with torch.no_grad():
            for name, boundary in forced.items():
                out = model(x, tt, y) if boundary is None else model(x, tt, y, boundary=boundary)
                errors[name][t] = (out[0][:, : x0.shape[1]] - noise).square().mean().item()
    return {"ckpt": str(ckpt), "num": num, "eps_mse": errors}


def robustness(image_size: int = 16, num_classes: int = 6, robust: bool = True, num: int = 512) -> dict:
    """The classifier's accuracy on held-out real shapes, clean, with pixel noise and blurred: how much
    of a sample's rendering it needs before it sees the shape."""
    classifier, _ = trained_classifier(image_size, num_classes, robust=robust)
    x, y = held_out_shapes(image_size, num_classes, num)
    g = torch.Generator().manual_seed(0)
    views = {"clean": x, **{f"noise {s}": (x + s * torch.randn(x.shape, generator=g)).clamp(-1, 1) for s in (0.1, 0.2, 0.3)},
             **{f"blur {s} px": blurred(x, torch.full((num,), s)) for s in (0.5, 1.0)}}
    return {name: accuracy(classifier, v, y) for name, v in views.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, help="a run directory or dcdit weights trained on shapes")
    parser.add_argument("--num", type=int, default=96)
    parser.add_argument("--cfg-scale", type=float, default=4.0)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scheduler", dest="method", default=None, choices=METHODS,
                        help="the sampler, as dcdit sample --scheduler (default: the recipe's)")
    parser.add_argument("--grid", type=Path, default=None,
                        help="also save the samples here (PNG, one column per class); with --from-real, the denoising rows")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--from-real", action="store_true", help="denoise noised real shapes instead of sampling")
    parser.add_argument("--classifier", choices=("robust", "plain"), default="robust",
                        help="robust: trained on blurred and noised shapes too (default); plain: clean shapes only")
    parser.add_argument("--robustness", action="store_true", help="the classifier's accuracy on degraded real shapes")
    args = parser.parse_args()
    robust = args.classifier == "robust"
    if args.robustness:
        r = robustness(robust=robust)
        print(json.dumps(r) if args.json else f"{args.classifier} classifier on held-out real shapes: " + ", ".join(
            f"{name} {100 * a:.1f}%" for name, a in r.items()))
        return
    if args.ckpt is None:
        parser.error("--ckpt is required (except with --robustness)")
    if args.from_real:
        if args.method is not None:
            parser.error("--scheduler does not apply to --from-real, which reports the DDPM and the DDIM chain")
        r = denoised_recognition(args.ckpt, num=args.num, cfg_scale=args.cfg_scale, steps=args.steps, seed=args.seed,
                                 robust=robust, grid=args.grid)
        if args.json:
            print(json.dumps(r))
            return
        print(f"recognised after denoising real shapes from t0 (cfg {args.cfg_scale:g}; real shapes {100 * r['real_accuracy']:.1f}%):")
        for t in r["recognised_from_t0"]:
            print(f"  t0 {t:>3}: one-step x0 {100 * r['one_step_from_t0'][t]:5.1f}%, DDPM chain "
                  f"{100 * r['recognised_from_t0'][t]:5.1f}%, DDIM chain {100 * r['ddim_from_t0'][t]:5.1f}%")
        return
    r = recognition(args.ckpt, args.num, args.cfg_scale, args.steps, args.seed, args.grid, robust=robust, method=args.method)
    if args.json:
        print(json.dumps(r))
        return
    print(f"classifier on real held-out shapes: {100 * r['real_accuracy']:.1f}%")
    print(f"{args.ckpt}: {100 * r['recognised']:.1f}% of {r['num']} cfg-{r['cfg_scale']:g} samples ({r['method']}, {r['steps']} steps) "
          f"recognised as their class (chance {100 * r['chance']:.0f}%)")
    print("per class: " + ", ".join(f"{SHAPE_CLASSES[c]} {100 * a:.0f}%" for c, a in r["per_class"].items()))


if __name__ == "__main__":
    main()
