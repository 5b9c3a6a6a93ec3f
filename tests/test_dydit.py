"""DyDiT's gates inside DiT / DC-DiT blocks (paper §4.5, models/dydit.py)."""

import dataclasses

import pytest
import torch

from dcdit_cli.config.recipe import load_recipe
from dcdit_cli.models import build_model
from dcdit_cli.models.attention import PackedLayout
from dcdit_cli.models.dit import DiTBlock
from dcdit_cli.models.dydit import (
    DyDiTBlock,
    add_gates,
    block_flops,
    flops_loss,
    gumbel_sigmoid_gate,
    saved_flops,
)
from dcdit_cli.models.flops import count_flops, dynamic_flops, static_cost

D, H = 32, 4


def _randomise(module, seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if ".dydit." not in f".{name}":
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return module


def _pair(seed=0):
    """A plain DiTBlock with random weights and a DyDiTBlock holding the same weights."""
    torch.manual_seed(seed)
    plain = _randomise(DiTBlock(D, H), seed)
    holder = torch.nn.Module()
    holder.blocks = torch.nn.ModuleList([DiTBlock(D, H)])
    holder.blocks[0].load_state_dict(plain.state_dict())
    gated = add_gates(holder).blocks[0]
    return plain, gated


def _inputs(b=3, t=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, D, generator=g), torch.randn(b, D, generator=g), torch.randn(b, D, generator=g)


def _gated_cfg(name="tiny", **model):
    r = load_recipe(name)
    return dataclasses.replace(r.model, dynamic="dydit", **model)


def test_state_dict_keys_are_the_plain_ones_plus_dydit():
    plain, gated = _pair()
    extra = set(gated.state_dict()) - set(plain.state_dict())
    assert set(plain.state_dict()) <= set(gated.state_dict())
    assert extra and all(k.startswith("dydit.") for k in extra)
    model = build_model(_gated_cfg())
    assert "blocks.1.dydit.head_router.weight" in model.state_dict()
    assert "blocks.0.dydit.token_router.2.bias" in model.state_dict()


@pytest.mark.parametrize("mode", ["train", "eval-masked", "eval-sliced"])
def test_open_gates_reproduce_the_ungated_block(mode):
    plain, gated = _pair()
    x, c, t_emb = _inputs()
    gated.train(mode == "train")
    torch.manual_seed(0)
    out, decided = gated(x, c, t_emb=t_emb, skip_masked=mode == "eval-sliced")
    assert torch.equal(decided.heads, torch.ones(3, H)) and bool(decided.tokens.bool().all())
    assert not any(hasattr(gated.dydit, name) for name in ("skip", "last", "widths"))  # nothing kept on the module
    ref = plain(x, c)
    if mode == "eval-sliced":
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(out, ref)


def _close(gated, heads=(), groups=()):
    with torch.no_grad():
        for h in heads:
            gated.dydit.head_router.bias[h] = -50.0
        for g in groups:
            gated.dydit.mlp_router.bias[g] = -50.0


def test_masked_head_equals_that_heads_output_zeroed():
    plain, gated = _pair()
    x, c, t_emb = _inputs()
    _close(gated, heads=[1])
    gated.eval()
    out, _ = gated(x, c, t_emb=t_emb, skip_masked=False)
    d = D // H
    hook = plain.attn.proj.register_forward_pre_hook(lambda m, a: (a[0] * (torch.arange(D) // d != 1),))
    ref = plain(x, c)
    hook.remove()
    assert torch.equal(out, ref)
    assert not torch.allclose(out, plain(x, c))  # the head mattered


def test_masked_mlp_group_equals_that_groups_channels_zeroed():
    plain, gated = _pair()
    x, c, t_emb = _inputs()
    _close(gated, groups=[0, 3])
    gated.eval()
    out, _ = gated(x, c, t_emb=t_emb, skip_masked=False)
    cw = 4 * D // H
    keep = ~torch.isin(torch.arange(4 * D) // cw, torch.tensor([0, 3]))
    hook = plain.mlp.act.register_forward_pre_hook(lambda m, a: (a[0] * keep,))
    ref = plain(x, c)
    hook.remove()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_skipped_tokens_keep_their_residual_input_and_selected_ones_run_the_mlp():
    plain, gated = _pair()
    x, c, t_emb = _inputs(b=2, t=16)
    with torch.no_grad():  # a token router that selects about half of the tokens
        gated.dydit.token_router[-1].bias.zero_()
        gated.dydit.token_router[0].weight.normal_(0, 1.0)
        gated.dydit.token_router[-1].weight.normal_(0, 1.0)
    for skip in (False, True):
        gated.eval()
        out, decided = gated(x, c, t_emb=t_emb, skip_masked=skip)
        selected = decided.tokens.bool()
        assert 0 < int(selected.sum()) < selected.numel()
        shift, scale, gate, *_ = plain.adaLN_modulation(c).chunk(6, dim=1)
        from dcdit_cli.models.dit import modulate

        after_attn = x + gate.unsqueeze(1) * plain.attn(modulate(plain.norm1(x), shift, scale))
        torch.testing.assert_close(out[~selected], after_attn[~selected], rtol=0, atol=1e-6)
        torch.testing.assert_close(out[selected], plain(x, c)[selected], rtol=1e-5, atol=1e-6)


def test_gated_inference_path_equals_the_masked_training_path_with_padding_and_mixed_timesteps():
    """Sliced weights and gathered tokens give the masked path's output, also when samples
    have different width masks (several groups) and padded tokens."""
    plain, gated = _pair()
    x, c, t_emb = _inputs(b=4, t=12)
    with torch.no_grad():  # width masks that differ between samples, tokens about half selected
        gated.dydit.head_router.weight.normal_(0, 3.0)
        gated.dydit.head_router.bias.zero_()
        gated.dydit.mlp_router.weight.normal_(0, 3.0)
        gated.dydit.mlp_router.bias.zero_()
        gated.dydit.token_router[-1].bias.zero_()
        gated.dydit.token_router[0].weight.normal_(0, 1.0)
        gated.dydit.token_router[-1].weight.normal_(0, 1.0)
    valid = torch.ones(4, 12, dtype=torch.bool)
    valid[1, 9:] = False
    valid[3, 5:] = False
    layout = PackedLayout.from_valid(valid, int(valid.sum()))  # the DC-DiT's packed tokens
    gated.eval()
    outs = {}
    for skip in (False, True):
        out, decided = gated(layout.unpad(x), c, layout, t_emb=t_emb, skip_masked=skip)
        outs[skip] = layout.pad(out)
    heads = decided.heads
    assert len({tuple(r.tolist()) for r in heads}) > 1 and 0 < heads.sum() < heads.numel()
    torch.testing.assert_close(outs[True][valid], outs[False][valid], rtol=1e-5, atol=1e-5)


def test_all_heads_and_groups_closed_runs_on_biases():
    plain, gated = _pair()
    x, c, t_emb = _inputs()
    _close(gated, heads=range(H), groups=range(H))
    gated.eval()
    res = {}
    for skip in (False, True):
        res[skip], _ = gated(x, c, t_emb=t_emb, skip_masked=skip)
    torch.testing.assert_close(res[True], res[False], rtol=1e-6, atol=1e-6)


def test_gumbel_sigmoid_gate_is_hard_with_straight_through_gradient():
    logits = torch.tensor([-3.0, -0.1, 0.1, 3.0], requires_grad=True)
    hard = gumbel_sigmoid_gate(logits, training=False)
    assert torch.equal(hard, torch.tensor([0.0, 0.0, 1.0, 1.0]))
    hard.sum().backward()
    s = torch.sigmoid(logits.detach())
    torch.testing.assert_close(logits.grad, s * (1 - s))  # d sigmoid / d logit, no τ at inference
    torch.manual_seed(0)
    z = torch.zeros(20000, requires_grad=True)
    g = gumbel_sigmoid_gate(z, training=True, tau=5.0)
    assert set(g.detach().unique().tolist()) == {0.0, 1.0} and abs(g.detach().mean().item() - 0.5) < 0.02
    g.sum().backward()
    assert (z.grad > 0).all() and z.grad.max() <= 0.25 / 5.0 + 1e-6  # the τ = 5 sigmoid's slope


def test_flops_loss_formula_and_zero_at_target():
    dyn = torch.tensor([60.0, 80.0, 70.0])
    static = torch.tensor([100.0, 100.0, 100.0])
    torch.testing.assert_close(flops_loss(dyn, static, 0.5), torch.tensor((0.7 - 0.5) ** 2))
    assert flops_loss(0.7 * static, static, 0.7).item() == pytest.approx(0.0, abs=1e-12)
    per = torch.tensor([200.0, 50.0])
    torch.testing.assert_close(flops_loss(torch.tensor([100.0, 50.0]), per, 0.6), torch.tensor((0.75 - 0.6) ** 2))


def test_flops_target_warm_up_follows_dydit():
    """DyDiT's train.py --warmup: 1 for 100 steps, then 1 − (1 − λ)·step/W until W, then λ."""
    from dcdit_cli.training.losses import FlopsLoss

    warm = FlopsLoss(None, None, target=0.7, warmup_steps=5000)
    got = [warm.target_at(s) for s in (0, 99, 100, 2500, 5000, 9000, None)]
    assert got == pytest.approx([1.0, 1.0, 1.0 - 0.3 * 100 / 5000, 0.85, 0.7, 0.7, 0.7])
    assert FlopsLoss(None, None, target=0.7).target_at(0) == 0.7  # no warm-up: λ from the start
    assert FlopsLoss(None, None, target=0.7).weight == 2.0  # DyDiT's weight


def test_block_flops_match_the_flop_counter_on_the_sliced_path():
    """F_dynamic in closed form equals what FlopCounterMode counts on the sliced forward."""
    cfg = dataclasses.replace(_gated_cfg("tiny"), kind="dit", patch_size=2)
    torch.manual_seed(0)
    model = _randomise(build_model(cfg)).eval()
    blocks = model.blocks
    with torch.no_grad():
        blocks[0].dydit.head_router.bias[0] = -50.0
        blocks[1].dydit.mlp_router.bias[:2] = -50.0
        blocks[1].dydit.token_router[-1].bias.zero_()
        blocks[1].dydit.token_router[-1].weight.normal_(0, 1.0)
    x = torch.randn(1, cfg.in_channels, cfg.input_size, cfg.input_size)
    t, y = torch.tensor([3]), torch.tensor([1])
    counted = count_flops(model, x, t, y)
    with torch.no_grad():
        _, stats = model(x, t, y)  # the same forward: eval, deterministic
    f_dyn, f_static = dynamic_flops(stats.gates, cfg, static_cost(cfg))
    assert 0 < saved_flops(stats.gates, cfg).item() and 0 < int(stats.gates[1].tokens.sum()) < 16
    assert f_dyn.item() == pytest.approx(counted, rel=1e-6)
    plain = build_model(dataclasses.replace(cfg, dynamic="none"))
    assert f_static.item() == pytest.approx(count_flops(plain, x, t, y), rel=1e-9)


def test_block_flops_with_everything_on_is_the_dense_block():
    valid = torch.ones(1, 10, dtype=torch.bool)
    ones = torch.ones(1, H)
    f = block_flops(ones, ones, torch.ones(1, 10), valid, D, H, 4 * D)
    d = D // H
    assert f.item() == 2 * 10 * D * 3 * D + H * 100 * (4 * d + 3) + 2 * 10 * D * D + 2 * 2 * 10 * D * 4 * D


def test_gradients_reach_every_router_through_diffusion_and_flops_losses():
    cfg = _gated_cfg("tiny")
    torch.manual_seed(0)
    model = _randomise(build_model(cfg)).train()  # trained-like blocks, the gates as built
    x = torch.randn(2, cfg.in_channels, cfg.input_size, cfg.input_size)
    out, stats = model(x, torch.tensor([5, 900]), torch.tensor([0, 1]))
    f_dyn, f_static = dynamic_flops(stats.gates, cfg, static_cost(cfg))
    (out.square().mean() + flops_loss(f_dyn, f_static, 0.7)).backward()
    for name, p in model.named_parameters():
        if ".dydit." in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_plain_weights_load_into_the_gated_model_with_only_gates_missing():
    plain = build_model(load_recipe("tiny").model)
    gated = build_model(_gated_cfg())
    missing, unexpected = gated.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(".dydit." in k for k in missing)


def test_gated_dcdit_sliced_equals_masked_end_to_end():
    cfg = _gated_cfg("tiny")
    torch.manual_seed(0)
    model = _randomise(build_model(cfg)).eval()
    for b in model.blocks:
        with torch.no_grad():
            b.dydit.head_router.bias.fill_(0.0)
            b.dydit.mlp_router.bias.fill_(0.0)
            b.dydit.token_router[-1].bias.zero_()
            b.dydit.token_router[-1].weight.normal_(0, 1.0)
    x = torch.randn(3, cfg.in_channels, cfg.input_size, cfg.input_size) * torch.tensor([0.2, 1.0, 3.0])[:, None, None, None]
    t, y = torch.tensor([7, 7, 7]), torch.tensor([0, 1, 2])
    with torch.no_grad():
        a, sa = model(x, t, y)
        b, sb = model(x, t, y, skip_masked=False)
    assert torch.equal(sa.kept, sb.kept)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert isinstance(model.blocks[0], DyDiTBlock)


@pytest.mark.parametrize("skip", [True, False])
def test_gated_dcdit_with_every_gate_on_equals_the_plain_model_bit_for_bit(skip):
    """The gated blocks run the packed kept tokens through the same variable-length attention as the
    plain blocks, so a batch whose samples keep different counts gives identical outputs."""
    torch.manual_seed(0)
    plain = _randomise(build_model(load_recipe("tiny").model)).eval()
    gated = build_model(_gated_cfg("tiny")).eval()
    gated.load_state_dict(plain.state_dict(), strict=False)  # only the .dydit. gates keep their init (all on)
    cfg = _gated_cfg("tiny")
    for draw in range(8):  # padding the batch to its longest sample changes the rounding in about half of these
        g = torch.Generator().manual_seed(draw)
        scale = torch.rand(4, generator=g)[:, None, None, None] * 3
        x = torch.randn(4, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g) * scale
        t, y = torch.full((4,), int(torch.randint(1000, (1,), generator=g))), torch.randint(6, (4,), generator=g)
        with torch.no_grad():
            a, sa = plain(x, t, y)
            b, sb = gated(x, t, y, skip_masked=skip)
        assert torch.equal(sa.kept, sb.kept) and torch.equal(a, b), draw
        assert sa.gates is None and all(g.heads.all() and g.tokens[g.valid].all() for g in sb.gates)


def test_fine_tune_a_plain_run_with_gates_end_to_end(tmp_path):
    """train --init-from a plain DC-DiT run, then sample, flops --ckpt and viz-boundaries count and draw the gates."""
    import json

    from dcdit_cli.common.console import DcditError
    from dcdit_cli.models.flops import flops_row
    from dcdit_cli.sampling.sampler import measure_kept_tokens, run_sample
    from dcdit_cli.sampling.viz_boundaries import run_viz
    from dcdit_cli.training.loop import train

    train(load_recipe("tiny", ["train.max_steps=2"]), tmp_path / "plain")
    gated = load_recipe("tiny", ["model.dynamic=dydit", "train.max_steps=3", "train.log_every_steps=1", "train.lr=0.05"])
    train(gated, tmp_path / "gated", init_from=tmp_path / "plain")
    records = [json.loads(line) for line in (tmp_path / "gated" / "metrics.jsonl").read_text().splitlines()]
    assert all("flops_loss" in r and "flops_ratio" in r for r in records)
    assert records[0]["flops_ratio"] == pytest.approx(1.0, abs=0.05)  # all on: 1 + the routers' small cost
    assert [r["flops_target"] for r in records] == pytest.approx([0.7] * 3)
    warm = gated.replace(train={"max_steps": 2, "flops_target_warmup_steps": 5000})
    train(warm, tmp_path / "warm", init_from=tmp_path / "plain")  # the loop passes its step: DyDiT's 100-step hold
    assert [json.loads(line)["flops_target"] for line in (tmp_path / "warm" / "metrics.jsonl").read_text().splitlines()] == [1.0, 1.0]

    report = run_sample(tmp_path / "gated", 2, {"cfg_scale": 2.0, "steps": 3}, out=tmp_path / "s.png")
    name, recipe, kept, saved = measure_kept_tokens(tmp_path / "gated", num=2)
    assert saved.shape == kept.shape and saved.any()
    row = flops_row(name, recipe, kept_per_step=kept, saved_per_step=saved)
    ungated = flops_row(name, recipe, kept_per_step=kept)
    assert row.kind == "dcdit+dydit" and row.tflops_per_img < ungated.tflops_per_img or saved.max() < 0
    assert report.skipped_tflops != 0.0

    result = run_viz(tmp_path / "gated", num=1, timesteps=3, steps=4, out_dir=tmp_path / "viz")
    assert result["gates"] and (tmp_path / "viz" / "gates_vs_t.png").stat().st_size > 0

    with pytest.raises(DcditError, match="made by a different model"):  # a DiT's weights do not fit a DC-DiT
        train(load_recipe("tiny", ["model.kind=dit", "model.dynamic=dydit", "train.max_steps=1"]), tmp_path / "bad",
              init_from=tmp_path / "plain")


def test_viz_boundaries_on_a_gated_dit_draws_its_gates_alone(tmp_path):
    """Table 4's DyDiT-on-DiT rows have no router to draw: viz-boundaries writes the gates figure only;
    an ungated DiT is still refused."""
    from PIL import Image

    from dcdit_cli.common.console import DcditError
    from dcdit_cli.sampling.viz_boundaries import run_viz
    from dcdit_cli.training.loop import train

    dit = ["model.kind=dit", "model.patch_size=2", "train.max_steps=1"]
    train(load_recipe("tiny", [*dit, "model.dynamic=dydit"]), tmp_path / "gated-dit")
    result = run_viz(tmp_path / "gated-dit", num=2, timesteps=3, steps=4, out_dir=tmp_path / "viz")
    assert result["pngs"] == [] and len(result["timesteps"]) == 3
    with Image.open(tmp_path / "viz" / "gates_vs_t.png") as im:
        assert im.width >= 400 and im.height >= 200
    train(load_recipe("tiny", dit), tmp_path / "dit")
    with pytest.raises(DcditError, match="no router to draw"):
        run_viz(tmp_path / "dit", num=1, timesteps=3, steps=4, out_dir=tmp_path / "viz-plain")
