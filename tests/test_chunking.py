"""Router, chunk, de-chunk, STE and ratio loss against hand-made inputs (paper §3.3–3.5)."""

import math

import pytest
import torch
import torch.nn.functional as F
from dechunk_reference import blur_reference, plug_back_index_dense, plug_back_reference, smooth_reference

from dcdit_cli.models.chunking import (
    BAND_MAX_SIDE,
    ChunkLayer,
    DeChunkLayer,
    keep_at_least_one,
    ratio_loss,
    ste,
    tail_drop,
)
from dcdit_cli.models.routers import RandomRouter, Router


@pytest.mark.parametrize("projections", ["identity", "random"])
def test_router_matches_formula_on_hand_made_features(projections):
    """p from the paper's formula written out (normalised q and k, the in-grid 3×3 mean of k), values
    and gradients: the router folds q's norm and the border rescale into (B, L) products."""
    torch.manual_seed(0)
    side, D = 4, 8
    router = Router(D)
    if projections == "random":
        with torch.no_grad():
            router.q_proj.weight.copy_(torch.randn(D, D))
            router.k_proj.weight.copy_(torch.randn(D, D))
    h = torch.randn(1, side * side, D, requires_grad=True)
    p = router(h, side)
    # Oracle: normalised projections, mean of k over the in-grid 3×3 window (centre included).
    q = F.normalize(h[0] @ router.q_proj.weight.T, dim=-1).reshape(side, side, D)
    k = F.normalize(h[0] @ router.k_proj.weight.T, dim=-1).reshape(side, side, D)
    expected = torch.empty(side, side)
    for r in range(side):
        for c in range(side):
            window = k[max(r - 1, 0) : r + 2, max(c - 1, 0) : c + 2].reshape(-1, D)
            s = (q[r, c] * window.mean(0)).sum()
            expected[r, c] = ((1 - s) / 2).clamp(0, 1)
    assert torch.allclose(p[0], expected.reshape(-1), atol=1e-6)
    w = torch.randn(side * side)
    grad, = torch.autograd.grad((p[0] * w).sum(), h)
    grad_expected, = torch.autograd.grad((expected.reshape(-1) * w).sum(), h)
    assert torch.allclose(grad, grad_expected, atol=1e-6)


def test_router_backward_is_autograds_through_the_formula_including_zero_features():
    """The cosine router's written-out backward (routers._CosineScore) gives autograd's gradients of
    the same formula (F.normalize, the depthwise convolution, q's clamped norm) for h, W_Q, W_K and
    the k̄ weights, with trained-looking (random) weights and features that are exactly zero, where
    the norms are clamped; the forward is the formula's, bit for bit."""
    torch.manual_seed(0)
    side, D, B = 5, 6, 3
    router = Router(D)
    with torch.no_grad():
        for weight in router.parameters():
            weight.add_(torch.randn_like(weight) * 0.3)
    h = torch.randn(B, side * side, D)
    h[1, [0, 7, 24]] = 0.0  # q = k = 0 there: both norms below ε
    h.requires_grad_()

    def formula(h):  # through autograd, in the router's order of operations
        q, k = F.linear(h, torch.cat([router.q_proj.weight, router.k_proj.weight])).chunk(2, dim=-1)
        k_bar = router.k_avg(F.normalize(k, dim=-1).transpose(1, 2).reshape(B, D, side, side)).flatten(2).transpose(1, 2)
        scale = router.border_correction(side, "cpu").view(1, -1) / q.norm(dim=-1).clamp_min(1e-12)
        return ((1.0 - (q * k_bar).sum(-1) * scale) / 2.0).clamp(0.0, 1.0)

    w = torch.randn(B, side * side)
    params = [h, *router.parameters()]
    p, expected = router(h, side), formula(h)
    assert torch.equal(p, expected)
    grads = torch.autograd.grad((p * w).sum(), params)
    expected_grads = torch.autograd.grad((expected * w).sum(), params)
    for got, want in zip(grads, expected_grads):
        assert torch.allclose(got, want, atol=1e-6, rtol=1e-5)
    assert torch.count_nonzero(grads[0][1, 7]) > 0  # a zero feature still gets a gradient (through its neighbours' k̄)


def test_router_constant_input_is_border_neutral():
    side, D = 5, 6
    h = torch.randn(1, 1, D).expand(2, side * side, D).contiguous()
    p = Router(D)(h, side)
    assert torch.allclose(p, p[:, :1].expand_as(p), atol=1e-6)  # border == centre
    assert torch.allclose(p, torch.zeros_like(p), atol=1e-6)  # identical neighbours: s = 1


def test_router_orthogonal_neighbours_give_half():
    # A checkerboard of two orthogonal vectors: neighbours differ, so p is high but below 1.
    side, D = 4, 2
    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    grid = torch.stack([e0 if (r + c) % 2 == 0 else e1 for r in range(side) for c in range(side)])
    p = Router(D)(grid[None], side)
    centre = 1 * side + 1  # 5 of 9 window entries equal its own vector
    assert math.isclose(p[0, centre].item(), (1 - 5 / 9) / 2, abs_tol=1e-6)


def test_chunk_keeps_boundaries_in_raster_order_and_pads_with_highest_p():
    L, D = 9, 3  # a 3×3 grid
    h = torch.arange(2 * L * D, dtype=torch.float32).reshape(2, L, D)
    p = torch.tensor([[0.9, 0.1, 0.6, 0.3, 0.8, 0.2, 0.05, 0.04, 0.03], [0.2, 0.7, 0.4, 0.1, 0.45, 0.3, 0.05, 0.04, 0.03]])
    mask = p > 0.5
    tokens, order, valid, layout, _ = ChunkLayer()(h, mask, p)
    assert order[0].tolist() == [0, 2, 4]
    assert order[1, 0].item() == 1 and valid[1].tolist() == [True, False, False]
    assert order[1, 1:].tolist() == [4, 2]  # padding: highest-p non-boundaries (0.45, 0.4)
    assert torch.equal(tokens, torch.stack([h[0, 0], h[0, 2], h[0, 4], h[1, 1]]))  # packed: exactly the kept
    assert layout.cu_seqlens.tolist() == [0, 3, 4] and layout.sample.tolist() == [0, 0, 0, 1]
    assert layout.max_len == 3 and torch.equal(layout.unpad(layout.pad(tokens)), tokens)


def test_keep_at_least_one_and_tail_drop():
    p = torch.tensor([[0.1, 0.3, 0.2, 0.05], [0.9, 0.6, 0.7, 0.8]])
    mask = keep_at_least_one(p > 0.5, p)
    assert mask[0].tolist() == [False, True, False, False]
    kept = tail_drop(mask, p, torch.tensor([0.9, 0.5]))
    assert kept[0].tolist() == [False, True, False, False]  # never the last token
    assert kept[1].tolist() == [True, False, False, True]  # dropped the two lowest p (0.6, 0.7)
    assert torch.equal(tail_drop(mask, p, torch.zeros(2)), mask)


def plug_back_oracle(kept_rc, side):
    out = []
    for r in range(side):
        for c in range(side):
            d = [(r - kr) ** 2 + (c - kc) ** 2 for kr, kc in kept_rc]
            out.append(d.index(min(d)))  # first minimum = smallest raster index
    return out


def test_plug_back_on_hand_made_grid_with_ties():
    side = 4
    kept = [(0, 0), (0, 3), (3, 1)]  # raster order
    order = torch.tensor([[r * side + c for r, c in kept]])
    pos = torch.tensor([[[float(r), float(c)] for r, c in kept]])
    idx = plug_back_reference(pos, torch.ones(1, 3, dtype=torch.bool), side)
    assert idx[0].tolist() == plug_back_oracle(kept, side)
    # (0,1)/(0,2) are at distance 1 and 2; (1,2): d²(0,3)=2, d²(0,0)=5 → slot 1; (2,0): d²(0,0)=4 and d²(3,1)=2 → slot 2.
    assert idx[0, 0 * side + 1].item() == 0 and idx[0, 1 * side + 2].item() == 1 and idx[0, 2 * side + 0].item() == 2
    # An exact tie: (1,1)... position (2,2) with kept (2,0) and (2,4) on a 5-grid → the smaller raster index.
    side = 5
    tie = plug_back_reference(torch.tensor([[[2.0, 0.0], [2.0, 4.0]]]), torch.ones(1, 2, dtype=torch.bool), side)
    assert DeChunkLayer.plug_back_index(torch.tensor([[10, 14]]), torch.ones(1, 2, dtype=torch.bool), side)[0, 12] == 0
    assert tie[0, 2 * side + 2].item() == 0
    assert order.shape == (1, 3)


def test_plug_back_ignores_padding_slots():
    pos = torch.tensor([[[0.0, 0.0], [1.0, 1.0]]])
    idx = plug_back_reference(pos, torch.tensor([[True, False]]), 2)
    assert DeChunkLayer.plug_back_index(torch.tensor([[0, 3]]), torch.tensor([[True, False]]), 2).tolist() == [[0, 0, 0, 0]]
    assert idx.tolist() == [[0, 0, 0, 0]]


def test_smoothing_with_confident_boundaries_is_identity_and_matches_formula():
    torch.manual_seed(0)
    layer = DeChunkLayer(sigma=1.0)
    z = torch.randn(1, 4, 5)
    pos = torch.tensor([[[0.0, 0.0], [0.0, 1.0], [2.0, 2.0], [3.0, 0.0]]])
    valid = torch.ones(1, 4, dtype=torch.bool)
    ones = torch.full((1, 4), 1 - 1e-4)
    assert torch.allclose(smooth_reference(z, pos, ones, valid, layer.sigma), z, atol=1e-3)
    p = torch.tensor([[0.6, 0.9, 0.7, 0.55]])
    got = smooth_reference(z, pos, p, valid, layer.sigma)
    for i in range(4):
        w = torch.tensor([math.exp(-((pos[0, i] - pos[0, j]) ** 2).sum().item() / 2) * p[0, j].item() for j in range(4)])
        w = w / w.sum()
        expected = p[0, i] * z[0, i] + (1 - p[0, i]) * (w[:, None] * z[0]).sum(0)
        assert torch.allclose(got[0, i], expected, atol=1e-5)


def test_ste_forward_is_one_and_passes_gradient():
    x = torch.tensor([0.6, 0.9, 0.51], requires_grad=True)
    y = ste(x)
    assert torch.equal(y, torch.ones(3))
    (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert x.grad.tolist() == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("n", [4.0, 16.0])
def test_ratio_loss_formula_and_minimum(n):
    L = 64
    for f_count, g in [(16, 0.25), (4, 0.1), (32, 0.7), (64, 1.0)]:
        mask = torch.zeros(1, L, dtype=torch.bool)
        mask[0, :f_count] = True
        p = torch.full((1, L), g)
        f = f_count / L
        expected = n / (n - 1) * ((n - 1) * f * g + (1 - f) * (1 - g))
        assert math.isclose(ratio_loss(mask, p, n).item(), expected, rel_tol=1e-6)
    # Minimum 1 at F = G = 1/N along the diagonal F = G.
    values = {x: n / (n - 1) * ((n - 1) * x * x + (1 - x) ** 2) for x in torch.linspace(0.01, 0.99, 99).tolist()}
    best = min(values, key=values.get)
    assert abs(best - 1 / n) < 0.011 and math.isclose(min(values.values()), 1.0, abs_tol=2e-3)
    mask = torch.zeros(1, L, dtype=torch.bool)
    mask[0, : int(L / n)] = True
    assert math.isclose(ratio_loss(mask, torch.full((1, L), 1 / n), n).item(), 1.0, rel_tol=1e-6)


def test_ratio_loss_gradient_flows_only_through_p():
    mask = torch.tensor([[True, True, False, False]])
    p = torch.full((1, 4), 0.5, requires_grad=True)
    ratio_loss(mask, p, 4.0).backward()
    f = 0.5  # dL/dG = N/(N−1)·((N−1)F − (1−F)), spread over the 4 entries of the mean
    assert torch.allclose(p.grad, torch.full((1, 4), 4 / 3 * (3 * f - (1 - f)) / 4))


def test_random_router_keeps_about_l_over_n():
    torch.manual_seed(0)
    h = torch.zeros(8, 1024, 4)
    p = RandomRouter(4.0)(h, 32)
    frac = (p > 0.5).float().mean().item()
    assert abs(frac - 0.25) < 0.01
    assert p.min() >= 0 and p.max() <= 1


def _random_chunks(seed, batch=3, side=9, density=(0.02, 0.3, 0.7)):
    g = torch.Generator().manual_seed(seed)
    L = side * side
    masks = torch.stack([torch.rand(L, generator=g) < density[i % len(density)] for i in range(batch)])
    masks[:, 0] |= ~masks.any(1)  # at least one kept
    p = torch.rand(batch, L, generator=g) * 0.5 + 0.5
    z = torch.randn(batch, L, 6, generator=g)
    _, order, valid, _, _ = ChunkLayer()(z, masks, p)
    return z.gather(1, order[..., None].expand(-1, -1, 6)), order, valid, p


@pytest.mark.parametrize("seed", range(6))
def test_grid_plug_back_equals_brute_force_oracle(seed):
    side = 9 if seed % 2 else 8  # odd and even sides make exact ties
    _, order, valid, _ = _random_chunks(seed, side=side)
    from dcdit_cli.models.chunking import raster_to_rc

    fast = DeChunkLayer.plug_back_index(order, valid, side)
    oracle = plug_back_reference(raster_to_rc(order, side), valid, side)
    assert torch.equal(fast, oracle)
    assert torch.equal(plug_back_index_dense(order, valid, side), oracle)


@pytest.mark.parametrize("side", [1, 2, 5, 12, 17])
@pytest.mark.parametrize("density", [0.0, 0.03, 0.25, 0.9])
def test_linear_plug_back_equals_both_oracles_on_random_masks(side, density):
    """The O(L·radius) transform against the brute force and the previous dense transform, with
    single tokens (large radius), sparse and dense masks and the exact ties of symmetric grids."""
    from dcdit_cli.models.chunking import plug_back_radius, raster_to_rc

    g = torch.Generator().manual_seed(side * 100 + int(density * 100))
    B, L = 6, side * side
    masks = torch.rand(B, L, generator=g) < density
    masks[0] = False
    masks[0, L // 2] = True  # one token in the centre: every position ties with nothing but it
    if L > 3:
        masks[1] = False
        masks[1, [0, L - 1]] = True  # two opposite corners: the anti-diagonal ties
    masks[:, 0] |= ~masks.any(1)
    p = torch.rand(B, L, generator=g)
    _, order, valid, _, radius = ChunkLayer()(torch.zeros(B, L, 1), masks, p)
    assert radius == int(plug_back_radius(masks.view(B, side, side)))
    oracle = plug_back_reference(raster_to_rc(order, side), valid, side)
    assert torch.equal(DeChunkLayer.plug_back_index(order, valid, side, radius), oracle)
    assert torch.equal(plug_back_index_dense(order, valid, side), oracle)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("sigma", [1.0, 2.0])
@pytest.mark.parametrize("side", [10, BAND_MAX_SIDE + 3])  # the blur as band products, then as convolutions
def test_grid_smoothing_equals_direct_oracle(seed, sigma, side):
    from dcdit_cli.models.chunking import raster_to_rc

    z, order, valid, p = _random_chunks(seed, side=side)
    layer = DeChunkLayer(sigma)
    p_kept = p.gather(1, order)
    fast = layer.smooth(z, order, valid, p_kept, side)
    oracle = smooth_reference(z, raster_to_rc(order, side), p_kept, valid, layer.sigma)
    assert torch.allclose(fast[valid], oracle[valid], atol=1e-5)


@pytest.mark.parametrize("side", [5, 16, BAND_MAX_SIDE])
@pytest.mark.parametrize("sigma", [1.0, 2.0])
def test_gaussian_blur_equals_the_separable_convolutions_forward_and_backward(side, sigma):
    """The de-chunk blur as band-matrix products (grids up to BAND_MAX_SIDE) equals two zero-padded
    depthwise convolutions and so does its gradient (the blur is self-adjoint); its FLOPs are counted
    as theirs, so the smoothing counts alike on either side of the switch."""
    from dcdit_cli.models.chunking import gaussian_blur
    from dcdit_cli.models.flops import count_flops, count_train_flops

    kernel = DeChunkLayer(sigma).kernel_1d
    grid = torch.randn(side, side, 6, generator=torch.Generator().manual_seed(side), requires_grad=True)
    weight = torch.randn(side, side, 6)
    blurred = gaussian_blur(grid, kernel)
    assert torch.allclose(blurred, blur_reference(grid, kernel), atol=1e-5) and not torch.equal(blurred, grid)
    (got,) = torch.autograd.grad((blurred * weight).sum(), grid)
    (expected,) = torch.autograd.grad((blur_reference(grid, kernel) * weight).sum(), grid)
    assert torch.allclose(got, expected, atol=1e-5)
    convs = 2 * 2 * kernel.numel() * grid.numel()  # two depthwise convolutions of 2r + 1 taps
    assert count_flops(gaussian_blur, grid, kernel) == convs == count_flops(blur_reference, grid, kernel)
    assert count_train_flops(lambda: gaussian_blur(grid, kernel).sum()) == 2 * convs  # + the gradient's blur
    torch.library.opcheck(gaussian_blur, (grid, kernel))


def test_the_oracles_live_in_the_tests():
    """The direct formulations are test oracles (tests/dechunk_reference.py), not library code."""
    for name in ("smooth_reference", "plug_back_reference", "plug_back_index_dense"):
        assert not hasattr(DeChunkLayer, name)
