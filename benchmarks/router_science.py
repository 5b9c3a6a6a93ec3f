"""What did the router learn? Boundary probability on objects vs background, and kept tokens vs t.

On the built-in shapes set every image has a per-pixel object mask, so the router's boundary
probability p can be scored as a detector of the (textured) object: AUROC of p for
object-vs-background pixels, at several diffusion timesteps, on fixed validation images.
Also prints the kept-token count and compression ratio per timestep (paper Fig. 4).
AUROC above 0.5: p is higher on objects; below 0.5: p concentrates on the background.

Where objects sit at the same places in every image (the fixed shapes set, ``data.shapes = "fixed"``)
a router that keeps the centre scores a high AUROC without looking at the image. Two more
readings separate place from content: "position alone", the AUROC of the held-out masks' mean
(how often each pixel is object, the best score that ignores the image), and "AUROC at equal
position", p compared only between images at the same pixel (a score of position alone gets 0.5).

    python benchmarks/router_science.py --ckpt runs/toy [--num 64]
"""

from __future__ import annotations

import argparse

import torch


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Mann–Whitney AUROC with average ranks for ties: P(score_pos > score_neg)."""
    scores, labels = scores.double().flatten(), labels.bool().flatten()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = scores.argsort()
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, scores.numel() + 1, dtype=torch.float64)
    sorted_scores = scores[order]  # average the ranks of tied scores
    uniq, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    avg = ends - (counts.double() - 1) / 2
    ranks[order] = avg[inverse]
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auroc_at_equal_position(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """scores, labels (N, L): P(score on an object > score on background | the same pixel, in two
    images), ties counted half. A score that depends on the pixel alone gets exactly 0.5."""
    labels = labels.bool()
    diff = scores.double()[:, None, :] - scores.double()[None, :, :]  # (N, N, L): image i's score − image j's
    pairs = labels[:, None, :] & ~labels[None, :, :]  # i object, j background, at the same pixel
    if not pairs.any():
        return float("nan")
    wins = (diff > 0).double() + 0.5 * (diff == 0).double()
    return float((wins * pairs).sum() / pairs.sum())


@torch.no_grad()
def main() -> None:
    from rich.console import Console
    from rich.table import Table

    from dcdit_cli.data.datasets import ShapesDataset
    from dcdit_cli.diffusion.gaussian import make_diffusion
    from dcdit_cli.training.checkpoint import load_weights

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--num", type=int, default=64)
    parser.add_argument("--timesteps", type=int, nargs="+", default=[0, 50, 100, 250, 500, 750, 999])
    args = parser.parse_args()

    model, recipe, step = load_weights(args.ckpt)
    if recipe.data.kind != "shapes" or recipe.model.kind != "dcdit":
        raise SystemExit("router_science needs a DC-DiT trained on the shapes set (it uses the object masks)")
    data = ShapesDataset(recipe.data.image_size, recipe.data.num_classes, seed=recipe.run.seed + 12345,  # held-out seed
                         variety=recipe.data.shapes)
    x0, y, masks = data.batch(torch.arange(args.num))
    diffusion = make_diffusion(num_timesteps=recipe.diffusion.num_timesteps)
    L = recipe.model.input_size**2
    table = Table(title=f"{args.ckpt} (step {step}): router vs object masks on {args.num} held-out images")
    for col in ("t", "AUROC p (object vs background)", "AUROC at equal position", "kept tokens", "compression L/M",
                "kept on objects", "object area"):
        table.add_column(col, justify="right")
    obj = masks.flatten(1)  # (N, L)
    position_alone = auroc(obj.float().mean(0).expand_as(obj), obj)
    table.caption = f"position alone (the masks' mean as the score): AUROC {position_alone:.3f}"
    g = torch.Generator().manual_seed(0)
    for t_val in args.timesteps:
        t = torch.full((args.num,), t_val)
        x_t = diffusion.q_sample(x0, t, torch.randn(x0.shape, generator=g))
        _, stats = model(x_t, t, y)
        kept_obj = (stats.kept & obj).sum() / stats.kept.sum()
        table.add_row(str(t_val), f"{auroc(stats.p, obj):.3f}", f"{auroc_at_equal_position(stats.p, obj):.3f}",
                      f"{stats.num_kept.float().mean():.1f}",
                      f"{(L / stats.num_kept.float()).mean():.2f}", f"{kept_obj:.2f}", f"{obj.float().mean():.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()
