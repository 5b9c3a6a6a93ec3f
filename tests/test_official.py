"""The authors' released DC-DiT checkpoints: predictive router, safe reading, key map, the forward
against an independent re-implementation of theirs (tests/official_oracle.py), convert, CLI."""

import subprocess
import sys

import pytest
import torch
from official_oracle import AuthorsDCDiT, save_authors_checkpoint

from dcdit_cli.common.console import DcditError
from dcdit_cli.config.recipe import ModelConfig, available_recipes, load_recipe
from dcdit_cli.models import build_model
from dcdit_cli.models.routers import PredictiveRouter, force_endpoints
from dcdit_cli.training.checkpoint import convert_weights, init_from, load_weights, read_weights
from dcdit_cli.training.released_checkpoints import read_official


def dcdit(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "dcdit_cli", *args], capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def authors_file(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("authors")
    model, ema = AuthorsDCDiT().randomize(0), AuthorsDCDiT().randomize(1)
    return save_authors_checkpoint(tmp / "0400000.pt", tmp, model, ema), model, ema


# ----------------------------------------------------------------------------------------
# The predictive router
# ----------------------------------------------------------------------------------------


def test_predictive_router_shapes_and_init_near_one_over_n():
    torch.manual_seed(0)
    router = PredictiveRouter(64)
    p = router(torch.randn(3, 100, 64), 10)
    assert p.shape == (3, 100) and p.dtype == torch.float32
    assert router.residual_scorer[-1].bias.item() == pytest.approx(-1.1)
    assert p.mean().item() == pytest.approx(0.25, abs=0.05)  # sigmoid(−1.1) = 0.2497
    assert [type(m).__name__ for m in router.residual_scorer] == ["Conv2d", "GroupNorm", "SiLU", "Conv2d"]
    assert router.residual_scorer[1].num_groups == 8 and router.proj.out_channels == 16


def test_force_endpoints_sets_one_without_gradient():
    logits = torch.randn(2, 9, requires_grad=True)
    p = force_endpoints(torch.sigmoid(logits))
    assert torch.equal(p[:, [0, -1]], torch.ones(2, 2)) and bool((p[:, 1:-1] < 1).all())
    p.sum().backward()
    assert torch.equal(logits.grad[:, [0, -1]], torch.zeros(2, 2)) and bool((logits.grad[:, 1:-1] != 0).all())


def test_diffusion_loss_alone_reaches_every_predictive_router_parameter():
    torch.manual_seed(0)
    m = build_model(load_recipe("tiny", ["model.router=predictive", "model.force_endpoints=true"]).model)
    for p in m.parameters():  # break adaLN-Zero so that gradients flow everywhere
        p.data.add_(torch.randn_like(p) * 0.05)
    out, stats = m(torch.randn(2, 3, 8, 8), torch.tensor([10, 500]), torch.tensor([1, 2]))
    assert bool(stats.kept[:, 0].all() and stats.kept[:, -1].all())  # forced endpoints are kept
    out.square().mean().backward()  # no ratio loss
    for name, param in m.router.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("name", [n for n in available_recipes() if load_recipe(n).model.kind == "dcdit"])
def test_every_dcdit_recipe_has_a_nonzero_decoder_norm(name):
    recipe = load_recipe(name)
    with torch.device("meta"):
        m = build_model(recipe.model)
    assert isinstance(m.decoder.norm, torch.nn.RMSNorm) and m.decoder.norm.eps == recipe.model.norm_eps
    for module in m.modules():  # model.norm_eps for the scaffold's GroupNorms and every RMSNorm; DiT's 1e-6 elsewhere
        if isinstance(module, (torch.nn.GroupNorm, torch.nn.RMSNorm)):
            assert module.eps == recipe.model.norm_eps
        elif isinstance(module, torch.nn.LayerNorm) and not recipe.model.cond_adaptor:
            assert module.eps == 1e-6
    fresh = build_model(load_recipe("tiny").model)  # meta tensors have no values: check the init on a tiny model
    assert bool((fresh.decoder.norm.weight != 0).all())
    assert m.decoder.norm.weight.shape == (recipe.model.scaffold_width,)


def test_official_recipes_match_the_authors_configs():
    for name, (width, heads, depth, e) in {"s-n4-official": (384, 6, 12, 96), "b-n4-official": (768, 12, 12, 192),
                                           "xl-n4-official": (1152, 16, 28, 288)}.items():
        r = load_recipe(name)
        m, t = r.model, r.train
        assert (m.hidden_size, m.num_heads, m.depth, m.scaffold_width) == (width, heads, depth, e)
        assert (m.router, m.force_endpoints, m.norm_eps, m.target_ratio, m.smoothing_sigma) == ("predictive", True, 1e-5, 4.0, 1.0)
        assert t.multi_budget_fractions == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6] and t.multi_budget_start_step == 50_000
        assert (t.lr, t.global_batch, t.ema_decay, t.grad_clip, t.ratio_loss_weight, t.label_dropout) == (1e-4, 256, 0.9999, 1.0, 0.03, 0.1)


# ----------------------------------------------------------------------------------------
# Reading their file: key map, recipe, equivalence with their forward
# ----------------------------------------------------------------------------------------


def test_reads_maps_every_key_and_derives_the_recipe(authors_file):
    path, model, ema = authors_file
    state, recipe, step = read_official(path)
    assert step == 400_000
    theirs = ema.state_dict()
    assert len(state) == len(theirs) - 1  # every key mapped; pos_embed checked and dropped
    assert torch.equal(state["router.residual_scorer.3.bias"], theirs["hnet.routing_module.residual_scorer.3.bias"])
    assert torch.equal(state["decoder.norm.weight"], theirs["hnet.decoder.rmsnorm.weight"])
    assert torch.equal(state["encoder.blocks.1.skip.weight"], theirs["hnet.encoder.layers.1.skip_proj.weight"])
    assert torch.equal(state["blocks.1.adaLN_modulation.1.weight"], theirs["hnet.main_network.main_network.layers.1.adaLN_modulation.1.weight"])
    raw, _, _ = read_official(path, weights="model")
    assert torch.equal(raw["inner_norm.weight"], model.state_dict()["hnet.main_network.main_network.rmsnorm.weight"])
    m = recipe.model
    assert (m.hidden_size, m.depth, m.num_heads, m.scaffold_width, m.input_size, m.num_classes) == (64, 2, 4, 32, 8, 10)
    assert (m.router, m.force_endpoints, m.norm_eps, m.encoder_blocks, m.decoder_blocks) == ("predictive", True, 1e-5, 2, 2)
    assert recipe.train.multi_budget_start_step == 50_000 and recipe.train.multi_budget_fractions[-1] == 0.6
    dc = build_model(m)
    assert set(dc.state_dict()) == set(state)


@pytest.mark.parametrize("fraction", [0.0, 0.3])
def test_forward_equals_the_authors_forward(authors_file, fraction):
    path, _, ema = authors_file
    model, _, _ = load_weights(path)
    torch.manual_seed(0)
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([999, 500, 3]), torch.tensor([1, 7, 10])  # 10 = null class
    f = torch.tensor([fraction, 0.5 * fraction, 0.0])
    expected, kept, selected = ema.eval()(x, t, y, f)
    with torch.no_grad():
        out, stats = model(x, t, y, budget=f)
    counts = kept.sum(1)
    assert bool(((counts > 2) & (counts < 64)).all()), counts  # a real selection, not all or nothing
    assert torch.equal(stats.kept, kept)
    assert torch.allclose(torch.maximum(stats.p, 1 - stats.p), selected, atol=1e-6)
    assert torch.allclose(out, expected, atol=2e-5, rtol=1e-5), (out - expected).abs().max()
    model.decoder.norm = torch.nn.Identity()  # the comparison is sensitive: without the decoder norm it fails
    with torch.no_grad():
        assert (model(x, t, y, budget=f)[0] - expected).abs().max() > 0.1


def test_convert_writes_dcdit_weights_that_load_identically(authors_file, tmp_path):
    path, _, _ = authors_file
    written = convert_weights(path, tmp_path / "conv")
    assert written.suffix == ".safetensors" and (tmp_path / "conv" / "recipe.toml").is_file()
    a, recipe_a, _ = load_weights(path)
    b, recipe_b, step = load_weights(tmp_path / "conv")
    assert recipe_a == recipe_b and step == 400_000
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.tensor([3, 4])
    with torch.no_grad():
        assert torch.equal(a(x, t, y)[0], b(x, t, y)[0])
    state, _, _ = read_weights(written)  # no pickle on the way back
    assert set(state) == set(a.state_dict())


def test_init_from_loads_strictly_but_tolerates_new_dydit_gates(authors_file):
    path, _, _ = authors_file
    _, recipe, _ = read_official(path)
    model = build_model(recipe.model)
    assert init_from(model, path) == []
    assert torch.equal(model.state_dict()["router.proj.weight"], read_official(path)[0]["router.proj.weight"])
    model.blocks[0].dydit = torch.nn.Linear(2, 2)  # a gate another stream adds (issue 12)
    assert sorted(init_from(model, path)) == ["blocks.0.dydit.bias", "blocks.0.dydit.weight"]
    other = build_model(load_recipe("tiny").model)
    with pytest.raises(DcditError, match="made by a different model"):
        init_from(other, path)


# ----------------------------------------------------------------------------------------
# Refusals: one line each, nothing run
# ----------------------------------------------------------------------------------------


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_a_pickle_that_would_create_a_file_is_refused(tmp_path):
    target = tmp_path / "pwned.txt"
    torch.save({"model": {}, "ema": {}, "opt": {}, "config": _Evil(str(target))}, tmp_path / "evil.pt")
    with pytest.raises(DcditError, match="open") as e:
        read_official(tmp_path / "evil.pt")
    assert "\n" not in str(e.value) and "evil.pt" in str(e.value) and "refused" in str(e.value)
    assert not target.exists()
    proc = dcdit("sample", "--ckpt", str(tmp_path / "evil.pt"), "--out", str(tmp_path / "s.png"))
    assert proc.returncode == 2 and not target.exists() and "refused" in proc.stderr


def test_truncated_and_dit_files_are_one_line_through_the_cli(authors_file, tmp_path):
    from dcdit_cli.models.dit import DiT

    data = authors_file[0].read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    torch.save(DiT(ModelConfig(kind="dit", input_size=8, patch_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=10)).state_dict(), tmp_path / "dit.pt")
    for name, words in {"cut.pt": "truncated", "dit.pt": "DiT checkpoint, not a DC-DiT"}.items():
        proc = dcdit("convert", "--from", str(tmp_path / name), "--out", str(tmp_path / "out"))
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and words in proc.stderr.replace("\n", " "), proc.stderr
    assert not (tmp_path / "out").exists()


def test_hf_reference_absent_from_the_cache_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    proc = dcdit("convert", "--from", "hf:amd/DynamicChunkingDiT/XL-256/0400000.pt", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "huggingface-cli download amd/DynamicChunkingDiT XL-256/0400000.pt" in proc.stderr.replace("\n", " ")


def test_hf_reference_found_in_the_cache(authors_file, tmp_path, monkeypatch):
    from dcdit_cli.training.checkpoint import resolve_weights

    snapshot = tmp_path / "hub" / "models--amd--DynamicChunkingDiT" / "snapshots" / ("a" * 40) / "S-256"
    snapshot.mkdir(parents=True)
    (snapshot / "0400000.pt").write_bytes(authors_file[0].read_bytes())
    (tmp_path / "hub" / "models--amd--DynamicChunkingDiT" / "refs").mkdir()
    (tmp_path / "hub" / "models--amd--DynamicChunkingDiT" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.file_download.HF_HUB_CACHE", str(tmp_path / "hub"), raising=False)
    assert resolve_weights("hf:amd/DynamicChunkingDiT/S-256/0400000.pt") == snapshot / "0400000.pt"


# ----------------------------------------------------------------------------------------
# The commands a user runs on their file
# ----------------------------------------------------------------------------------------


def test_sample_viz_and_flops_read_the_authors_file(authors_file, tmp_path, vae_dir):
    path = authors_file[0]
    proc = dcdit("sample", "--ckpt", str(path), "--vae", str(vae_dir), "--num", "2", "--steps", "2", "--out", str(tmp_path / "s.png"))
    assert proc.returncode == 0 and (tmp_path / "s.png").is_file(), proc.stderr
    proc = dcdit("viz-boundaries", "--ckpt", str(path), "--vae", str(vae_dir), "--num", "1", "--steps", "2",
                 "--timesteps", "2", "--out", str(tmp_path / "b"))
    assert proc.returncode == 0 and any((tmp_path / "b").glob("*.png")), proc.stderr
    proc = dcdit("flops", "--ckpt", str(path), "--num", "1", "--json")
    assert proc.returncode == 0, proc.stderr


def test_train_init_from_starts_from_the_weights_and_resume_wins(tmp_path):
    from safetensors.torch import load_file

    from dcdit_cli.training.loop import train

    source = train(load_recipe("tiny", ["train.max_steps=2", "train.ckpt_every_steps=2"]), tmp_path / "a")
    other = train(load_recipe("tiny", ["train.max_steps=1", "run.seed=7"]), tmp_path / "c")
    frozen = load_recipe("tiny", ["train.max_steps=1", "train.lr=0.0", "train.ckpt_every_steps=1"])  # lr 0: weights stay put
    with pytest.raises(DcditError, match="does not exist"):
        train(frozen, tmp_path / "b", init_from=tmp_path / "missing")
    assert not (tmp_path / "b").exists()
    train(frozen, tmp_path / "b", init_from=tmp_path / "a")
    a, b = load_file(str(source)), load_file(str(tmp_path / "b/checkpoints/step-0000001/model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the model started from a's EMA weights
    train(frozen.replace(train={"max_steps": 2}), tmp_path / "b", init_from=other)  # its own checkpoint wins
    c = load_file(str(tmp_path / "b/checkpoints/step-0000002/model.safetensors"))
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_weights_that_do_not_match_their_config_are_one_line(tmp_path):
    model = AuthorsDCDiT()
    damaged = {k: v for k, v in model.state_dict().items() if k != "hnet.decoder.rmsnorm.weight"}
    save_authors_checkpoint(tmp_path / "damaged.pt", tmp_path, model, damaged)
    with pytest.raises(DcditError, match="decoder.norm.weight is missing") as e:
        read_official(tmp_path / "damaged.pt")
    assert "\n" not in str(e.value)
    extra = {**model.state_dict(), "hnet.mystery.weight": torch.zeros(2)}
    save_authors_checkpoint(tmp_path / "extra.pt", tmp_path, model, extra)
    with pytest.raises(DcditError, match="hnet.mystery.weight"):
        read_official(tmp_path / "extra.pt")


def test_configs_dcdit_cannot_express_and_foreign_tensors_are_one_line_naming_the_file(tmp_path):
    model = AuthorsDCDiT()
    extra = {**model.state_dict(), "final_layer.extra.weight": torch.zeros(2)}  # under a pass-through prefix
    save_authors_checkpoint(tmp_path / "extra.pt", tmp_path, model, extra)
    with pytest.raises(DcditError, match="final_layer.extra.weight is not in its config's model"):
        read_official(tmp_path / "extra.pt")

    def setter(section, **values):
        return lambda cfg: [setattr(getattr(cfg.model, "hnet") if section == "hnet" else getattr(cfg, section), k, v)
                            for k, v in values.items()]

    for name, edit, words in (
        ("curriculum", setter("training", downsample_factor_start=2.0, downsample_factor_warmup_steps=1000), "downsample_factor_start"),
        ("fp16-router", setter("hnet", fp32_router_dechunk=False), "fp32_router_dechunk false"),
        ("lr-text", setter("training", learning_rate="abc"), "could not convert string to float"),
        ("heads", setter("hnet", num_heads=[4, 3]), "not divisible by model.num_heads 3"),
    ):
        save_authors_checkpoint(tmp_path / f"{name}.pt", tmp_path, model, model, edit=edit)
        with pytest.raises(DcditError, match=words) as e:
            read_official(tmp_path / f"{name}.pt")
        assert f"{name}.pt" in str(e.value) and "<replace>" not in str(e.value) and "\n" not in str(e.value)

    import argparse

    torch.save({"model": {}, "ema": {}, "args": argparse.Namespace(model="DiT-XL/2")}, tmp_path / "dit-train.pt")
    with pytest.raises(DcditError, match="an official DiT training checkpoint, not a DC-DiT release: upcycle it"):
        read_official(tmp_path / "dit-train.pt")

    save_authors_checkpoint(tmp_path / "accum.pt", tmp_path, model, model, edit=setter("training", gradient_accumulation_steps=4))
    _, recipe, _ = read_official(tmp_path / "accum.pt")
    assert recipe.train.global_batch == 4 * 256  # images per update: their loader batch × accumulation


@pytest.mark.parametrize("name, sizes", [("s-n4-official", (384, 6, 12)), ("xl-n4-official", (1152, 16, 28))])
def test_full_size_key_map_on_meta_tensors(name, sizes):
    from dcdit_cli.training.released_checkpoints import _check_against, map_official_state

    width, heads, depth = sizes
    with torch.device("meta"):
        theirs = AuthorsDCDiT(D=width, factor=4, heads=heads, depth=depth, side=32, classes=1000).state_dict()
    theirs.pop("pos_embed")  # values are needed to check it (meta tensors have none)
    mapped = map_official_state(theirs, name)
    _check_against(mapped, load_recipe(name), name)  # every tensor of the official recipe's model, with its shape
    with torch.device("meta"):
        assert len(mapped) == len(build_model(load_recipe(name).model).state_dict())
