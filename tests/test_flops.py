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
    cost(20) − cost(7) less than one with (20, 20) (the portable attention pads a group of one sample
    not at all). With four samples it sorts them by kept count into two groups and pads attention to
    each group's longest, up to a multiple of 8 except 1–4 past a multiple of 16
    (``attention.padded_length``): (20, 7, 9, 3) attends as (3, 7) → 8 and (9, 20) → 20."""
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
    # The same groups' padding (16 and 20) in both batches: only the linear layers shrink.
    assert batch_flops(20, 20, 9, 9) - batch_flops(20, 13, 9, 3) == pytest.approx(cost.b * (7 + 6), rel=1e-9)
    # c·M² is the attention, paid on the groups' padded squares: 2·8² + 2·20² against 2·16² + 2·20².
    assert batch_flops(20, 7, 9, 3) - batch_flops(20, 20, 9, 9) == pytest.approx(
        -cost.b * (13 + 6) + cost.c * 2 * (8**2 - 16**2), rel=1e-9)


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


def test_authors_convention_differs_by_padded_smoothing_minus_residual_proj():
    """docs/reference.md#authors-flop-counter: their count − dcdit's = 2·M_max²·D (the padded bmm)
    − dcdit's grid smoothing (2 depthwise convs of 2σ·6+1 taps over D + 1 channels) − residual_proj (2·L·D²)."""
    from dcdit_cli.models.flops import authors_delta

    recipe = load_recipe("tiny")
    m = recipe.model
    L, D = m.input_size**2, m.hidden_size
    delta = authors_delta(m)
    taps = 2 * 6 * int(m.smoothing_sigma) + 1
    assert delta.dechunk == 2 * 2 * taps * (D + 1) * L
    assert delta.residual_proj == 2 * L * D * D
    ours, theirs = flops_row("tiny", recipe), flops_row("tiny", recipe, convention="authors")
    M = L // 4
    steps = recipe.diffusion.sampling_steps
    expected = (2 * M * M * D - delta.dechunk - delta.residual_proj) * 2 * (steps - 1) / 1e12
    assert theirs.authors_tflops - ours.tflops_per_img == pytest.approx(expected, rel=1e-9)
    assert theirs.tflops_per_img == ours.tflops_per_img and theirs.authors_compression == pytest.approx(4.0)
    dit = flops_row("dit-b-p2", load_recipe("dit-b-p2"), convention="authors")
    assert dit.authors_tflops == dit.tflops_per_img  # a DiT is counted alike


def test_authors_sample_report_matches_an_oracle_of_their_counter():
    """authors' sample.py: each step's whole CFG batch (smoothing padded to the batch's largest M),
    steps 2.. summed, ÷ images. Oracle: each row's forward counted by FlopCounterMode without the
    dechunk and residual_proj modules, plus one real bmm over the batch padded to its largest M."""
    import numpy as np
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from dcdit_cli.models.flops import _CUSTOM, authors_tflops_per_image, count_flops

    recipe = load_recipe("tiny")
    model = build_for_counting(recipe.model, "cpu")
    side, D = recipe.model.input_size, recipe.model.hidden_size
    x = torch.zeros(1, recipe.model.in_channels, side, side)
    t = y = torch.zeros(1, dtype=torch.long)

    def their_count_without_smoothing(m):
        boundary = torch.zeros(1, side * side, dtype=torch.bool)
        boundary[0, :m] = True
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False, custom_mapping=_CUSTOM) as counter, torch.no_grad():
            model(x, t, y, boundary=boundary)
        counts = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
        return counts["Global"] - counts["DCDiT.dechunk"] - counts["DCDiT.residual_proj"]

    rows = [20, 7, 9, 3]  # [cond image 0, cond image 1, uncond 0, uncond 1]: one batch, M_max = 20
    padded_bmm = count_flops(torch.bmm, torch.zeros(4, 20, 20), torch.zeros(4, 20, D))
    step = sum(their_count_without_smoothing(m) for m in rows) + padded_bmm
    kept = np.array([[[20, 9], [7, 3]]] * 3)  # (3 steps, 2 images, 2 halves); the first step is not counted
    assert authors_tflops_per_image(recipe.model, kept) * 1e12 == pytest.approx(2 * step / 2, rel=1e-9)


def test_authors_compression_is_geometric_over_steps_of_the_conditional_half():
    import math

    import numpy as np

    from dcdit_cli.models.flops import authors_compression

    kept = np.array([[[16, 64], [16, 64]], [[4, 1], [12, 1]]])  # (2 steps, 2 images, [cond, uncond])
    # step 1: 2·64 / 32 = 4; step 2: 2·64 / 16 = 8; geometric mean √32; the unconditional half is ignored.
    assert authors_compression(kept, 64) == pytest.approx(math.sqrt(32))
    row = flops_row("tiny", load_recipe("tiny"), kept_per_step=kept)
    assert row.authors_compression == pytest.approx(math.sqrt(32))
    assert row.compression == pytest.approx(64 / kept.mean())  # dcdit's: L over the mean kept count of every forward
