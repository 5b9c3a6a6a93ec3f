"""diffusers' fast schedulers against the paper's DDPM-250 on the toy model: time, cost and quality.

Samples the same images (fixed seeds, the classes cycling) under each setting, in chunks: every
chunk runs every setting in turn, so machine load drifts alike, and each setting's time per image
is the median over chunks, reported as a ratio to DDPM at 250 steps measured in the same run.
Quality, on all images of a setting:

- recognised: the share the shape classifier (benchmarks/shape_classifier.py) labels with the
  class the image was drawn for (chance: 1 / classes);
- feature FD: the Fréchet distance between the classifier's pooled features of the samples and
  of 600 real shapes (an FID on the shapes set's own features; small sample, so compare rows, not
  absolute values);
- ODE gap: for deterministic samplers, the RMS distance of x_0 to DPM-Solver++ at --ref-steps
  from the same noise (how far the solver is from its own converged solution); "-" for DDPM.

    python benchmarks/sampler_comparison.py --ckpt runs/toy --num 12 --chunks 3 --ref-steps 50 \\
        --json docs/figures/sampler-comparison.json --figure docs/figures/sampler-comparison.png
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from dcdit_cli.common.plots import font
from dcdit_cli.data.datasets import ShapesDataset
from dcdit_cli.evaluation.fid import frechet_distance
from dcdit_cli.sampling.sampler import SampleOptions, sample_batch, summarise
from dcdit_cli.training.checkpoint import load_weights
from shape_classifier import TEST_SEED, trained_classifier

SETTINGS = [  # name, scheduler, steps, budget
    ("DDPM 250 (paper)", "ddpm", 250, 0.0),
    ("DDIM 25", "ddim", 25, 0.0),
    ("DPM-Solver++ 25", "dpm-solver", 25, 0.0),
    ("DPM-Solver++ 20", "dpm-solver", 20, 0.0),
    ("UniPC 20", "unipc", 20, 0.0),
    ("DPM-Solver++ 25, budget 0.2", "dpm-solver", 25, 0.2),
    ("DPM-Solver++ 25, budget 0.4", "dpm-solver", 25, 0.4),
]
BASELINE = SETTINGS[0][0]
DETERMINISTIC = ("ddim", "dpm-solver", "unipc")


def features(classifier, x: torch.Tensor) -> np.ndarray:
    """The classifier's pooled features (B, F) of images in [-1, 1]."""
    with torch.no_grad():
        return classifier.eval().features(x.clamp(-1, 1)).mean(dim=(2, 3)).double().numpy()


def fd(a: np.ndarray, b: np.ndarray) -> float:
    return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def run(ckpt: Path, num: int, chunks: int, cfg_scale: float, ref_steps: int) -> dict:
    model, recipe, step = load_weights(ckpt)
    K = recipe.model.num_classes
    classifier, real_acc = trained_classifier(recipe.data.image_size, K, robust=False, variety=recipe.data.shapes)  # the figure's classifier
    real, _, _ = ShapesDataset(recipe.data.image_size, K, seed=TEST_SEED, variety=recipe.data.shapes).batch(torch.arange(600))
    real_feats = features(classifier, real)
    classes = list(range(K))
    parts = np.array_split(np.arange(num), chunks)
    seconds = {name: [] for name, *_ in SETTINGS}
    x0s = {name: [] for name, *_ in SETTINGS}
    kept = {name: [] for name, *_ in SETTINGS}
    ref = []
    for part in parts:
        idx = [int(i) for i in part]
        for name, method, steps, budget in SETTINGS:
            opts = SampleOptions.from_recipe(recipe, steps=steps, method=method, budget=budget, cfg_scale=cfg_scale)
            start = time.perf_counter()
            x0, y, log = sample_batch(model, recipe, idx, opts, classes=classes)
            seconds[name].append((time.perf_counter() - start) / len(idx))
            x0s[name].append(x0)
            kept[name].append(log)
        opts = SampleOptions.from_recipe(recipe, steps=ref_steps, method="dpm-solver", cfg_scale=cfg_scale)
        ref.append(sample_batch(model, recipe, idx, opts, classes=classes)[0])
    labels = torch.tensor([classes[i % K] for i in range(num)])
    ref = torch.cat(ref)
    base = statistics.median(seconds[BASELINE])
    rows = []
    for name, method, steps, budget in SETTINGS:
        x0 = torch.cat(x0s[name])
        with torch.no_grad():
            pred = classifier.eval()(x0.clamp(-1, 1)).argmax(1)
        report = summarise(recipe, [log.as_array() for log in kept[name]], num, 0.0, [log.saved_array() for log in kept[name]])
        per_image = statistics.median(seconds[name])
        rows.append({
            "setting": name, "scheduler": method, "steps": steps, "budget": budget,
            "seconds_per_image": per_image, "time_vs_ddpm250": per_image / base,
            "tflops_spent_per_img": report.tflops_per_img, "kept_tokens": report.kept_tokens,
            "recognised": (pred == labels).float().mean().item(), "feature_fd": fd(features(classifier, x0), real_feats),
            "ode_gap": (x0 - ref).pow(2).mean().sqrt().item() if method in DETERMINISTIC else None,
        })
    return {"ckpt": str(ckpt), "weights_step": step, "num": num, "chunks": chunks, "cfg_scale": cfg_scale,
            "ref_steps": ref_steps, "classifier_real_accuracy": real_acc, "chance": 1 / K,
            "real_vs_real_feature_fd": fd(real_feats[:300], real_feats[300:]),
            "torch_threads": torch.get_num_threads(), "rows": rows}


def figure(result: dict) -> Image.Image:
    """One bar per setting: its feature FD, labelled with its time per image relative to DDPM 250."""
    rows = result["rows"]
    f, width, left, right, bar = font(13), 1000, 230, 700, 26
    image = Image.new("RGB", (width, 90 + len(rows) * (bar + 12)), "white")
    draw = ImageDraw.Draw(image)
    top = max(r["feature_fd"] for r in rows) * 1.1
    draw.text((20, 14), f"toy sampler comparison ({result['num']} images, cfg {result['cfg_scale']:g}, weights step "
                        f"{result['weights_step']}): feature FD to real shapes (lower is better; real vs real "
                        f"{result['real_vs_real_feature_fd']:.2f}); grey: dcdit's ADM sampler, blue: diffusers", font=f, fill=(0, 0, 0))
    for i, r in enumerate(rows):
        y = 50 + i * (bar + 12)
        draw.text((20, y + 6), r["setting"], font=f, fill=(0, 0, 0))
        end = left + (right - left) * r["feature_fd"] / top
        colour = (120, 120, 120) if r["scheduler"] in ("ddpm", "ddim") else (31, 119, 180)  # grey: dcdit's ADM sampler
        draw.rectangle([left, y, end, y + bar], fill=colour, outline=(0, 0, 0))
        draw.text((end + 6, y + 6), f"{r['feature_fd']:.1f}   time x{r['time_vs_ddpm250']:.3f} of DDPM 250", font=f, fill=(0, 0, 0))
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, help="a toy run directory (dcdit train --recipe toy)")
    parser.add_argument("--from-json", type=Path, default=None, help="redraw --figure from a result written by --json")
    parser.add_argument("--num", type=int, default=12)
    parser.add_argument("--chunks", type=int, default=3, help="timing repeats: every chunk runs every setting")
    parser.add_argument("--cfg-scale", type=float, default=4.0)
    parser.add_argument("--ref-steps", type=int, default=50, help="DPM-Solver++ steps of the converged reference")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--figure", type=Path, default=None)
    args = parser.parse_args()
    if args.from_json is None and args.ckpt is None:
        parser.error("pass --ckpt RUN (or --from-json RESULT to redraw the figure)")
    result = json.loads(args.from_json.read_text()) if args.from_json else run(args.ckpt, args.num, args.chunks,
                                                                                 args.cfg_scale, args.ref_steps)
    print(f"{result['num']} images ({result['chunks']} chunks), cfg {result['cfg_scale']:g}; classifier on real shapes "
          f"{100 * result['classifier_real_accuracy']:.0f}%, chance {100 * result['chance']:.0f}%, "
          f"real-vs-real feature FD {result['real_vs_real_feature_fd']:.3f}")
    print(f"{'setting':32s} {'s/img':>7s} {'×DDPM250':>9s} {'TFLOPs':>9s} {'kept':>6s} {'recog':>6s} {'featFD':>7s} {'ODE gap':>8s}")
    for r in result["rows"]:
        gap = "-" if r["ode_gap"] is None else f"{r['ode_gap']:.4f}"
        print(f"{r['setting']:32s} {r['seconds_per_image']:7.3f} {r['time_vs_ddpm250']:9.3f} {r['tflops_spent_per_img']:9.3g} "
              f"{r['kept_tokens']:6.1f} {100 * r['recognised']:5.0f}% {r['feature_fd']:7.3f} {gap:>8s}")
    if args.json and not args.from_json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    if args.figure:
        args.figure.parent.mkdir(parents=True, exist_ok=True)
        figure(result).save(args.figure)


if __name__ == "__main__":
    main()
