"""Small Pillow plotting primitives shared by the figures dcdit writes (no matplotlib).

``Axes`` maps data to pixels and draws a framed, ticked, labelled box; ``training_curves``
turns a run's metrics.jsonl into the PNG that ``dcdit train`` writes beside its checkpoints.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Viridis at 0, 1/8, ..., 1 (the perceptually uniform map of matplotlib, van der Walt & Smith 2015);
# values in between are linearly interpolated.
_VIRIDIS = np.array([
    (0x44, 0x01, 0x54), (0x48, 0x28, 0x78), (0x3E, 0x49, 0x89), (0x31, 0x68, 0x8E), (0x26, 0x82, 0x8E),
    (0x1F, 0x9E, 0x89), (0x35, 0xB7, 0x79), (0x6E, 0xCE, 0x58), (0xFD, 0xE7, 0x25),
], dtype=np.float64)

SAMPLE_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
def viridis(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape) → uint8 RGB (..., 3)."""
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64)), 0.0, 1.0) * (len(_VIRIDIS) - 1)
    lo = np.minimum(np.floor(v).astype(int), len(_VIRIDIS) - 2)
    frac = (v - lo)[..., None]
    return np.round(_VIRIDIS[lo] * (1 - frac) + _VIRIDIS[lo + 1] * frac).astype(np.uint8)


def font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow ≥ 10.1 with FreeType: a scalable font
    except (TypeError, ImportError):  # pragma: no cover - older Pillow or no FreeType: the bitmap font
        return ImageFont.load_default()


def text_width(draw: ImageDraw.ImageDraw, text: str, font) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    return right - left


def centered(draw: ImageDraw.ImageDraw, cx: float, y: float, text: str, font, fill=(0, 0, 0)) -> None:
    draw.text((cx - text_width(draw, text, font) / 2, y), text, font=font, fill=fill)


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 × 10^k apart) covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / target
    base = 10 ** math.floor(math.log10(raw))
    step = next(m * base for m in (1, 2, 5, 10) if m * base >= raw)
    start = math.floor(lo / step) * step
    ticks, v = [], start
    while v <= hi + 1e-9 * step:
        ticks.append(round(v, 10))
        v += step
    if ticks[-1] < hi:
        ticks.append(round(v, 10))
    return ticks


class Axes:
    """A plot box in pixels with data limits; x may run backwards (t from 999 down to 0)."""

    def __init__(self, image: Image.Image, box, xlim, ylim, font):
        self.image, self.draw = image, ImageDraw.Draw(image)
        self.box, self.xlim, self.ylim, self.font = box, xlim, ylim, font

    def px(self, x: float, y: float) -> tuple[float, float]:
        (l, t, r, b), (x0, x1), (y0, y1) = self.box, self.xlim, self.ylim
        return l + (x - x0) / (x1 - x0) * (r - l), b - (y - y0) / (y1 - y0) * (b - t)

    def frame(self, xticks, yticks, xlabel: str, ylabel: str, title: str) -> None:
        d, (l, t, r, b), f = self.draw, self.box, self.font
        tick_w = max((text_width(d, f"{y:g}", f) for y in yticks), default=0)
        for y in yticks:
            _, py = self.px(self.xlim[0], y)
            d.line([l, py, r, py], fill=(228, 228, 228))
            d.line([l - 4, py, l, py], fill=(0, 0, 0))
            label = f"{y:g}"
            d.text((l - 8 - text_width(d, label, f), py - 7), label, font=f, fill=(0, 0, 0))
        for x in xticks:
            px, _ = self.px(x, self.ylim[0])
            d.line([px, b, px, b + 4], fill=(0, 0, 0))
            centered(d, px, b + 6, f"{x:g}", f)
        d.rectangle([l, t, r, b], outline=(0, 0, 0))
        centered(d, (l + r) / 2, b + 24, xlabel, f)
        centered(d, (l + r) / 2, t - 20, title, f)
        label = Image.new("RGBA", (text_width(d, ylabel, f) + 4, 18), (255, 255, 255, 0))
        ImageDraw.Draw(label).text((2, 1), ylabel, font=f, fill=(0, 0, 0))
        label = label.rotate(90, expand=True)
        x = min(l - 58, l - 8 - tick_w - 4 - label.width)  # clear of the widest tick label
        self.image.paste(label, (int(max(x, 0)), int((t + b) / 2 - label.height / 2)), label)

    def line(self, xs, ys, fill, width: int) -> None:
        self.draw.line([self.px(x, y) for x, y in zip(xs, ys)], fill=fill, width=width, joint="curve")

    def points(self, xs, ys, fill, radius: int = 5, labels=None) -> None:
        """Filled circles with a black rim, each optionally labelled to its upper right."""
        for i, (x, y) in enumerate(zip(xs, ys)):
            px, py = self.px(x, y)
            self.draw.ellipse([px - radius, py - radius, px + radius, py + radius], fill=fill, outline=(0, 0, 0))
            if labels is not None:
                self.draw.text((px + radius + 2, py - radius - 12), labels[i], font=self.font, fill=(60, 60, 60))


def legend(draw: ImageDraw.ImageDraw, x: int, y: int, entries, font) -> None:
    """A row of (label, colour) entries starting at (x, y)."""
    for label, colour in entries:
        draw.ellipse([x, y + 2, x + 12, y + 14], fill=colour, outline=(0, 0, 0))
        draw.text((x + 18, y), label, font=font, fill=(0, 0, 0))
        x += 36 + text_width(draw, label, font)


def padded_limits(values, pad: float = 0.08) -> tuple[float, float, list[float]]:
    """Nice ticks around the values with a margin, and the limits they span."""
    lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
    span = (hi - lo) or max(abs(hi), 1.0)
    ticks = nice_ticks(lo - pad * span, hi + pad * span)
    return ticks[0], ticks[-1], ticks




def training_curves(metrics_path: Path, title: str) -> Image.Image:
    """Loss terms and compression against the optimizer step, from a run's metrics.jsonl."""
    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    steps = np.array([r["step"] for r in records], dtype=np.float64)
    panels = [("loss", [("loss", (0, 0, 0)), ("mse", SAMPLE_COLOURS[0]), ("vb", SAMPLE_COLOURS[1])])]
    if "compression" in records[0]:
        panels.append(("compression L / kept", [("compression", SAMPLE_COLOURS[2])]))
    W, H, pad = 490 * len(panels), 420, 78
    image = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    big, small = font(14), font(12)
    centered(draw, W / 2, 8, title, big)
    xt = nice_ticks(0.0, float(steps.max()))
    panel_w = (W - pad * len(panels) - 20) // len(panels)
    for i, (name, series) in enumerate(panels):
        values = [np.array([r.get(key, np.nan) for r in records], dtype=np.float64) for key, _ in series]
        yt = nice_ticks(0.0, float(np.nanmax(np.concatenate(values))))
        left = pad + i * (panel_w + pad)
        ax = Axes(image, (left, 64, left + panel_w, H - 90), (xt[0], xt[-1]), (yt[0], yt[-1]), small)
        ax.frame(xt, yt, "optimizer step", name, name)
        x, y = left, H - 34
        for (key, colour), v in zip(series, values):
            ax.line(steps, v, colour, 2)
            draw.line([x, y + 7, x + 22, y + 7], fill=colour, width=2)
            draw.text((x + 28, y), key, font=small, fill=(0, 0, 0))
            x += 40 + text_width(draw, key, small)
    return image
