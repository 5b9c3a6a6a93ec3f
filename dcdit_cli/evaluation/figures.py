"""The two figures of `dcdit eval`, drawn with the Pillow primitives of :mod:`dcdit_cli.common.plots`.

* ``pareto.png``: FID against TFLOPs/img, one point per evaluated setting, this run's points
  joined in order of cost and other runs' ``eval.json`` overlaid in other colours (the authors'
  README figure: DC-DiT against its DiT baselines).
* ``elastic.png``: FID and TFLOPs/img against the tail-dropping budget, one line per guidance
  scale (the README's quality across budgets).
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from dcdit_cli.common.plots import SAMPLE_COLOURS, Axes, centered, font, legend, padded_limits

_W, _H, _PAD = 760, 520, 80
_MAX_LABELS = 5  # more labelled points than this overlap: the elastic figure tells them apart


def _frontier(records: list[dict]) -> tuple[list[float], list[float]]:
    pts = sorted((r["tflops_per_img"], r["fid"]) for r in records)
    return [p[0] for p in pts], [p[1] for p in pts]


def _label(r: dict) -> str:
    """'cfg 1.5, f 0.2', with the unconditional half's budget after a slash under Lite-CFG."""
    lite = f"/{r['uncond_budget']:g}" if r.get("uncond_budget", r["budget"]) != r["budget"] else ""
    return f"cfg {r['cfg_scale']:g}, f {r['budget']:g}{lite}"


def pareto_figure(records: list[dict], others: list[tuple[Path, list[dict]]], title: str) -> Image.Image:
    """FID (lower is better) against TFLOPs/img for this run's settings and the compared runs'."""
    runs = [(records[0]["run"] if records else "this run", records)]
    runs += [(recs[0].get("run", str(path)) if recs else str(path), recs) for path, recs in others]
    all_recs = [r for _, recs in runs for r in recs]
    image = Image.new("RGB", (_W, _H), (255, 255, 255))
    draw, big, small = ImageDraw.Draw(image), font(15), font(12)
    centered(draw, _W / 2, 8, title, big)
    x0, x1, xt = padded_limits([r["tflops_per_img"] for r in all_recs])
    y0, y1, yt = padded_limits([r["fid"] for r in all_recs])
    ax = Axes(image, (_PAD, 60, _W - 30, _H - 100), (x0, x1), (y0, y1), small)
    ax.frame(xt, yt, "TFLOPs / image (paper Table 1 convention, measured kept tokens)", "FID (lower is better)", "")
    entries = []
    for i, (name, recs) in enumerate(runs):
        colour = SAMPLE_COLOURS[i % len(SAMPLE_COLOURS)]
        xs, ys = _frontier(recs)
        if len(xs) > 1:
            ax.line(xs, ys, colour, 2)
        labels = [_label(r) for r in recs] if i == 0 and len(recs) <= _MAX_LABELS else None
        ax.points([r["tflops_per_img"] for r in recs], [r["fid"] for r in recs], colour, labels=labels)
        entries.append((name, colour))
    legend(draw, _PAD, _H - 36, entries, small)
    return image


def elastic_figure(records: list[dict], title: str) -> Image.Image:
    """Two panels against the budget f: FID, and TFLOPs/img; one line per guidance scale (and per
    Lite-CFG unconditional budget, which gets its own line)."""
    image = Image.new("RGB", (2 * _W - 160, _H), (255, 255, 255))
    draw, big, small = ImageDraw.Draw(image), font(15), font(12)
    centered(draw, image.width / 2, 8, title, big)
    series = sorted({_series(r) for r in records}, key=lambda k: (k[0], -1.0 if k[1] is None else k[1]))
    b0, b1, bt = padded_limits([r["budget"] for r in records])
    panel_w = (image.width - 2 * _PAD - 60) // 2
    small_cost = max(r["tflops_per_img"] for r in records) < 0.01  # toy models: GFLOPs keep the ticks short
    cost_label, cost_scale = ("GFLOPs / image", 1e3) if small_cost else ("TFLOPs / image", 1.0)
    for k, (key, label, scale) in enumerate((("fid", "FID (lower is better)", 1.0), ("tflops_per_img", cost_label, cost_scale))):
        y0, y1, yt = padded_limits([r[key] * scale for r in records])
        left = _PAD + k * (panel_w + _PAD + 30)
        ax = Axes(image, (left, 60, left + panel_w, _H - 100), (b0, b1), (y0, y1), small)
        ax.frame(bt, yt, "tail-dropping budget f (share of boundaries dropped)", label, label.split(" (")[0])
        for i, k in enumerate(series):
            recs = sorted((r for r in records if _series(r) == k), key=lambda r: r["budget"])
            xs, ys = [r["budget"] for r in recs], [r[key] * scale for r in recs]
            colour = SAMPLE_COLOURS[i % len(SAMPLE_COLOURS)]
            if len(xs) > 1:
                ax.line(xs, ys, colour, 2)
            ax.points(xs, ys, colour)
    names = [f"cfg {c:g}" + ("" if u is None else f", uncond budget {u:g}") for c, u in series]
    legend(draw, _PAD, _H - 36, [(n, SAMPLE_COLOURS[i % len(SAMPLE_COLOURS)]) for i, n in enumerate(names)], small)
    return image


def _series(record: dict) -> tuple[float, float | None]:
    """(guidance scale, the unconditional half's budget when Lite-CFG sets it apart, else None)."""
    uncond = record.get("uncond_budget", record["budget"])
    return record["cfg_scale"], None if uncond == record["budget"] else uncond


__all__ = ["pareto_figure", "elastic_figure"]
