"""The toy run of docs/evaluation.md: `dcdit eval` end to end on CPU, in a few minutes.

Trains the `tiny` DC-DiT and a DiT/2 of the same width on the built-in 8×8 shapes set, builds
a reference batch from 64 real shapes with `dcdit fid --make-ref`, and evaluates both with
`dcdit eval` (the DC-DiT over budgets and two guidance scales, the DiT overlaid with
--compare). The Inception weights are the test suite's random ones (tests/conftest.py): the
real file cannot be downloaded here, so the numbers show the pipeline, not image quality.

    python benchmarks/toy_eval.py --out /tmp/toy-eval            # then see OUT/tiny/eval/*.png
    python benchmarks/toy_eval.py --out /tmp/toy-eval --figures docs/figures
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def dcdit(*args: str) -> None:
    print("$ dcdit " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "dcdit_cli", *args], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--num", type=int, default=64, help="samples per setting and real images in the reference")
    parser.add_argument("--steps", type=int, default=25, help="sampler steps")
    parser.add_argument("--figures", type=Path, default=None, help="copy the two PNGs here as tiny-pareto/elastic.png")
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    import torch
    from PIL import Image

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import random_inception_state_dict

    from dcdit_cli.config.recipe import load_recipe
    from dcdit_cli.data.datasets import make_dataset
    from dcdit_cli.sampling.sampler import to_uint8

    weights = out / "inception-random.pth"
    if not weights.exists():
        torch.save(random_inception_state_dict(), weights)
    shapes = make_dataset(load_recipe("tiny").data, seed=123)  # not the training seed's first images
    (out / "real").mkdir(exist_ok=True)
    for i in range(args.num):
        Image.fromarray(to_uint8(shapes[i][0][None])[0]).save(out / "real" / f"{i:03d}.png")
    dcdit("fid", "--make-ref", str(out / "real"), "--out", str(out / "ref.npz"), "--image-size", "8",
          "--inception-weights", str(weights))

    steps = f"train.max_steps={args.train_steps}"
    dcdit("train", "--recipe", "tiny", "--set", steps, "--set", "train.ckpt_every_steps=100", "--out", str(out / "tiny"))
    dcdit("train", "--recipe", "tiny", "--set", steps, "--set", "train.ckpt_every_steps=100", "--set", "model.kind=dit",
          "--set", "model.patch_size=2", "--set", "run.name=tiny-dit-p2", "--out", str(out / "tiny-dit"))
    common = ["--ref", str(out / "ref.npz"), "--num", str(args.num), "--steps", str(args.steps), "--batch-size", "32",
              "--inception-weights", str(weights)]
    dcdit("eval", "--ckpt", str(out / "tiny-dit"), "--cfg-scales", "1.0,2.0", *common)
    dcdit("eval", "--ckpt", str(out / "tiny"), "--budgets", "0,0.25,0.5,0.75", "--cfg-scales", "1.0,2.0", *common,
          "--compare", str(out / "tiny-dit"))
    if args.figures:
        args.figures.mkdir(parents=True, exist_ok=True)
        for name in ("pareto", "elastic"):
            shutil.copy(out / "tiny" / "eval" / f"{name}.png", args.figures / f"tiny-{name}.png")
    print(f"records: {out / 'tiny' / 'eval' / 'eval.json'}")


if __name__ == "__main__":
    main()
