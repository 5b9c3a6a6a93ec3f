"""Which shapes distribution can the README demo learn in its time? Trains the ``toy`` recipe on a
variant of the shapes set, then scores its cfg-4 samples with the shape classifier
(``benchmarks/shape_classifier.py``), itself trained on the same variant.

A variant changes only how shapes are drawn, for this benchmark (the shipped set is ``default``):

- ``scale``: the shape's span as a fraction of the side (default 0.35–0.70);
- ``jitter``: the centre's largest offset from the middle (default: anywhere mostly inside);
- ``rotation``: the largest angle in degrees (default 12);
- ``colours``: ``random`` (default: any colour on a contrasting one), ``fixed`` (light grey on
  dark grey) or ``palette`` (one of four hues on near-black);
- ``texture``: a factor on the fill texture's amplitude (0: flat fills).

    OMP_NUM_THREADS=1 python benchmarks/demo_settings.py --variant mono-centred --out runs/demo-mono-centred
    OMP_NUM_THREADS=1 python benchmarks/demo_settings.py --variant mono-centred --set train.lr=0.002 --out runs/demo-lr
    python benchmarks/demo_settings.py --list

    OMP_NUM_THREADS=1 python benchmarks/demo_settings.py --variant fixed --recipe toy-dit --set train.lr=0.001 --out runs/dit-fixed
    python benchmarks/demo_settings.py --variant fixed --ckpt runs/demo-fixed/weights/step-0002400-ema.safetensors --grid fixed.png

``fixed`` is the limit, and the shipped ``data.shapes = "fixed"`` set (the ``demo`` recipe's): one
grey shape per class, flat, unrotated, of one size at the centre (six images up to the background's
slope), so the class alone decides the image. ``fixed-colours`` is the same layout in the varied set's
colours. ``--recipe`` trains another recipe than ``toy`` (``toy-dit``: the DiT baseline; ``demo``:
toy on the fixed set at lr 3e-3); ``--ckpt`` scores a trained run or weights of the variant again
without training.

    OMP_NUM_THREADS=1 python benchmarks/demo_settings.py --variant fixed --set train.lr=0.003 --out runs/demo-fixed-lr3

Each run appends one JSON line (variant, recipe, overrides, training seconds, recognition, and
the ε-MSE on real shapes of the variant at t = 50 … 800, ``shape_classifier.noise_error``) to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shape_classifier import noise_error, recognition  # noqa: E402

from dcdit_cli.common.console import DcditError  # noqa: E402
from dcdit_cli.config.recipe import load_recipe  # noqa: E402
from dcdit_cli.data.datasets import ShapesDataset  # noqa: E402
from dcdit_cli.training.checkpoint import read_weights, resolve_weights  # noqa: E402
from dcdit_cli.training.loop import train  # noqa: E402

PALETTE = np.array([[0.9, 0.2, 0.2], [0.2, 0.8, 0.3], [0.25, 0.4, 0.95], [0.95, 0.85, 0.2]])
VARIANTS = {
    "default": {},
    "flat": {"texture": 0.0},
    "large-flat": {"scale": (0.55, 0.85), "texture": 0.0},
    "large-flat-centred": {"scale": (0.55, 0.85), "texture": 0.0, "jitter": 0.08, "rotation": 0.0},
    "mono": {"colours": "fixed"},
    "mono-flat": {"colours": "fixed", "texture": 0.0},
    "mono-centred": {"colours": "fixed", "jitter": 0.1, "rotation": 0.0, "scale": (0.5, 0.7)},
    "mono-flat-centred": {"colours": "fixed", "texture": 0.0, "jitter": 0.1, "rotation": 0.0, "scale": (0.5, 0.7)},
    "fixed-colours": {"texture": 0.0, "jitter": 0.0, "rotation": 0.0, "scale": (0.6, 0.6)},
    "palette-centred": {"colours": "palette", "jitter": 0.1, "rotation": 0.0, "scale": (0.5, 0.7)},
}


SHIPPED = {"fixed": "fixed"}  # variants that are a data.shapes setting of the shipped set, not a patch of it


def variant_recipe(variant: str, name: str, overrides: list[str]):
    """The recipe ``name`` trained on ``variant``: ``data.shapes`` is the variant's shipped setting, or
    the varied set that the variant's patch (:func:`drawn`) then changes."""
    return load_recipe(name, [f"data.shapes={SHIPPED.get(variant, 'varied')}", *overrides])


def drawn(variant: dict):
    """ShapesDataset._params with the variant's changes; its extra draws use their own stream
    (seed, index, 99), so the default draws are untouched."""
    original = ShapesDataset._params

    def params(self, index: int) -> dict:
        p = original(self, index)
        rng = np.random.default_rng([self.seed, index, 99])
        if "scale" in variant:
            p["r"] = rng.uniform(*variant["scale"]) / 2.0
            margin = 0.85 * p["r"]
            p["cx"], p["cy"] = rng.uniform(margin, 1 - margin), rng.uniform(margin, 1 - margin)
        if "jitter" in variant:
            j = variant["jitter"]
            p["cx"], p["cy"] = 0.5 + rng.uniform(-j, j), 0.5 + rng.uniform(-j, j)
        p["tex_amp"] *= variant.get("texture", 1.0)
        if "rotation" in variant:
            p["angle"] = rng.uniform(-variant["rotation"], variant["rotation"]) * math.pi / 180
        if variant.get("colours") == "fixed":
            p["fg"], p["bg"] = np.full(3, 0.85), np.full(3, 0.15)
        elif variant.get("colours") == "palette":
            p["fg"], p["bg"] = PALETTE[rng.integers(len(PALETTE))], 0.1 + 0.05 * rng.uniform(-1, 1, 3)
        return p

    return params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=sorted([*VARIANTS, *SHIPPED]), default="default")
    parser.add_argument("--recipe", default="toy", help="the recipe trained (default toy; toy-dit: the DiT baseline)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override on top of --recipe")
    parser.add_argument("--out", type=Path, help="run directory (default runs/demo-<variant>)")
    parser.add_argument("--ckpt", type=Path, help="score this trained run (or weights) of the variant again; no training")
    parser.add_argument("--grid", type=Path, help="save the scored samples here, one column per class "
                        "(default: recognised.png in the run directory when training)")
    parser.add_argument("--num", type=int, default=96, help="samples scored (16 per class)")
    parser.add_argument("--json", type=Path, default=Path("runs/demo-settings.jsonl"))
    parser.add_argument("--list", action="store_true", help="print the variants and stop")
    parser.add_argument("--classifier", choices=("robust", "plain"), default="robust",
                        help="the shape classifier that scores the samples (benchmarks/shape_classifier.py)")
    args = parser.parse_args()
    if args.list:
        for name, v in {**VARIANTS, **{k: f"data.shapes = {v!r}" for k, v in SHIPPED.items()}}.items():
            print(f"{name:<20} {v or 'the shipped varied set'}")
        return
    out = args.out or Path(f"runs/demo-{args.variant}")
    try:  # a wrong recipe, override or checkpoint: one line, exit 2, before any work
        recipe = variant_recipe(args.variant, args.recipe, args.overrides)
        run = resolve_weights(args.ckpt) if args.ckpt else out
        if args.ckpt:
            read_weights(run)  # dcdit weights with their recipe, not a damaged or foreign file
    except DcditError as e:
        parser.error(str(e))
    # The classifier is cached per variant: it learns the classes of the distribution it scores.
    cache = Path("runs") / f"classifier-{args.variant}"
    with mock.patch.object(ShapesDataset, "_params", drawn(VARIANTS.get(args.variant, {}))):
        seconds = None
        if args.ckpt is None:
            start = time.perf_counter()
            train(recipe, out)
            seconds = time.perf_counter() - start
        grid = args.grid or (None if args.ckpt else out / "recognised.png")
        r = recognition(run, num=args.num, grid=grid, cache=cache, robust=args.classifier == "robust")
        errors = noise_error(run, num=args.num)["eps_mse"]
    row = {"variant": args.variant, "recipe": args.recipe, "overrides": args.overrides, "threads": torch.get_num_threads(),
           "train_seconds": None if seconds is None else round(seconds, 1), **r, "eps_mse": errors}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    with args.json.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"{args.variant} {run} {' '.join(args.overrides)}: {100 * r['recognised']:.1f}% of {r['num']} cfg-4 samples recognised "
          f"(classifier {100 * r['real_accuracy']:.1f}% on real held-out shapes; "
          + ("scored again)" if seconds is None else f"{seconds:.0f} s of training)"))
    for name, by_t in errors.items():
        print(f"  ε-MSE on real shapes, {name}: " + ", ".join(f"t {t} {e:.4f}" for t, e in by_t.items()))


if __name__ == "__main__":
    main()
