"""DyDiT's gates along the sampling trajectory: `dcdit viz-boundaries` on a gated DC-DiT also
writes DIR/gates_vs_t.png (paper §4.5; models/dydit.py); on a gated DiT (Table 4's DyDiT rows,
which have no router to draw) it writes that figure alone.

    top     active attention heads and MLP groups of every block against t (one row per head or
            group, blocks stacked; dark = on). They depend on t only, so one image stands for all.
    bottom  at the sheet's columns, sample 0's token grid: the fraction of blocks in which each kept
            token ran the MLP (viridis; 0 = skipped it in every block); grey = not kept by the router.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from dcdit_cli.common.plots import centered, font, nice_ticks, viridis
from dcdit_cli.models.dcdit import RouterStats
from dcdit_cli.models.dit import ForwardStats

_ON, _OFF, _NOT_KEPT = (25, 95, 60), (228, 228, 228), (190, 190, 190)


def gate_snapshot(stats: ForwardStats, batch: int) -> dict | None:
    """The gates of one forward (its stats): heads/groups (depth, H) of image 0 (t-only) and, per image of
    the first ``batch`` (the conditional half), the fraction of blocks each grid position ran the
    MLP in (B, L), NaN where the router kept no token. None for an ungated model."""
    if stats.gates is None:
        return None
    heads = torch.stack([g.heads[0] for g in stats.gates]).detach().float().cpu()  # (depth, H)
    groups = torch.stack([g.groups[0] for g in stats.gates]).detach().float().cpu()
    ran = torch.stack([g.tokens[:batch] for g in stats.gates]).detach().float().mean(0).cpu()  # (B, M)
    if not isinstance(stats, RouterStats):  # a DiT: every patch token runs the blocks, in raster order
        return {"heads": heads, "groups": groups, "ran_mlp": ran}
    order, valid = stats.order[:batch].cpu(), stats.valid[:batch].cpu()
    grid = torch.full((batch, stats.p.shape[1]), float("nan"))
    rows = torch.arange(batch)[:, None].expand_as(order)
    grid[rows[valid], order[valid]] = ran[valid]
    return {"heads": heads, "groups": groups, "ran_mlp": grid}


def _heatmap(draw: ImageDraw.ImageDraw, x0: int, y0: int, masks: np.ndarray, cell_w: int, cell_h: int) -> None:
    """masks (T', depth, H) → columns = steps, rows = block-major heads; a line between blocks."""
    steps, depth, H = masks.shape
    for s in range(steps):
        for r in range(depth * H):
            on = masks[s, r // H, r % H] > 0.5
            x, y = x0 + s * cell_w, y0 + r * cell_h
            draw.rectangle([x, y, x + cell_w - 1, y + cell_h - 1], fill=_ON if on else _OFF)
    for blk in range(1, depth):
        y = y0 + blk * H * cell_h
        draw.line([x0, y, x0 + steps * cell_w, y], fill=(255, 255, 255))


def gates_figure(t_all: list[int], snapshots: list[dict], t_cols: list[int], col_snaps: list[dict], side: int,
                 title: str) -> Image.Image:
    """The figure described in the module docstring; snapshots per sampler step, col_snaps at the columns."""
    heads = np.stack([s["heads"].numpy() for s in snapshots])  # (T', depth, H)
    groups = np.stack([s["groups"].numpy() for s in snapshots])
    steps, depth, H = heads.shape
    cell_w, cell_h = max(1, 420 // steps), max(2, min(14, 240 // (depth * H)))
    map_w, map_h = steps * cell_w, depth * H * cell_h
    cell = max(4, 120 // side)
    panel = side * cell
    S = len(col_snaps)
    W = max(2 * map_w + 3 * 70, 70 + S * (panel + 10) + 20)
    H_img = 40 + 20 + map_h + 50 + 24 + panel + 60
    image = Image.new("RGB", (W, H_img), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    big, small = font(14), font(12)
    centered(draw, W / 2, 8, title, big)
    top = 60
    for i, (name, masks) in enumerate((("attention heads active", heads), ("MLP groups active", groups))):
        x0 = 70 + i * (map_w + 70)
        centered(draw, x0 + map_w / 2, top - 20, f"{name} ({100 * masks.mean():.0f}% on average)", small)
        _heatmap(draw, x0, top, masks, cell_w, cell_h)
        draw.rectangle([x0 - 1, top - 1, x0 + map_w, top + map_h], outline=(0, 0, 0))
        for blk in range(depth):
            if H * cell_h >= 12:
                draw.text((x0 - 62, top + blk * H * cell_h + (H * cell_h - 12) // 2), f"block {blk}", font=small,
                          fill=(0, 0, 0))
        for tick in nice_ticks(float(min(t_all)), float(max(t_all)))[::-1]:
            s = int(np.argmin(np.abs(np.asarray(t_all) - tick)))
            x = x0 + s * cell_w + cell_w // 2
            draw.line([x, top + map_h, x, top + map_h + 4], fill=(0, 0, 0))
            centered(draw, x, top + map_h + 6, f"{int(tick)}", small)
        centered(draw, x0 + map_w / 2, top + map_h + 22, "timestep t (sampling runs left to right)", small)
    y1 = top + map_h + 50
    draw.text((70, y1), "sample 0: fraction of blocks in which each kept token ran the MLP: dark purple 0 (skipped "
              "it in every block) to yellow 1; grey: not kept by the router", font=small, fill=(0, 0, 0))
    y1 += 24
    for k, (t, snap) in enumerate(zip(t_cols, col_snaps)):
        frac = snap["ran_mlp"][0].numpy().reshape(side, side)
        rgb = viridis(np.nan_to_num(frac, nan=0.0))
        rgb[np.isnan(frac)] = _NOT_KEPT
        x0 = 70 + k * (panel + 10)
        image.paste(Image.fromarray(rgb.astype(np.uint8)).resize((panel, panel), Image.NEAREST), (x0, y1))
        centered(draw, x0 + panel / 2, y1 + panel + 4, f"t = {t}", small)
    return image
