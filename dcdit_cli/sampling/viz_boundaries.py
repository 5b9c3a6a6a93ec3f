"""`dcdit viz-boundaries`: the router's boundaries along the sampling trajectory (paper §4.2, Fig. 4).

The images are sampled exactly as `dcdit sample` samples them (the same per-image seeds, CFG,
budgets and DDPM respacing: this module calls :func:`dcdit_cli.sampling.sampler.sample_batch`). A thin
wrapper around the model keeps, at a few evenly spaced sampler steps (the first and the last
included), x_t and the conditional half's :class:`RouterStats`; every step's kept count goes
into the compression-vs-timestep plot.

Outputs, all drawn with Pillow (matplotlib is not a dependency):

    DIR/sample-000.png         row 1: x_t at the chosen steps; row 2: boundary probability p
                               (viridis), kept tokens boxed, boundaries removed by --budget crossed
    DIR/compression_vs_t.png   compression L / kept and kept tokens against t, mean and per sample
    DIR/gates_vs_t.png         gated models only (model.dynamic = 'dydit'): DyDiT's active heads and
                               MLP groups against t, and which tokens skipped the MLP (viz_gates.py)
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from dcdit_cli.common.atomic import write_png
from dcdit_cli.common.console import DcditError, print0, progress_bar
from dcdit_cli.common.plots import SAMPLE_COLOURS, Axes, centered, font, nice_ticks, text_width, viridis
from dcdit_cli.config.options import OptionCheck
from dcdit_cli.diffusion.schedulers import METHODS
from dcdit_cli.models.dcdit import RouterStats
from dcdit_cli.sampling.sampler import SampleOptions, ToPixels, classes_for, sample_batch, to_uint8
from dcdit_cli.sampling.viz_gates import gate_snapshot, gates_figure
from dcdit_cli.training.checkpoint import load_weights

# ----------------------------------------------------------------------------------------
# Colours and fonts
# ----------------------------------------------------------------------------------------

_KEPT_OUTER, _KEPT_INNER, _DROPPED = (0, 0, 0), (255, 255, 255), (255, 40, 40)


# ----------------------------------------------------------------------------------------
# Recording x_t and the router's decisions while sampling
# ----------------------------------------------------------------------------------------


def column_steps(steps: int, columns: int) -> list[int]:
    """``columns`` evenly spaced sampler steps in [0, steps), the first and the last included."""
    if columns < 1:
        raise DcditError(f"--timesteps {columns}: show at least 1 timestep (e.g. --timesteps 8)")
    return sorted({int(round(k)) for k in np.linspace(0, steps - 1, min(columns, steps))})


class _Recorder:
    """Calls the model and keeps what the sampler showed it: every step's t and kept count, and
    at the chosen steps x_t, p, the router's boundaries and the kept tokens (first B rows = the
    conditional half under CFG); DyDiT's gates at every step (a gated DiT: only those).
    Everything else is delegated to the model."""

    def __init__(self, model, batch: int, record_at: list[int]):
        self.model, self.batch, self.record_at = model, batch, set(record_at)
        self.calls = 0
        self.t: list[int] = []
        self.num_kept: list[torch.Tensor] = []  # (B,) per step
        self.frames: list[dict[str, torch.Tensor]] = []
        self.gates: list[dict] = []  # DyDiT's gates at every step (viz_gates.py); empty without gates

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, x, t, y, budget=None):
        out, stats = self.model(x, t, y, budget=budget)
        B = self.batch
        self.t.append(int(t[0]))
        gates = gate_snapshot(stats, B)
        if gates is not None:
            self.gates.append(gates)
        if not isinstance(stats, RouterStats):  # a gated DiT: no router to record
            return out, stats
        self.num_kept.append(stats.num_kept[:B].detach().cpu())
        if self.calls in self.record_at:
            self.frames.append({"x": x[:B].detach().float().cpu(), "p": stats.p[:B].detach().float().cpu(),
                                "mask": stats.mask[:B].detach().cpu(), "kept": stats.kept[:B].detach().cpu()})
        self.calls += 1
        return out, stats


@dataclass
class Trajectory:
    """What one batch of images went through: S chosen columns, T' sampler steps, B images."""

    labels: torch.Tensor  # (B,)
    t_all: list[int]  # (T',) the original timestep of every sampler step
    kept_all: np.ndarray  # (T', B) kept tokens of the conditional half at every step
    t_cols: list[int]  # (S,)
    x: torch.Tensor  # (S, B, C, H, W) x_t in model space
    p: torch.Tensor  # (S, B, L)
    mask: torch.Tensor  # (S, B, L) the router's boundaries (before tail dropping)
    kept: torch.Tensor  # (S, B, L) the tokens the inner network ran on
    gates: list[dict] | None = None  # (T',) DyDiT's gates per step (viz_gates.gate_snapshot), None without


def record_batch(model, recipe, indices: list[int], opts, classes, device, cols: list[int], on_step=None) -> Trajectory:
    recorder = _Recorder(model, len(indices), cols)
    _, labels, _ = sample_batch(recorder, recipe, indices, opts, classes, device, on_step)
    frames = {k: torch.stack([f[k] for f in recorder.frames]) for k in ("x", "p", "mask", "kept")}
    return Trajectory(labels=labels, t_all=recorder.t, kept_all=torch.stack(recorder.num_kept).numpy(),
                      t_cols=[recorder.t[k] for k in cols], gates=recorder.gates or None, **frames)


# ----------------------------------------------------------------------------------------
# One sheet per sample: x_t over p with the kept tokens
# ----------------------------------------------------------------------------------------

MIN_PANEL = 160
"""Panels are at least this many pixels wide: small grids are upscaled (nearest)."""
_GUTTER, _GAP, _MARGIN, _TITLE, _HEAD, _CAPTION, _LEGEND, _CBAR = 64, 8, 12, 26, 20, 20, 28, 56


@dataclass(frozen=True)
class SheetLayout:
    columns: int
    grid: int  # side of the token grid
    cell: int  # pixels per token

    @property
    def panel(self) -> int:
        return self.grid * self.cell

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the sheet in pixels."""
        width = _GUTTER + self.columns * self.panel + (self.columns - 1) * _GAP + _CBAR + _MARGIN
        height = _TITLE + _HEAD + 2 * self.panel + _GAP + _CAPTION + _LEGEND + _MARGIN
        return width, height

    def panel_xy(self, row: int, col: int) -> tuple[int, int]:
        return _GUTTER + col * (self.panel + _GAP), _TITLE + _HEAD + row * (self.panel + _GAP)


def sheet_layout(columns: int, grid: int, image_side: int) -> SheetLayout:
    """Token cells of ⌈max(MIN_PANEL, image side) / grid⌉ pixels (16×16 tokens → 10 px each), rounded up
    to a whole number of image pixels per token when the image side is a multiple of the grid (a P×P
    patch of a pixel-space DC-DiT, 8 latent pixels' worth of a decoded one), so each token cell covers
    exactly its patch of x_t."""
    unit = image_side // grid if image_side % grid == 0 else 1  # image pixels per token
    return SheetLayout(columns, grid, unit * math.ceil(max(MIN_PANEL, image_side) / (grid * unit)))


def _draw_kept(draw: ImageDraw.ImageDraw, x0: int, y0: int, cell: int, kept: np.ndarray, dropped: np.ndarray) -> None:
    """A black-and-white box inside every kept cell (visible on any colour); a red cross on every
    boundary that tail dropping removed."""
    for r, c in zip(*np.nonzero(kept)):
        x, y = x0 + c * cell, y0 + r * cell
        draw.rectangle([x, y, x + cell - 1, y + cell - 1], outline=_KEPT_OUTER)
        draw.rectangle([x + 1, y + 1, x + cell - 2, y + cell - 2], outline=_KEPT_INNER)
    for r, c in zip(*np.nonzero(dropped)):
        x, y = x0 + c * cell, y0 + r * cell
        draw.line([x + 2, y + 2, x + cell - 3, y + cell - 3], fill=_DROPPED, width=max(1, cell // 8))
        draw.line([x + 2, y + cell - 3, x + cell - 3, y + 2], fill=_DROPPED, width=max(1, cell // 8))


def _colorbar(draw: ImageDraw.ImageDraw, image: Image.Image, x: int, y: int, height: int, font) -> None:
    bar = viridis(np.linspace(1, 0, height))[:, None, :].repeat(12, axis=1)  # (height, 12, 3), p = 1 on top
    image.paste(Image.fromarray(bar), (x, y))
    draw.rectangle([x - 1, y - 1, x + 12, y + height], outline=(0, 0, 0))
    for value in (0.0, 0.5, 1.0):
        ty = y + round((1 - value) * (height - 1))
        draw.line([x + 12, ty, x + 16, ty], fill=(0, 0, 0))
        draw.text((x + 18, ty - 7), f"{value:g}", font=font, fill=(0, 0, 0))
    draw.text((x - 1, y - 22), "p", font=font, fill=(0, 0, 0))


def boundary_sheet(images: np.ndarray, p: np.ndarray, mask: np.ndarray, kept: np.ndarray, t_cols: list[int],
                   title: str) -> Image.Image:
    """One sample's sheet. images (S, h, w, 3) uint8 x_t; p, mask, kept (S, G, G) for the G×G token grid,
    drawn upsampled to the image (a token's cell covers its patch of pixels, h / G of them a side)."""
    S, G = p.shape[0], p.shape[1]
    layout = sheet_layout(S, G, images.shape[1])
    sheet = Image.new("RGB", layout.size, (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    big, small = font(14), font(12)
    draw.text((_MARGIN, 5), title, font=big, fill=(0, 0, 0))
    panel, L = layout.panel, G * G
    for col in range(S):
        x0, y0 = layout.panel_xy(0, col)
        centered(draw, x0 + panel / 2, y0 - _HEAD + 2, f"t = {t_cols[col]}", big)
        resample = Image.NEAREST if panel % images.shape[1] == 0 else Image.LANCZOS
        sheet.paste(Image.fromarray(images[col]).resize((panel, panel), resample), (x0, y0))
        x1, y1 = layout.panel_xy(1, col)
        heat = Image.fromarray(viridis(p[col])).resize((panel, panel), Image.NEAREST)
        sheet.paste(heat, (x1, y1))
        _draw_kept(draw, x1, y1, layout.cell, kept[col], mask[col] & ~kept[col])
        n = int(kept[col].sum())
        centered(draw, x1 + panel / 2, y1 + panel + 3, f"kept {n}/{L} ({100 * n / L:.1f}%)", small)
    for row, label in enumerate(("x_t", "router p")):
        _, y = layout.panel_xy(row, 0)
        draw.text((_MARGIN - 4, y + panel / 2 - 8), label, font=big, fill=(0, 0, 0))
    _, y1 = layout.panel_xy(1, 0)
    _colorbar(draw, sheet, layout.size[0] - _MARGIN - _CBAR + 10, y1, panel, small)
    # legend
    ly = y1 + panel + _CAPTION + 6
    c = 12
    _draw_kept(draw, _GUTTER, ly, c, np.ones((1, 1), bool), np.zeros((1, 1), bool))
    text = "kept token (runs through the inner DiT)"
    draw.text((_GUTTER + c + 6, ly - 1), text, font=small, fill=(0, 0, 0))
    lx = _GUTTER + c + 6 + text_width(draw, text, small) + 24
    draw.rectangle([lx, ly, lx + c - 1, ly + c - 1], fill=tuple(viridis(np.array(0.8)).tolist()))
    _draw_kept(draw, lx, ly, c, np.zeros((1, 1), bool), np.ones((1, 1), bool))
    text = "boundary (p > 0.5) dropped by the budget (tail dropping)"
    draw.text((lx + c + 6, ly - 1), text, font=small, fill=(0, 0, 0))
    return sheet


# ----------------------------------------------------------------------------------------
# Compression against the timestep (paper Fig. 4), drawn with Pillow
# ----------------------------------------------------------------------------------------


def compression_plot(t_all: list[int], kept_all: np.ndarray, tokens: int, title: str) -> Image.Image:
    """Two panels against t (noisy on the left, clean on the right): L / kept and kept tokens;
    a thin line per sample, the mean (L / mean kept for the ratio) thick and black."""
    kept = kept_all.astype(np.float64)  # (T', B)
    series = {  # title: (y label, per sample, mean)
        "compression ratio": ("L / kept", tokens / kept, tokens / kept.mean(axis=1)),
        f"kept tokens (of L = {tokens})": ("kept tokens", kept, kept.mean(axis=1)),
    }
    W, H, pad = 980, 470, 78
    image = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    big, small = font(14), font(12)
    centered(draw, W / 2, 8, title, big)
    xs = np.asarray(t_all, dtype=np.float64)
    xt = nice_ticks(float(xs.min()), float(xs.max()))
    xlim = (xt[-1], xt[0])  # t runs backwards: noisy on the left
    panel_w = (W - 2 * pad - 40) // 2
    for i, (name, (ylabel, per, mean)) in enumerate(series.items()):
        l = pad + i * (panel_w + pad - 20)
        box = (l, 64, l + panel_w, H - 100)
        yt = nice_ticks(0.0, float(per.max()))
        ax = Axes(image, box, xlim, (yt[0], yt[-1]), small)
        ax.frame(xt[::-1], yt, "timestep t  (noisy at left; sampling runs left to right)",
                 ylabel, name)
        for b in range(per.shape[1]):
            ax.line(xs, per[:, b], SAMPLE_COLOURS[b % len(SAMPLE_COLOURS)], 1)
        ax.line(xs, mean, (0, 0, 0), 3)
    # legend under the panels
    entries = [("mean", (0, 0, 0), 3)] + [(f"sample {b}", SAMPLE_COLOURS[b % len(SAMPLE_COLOURS)], 1)
                                          for b in range(min(kept.shape[1], len(SAMPLE_COLOURS)))]
    if kept.shape[1] > len(SAMPLE_COLOURS):
        entries.append((f"… {kept.shape[1]} samples", (128, 128, 128), 1))
    x, y = pad, H - 34
    for label, colour, width in entries:
        draw.line([x, y + 7, x + 22, y + 7], fill=colour, width=width)
        draw.text((x + 28, y), label, font=small, fill=(0, 0, 0))
        x += 28 + text_width(draw, label, small) + 22
    return image


# ----------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------


def run_viz(ckpt, num: int = 4, classes: list[int] | None = None, timesteps: int = 8, budget: float | None = None,
            out_dir: Path = Path("boundaries"), seed: int = 0, cfg_scale: float | None = None,
            steps: int | None = None, vae: str | None = None, as_json: bool = False, method: str | None = None) -> dict:
    """What `dcdit viz-boundaries` does; returns the JSON summary plus the paths written.

    kept[i][b] is image b's kept-token count (conditional half) at column i, compression[i][b]
    = L / kept[i][b]; mean_kept[i] averages over the images and mean_compression[i] = L / mean_kept[i].
    """
    check = OptionCheck().count("--num", num, example=4).count("--timesteps", timesteps, example=8).count("--steps", steps, example=50)
    check.fraction("--budget", budget).cfg_scale("--cfg-scale", cfg_scale).seed("--seed", seed)
    if method is not None:
        check.choice("--scheduler", method, METHODS)
    check.output("--out", Path(out_dir), directory=True).done()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, recipe, step = load_weights(ckpt, device)
    gated = recipe.model.dynamic == "dydit"
    if recipe.model.kind != "dcdit" and not gated:
        raise DcditError(f"{ckpt} is a {recipe.model.kind} checkpoint: it patchifies with a fixed grid and has no "
                         "router to draw; pass a DC-DiT run (model.kind = 'dcdit') or a DyDiT-gated one")
    opts = SampleOptions.from_recipe(recipe, cfg_scale=cfg_scale, steps=steps, budget=budget, seed=seed, method=method)
    classes_for(range(num), recipe.model.num_classes, seed, classes)  # bad --classes: one line, before any output
    steps, cfg_scale, budget = opts.steps, opts.cfg_scale, opts.budget
    cols = column_steps(steps, timesteps)
    gates_title = f"{recipe.run.name}: DyDiT gates, cfg {cfg_scale:g}, {steps} {opts.method.upper()} steps (conditional half)"
    if recipe.model.kind != "dcdit":  # a gated DiT (Table 4's DyDiT rows): its gates, no boundaries
        recorder = _Recorder(model, min(num, 16), [])
        sample_batch(recorder, recipe, list(range(recorder.batch)), opts, classes, device)
        side = recipe.model.input_size // recipe.model.patch_size
        t_cols = [recorder.t[k] for k in cols]
        figure = gates_figure(recorder.t, recorder.gates, t_cols, [recorder.gates[k] for k in cols], side, gates_title)
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        gates_png = write_png(Path(out_dir) / "gates_vs_t.png", figure)
        result = {"timesteps": t_cols, "steps": steps, "gates": str(gates_png), "pngs": []}
        if as_json:
            sys.stdout.write(json.dumps(result) + "\n")
        else:
            print0(f"wrote {gates_png} (a DiT has no router: only DyDiT's gates are drawn)")
        return result
    decoder = ToPixels(recipe, vae, device)
    G, out_dir = recipe.model.input_size // recipe.model.patch_size, Path(out_dir)  # the token grid
    L = G * G
    out_dir.mkdir(parents=True, exist_ok=True)

    pngs, kept_cols, t_all, kept_all, start = [], [], [], [], time.perf_counter()
    with progress_bar("viz-boundaries", disable=as_json) as progress:
        task = progress.add_task("viz-boundaries", total=num * steps, rate="")
        for lo in range(0, num, 16):
            idx = list(range(lo, min(num, lo + 16)))
            traj = record_batch(model, recipe, idx, opts, classes, device, cols,
                                on_step=lambda done, total, n=len(idx): progress.update(task, advance=n))
            frames = np.stack([to_uint8(decoder(x.to(device))) for x in traj.x])  # (S, B, h, w, 3)
            p, mask, kept = (a.reshape(*a.shape[:2], G, G).numpy() for a in (traj.p, traj.mask, traj.kept))
            mask, kept = mask.astype(bool), kept.astype(bool)  # (S, B, G, G) each
            for b, i in enumerate(idx):
                title = "  ·  ".join([f"sample {i}", f"class {int(traj.labels[b])}", f"budget {budget:g}",
                                      f"cfg {cfg_scale:g}", f"{steps} {opts.method.upper()} steps", f"weights step {step}"])
                sheet = boundary_sheet(frames[:, b], p[:, b], mask[:, b], kept[:, b], traj.t_cols, title)
                path = out_dir / f"sample-{i:03d}.png"
                write_png(path, sheet)
                pngs.append(str(path))
            kept_cols.append(traj.kept.sum(dim=2).numpy())  # (S, B)
            t_all, t_cols = traj.t_all, traj.t_cols
            kept_all.append(traj.kept_all)
    kept_cols, kept_all = np.concatenate(kept_cols, axis=1), np.concatenate(kept_all, axis=1)

    summary = out_dir / "compression_vs_t.png"
    title = (f"{recipe.run.name}: {L} tokens, budget {budget:g}, cfg {cfg_scale:g}, {num} samples, "
             f"{steps} {opts.method.upper()} steps (conditional half)")
    write_png(summary, compression_plot(t_all, kept_all, L, title))
    if traj.gates:  # a DyDiT-gated model (paper §4.5): heads / MLP groups against t, tokens that skipped the MLP
        gates_png = out_dir / "gates_vs_t.png"
        write_png(gates_png, gates_figure(t_all, traj.gates, t_cols, [traj.gates[k] for k in cols], G, gates_title))

    mean_kept = kept_cols.mean(axis=1)
    result = {
        "timesteps": [int(t) for t in t_cols],
        "kept": kept_cols.astype(int).tolist(),
        "compression": (L / kept_cols).round(4).tolist(),
        "mean_kept": mean_kept.round(4).tolist(),
        "mean_compression": (L / mean_kept).round(4).tolist(),
        "tokens": L,
        "budget": budget,
        "steps": steps,
        "pngs": pngs,
        "summary": str(summary),
        "gates": str(gates_png) if traj.gates else None,
    }
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        print0(f"wrote {len(pngs)} boundary sheets ({out_dir}/sample-*.png) and {summary} "
               f"in {time.perf_counter() - start:.1f}s (weights at step {step})")
        print0("      t  " + "  ".join(f"{t:>6d}" for t in result["timesteps"]))
        print0("   kept  " + "  ".join(f"{k:6.1f}" for k in mean_kept))
        print0("     CR  " + "  ".join(f"{c:6.2f}" for c in result["mean_compression"]))
    return result
