"""Facts of docs/reference.md that no other test pins: each test fails if its fact is changed."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dcdit_cli.diffusion.gaussian import make_diffusion
from dcdit_cli.models.flops import count_flops
from dcdit_cli.models import DCDiT
from dcdit_cli.models.chunking import DeChunkLayer
from dcdit_cli.models.dit import DiTBlock, LabelEmbedder, TimestepEmbedder
from dcdit_cli.models.routers import PredictiveRouter, Router
from dcdit_cli.config.recipe import DiffusionConfig, EvalConfig, ModelConfig, SampleConfig, load_recipe

TINY = dict(input_size=8, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=5, scaffold_width=16)


def test_timestep_embedding_is_cos_then_sin_with_max_period_10000():
    emb = TimestepEmbedder.timestep_embedding(torch.tensor([0.0, 7.0]), 256)
    freqs = torch.exp(-math.log(10000) * torch.arange(128) / 128)
    assert emb.shape == (2, 256) and TimestepEmbedder(8).frequency_embedding_size == 256
    torch.testing.assert_close(emb[1], torch.cat([torch.cos(7 * freqs), torch.sin(7 * freqs)]))
    assert torch.equal(emb[0], torch.cat([torch.ones(128), torch.zeros(128)]))


def test_label_table_has_a_null_row_for_guidance():
    assert LabelEmbedder(1000, 8).embedding_table.num_embeddings == 1001


def test_scaffold_widths_and_norms():
    m = DCDiT(ModelConfig(**TINY))
    stem = m.encoder.stem
    assert (stem.in_channels, stem.out_channels, stem.kernel_size, stem.stride, stem.padding) == (3, 16, (3, 3), (1, 1), (1, 1))
    widths = lambda blocks: [(b.conv1.in_channels, b.conv1.out_channels, b.conv2.out_channels) for b in blocks]
    assert widths(m.encoder.blocks) == [(16, 16, 16), (16, 16, 32)]  # e → e, then e → D
    assert widths(m.decoder.blocks) == [(32, 16, 16), (16, 16, 16)]  # D → e, then e → e
    assert all(b.conv1.kernel_size == b.conv2.kernel_size == (3, 3) for b in [*m.encoder.blocks, *m.decoder.blocks])
    assert all(b.cond_proj.out_features == b.conv1.out_channels for b in m.encoder.blocks)  # c joins after conv1
    norms = {name: mod.normalized_shape for name, mod in m.named_modules() if isinstance(mod, torch.nn.RMSNorm)}
    assert norms == {"encoder.norm": (32,), "inner_norm": (32,), "decoder.norm": (16,)}
    assert (m.final_layer.linear.in_features, m.final_layer.linear.out_features) == (16, 6)
    assert not m.final_layer.norm_final.elementwise_affine


@pytest.mark.parametrize("router", [Router, PredictiveRouter])
def test_routers_run_in_fp32_under_autocast(router):
    torch.manual_seed(0)
    r = router(16)
    h = torch.randn(2, 16, 16)
    exact = r(h, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        p = r(h, 4)
    assert p.dtype == torch.float32 and torch.equal(p, exact)


def test_dechunk_clamps_p_and_plugs_back_to_the_nearest_kept_token():
    z = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # two kept tokens on a 2×2 grid, at (0, 0) and (1, 1)
    order, valid = torch.tensor([[0, 3]]), torch.ones(1, 2, dtype=torch.bool)
    out = DeChunkLayer(sigma=1.0)(z, order, valid, torch.zeros(1, 4), side=2)
    # p = 0 is clamped to 1e-4: the tokens still weigh each other (unclamped, every weight would be 0).
    w = torch.tensor([1.0, math.exp(-1.0)])  # d² = 2, σ = 1
    w = w / w.sum()
    first = 1e-4 * z[0, 0] + (1 - 1e-4) * (w[0] * z[0, 0] + w[1] * z[0, 1])
    second = 1e-4 * z[0, 1] + (1 - 1e-4) * (w[1] * z[0, 0] + w[0] * z[0, 1])
    # (0, 1) and (1, 0) are as near to both tokens: the tie goes to the smaller raster index, slot 0.
    torch.testing.assert_close(out[0], torch.stack([first, first, first, second]))


def test_smoothing_sigma_is_one_at_256_px():
    assert DeChunkLayer().sigma == 1.0
    for name in ("b-n4", "b-n16", "xl-n4", "xl-n16", "b-n4-random", "xl-n4-upcycle"):
        assert load_recipe(name).model.smoothing_sigma == 1.0, name


def test_learned_range_variance_spans_clipped_posterior_to_beta():
    diff = make_diffusion()
    betas = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1 - betas)
    beta_tilde = betas[1:] * (1 - abar[:-1]) / (1 - abar[1:])  # t = 1 … 999
    x_t = torch.zeros(1, 1, 1, 1)
    for t, low in ((500, beta_tilde[499]), (0, beta_tilde[0])):  # at t = 0 the posterior variance is clipped to t = 1's
        for v, expected in ((1.0, math.log(betas[t])), (-1.0, math.log(low)), (0.0, (math.log(betas[t]) + math.log(low)) / 2)):
            out = torch.tensor([0.0, v]).view(1, 2, 1, 1)
            got = diff.p_mean_variance(out, x_t, torch.tensor([t]))["log_variance"].item()
            assert got == pytest.approx(expected, rel=1e-5), (t, v)


def test_sampler_defaults_follow_dit():
    assert (DiffusionConfig().num_timesteps, DiffusionConfig().sampling_steps) == (1000, 250)
    assert (SampleConfig().cfg_scale, SampleConfig().guided_channels, EvalConfig().cfg_scale) == (4.0, 3, 1.5)
    assert EvalConfig().num_samples == 50_000
    assert make_diffusion("250").clip_denoised is False


def test_dit_block_adaln_chunks_are_shift_scale_gate_for_attention_then_mlp():
    torch.manual_seed(0)
    D = 8
    block = DiTBlock(D, num_heads=2)
    x, c = torch.randn(2, 5, D), torch.randn(2, D)
    lin = block.adaLN_modulation[-1]

    def run(**chunks):  # set the adaLN output to constants: chunk index → value
        with torch.no_grad():
            lin.weight.zero_()
            lin.bias.zero_()
            for i, value in chunks.items():
                lin.bias[int(i[1:]) * D : (int(i[1:]) + 1) * D] = value
            return block(x, c)

    torch.testing.assert_close(run(), x)  # both gates closed (adaLN-Zero)
    torch.testing.assert_close(run(g2=1.0), x + block.attn(block.norm1(x)))
    torch.testing.assert_close(run(g2=1.0, g0=0.5, g1=1.0), x + block.attn(2 * block.norm1(x) + 0.5))
    torch.testing.assert_close(run(g5=1.0, g3=0.5, g4=1.0), x + block.mlp(2 * block.norm2(x) + 0.5))
    assert block.norm1.eps == 1e-6 and not block.norm1.elementwise_affine


def test_upcycled_positions_lie_on_the_source_grid():
    order = torch.tensor([[0, 9, 63]])  # (0, 0), (1, 1), (7, 7) on an 8×8 grid
    native = DCDiT(ModelConfig(**TINY)).inner_positions(order, 8)
    torch.testing.assert_close(native, torch.tensor([[[0.0, 0.0], [1.0, 1.0], [7.0, 7.0]]]))
    scaled = DCDiT(ModelConfig(**TINY, pos_grid_scale=0.5)).inner_positions(order, 8)  # (r + 0.5)·16/32 − 0.5
    torch.testing.assert_close(scaled, torch.tensor([[[-0.25, -0.25], [0.25, 0.25], [3.25, 3.25]]]))


def test_upcycle_recipes_follow_paper_table3():
    for name, steps, warmup in (("xl-n4-upcycle-20k", 20_000, 0), ("xl-n4-upcycle-50k", 50_000, 0),
                                ("xl-n4-upcycle", 100_000, 0), ("xl-n4-upcycle-distill-20k", 20_000, 5000),
                                ("xl-n4-upcycle-distill-50k", 50_000, 5000), ("xl-n4-upcycle-distill", 100_000, 5000)):
        r = load_recipe(name)
        assert (r.train.max_steps, r.distill.steps) == (steps, warmup), name
        assert r.model.cond_adaptor and r.upcycle.freeze_embedders and r.model.pos_grid_scale == 0.5, name
        assert (r.model.hidden_size, r.model.depth, r.model.target_ratio) == (1152, 28, 4.0), name


def test_dydit_recipes_follow_paper_table4():
    for name in ("b-n4-dydit", "b-n16-dydit"):
        r = load_recipe(name)
        assert r.model.dynamic == "dydit" and r.train.flops_target == 0.7, name
        assert (r.train.max_steps, r.train.global_batch, r.train.lr) == (120_000, 256, 2e-5), name


def test_attention_flops_are_counted_on_cpu():
    H, L, d = 3, 10, 8
    q, k, v = (torch.randn(1, H, L, d) for _ in range(3))
    assert count_flops(F.scaled_dot_product_attention, q, k, v) == H * L * L * (4 * d + 3)


def test_vae_latents_are_scaled_by_0_18215(vae_dir):
    from dcdit_cli.data.vae import decode, encode, load_vae

    vae = load_vae(str(vae_dir))
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        z = encode(vae, images, sample=False)
        torch.testing.assert_close(z, vae.encode(images).latent_dist.mode() * 0.18215)
        torch.testing.assert_close(decode(vae, z), vae.decode(z / 0.18215).sample.clamp(-1, 1))


def test_precision_recall_reads_the_first_10000_reference_images(tmp_path, monkeypatch):
    from dcdit_cli.evaluation import fid

    assert fid.PR_REF_IMAGES == 10_000
    monkeypatch.setattr(fid, "PR_REF_IMAGES", 3)  # the same rule at a size a test can afford
    images = np.arange(5, dtype=np.uint8)[:, None, None, None] * np.ones((5, 8, 8, 3), np.uint8)
    np.savez(tmp_path / "ref.npz", arr_0=images)  # no stored statistics: computed from every image

    def fake_inception(batch):
        value = batch[:, :1, 0, 0].astype(np.float32)  # (n, 1): the image's index
        return {"pool": np.repeat(value, 2048, axis=1), "logits": np.ones((len(batch), 1008), np.float32),
                "spatial": np.repeat(value, 2023, axis=1)}

    ref = fid.load_reference(tmp_path / "ref.npz")
    pool = fid.reference_features(ref, fake_inception, batch_size=2)
    assert pool[:, 0].tolist() == [0.0, 1.0, 2.0]  # precision / recall: the first images only
    assert ref.mu[0] == pytest.approx(2.0)  # FID statistics: all five


def test_ema_update_keeps_decay_of_the_average():
    from dcdit_cli.training.loop import update_ema

    ema, model = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    with torch.no_grad():
        ema.weight.fill_(1.0)
        model.weight.fill_(3.0)
    update_ema(ema, model, 0.9999)
    torch.testing.assert_close(ema.weight, torch.full((1, 2), 0.9999 * 1.0 + 0.0001 * 3.0))
