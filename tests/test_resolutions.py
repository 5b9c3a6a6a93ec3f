"""512² latents (docs/resolutions.md): recipes, positions, FLOP-matched baselines."""

from __future__ import annotations

import pytest
import torch

from dcdit_cli.config.recipe import load_recipe
from dcdit_cli.models import build_model
from dcdit_cli.models.dit import grid_positions
from dcdit_cli.models.flops import flops_row

PAIRS_512 = {"b-n4-512": "dit-b-p2-512-isoflop", "xl-n4-512": "dit-xl-p2-512-isoflop", "xl-n16-512": "dit-xl-p4-512-isoflop"}


@pytest.mark.parametrize("name", sorted(PAIRS_512))
def test_512_recipes_use_sigma_two_and_the_64_grid(name):
    """docs/reference.md#positions-at-512-px, docs/reference.md#smoothing: σ = 2.0 at 512 px."""
    recipe = load_recipe(name)
    m, d = recipe.model, recipe.data
    assert (m.input_size, d.image_size, m.smoothing_sigma, m.pos_grid_scale) == (64, 512, 2.0, 0.5)
    dit = load_recipe(PAIRS_512[name])
    assert (dit.model.input_size, dit.data.image_size) == (64, 512)


def test_512_positions_lie_on_dit_xl2_512_grid():
    """Every 2×2 block of the DC-DiT's 64² tokens averages to the position DiT-XL/2-512 gives that patch."""
    with torch.device("meta"):
        model = build_model(load_recipe("xl-n4-512").model)
    order = torch.arange(64 * 64)[None]  # every token, raster order
    pos = model.inner_positions(order, 64)[0].view(32, 2, 32, 2, 2)  # (patch row, dr, patch col, dc, [r, c])
    dit_grid = grid_positions(32).view(32, 32, 2)
    torch.testing.assert_close(pos.mean(dim=(1, 3)), dit_grid)
    assert float(pos[..., 0].min()) == -0.25 and float(pos[..., 0].max()) == 31.25


@pytest.mark.parametrize("name", sorted(PAIRS_512))
def test_512_baselines_are_flop_matched_within_two_percent(name):
    ours, dit = flops_row(name, load_recipe(name)), flops_row(PAIRS_512[name], load_recipe(PAIRS_512[name]))
    assert abs(dit.tflops_per_img / ours.tflops_per_img - 1) < 0.02
