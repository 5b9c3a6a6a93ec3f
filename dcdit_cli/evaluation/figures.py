"""The two figures of `dcdit eval`, drawn with the Pillow primitives of :mod:`dcdit_cli.common.plots`.

* ``pareto.png``: a quality metric (FID by default, any record field with ``--pareto-metric``)
  against TFLOPs/img, one point per evaluated setting, this run's points joined in order of cost
  and other runs' ``eval.json`` overlaid in other colours (the authors' README figure: DC-DiT
  against its DiT baselines). Records without the metric (older runs) are left out.
* ``elastic.png``: one panel per quality metric (FID, and FD-DINOv2 / KID when computed) and one
  for TFLOPs/img, against the tail-dropping budget, one line per guidance scale (the README's
  quality across budgets); two panels a row.
"""

from __future__ import annotations

from pathlib import Path

import math

from PIL import Image, ImageDraw

from dcdit_cli.common.plots import SAMPLE_COLOURS, Axes, centered, font, legend, padded_limits
from dcdit_cli.evaluation.metrics import FIELDS, Field

_W, _H, _PAD = 760, 520, 80
_MAX_LABELS = 5  # more labelled points than this overlap: the elastic figure tells them apart


def _with(records: list[dict], key: str) -> list[dict]:
    """The records with a finite value of ``key``."""
    return [r for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]


def _frontier(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    pts = sorted((r["tflops_per_img"], r[key]) for r in records)
    return [p[0] for p in pts], [p[1] for p in pts]


def _label(r: dict) -> str:
    """'cfg 1.5, f 0.2', with the unconditional half's budget after a slash under Lite-CFG."""
    lite = f"/{r['uncond_budget']:g}" if r.get("uncond_budget", r["budget"]) != r["budget"] else ""
    return f"cfg {r['cfg_scale']:g}, f {r['budget']:g}{lite}"


def pareto_figure(records: list[dict], others: list[tuple[Path, list[dict]]], title: str,
                  metric: Field = FIELDS["fid"]) -> Image.Image:
    """``metric`` (FID by default) against TFLOPs/img for this run's settings and the compared runs'."""
    key = metric.key
    runs = [(records[0]["run"] if records else "this run", _with(records, key))]
    runs += [(recs[0].get("run", str(path)), recs) for path, recs in ((p, _with(r, key)) for p, r in others) if recs]
    all_recs = [r for _, recs in runs for r in recs]
    image = Image.new("RGB", (_W, _H), (255, 255, 255))
    draw, big, small = ImageDraw.Draw(image), font(15), font(12)
    centered(draw, _W / 2, 8, title, big)
    x0, x1, xt = padded_limits([r["tflops_per_img"] for r in all_recs])
    y0, y1, yt = padded_limits([r[key] for r in all_recs])
    ax = Axes(image, (_PAD, 60, _W - 30, _H - 100), (x0, x1), (y0, y1), small)
    ax.frame(xt, yt, "TFLOPs / image (paper Table 1 convention, measured kept tokens)", metric.axis_label(), "")
    entries = []
    for i, (name, recs) in enumerate(runs):
        colour = SAMPLE_COLOURS[i % len(SAMPLE_COLOURS)]
        xs, ys = _frontier(recs, key)
        if len(xs) > 1:
            ax.line(xs, ys, colour, 2)
        labels = [_label(r) for r in recs] if i == 0 and len(recs) <= _MAX_LABELS else None
        ax.points([r["tflops_per_img"] for r in recs], [r[key] for r in recs], colour, labels=labels)
        entries.append((name, colour))
    legend(draw, _PAD, _H - 36, entries, small)
    return image


def elastic_figure(records: list[dict], title: str, metrics: list[Field] = (FIELDS["fid"],)) -> Image.Image:
    """One panel per quality metric in ``metrics`` and one for TFLOPs/img, against the budget f,
    two panels a row; one line per guidance scale (and per Lite-CFG unconditional budget, which
    gets its own line). A record without a metric is left out of that metric's panel."""
    row_h = _H - 90  # a row of panels below the title; the legend below the last row
    rows = math.ceil((len(metrics) + 1) / 2)
    image = Image.new("RGB", (2 * _W - 160, rows * row_h + 90), (255, 255, 255))
    draw, big, small = ImageDraw.Draw(image), font(15), font(12)
    centered(draw, image.width / 2, 8, title, big)
    series = sorted({_series(r) for r in records}, key=lambda k: (k[0], -1.0 if k[1] is None else k[1]))
    b0, b1, bt = padded_limits([r["budget"] for r in records])
    panel_w = (image.width - 2 * _PAD - 60) // 2
    small_cost = max(r["tflops_per_img"] for r in records) < 0.01  # toy models: GFLOPs keep the ticks short
    cost_label, cost_scale = ("GFLOPs / image", 1e3) if small_cost else ("TFLOPs / image", 1.0)
    panels = [(m.key, m.axis_label(), 1.0) for m in metrics] + [("tflops_per_img", cost_label, cost_scale)]
    for p, (key, label, scale) in enumerate(panels):
        recs_with = _with(records, key)
        y0, y1, yt = padded_limits([r[key] * scale for r in recs_with])
        left, top = _PAD + (p % 2) * (panel_w + _PAD + 30), 60 + (p // 2) * row_h
        ax = Axes(image, (left, top, left + panel_w, top + _H - 160), (b0, b1), (y0, y1), small)
        ax.frame(bt, yt, "tail-dropping budget f (share of boundaries dropped)", label, label.split(" (")[0])
        for i, k in enumerate(series):
            recs = sorted((r for r in recs_with if _series(r) == k), key=lambda r: r["budget"])
            xs, ys = [r["budget"] for r in recs], [r[key] * scale for r in recs]
            colour = SAMPLE_COLOURS[i % len(SAMPLE_COLOURS)]
            if len(xs) > 1:
                ax.line(xs, ys, colour, 2)
            ax.points(xs, ys, colour)
    names = [f"cfg {c:g}" + ("" if u is None else f", uncond budget {u:g}") for c, u in series]
    legend(draw, _PAD, image.height - 36, [(n, SAMPLE_COLOURS[i % len(SAMPLE_COLOURS)]) for i, n in enumerate(names)], small)
    return image


def _series(record: dict) -> tuple[float, float | None]:
    """(guidance scale, the unconditional half's budget when Lite-CFG sets it apart, else None)."""
    uncond = record.get("uncond_budget", record["budget"])
    return record["cfg_scale"], None if uncond == record["budget"] else uncond


__all__ = ["pareto_figure", "elastic_figure"]
