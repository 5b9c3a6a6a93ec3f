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


@pytest.mark.parametrize("name", ["tiny", "toy-dit", "toy-dydit"])
def test_grad_checkpointing_gives_the_same_gradients(name):
    """train.grad_checkpointing recomputes the inner and scaffold blocks in backward: same loss, same gradients."""
    import dataclasses

    from dcdit_cli.models import checkpoint_blocks

    cfg = load_recipe(name).model
    if cfg.kind == "dcdit":
        cfg = dataclasses.replace(cfg, input_size=16, in_channels=3)
    side = cfg.input_size
    x = torch.randn(4, cfg.in_channels, side, side, generator=torch.Generator().manual_seed(0))
    t, y = torch.tensor([5, 500, 900, 999]), torch.tensor([0, 1, 2, 3])
    grads, losses = [], []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg)
        if checkpointed:
            checkpoint_blocks(model)
        out = model(x, t, y)[0]  # (prediction, router stats or None)
        loss = out.square().mean()
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert losses[0] == losses[1]
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=0, atol=0, msg=n)


def test_512_px_pipeline_on_a_64_grid_through_the_cli(tmp_path):
    """extract --image-size 512 (a tiny ×8 VAE: 64×64 latents) → train a tiny DC-DiT on the 64×64 grid
    with grad checkpointing, σ 2 and the 512 recipes' positions → resume → sample (decoded) → boundaries."""
    import json
    import os
    import subprocess
    import sys

    import numpy as np
    from diffusers import AutoencoderKL
    from PIL import Image

    def dcdit(*args):
        proc = subprocess.run([sys.executable, "-m", "dcdit_cli", *args], capture_output=True, text=True, cwd=tmp_path,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    torch.manual_seed(0)
    AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  block_out_channels=(8,) * 4, layers_per_block=1, latent_channels=4, norm_num_groups=4).save_pretrained(tmp_path / "vae")
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "images" / cls).mkdir(parents=True)
        for k in range(2):
            Image.fromarray(rng.integers(0, 256, (530, 600, 3), dtype=np.uint8)).save(tmp_path / "images" / cls / f"{k}.png")
    dcdit("extract", "--data-path", "images", "--out", "features", "--vae", "vae", "--image-size", "512", "--batch-size", "2")
    assert json.loads((tmp_path / "features/index.json").read_text())["latent_shape"] == [4, 64, 64]

    sets = ["data.kind=latents", "data.path=features", "data.image_size=512", "data.num_classes=2", "model.num_classes=2",
            "model.in_channels=4", "model.input_size=64", "model.smoothing_sigma=2.0", "model.pos_grid_scale=0.5",
            "train.grad_checkpointing=true", "train.global_batch=4", "train.max_steps=2"]
    args = ["train", "--recipe", "tiny", *sum((["--set", s] for s in sets), []), "--out", "runs/r"]
    dcdit(*args)
    resumed = dcdit(*args, "--set", "train.max_steps=3")
    assert "resuming" in resumed.stdout + resumed.stderr
    dcdit("sample", "--ckpt", "runs/r", "--num", "2", "--steps", "3", "--vae", "vae", "--npz", "s.npz", "--batch-size", "2")
    assert np.load(tmp_path / "s.npz")["arr_0"].shape == (2, 512, 512, 3)
    dcdit("viz-boundaries", "--ckpt", "runs/r", "--num", "1", "--steps", "3", "--vae", "vae", "--out", "viz")
    assert list((tmp_path / "viz").glob("*.png"))


@pytest.mark.parametrize("precision,checkpointing", [("no", False), ("bf16", True)])
def test_memory_model_matches_measured_peaks_at_two_grid_sizes(precision, checkpointing):
    """docs/resolutions.md#memory: the fitted model within 15% of MemTracker's measured peak at 16² and 32²
    (a width the fit did not see); checkpointing lowers the measured peak."""
    import dataclasses

    from dcdit_cli.training import memory

    base = dataclasses.replace(load_recipe("tiny").model, hidden_size=80, scaffold_width=20, depth=2, num_heads=4,
                               norm_groups=4)
    for side in (16, 32):
        m = dataclasses.replace(base, input_size=side)
        measured = memory.measure_peak_bytes(m, 2, precision, checkpointing)
        predicted = memory.predict_peak_bytes(m, 2, precision, checkpointing, scores=True)
        assert abs(predicted / measured - 1) < 0.15, (side, predicted, measured)
        if checkpointing:
            assert measured < memory.measure_peak_bytes(m, 2, precision, False)


def test_flops_memory_reports_xl_512_with_and_without_checkpointing(capsys):
    import json

    from dcdit_cli.training.memory import run_memory

    rows = run_memory(["xl-n4-512"], [], batch=32, precision=None, as_json=True)
    printed = json.loads(capsys.readouterr().out)[0]
    assert printed["recipe"] == "xl-n4-512" and printed["precision"] == "bf16"
    row = rows[0]
    assert 0 < row.peak_gib_checkpointing < row.peak_gib
    for plain, ckpt in row.max_batch.values():
        assert ckpt >= plain
    assert row.max_batch[192][0] >= row.max_batch[80][0]
