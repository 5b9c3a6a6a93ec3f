"""Are a model's samples recognisable? A small shape classifier, trained on the real shapes set,
labels class-conditional samples; the share it labels with the class they were drawn for is the
recognition rate (chance: 1 / number of classes).

The classifier (three conv layers, global pooling, a linear head) trains on shapes of another
seed than any diffusion run uses (seed 777) and is scored on held-out shapes (seed 4242), so it
knows the classes, not the training images. It is a benchmark instrument, not part of the model;
its weights are cached in ``runs/shape-classifier-<size>.safetensors``.

    python benchmarks/shape_classifier.py --ckpt runs/toy                 # 96 cfg-4 samples, 100 steps
    python benchmarks/shape_classifier.py --ckpt runs/toy --num 192 --cfg-scale 4 --steps 100
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
from dcdit_cli.sampling.sampler import SampleOptions, sample_batch, save_grid, to_uint8

TRAIN_SEED, TEST_SEED = 777, 4242


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


def trained_classifier(image_size: int, num_classes: int, steps: int = 1500, batch: int = 128,
                       cache: Path = Path("runs")) -> tuple[nn.Module, float]:
    """The cached classifier for this size (trained on first use) and its held-out accuracy."""
    path = cache / f"shape-classifier-{image_size}-{num_classes}.safetensors"
    model = ShapeClassifier(num_classes)
    test = ShapesDataset(image_size, num_classes, seed=TEST_SEED)
    x_test, y_test, _ = test.batch(torch.arange(1024))
    if path.is_file():
        model.load_state_dict(load_file(str(path)))
        return model, accuracy(model, x_test, y_test)
    torch.manual_seed(0)
    data = ShapesDataset(image_size, num_classes, seed=TRAIN_SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    for step in range(steps):
        x, y, _ = data.batch(torch.arange(step * batch, (step + 1) * batch))
        loss = F.cross_entropy(model.train()(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    cache.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), str(path))
    return model, accuracy(model, x_test, y_test)


def recognition(ckpt: Path, num: int = 96, cfg_scale: float = 4.0, steps: int = 100, seed: int = 0,
                grid: Path | None = None, cache: Path = Path("runs")) -> dict:
    """Samples ``num`` images, the classes cycling, and the classifier's verdict on them; ``grid``
    saves the samples, one column per class; ``cache``: where the classifier's weights are kept."""
    model, recipe, _ = load_weights(ckpt)
    if recipe.data.kind != "shapes":
        raise SystemExit(f"{ckpt} was trained on data.kind = {recipe.data.kind!r}: the classifier knows the shapes set only")
    K = recipe.model.num_classes
    classifier, real_acc = trained_classifier(recipe.data.image_size, K, cache=cache)
    opts = SampleOptions.from_recipe(recipe, cfg_scale=cfg_scale, steps=steps, seed=seed)
    start = time.perf_counter()
    x0, y, _ = sample_batch(model, recipe, list(range(num)), opts, classes=list(range(K)))
    seconds = time.perf_counter() - start
    with torch.no_grad():
        pred = classifier.eval()(x0.clamp(-1, 1)).argmax(1)
    per_class = {c: (pred[y == c] == c).float().mean().item() for c in range(K)}
    if grid is not None:
        save_grid(to_uint8(x0), grid, nrow=K)
    return {"ckpt": str(ckpt), "num": num, "cfg_scale": cfg_scale, "steps": steps, "real_accuracy": real_acc,
            "recognised": (pred == y).float().mean().item(), "per_class": per_class, "chance": 1 / K,
            "sampling_seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, required=True, help="a run directory or dcdit weights trained on shapes")
    parser.add_argument("--num", type=int, default=96)
    parser.add_argument("--cfg-scale", type=float, default=4.0)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", type=Path, default=None, help="also save the samples here (PNG, one column per class)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    r = recognition(args.ckpt, args.num, args.cfg_scale, args.steps, args.seed, args.grid)
    if args.json:
        print(json.dumps(r))
        return
    print(f"classifier on real held-out shapes: {100 * r['real_accuracy']:.1f}%")
    print(f"{args.ckpt}: {100 * r['recognised']:.1f}% of {r['num']} cfg-{r['cfg_scale']:g} samples ({r['steps']} steps) "
          f"recognised as their class (chance {100 * r['chance']:.0f}%)")
    print("per class: " + ", ".join(f"{SHAPE_CLASSES[c]} {100 * a:.0f}%" for c, a in r["per_class"].items()))


if __name__ == "__main__":
    main()
