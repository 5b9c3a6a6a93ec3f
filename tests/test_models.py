"""DC-DiT and DiT model-level behaviour: shapes, inits, batch invariance, gradients, sizes."""

import dataclasses

import pytest
import torch

from dcdit_cli.config.recipe import ModelConfig, load_recipe
from dcdit_cli.models import DCDiT, DiT, RouterStats, build_model
from dcdit_cli.models.dit import grid_positions, sincos_2d

TINY = dict(input_size=8, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=5, scaffold_width=16)


def _inputs(b, side=8, ch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, ch, side, side, generator=g), torch.randint(0, 1000, (b,), generator=g), torch.randint(0, 5, (b,), generator=g)


def _randomise(model, seed=0):
    """Give zero-initialised layers random weights so every path carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def test_zero_inits():
    m = DCDiT(ModelConfig(**TINY))
    assert torch.count_nonzero(m.residual_proj.weight) == 0 and torch.count_nonzero(m.residual_proj.bias) == 0
    assert torch.count_nonzero(m.final_layer.linear.weight) == 0
    assert torch.count_nonzero(m.final_layer.adaLN_modulation[-1].weight) == 0
    for block in m.blocks:
        assert torch.count_nonzero(block.adaLN_modulation[-1].weight) == 0
    assert torch.equal(m.router.q_proj.weight, torch.eye(32)) and torch.equal(m.router.k_proj.weight, torch.eye(32))
    assert torch.allclose(m.router.k_avg.weight, torch.full_like(m.router.k_avg.weight, 1 / 9))
    x, t, y = _inputs(2)
    out, _ = m(x, t, y)
    assert torch.count_nonzero(out) == 0  # adaLN-Zero: the untrained model predicts 0


def test_shapes_and_stats():
    m = _randomise(DCDiT(ModelConfig(**TINY)))
    x, t, y = _inputs(3)
    out, stats = m(x, t, y)
    assert out.shape == (3, 6, 8, 8)
    assert stats.p.shape == (3, 64) and stats.kept.shape == (3, 64)
    assert torch.equal(stats.num_kept, stats.kept.sum(1)) and (stats.num_kept >= 1).all()
    assert stats.order.shape[1] == int(stats.num_kept.max())
    assert torch.allclose(stats.compression, 64 / stats.num_kept.float())


def test_the_scaffold_runs_channels_last_without_copies_at_its_ends():
    """Every convolution and GroupNorm of the encoder and decoder sees a channels-last input, so the
    encoder's (B, D, H, W) output read as (B, L, D) tokens, and the decoder's (B, L, D) input read
    as a grid, need no copy (docs/performance.md, "a channels-last scaffold")."""
    m = _randomise(DCDiT(ModelConfig(**TINY)))
    seen = []
    hooks = [mod.register_forward_hook(lambda mod, a, o, name=name: seen.append((name, a[0], o)))
             for name, mod in m.named_modules()
             if name.startswith(("encoder", "decoder")) and isinstance(mod, (torch.nn.Conv2d, torch.nn.GroupNorm))]
    m(*_inputs(2))
    for h in hooks:
        h.remove()
    assert len(seen) == len(hooks) > 0
    for name, inp, out in seen:
        assert inp.is_contiguous(memory_format=torch.channels_last) and not inp.is_contiguous(), name
    encoder_out = next(o for name, _, o in reversed(seen) if name.startswith("encoder"))
    assert encoder_out.flatten(2).transpose(1, 2).is_contiguous()  # (B, L, D) tokens without a copy
    decoder_in = next(i for name, i, _ in seen if name.startswith("decoder"))
    assert decoder_in.flatten(2).transpose(1, 2).is_contiguous()  # the (B, L, D) de-chunked tokens, as a grid


def test_batch_invariance_alone_vs_batch_of_four():
    torch.manual_seed(0)
    m = _randomise(DCDiT(ModelConfig(**TINY))).eval()
    # Bias the router so samples keep different numbers of tokens.
    x, t, y = _inputs(4)
    x = x * torch.tensor([0.1, 1.0, 3.0, 0.5])[:, None, None, None]
    with torch.no_grad():
        batched, stats = m(x, t, y)
        assert len(set(stats.num_kept.tolist())) > 1, "test needs different kept counts to exercise padding"
        for i in range(4):
            alone, s1 = m(x[i : i + 1], t[i : i + 1], y[i : i + 1])
            assert torch.equal(s1.kept[0], stats.kept[i])
            assert torch.allclose(alone[0], batched[i], atol=1e-5), i


def test_budget_per_sample_and_zero_budget_identity():
    m = _randomise(DCDiT(ModelConfig(**TINY))).eval()
    x, t, y = _inputs(2)
    with torch.no_grad():
        a, sa = m(x, t, y)
        b, sb = m(x, t, y, budget=0.0)
        c, sc = m(x, t, y, budget=torch.tensor([0.0, 0.5]))
    assert torch.equal(a, b)
    assert sc.num_kept[0] == sa.num_kept[0] and sc.num_kept[1] < sa.num_kept[1] or sa.num_kept[1] == 1
    assert torch.equal(sc.mask, sa.mask)  # the ratio loss sees the mask before dropping
    with pytest.raises(ValueError):
        m(x, t, y, budget=1.0)


def test_a_host_zero_budget_skips_tail_dropping(monkeypatch):
    """Nothing to drop, so a host budget of 0 (or None: training) never runs the sort of tail dropping;
    a tensor budget, even of zeros, does (its values are on the device)."""
    import dcdit_cli.models.dcdit as dcdit

    m = _randomise(DCDiT(ModelConfig(**TINY))).eval()
    x, t, y = _inputs(2)
    calls = []
    monkeypatch.setattr(dcdit, "tail_drop", lambda mask, p, f: calls.append(f) or mask)
    with torch.no_grad():
        for budget in (None, 0.0, 0):
            _, stats = m(x, t, y, budget=budget)
            assert torch.equal(stats.kept, stats.mask)
        assert calls == []
        m(x, t, y, budget=0.25)
        m(x, t, y, budget=torch.zeros(2))
    assert len(calls) == 2 and calls[0].tolist() == [0.25, 0.25]


def test_diffusion_loss_alone_reaches_router():
    torch.manual_seed(0)
    m = _randomise(DCDiT(ModelConfig(**TINY)))
    x, t, y = _inputs(2)
    out, stats = m(x, t, y)
    loss = out.square().mean()  # any loss on the prediction; no ratio loss (λ = 0)
    loss.backward()
    for name in ("q_proj", "k_proj", "k_avg"):
        grad = getattr(m.router, name).weight.grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_random_router_model_runs_and_keeps_about_l_over_n():
    torch.manual_seed(0)
    m = DCDiT(ModelConfig(**{**TINY, "input_size": 16}, router="random", target_ratio=4.0))
    x, t, y = _inputs(8, side=16)
    _, stats = m(x, t, y)
    assert abs(stats.mask.float().mean().item() - 0.25) < 0.05


def test_sincos_matches_dit_table_layout():
    emb = sincos_2d(grid_positions(4), 16)  # (16, 16)
    # first half encodes the column: tokens in the same column share it
    assert torch.allclose(emb[0, :8], emb[4, :8]) and not torch.allclose(emb[0, 8:], emb[4, 8:])
    assert torch.allclose(emb[0, 8:], emb[1, 8:]) and not torch.allclose(emb[0, :8], emb[1, :8])
    # [sin | cos] at position 0: sin 0 = 0, cos 0 = 1
    assert torch.equal(emb[0, :4], torch.zeros(4)) and torch.equal(emb[0, 4:8], torch.ones(4))


def test_the_inner_position_table_is_computed_once_and_another_grid_computes_its_own():
    """The kept tokens' sin-cos embeddings come from a table of the recipe's grid built at construction
    (not in the state dict, as the DiT's fixed pos_embed needs no saving either); a forward on another
    grid side gives what a model built for that side gives with the same weights."""
    m = _randomise(DCDiT(ModelConfig(**TINY, pos_grid_scale=0.5)))
    assert torch.equal(m.pos_table, m.position_table(8)) and m.pos_table.shape == (64, 32)
    assert "pos_table" not in m.state_dict()
    assert not torch.equal(m.position_table(8), DCDiT(ModelConfig(**TINY)).pos_table)  # the grid scale is in it
    wide = DCDiT(ModelConfig(**{**TINY, "input_size": 12}, pos_grid_scale=0.5))
    wide.load_state_dict(m.state_dict())
    x, t, y = _inputs(2, side=12)
    assert torch.equal(m(x, t, y)[0], wide(x, t, y)[0])


def test_dit_official_parameter_counts():
    with torch.device("meta"):
        b2 = DiT(ModelConfig(kind="dit", patch_size=2, hidden_size=768, depth=12, num_heads=12))
        xl2 = DiT(ModelConfig(kind="dit", patch_size=2, hidden_size=1152, depth=28, num_heads=16))
    assert round(sum(p.numel() for p in b2.parameters()) / 1e6, 1) == 130.5
    assert sum(p.numel() for p in xl2.parameters()) == 675_129_632  # the official checkpoint
    keys = xl2.state_dict().keys()
    assert len(keys) == 292 and "blocks.27.adaLN_modulation.1.weight" in keys and "pos_embed" in keys


def test_dcdit_parameter_counts_near_paper():
    for name, paper in (("b-n4", 138e6), ("xl-n4", 690e6)):
        with torch.device("meta"):
            m = build_model(load_recipe(name).model)
        n = sum(p.numel() for p in m.parameters())
        assert abs(n - paper) / paper < 0.015, (name, n)


def test_dit_unpatchify_roundtrip_and_forward():
    m = _randomise(DiT(ModelConfig(kind="dit", input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=1, num_heads=2, num_classes=5)))
    x, t, y = _inputs(2)
    out, stats = m(x, t, y)
    assert out.shape == (2, 6, 8, 8) and stats.gates is None and not isinstance(stats, RouterStats)
    tokens = torch.arange(2 * 16 * 24, dtype=torch.float32).reshape(2, 16, 24)
    img = m.unpatchify(tokens)
    # token (0,0), sub-position (p=1, q=0), channel 2 → index (1·2 + 0)·6 + 2 = 14
    assert img[0, 2, 1, 0] == tokens[0, 0, 14]


def test_recipe_options_norm_groups_and_torch_init():
    """model.norm_groups sets the scaffold's GroupNorms; model.init = 'torch' keeps every structural init."""
    dit_init, torch_init = DCDiT(ModelConfig(**TINY)), DCDiT(ModelConfig(**TINY, norm_groups=4, init="torch"))
    gns = [m for m in torch_init.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert gns and all(m.num_groups == 4 for m in gns)
    assert all(m.num_groups == m.num_channels for m in dit_init.modules() if isinstance(m, torch.nn.GroupNorm))  # 16, 32 ≤ 32
    # The condition: N(0, 0.02) in DiT's init, PyTorch's N(0, 1) table and U(±1/√fan_in) MLP otherwise.
    assert dit_init.y_embedder.embedding_table.weight.std() < 0.05 < 0.5 < torch_init.y_embedder.embedding_table.weight.std()
    w = torch_init.t_embedder.mlp[0].weight
    assert w.abs().max() <= 1 / 256**0.5 and w.std() > 0.5 / 256**0.5
    # Structural inits are the same in both: identity router, zero residual, adaLN-zero, zero final layer.
    assert torch.equal(torch_init.router.q_proj.weight, torch.eye(32)) and torch.equal(torch_init.router.k_proj.weight, torch.eye(32))
    assert torch.count_nonzero(torch_init.residual_proj.weight) == 0 and torch.count_nonzero(torch_init.final_layer.linear.weight) == 0
    assert all(torch.count_nonzero(b.adaLN_modulation[-1].weight) == 0 for b in torch_init.blocks)
    assert torch.count_nonzero(torch_init.final_layer.adaLN_modulation[-1].weight) == 0
    toy = load_recipe("toy").model
    assert (toy.init, toy.norm_groups) == ("dit", 8)
    assert (load_recipe("b-n4").model.init, load_recipe("b-n4").model.norm_groups) == ("dit", 32)


def test_forced_boundaries_keep_confidence_on_the_forced_side():
    """forward(boundary=...) moves p to the forced side of 0.5 with the router's confidence; forcing
    the router's own decision is the unforced forward, bit for bit."""
    torch.manual_seed(0)
    m = _randomise(DCDiT(ModelConfig(**TINY))).eval()
    x, t, y = _inputs(3)
    with torch.no_grad():
        free, stats = m(x, t, y)
        same, same_stats = m(x, t, y, boundary=stats.mask)
        assert torch.equal(free, same) and torch.equal(stats.p, same_stats.p)
        forced = torch.rand(3, 64, generator=torch.Generator().manual_seed(1)) < 0.3
        out, fs = m(x, t, y, boundary=forced)
    flipped = forced != stats.mask
    assert torch.equal(fs.kept, forced) and torch.equal(fs.p[flipped], 1 - stats.p[flipped])
    assert torch.equal(fs.p[~flipped], stats.p[~flipped]) and (fs.p[forced & flipped] > 0.5).all()
    confidence = torch.maximum(stats.p, 1 - stats.p)
    assert torch.allclose(torch.maximum(fs.p, 1 - fs.p), confidence)
    assert not torch.allclose(out, free)


def test_dcdit_modes_are_forward_arguments():
    """Recording the block outputs and the attention backend are arguments of one forward, not
    attributes someone sets on the model (issue 19)."""
    from dcdit_cli.models.attention import available_backends

    m = load_recipe("tiny").model
    model = build_model(m).eval()
    assert not hasattr(model, "record_block_outputs")
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(2, m.in_channels, m.input_size, m.input_size, generator=g), torch.tensor([10, 500]), torch.tensor([0, 1])
    with torch.no_grad():
        out, stats = model(x, t, y)
        recorded, stats_r = model(x, t, y, record_blocks=True, attention=available_backends("cpu")[-1])
    assert stats.block_outputs is None and len(stats_r.block_outputs) == m.depth
    assert torch.allclose(out, recorded, atol=1e-5) and not hasattr(model, "attention")  # no backend kept on the model


@pytest.mark.parametrize("kind", ["dcdit", "dit"])
def test_the_model_config_is_the_one_source(kind):
    """A model is built from its recipe's ModelConfig alone and keeps it; a plain dict of the
    fields builds the same model (the diffusers wrapper's path); a config of the other kind is refused."""
    cfg = load_recipe("tiny", [f"model.kind={kind}", "model.dynamic=dydit"]).model
    torch.manual_seed(0)
    model = build_model(cfg)
    torch.manual_seed(0)
    again = build_model(ModelConfig(**dataclasses.asdict(cfg)))
    assert model.config is cfg and again.config == cfg
    assert model.state_dict().keys() == again.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    other = DiT if kind == "dcdit" else DCDiT
    with pytest.raises(ValueError, match="kind"):
        other(cfg)
