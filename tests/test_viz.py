"""viz-boundaries: sheets and plot written, JSON consistent with them, budgets, clear errors."""

import json

import numpy as np
import pytest
from PIL import Image

from dcdit_cli.common.console import DcditError
from dcdit_cli.config.recipe import load_recipe
from dcdit_cli.sampling.viz_boundaries import column_steps, nice_ticks, run_viz, sheet_layout, viridis
from dcdit_cli.training.loop import train

G, L = 8, 64  # the tiny recipe's 8×8 token grid


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("viz") / "run"
    train(load_recipe("tiny", ["train.max_steps=2"]), run)
    return run


@pytest.fixture(scope="module")
def viz0(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("viz0")
    return out, run_viz(tiny_run, num=3, timesteps=4, budget=0.0, out_dir=out, steps=10, seed=1)


def test_files_and_image_sizes(viz0):
    out, result = viz0
    assert sorted(p.name for p in out.glob("sample-*.png")) == ["sample-000.png", "sample-001.png", "sample-002.png"]
    expected = sheet_layout(len(result["timesteps"]), G, G).size
    for path in result["pngs"]:
        assert Image.open(path).size == expected
    assert sheet_layout(4, G, G).panel >= 128 and sheet_layout(8, 16, 16).panel >= 128
    assert sheet_layout(8, G, G).size[0] > sheet_layout(4, G, G).size[0]
    summary = Image.open(out / "compression_vs_t.png")
    assert summary.size[0] >= 640 and summary.size[1] >= 320


def test_json_numbers_are_consistent(viz0):
    _, r = viz0
    assert r["timesteps"][0] == 999 and r["timesteps"][-1] == 0 and len(r["timesteps"]) == 4
    assert r["timesteps"] == sorted(r["timesteps"], reverse=True)
    kept, comp = np.array(r["kept"]), np.array(r["compression"])
    assert kept.shape == comp.shape == (4, 3) and r["tokens"] == L
    assert ((kept >= 1) & (kept <= L)).all()
    np.testing.assert_allclose(comp, L / kept, rtol=1e-4)
    np.testing.assert_allclose(r["mean_kept"], kept.mean(axis=1), rtol=1e-4)
    np.testing.assert_allclose(r["mean_compression"], L / kept.mean(axis=1), rtol=1e-4)


def test_kept_boxes_drawn_match_the_counts(viz0):
    _, r = viz0
    layout = sheet_layout(4, G, G)
    sheet = np.asarray(Image.open(r["pngs"][0]))
    for col in range(4):
        x0, y0 = layout.panel_xy(1, col)
        boxed = sum(
            (sheet[y0 + i * layout.cell + layout.cell // 2, x0 + j * layout.cell + 1] == 255).all()
            for i in range(G) for j in range(G)
        )
        assert boxed == r["kept"][col][0]


def test_budget_keeps_fewer_tokens_and_json_goes_to_stdout(tiny_run, viz0, tmp_path, capsys):
    _, r0 = viz0
    r5 = run_viz(tiny_run, num=3, timesteps=4, budget=0.5, out_dir=tmp_path, steps=10, seed=1, as_json=True)
    printed = json.loads(capsys.readouterr().out)
    assert printed["kept"] == r5["kept"]
    assert np.sum(r5["kept"]) < np.sum(r0["kept"])
    assert np.mean(r5["mean_compression"]) > np.mean(r0["mean_compression"])


def test_dit_checkpoint_and_bad_budget_are_clear_errors(tiny_run, tmp_path):
    from dcdit_cli.models import build_model
    from dcdit_cli.training.checkpoint import export_weights

    for bad in (1.0, -0.1):
        with pytest.raises(DcditError, match=r"outside \[0, 1\)"):
            run_viz(tiny_run, num=1, budget=bad, out_dir=tmp_path, steps=2)
    recipe = load_recipe("tiny", ['model.kind="dit"', "model.patch_size=2"])
    export_weights(tmp_path / "dit", 0, build_model(recipe.model).state_dict(), recipe.to_toml(), 1)
    with pytest.raises(DcditError, match="no router"):
        run_viz(tmp_path / "dit", num=1, out_dir=tmp_path / "out", steps=2)


def test_helpers():
    assert column_steps(10, 4) == [0, 3, 6, 9]
    assert column_steps(3, 8) == [0, 1, 2]
    assert column_steps(100, 1) == [0]
    with pytest.raises(DcditError, match="at least 1"):
        column_steps(10, 0)
    assert nice_ticks(0, 999) == [0, 200, 400, 600, 800, 1000]
    colours = viridis(np.array([0.0, 0.5, 1.0]))
    assert colours.dtype == np.uint8
    assert tuple(colours[0]) == (0x44, 0x01, 0x54) and tuple(colours[2]) == (0xFD, 0xE7, 0x25)
