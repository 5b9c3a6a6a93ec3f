"""Tests for dcdit_cli.diffusion (docs/reference.md#adm-diffusion, docs/reference.md#classifier-free-guidance): closed forms, respacing, losses, sampling, CFG."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dcdit_cli.common.console import DcditError
from dcdit_cli.diffusion.gaussian import (
    GaussianDiffusion,
    SpacedDiffusion,
    classifier_free_guidance,
    linear_betas,
    make_diffusion,
    normal_kl,
    randn_like_per_sample,
    space_timesteps,
)

# Independent reference schedule: β linear 1e-4 → 0.02 over 1000 steps (docs/reference.md#noise-schedule).
REF_ALPHA_BAR = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))


def test_linear_betas():
    b = linear_betas(1000)
    assert b.dtype == np.float64 and b.shape == (1000,)
    assert b[0] == pytest.approx(1e-4) and b[-1] == pytest.approx(0.02)
    assert linear_betas(100)[0] == pytest.approx(1e-3) and linear_betas(100)[-1] == pytest.approx(0.2)


def test_q_sample_moments():
    diff = make_diffusion()
    t_int = 500
    x0 = torch.tensor([-0.8, 0.1, 0.9]).reshape(1, 3, 1, 1)
    n = 200_000
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(n, 3, 1, 1, generator=gen)
    xt = diff.q_sample(x0.expand(n, 3, 1, 1), torch.full((n,), t_int), noise)
    ab = REF_ALPHA_BAR[t_int]
    mean, var = xt.mean(0).flatten(), xt.var(0).flatten()
    assert torch.allclose(mean, math.sqrt(ab) * x0.flatten(), atol=0.01)
    assert torch.allclose(var, torch.full((3,), 1 - ab), rtol=0.02)


def test_normal_kl():
    m, lv = torch.tensor([0.3, -1.0]), torch.tensor([0.2, -2.0])
    assert torch.allclose(normal_kl(m, lv, m, lv), torch.zeros(2))
    m1, s1, m2, s2 = 0.5, 0.7, -0.2, 1.3
    expected = math.log(s2 / s1) + (s1 ** 2 + (m1 - m2) ** 2) / (2 * s2 ** 2) - 0.5
    got = normal_kl(torch.tensor(m1), torch.tensor(2 * math.log(s1)), torch.tensor(m2), torch.tensor(2 * math.log(s2)))
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert expected > 0.1


def test_space_timesteps_250():
    steps = space_timesteps(1000, "250")
    stride = 999 / 249
    expected = {round(i * stride) for i in range(250)}
    assert steps == expected
    ordered = sorted(steps)
    assert len(ordered) == 250
    assert ordered[:3] == [0, 4, 8] and ordered[-3:] == [991, 995, 999]


def test_space_timesteps_other_forms():
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert space_timesteps(100, "10,10") == space_timesteps(100, [10, 10])
    assert space_timesteps(100, [2, 3]) == {0, 49, 50, 74, 99}
    with pytest.raises(DcditError):
        space_timesteps(100, "200")
    with pytest.raises(DcditError):
        space_timesteps(100, "fast")


def test_respaced_betas_and_alpha_bar():
    diff = make_diffusion("250")
    assert isinstance(diff, SpacedDiffusion) and diff.num_timesteps == 250
    s = sorted(space_timesteps(1000, "250"))
    prev = np.append(1.0, REF_ALPHA_BAR[s][:-1])
    np.testing.assert_allclose(diff.betas, 1.0 - REF_ALPHA_BAR[s] / prev, rtol=1e-10)
    np.testing.assert_allclose(diff.alphas_cumprod, REF_ALPHA_BAR[s], rtol=1e-10)
    assert diff.timestep_map.tolist() == s
    assert type(make_diffusion(respacing="")) is GaussianDiffusion


def _leaf_output_fn(out):
    return lambda x_t, t: out


def test_vb_trains_only_variance_and_mse_only_eps():
    diff = make_diffusion()
    B, C = 4, 4
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand(B, C, 4, 4, generator=gen) * 2 - 1
    t = torch.tensor([0, 10, 500, 999])
    out = (0.3 * torch.randn(B, 2 * C, 4, 4, generator=gen)).requires_grad_(True)
    losses = diff.training_losses(_leaf_output_fn(out), x0, t, noise=torch.randn(x0.shape, generator=gen))
    assert set(losses) >= {"loss", "mse", "vb"} and all(v.shape == (B,) for v in losses.values())
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"])

    (g_vb,) = torch.autograd.grad(losses["vb"].sum(), out, retain_graph=True)
    assert torch.all(g_vb[:, :C] == 0)
    assert g_vb[:, C:].abs().sum(dim=(1, 2, 3)).min() > 0  # every row, t = 0 included
    (g_mse,) = torch.autograd.grad(losses["mse"].sum(), out)
    assert g_mse[:, :C].abs().sum() > 0 and torch.all(g_mse[:, C:] == 0)


def test_vb_at_t0_is_decoder_nll():
    diff = make_diffusion()
    B, C = 3, 4
    gen = torch.Generator().manual_seed(2)
    x0 = torch.rand(B, C, 4, 4, generator=gen) * 1.6 - 0.8  # interior bins only
    noise = torch.randn(x0.shape, generator=gen)
    out = 0.1 * torch.randn(B, 2 * C, 4, 4, generator=gen)
    t = torch.zeros(B, dtype=torch.long)
    vb = diff.training_losses(_leaf_output_fn(out), x0, t, noise=noise)["vb"]

    # independent decoder NLL with the exact normal CDF
    x_t = diff.q_sample(x0, t, noise)
    p = diff.p_mean_variance(out, x_t, t)
    mu, sd = p["mean"].double(), torch.exp(0.5 * p["log_variance"]).double()
    cdf = torch.special.ndtr
    prob = cdf((x0.double() - mu + 1 / 255) / sd) - cdf((x0.double() - mu - 1 / 255) / sd)
    nll_bits = (-torch.log(prob)).mean(dim=(1, 2, 3)) / math.log(2)
    torch.testing.assert_close(vb.double(), nll_bits, rtol=2e-2, atol=1e-3)

    # at t = 1 the vb is a KL and differs from the decoder NLL formula
    vb1 = diff.training_losses(_leaf_output_fn(out), x0, t + 1, noise=noise)["vb"]
    assert not torch.allclose(vb1, vb, rtol=0.1)


def test_cfg():
    B, C = 2, 4
    gen = torch.Generator().manual_seed(3)
    cond = torch.randn(B, 2 * C, 2, 2, generator=gen)
    uncond = torch.randn(B, 2 * C, 2, 2, generator=gen)
    out = torch.cat([cond, uncond])
    r1 = classifier_free_guidance(out, 1.0)
    assert r1.shape == out.shape
    torch.testing.assert_close(r1[:B], cond)
    torch.testing.assert_close(r1[B:], cond)

    s = 4.0
    r = classifier_free_guidance(out, s)
    torch.testing.assert_close(r[:B, :3], uncond[:, :3] + s * (cond[:, :3] - uncond[:, :3]))
    torch.testing.assert_close(r[:B, 3:], cond[:, 3:])  # 4th eps channel and variance unguided
    torch.testing.assert_close(r[B:], r[:B])

    ra = classifier_free_guidance(out, s, guided_channels=None)
    torch.testing.assert_close(ra[:B, :C], uncond[:, :C] + s * (cond[:, :C] - uncond[:, :C]))
    torch.testing.assert_close(ra[:B, C:], cond[:, C:])


def _point_mass_model(c: float, calls: list | None = None):
    """Exact ε̂ for data x0 ≡ c; uses the ORIGINAL t, so it also checks timestep_map."""
    ab = torch.tensor(REF_ALPHA_BAR, dtype=torch.float32)

    def fn(x_t, t):
        if calls is not None:
            calls.append(t.clone())
        a = ab[t].reshape(-1, 1, 1, 1)
        eps = (x_t - a.sqrt() * c) / (1 - a).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)

    return fn


def test_ddpm_converges_to_point_mass():
    diff = make_diffusion("50")
    c, calls, steps = 0.37, [], []
    x = diff.sample_loop(_point_mass_model(c, calls), (3, 2, 4, 4), generator=torch.Generator().manual_seed(4),
                         on_step=lambda i, n: steps.append((i, n)))
    torch.testing.assert_close(x, torch.full_like(x, c), atol=1e-3, rtol=0)
    assert steps[0] == (1, 50) and steps[-1] == (50, 50) and len(steps) == 50
    assert calls[0][0].item() == 999 and calls[-1][0].item() == 0


def test_ddim_eta0_deterministic():
    diff = make_diffusion("20")
    model = _point_mass_model(-0.2)
    noise = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(5))
    a = diff.sample_loop(model, noise.shape, noise=noise, method="ddim", generator=torch.Generator().manual_seed(6))
    b = diff.sample_loop(model, noise.shape, noise=noise, method="ddim", generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # with eta = 1 the generator matters (so the equality above is not vacuous)
    wild = lambda x_t, t: torch.cat([x_t * 0.5, torch.zeros_like(x_t)], dim=1)  # noqa: E731
    c = diff.sample_loop(wild, noise.shape, noise=noise, method="ddim", eta=1.0, generator=torch.Generator().manual_seed(6))
    d = diff.sample_loop(wild, noise.shape, noise=noise, method="ddim", eta=1.0, generator=torch.Generator().manual_seed(7))
    assert not torch.allclose(c, d)


def test_per_sample_generators_batch_invariant():
    diff = make_diffusion("10")
    model = lambda x_t, t: torch.cat([0.5 * x_t, torch.tanh(x_t)], dim=1)  # noqa: E731  row-independent
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    alone = diff.sample_loop(model, (1, 2, 4, 4), generator=gens([11]))
    batch = diff.sample_loop(model, (4, 2, 4, 4), generator=gens([11, 12, 13, 14]))
    torch.testing.assert_close(batch[:1], alone, rtol=0, atol=1e-6)
    assert not torch.allclose(batch[0], batch[1])
    with pytest.raises(DcditError):
        randn_like_per_sample((3, 2), gens([1, 2]), "cpu")


def test_clip_denoised_clamps_x0_and_rederives_eps():
    from dcdit_cli.diffusion.gaussian import make_diffusion

    d = make_diffusion("10", clip_denoised=True)
    x_t = torch.full((1, 1, 2, 2), 3.0)
    t = torch.tensor([9])
    out = d.p_mean_variance(torch.cat([torch.full_like(x_t, -5.0), torch.zeros_like(x_t)], 1), x_t, t)
    assert out["pred_xstart"].abs().max() <= 1.0
    a = float(d.alphas_cumprod[9])
    assert torch.allclose(out["eps"], (x_t - a**0.5 * out["pred_xstart"]) / (1 - a) ** 0.5, atol=1e-5)
    assert make_diffusion("10").clip_denoised is False


def test_make_diffusion_is_called_with_named_arguments():
    """Training asks for every step by name, sampling for a respacing; clip_denoised is keyword-only,
    and no dcdit module passes a bare positional respacing of "" (issue 19)."""
    import ast
    from pathlib import Path

    train = make_diffusion(num_timesteps=100)
    assert type(train) is GaussianDiffusion and train.num_timesteps == 100 and not train.clip_denoised
    spaced = make_diffusion(respacing="10", num_timesteps=100, clip_denoised=True)
    assert isinstance(spaced, SpacedDiffusion) and spaced.num_timesteps == 10 and spaced.clip_denoised
    with pytest.raises(TypeError):
        make_diffusion("10", 100, True)
    package = Path(__file__).resolve().parents[1] / "dcdit_cli"
    bare = [
        f"{path.relative_to(package)}:{node.lineno}"
        for path in package.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "make_diffusion"
        and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value == ""
    ]
    assert bare == []
