"""FLOP accounting reproduces paper Table 1 for the DiT baselines (docs/reference.md#baseline-depths, docs/reference.md#flop-convention)."""

import pytest

from dcdit_cli.config.recipe import load_recipe
from dcdit_cli.models.flops import build_for_counting, dcdit_cost, flops_row, forward_flops_at

TABLE1 = {  # recipe: (params, TFLOPs/img), paper Table 1 (dit-b-p2-isoflop: 17 blocks count 183.5M, docs/reference.md#table-1-configurations)
    "dit-b-p2": (141e6, 24.84), "dit-b-p2-isoflop": (183.5e6, 32.50), "dit-b-p4": (141e6, 6.01),
    "dit-b-p4-isoflop": (301e6, 12.92), "dit-xl-p2": (699e6, 122.41), "dit-xl-p2-isoflop": (818e6, 143.75),
    "dit-xl-p4": (699e6, 29.96), "dit-xl-p4-isoflop": (1201e6, 51.65),
}


@pytest.mark.parametrize("name", sorted(TABLE1))
def test_dit_rows_match_table1_within_one_percent(name):
    row = flops_row(name, load_recipe(name))
    params, tflops = TABLE1[name]
    assert abs(row.params - params) / params < 0.01
    assert abs(row.tflops_per_img - tflops) / tflops < 0.01


def test_forward_gflops_reference_values():
    # docs/reference.md#flop-convention: DiT-B/2 with 13 blocks is 49.873 GFLOPs a forward.
    row = flops_row("dit-b-p2", load_recipe("dit-b-p2"))
    assert abs(row.tflops_per_img * 1e12 / (2 * 249) / 1e9 - 49.873) < 0.01


def test_dcdit_quadratic_cost_is_exact():
    recipe = load_recipe("tiny")
    model = build_for_counting(recipe.model, "cpu")
    cost = dcdit_cost(recipe.model, model)
    for m in (7, 20, 64):
        assert cost(m) == pytest.approx(forward_flops_at(model, m), rel=1e-9)
    assert cost.c > 0  # attention and smoothing grow quadratically


def test_dcdit_row_from_target_and_from_measured_counts():
    recipe = load_recipe("tiny")
    by_target = flops_row("tiny", recipe)
    assert by_target.compression == pytest.approx(4.0) and by_target.source == "target N"
    steps = recipe.diffusion.sampling_steps
    kept = [[16, 16]] * steps  # 2 images, 16 kept tokens each at every step
    measured = flops_row("tiny", recipe, kept_per_step=kept)
    assert measured.tflops_per_img == pytest.approx(by_target.tflops_per_img * steps / (steps - 1) * (steps - 1) / steps)
    assert measured.compression == pytest.approx(4.0)


def test_depthwise_conv_backward_counts_groups():
    import torch

    from dcdit_cli.models.flops import count_flops, count_train_flops

    conv = torch.nn.Conv2d(96, 96, 3, padding=1, groups=96, bias=False)
    x = torch.randn(1, 96, 16, 16, requires_grad=True)
    forward = count_flops(conv, x)
    assert forward == 2 * 96 * 9 * 16 * 16
    assert count_train_flops(lambda: conv(x).sum()) == 3 * forward  # forward + grad input + grad weight


def test_batch_flops_count_exactly_the_kept_tokens():
    """The inner network runs on Σ M tokens, not B·M_max: a batch with kept counts (20, 7) costs exactly
    cost(20) − cost(7) less than one with (20, 20) (the portable attention pads each half of a batch
    only to that half's length, so with two samples it pads nothing); four samples (20, 7 | 9, 3)
    pay attention padding within each half only."""
    import torch

    from dcdit_cli.models.flops import count_flops

    recipe = load_recipe("tiny")
    model = build_for_counting(recipe.model, "cpu")
    model.attention = "sdpa_pad"
    cost = dcdit_cost(recipe.model, model)
    side, ch = recipe.model.input_size, recipe.model.in_channels
    x, t, y = torch.zeros(1, ch, side, side), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)

    def batch_flops(*ms):
        boundary = torch.zeros(len(ms), side * side, dtype=torch.bool)
        for i, m in enumerate(ms):
            boundary[i, :m] = True
        n = len(ms)
        return count_flops(model, x.expand(n, -1, -1, -1), t.expand(n), y.expand(n), boundary=boundary)

    assert batch_flops(20, 20) - batch_flops(20, 7) == pytest.approx(cost(20) - cost(7), rel=1e-9)
    # Within a half, attention pads to the half's longest sample: only the linear layers shrink.
    assert batch_flops(20, 20, 9, 9) - batch_flops(20, 7, 9, 3) == pytest.approx(cost.b * (13 + 6), rel=1e-9)


def test_per_image_flops_is_the_one_cost_function():
    """Spent FLOPs per image sum the exact forward cost over steps and halves; Table 1's
    convention rescales the mean forward to 2 halves × (steps − 1)."""
    import numpy as np

    from dcdit_cli.models.flops import per_image_flops, table1_tflops

    recipe = load_recipe("tiny")
    cost = dcdit_cost(recipe.model)
    kept = np.array([[[16, 8], [4, 4]], [[16, 16], [4, 2]]])  # (2 steps, 2 images, 2 halves)
    per = per_image_flops(recipe.model, kept)
    assert per[0] == pytest.approx(cost(16) + cost(8) + cost(16) + cost(16))
    assert per[1] == pytest.approx(cost(4) + cost(4) + cost(4) + cost(2))
    assert table1_tflops(recipe.model, kept, 250) == pytest.approx(per.mean() / 4 * 2 * 249 / 1e12)
    dit = load_recipe("toy-dit")
    tokens = (dit.model.input_size // dit.model.patch_size) ** 2
    one_half = np.full((3, 2, 1), tokens)  # guidance off: one half ran, the convention still counts two
    steps = dit.diffusion.sampling_steps
    assert table1_tflops(dit.model, one_half, steps) == pytest.approx(flops_row("toy-dit", dit).tflops_per_img)
