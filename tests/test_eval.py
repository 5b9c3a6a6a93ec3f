"""`dcdit eval`: settings, records, figures, and the whole command on the tiny recipe with a
random Inception and a reference made by `dcdit fid --make-ref` (CPU, well under a minute)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dcdit_cli.cli import app
from dcdit_cli.common.console import DcditError
from dcdit_cli.config.recipe import load_recipe
from dcdit_cli.evaluation import fid
from dcdit_cli.evaluation.evaluate import Setting, default_out, find_eval_json, merge_records, parse_floats, settings_for
from dcdit_cli.evaluation.figures import elastic_figure, pareto_figure
from dcdit_cli.evaluation.metrics import FIELDS
from dcdit_cli.training.loop import train

# ------------------------------------------------------------------ options and records


def test_parse_floats_and_setting_names():
    assert parse_floats("0,0.1, 0.2", "--budgets") == [0.0, 0.1, 0.2]
    assert parse_floats(None, "--budgets") is None
    with pytest.raises(DcditError, match="--budgets 'a,b'"):
        parse_floats("a,b", "--budgets")
    assert Setting(1.5, 0.2).name == "cfg1.5-b0.2" and Setting(1.25, 0.0, 0.9).name == "cfg1.25-b0-u0.9"


def test_settings_take_what_is_not_given_from_the_recipe():
    recipe = load_recipe("tiny", ["sample.budget=0.1", "sample.uncond_budget=0.5", "eval.cfg_scale=2.0"])
    assert [s.name for s in settings_for(recipe, None, None, None)] == ["cfg2-b0.1-u0.5"]
    assert [s.name for s in settings_for(recipe, [0.0, 0.2], -1.0, [1.0])] == ["cfg1-b0", "cfg1-b0.2"]
    assert [s.name for s in settings_for(recipe, [0.0], 0.9, None)] == ["cfg2-b0-u0.9"]


def test_merge_replaces_same_setting_and_keeps_others():
    old = [{"setting": "a", "fid": 1}, {"setting": "b", "fid": 2}]
    new = [{"setting": "b", "fid": 3}, {"setting": "c", "fid": 4}]
    assert merge_records(old, new) == [{"setting": "a", "fid": 1}, {"setting": "b", "fid": 3}, {"setting": "c", "fid": 4}]


def test_default_out_and_compare_lookup(tmp_path):
    assert default_out(tmp_path) == tmp_path / "eval"
    (tmp_path / "weights").mkdir()
    assert default_out(tmp_path / "weights" / "step-0000010.safetensors") == tmp_path / "eval"
    assert default_out("hf:me/dcdit-toy") == Path("eval") / "me--dcdit-toy"  # a Hub reference: not hf:me/eval
    with pytest.raises(DcditError, match="no eval.json"):
        find_eval_json(tmp_path)
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "eval.json").write_text("[]")
    assert find_eval_json(tmp_path) == tmp_path / "eval" / "eval.json"


# ------------------------------------------------------------------ figures


def _records(run, fids, tflops, budgets, cfg=1.5):
    return [{"run": run, "setting": f"{cfg}-{b}", "cfg_scale": cfg, "budget": b, "fid": f, "tflops_per_img": t}
            for f, t, b in zip(fids, tflops, budgets)]


def _has_colour(image: Image.Image, hex_colour: str) -> bool:
    rgb = np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)])
    return bool((np.abs(np.asarray(image.convert("RGB")).astype(int) - rgb).sum(-1) == 0).any())


def test_pareto_and_elastic_figures(tmp_path):
    mine = _records("b-n4", [13.5, 14.2, 16.0], [32.7, 27.1, 22.0], [0.0, 0.1, 0.2])
    base = _records("dit-b-p2", [19.45], [24.84], [0.0])
    pareto = pareto_figure(mine, [(tmp_path, base)], "FID vs cost")
    pareto.save(tmp_path / "pareto.png")
    elastic = elastic_figure(mine + _records("b-n4", [20.0, 21.0], [30.0, 25.0], [0.0, 0.2], cfg=1.0), "budgets")
    elastic.save(tmp_path / "elastic.png")
    with Image.open(tmp_path / "pareto.png") as im:
        assert im.size == (760, 520) and _has_colour(im, "#1f77b4") and _has_colour(im, "#ff7f0e")  # both runs
    with Image.open(tmp_path / "elastic.png") as im:
        assert im.size == (1360, 520) and _has_colour(im, "#1f77b4") and _has_colour(im, "#ff7f0e")  # both cfg lines


def test_figures_plot_any_metric_and_skip_records_without_it(tmp_path):
    mine = [{**r, "fd_dinov2": d, "kid": k} for r, d, k in
            zip(_records("b-n4", [13.5, 14.2, 16.0], [32.7, 27.1, 22.0], [0.0, 0.1, 0.2]), [210.0, 230.0, 260.0], [0.01, 0.02, 0.03])]
    old = _records("dit-b-p2", [19.45], [24.84], [0.0])  # evaluated before FD-DINOv2: no point on its plot
    pareto = pareto_figure(mine, [(tmp_path, old)], "FD-DINOv2 vs cost", FIELDS["fd_dinov2"])
    assert not _has_colour(pareto, "#ff7f0e") and _has_colour(pareto, "#1f77b4")
    assert _has_colour(pareto_figure(mine, [(tmp_path, [{**old[0], "fd_dinov2": 250.0}])], "t", FIELDS["fd_dinov2"]), "#ff7f0e")
    elastic = elastic_figure(mine, "budgets", [FIELDS["fid"], FIELDS["fd_dinov2"], FIELDS["kid"]])
    assert elastic.size == (1360, 950)  # four panels, two a row
    pareto.save(tmp_path / "pareto-fd.png")
    elastic.save(tmp_path / "elastic-4.png")


# ------------------------------------------------------------------ the whole command


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("eval") / "run"
    train(load_recipe("tiny", ["train.max_steps=4"]), run)
    return run


@pytest.fixture
def fast_sqrtm(monkeypatch):
    """scipy's sqrtm of a 2048² matrix takes ~10 s here: same trace, diag(√λ(σ1σ2)) (see test_fid)."""
    monkeypatch.setattr(fid.scipy.linalg, "sqrtm", lambda a: np.diag(np.sqrt(np.linalg.eigvals(a).astype(complex))))


def _invoke(*args):
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def test_eval_end_to_end_on_tiny(tiny_run, tmp_path, inception_weights, fast_sqrtm, monkeypatch):
    from dcdit_cli.data.datasets import make_dataset
    from dcdit_cli.sampling.sampler import to_uint8

    recipe = load_recipe("tiny")
    shapes = make_dataset(recipe.data, seed=1)
    (tmp_path / "real").mkdir()
    for i in range(12):
        Image.fromarray(to_uint8(shapes[i][0][None])[0]).save(tmp_path / "real" / f"{i:02d}.png")
    _invoke("fid", "--make-ref", str(tmp_path / "real"), "--out", str(tmp_path / "ref.npz"), "--image-size", "8",
            "--inception-weights", str(inception_weights))

    out = tmp_path / "eval"
    args = ["eval", "--ckpt", str(tiny_run), "--ref", str(tmp_path / "ref.npz"), "--num", "8", "--budgets", "0,0.5",
            "--cfg-scales", "1.0", "--steps", "3", "--batch-size", "4", "--out", str(out),
            "--inception-weights", str(inception_weights)]
    monkeypatch.setattr(sys, "argv", ["dcdit", *args])  # what the record stores as the command
    result = _invoke(*args)
    assert "dcdit eval: tiny (weights step 4, 8 samples)" in result.output and "Prec" in result.output  # the table
    records = json.loads((out / "eval.json").read_text())
    assert [r["setting"] for r in records] == ["cfg1-b0", "cfg1-b0.5"]
    for r in records:
        assert np.isfinite(r["fid"]) and np.isfinite(r["sfid"]) and r["inception_score"] >= 1.0
        assert 0.0 <= r["precision"] <= 1.0 and 0.0 <= r["recall"] <= 1.0 and r["num_samples"] == 8
        assert r["tflops_per_img"] > 0 and r["images_per_s"] > 0 and r["step"] == 4 and r["seed"] == 0
        assert r["command"] == "dcdit " + " ".join(args) and r["versions"]["torch"] == torch.__version__
    # measured cost: dropping half the boundaries runs fewer tokens, so fewer FLOPs
    assert records[1]["tflops_per_img"] < records[0]["tflops_per_img"]
    assert records[1]["compression"] > records[0]["compression"]
    for name, size in (("pareto.png", (760, 520)), ("elastic.png", (1360, 520))):
        with Image.open(out / name) as im:
            assert im.size == size

    # Rerun: finished parts are kept (not resampled) and records replaced, not duplicated;
    # another run's eval.json is overlaid on the Pareto plot.
    part = out / "samples" / "cfg1-b0.npz.parts" / "part-000000.npz"
    before = part.stat().st_mtime_ns
    other = tmp_path / "baseline"
    other.mkdir()
    (other / "eval.json").write_text(json.dumps([{**records[0], "run": "baseline", "fid": records[0]["fid"] + 1}]))
    second = tmp_path / "second.json"
    second.write_text(json.dumps([{**records[0], "run": "second", "fid": records[0]["fid"] + 2}]))
    _invoke(*args, "--compare", str(other), str(second))  # several runs after one --compare
    assert part.stat().st_mtime_ns == before
    assert [r["setting"] for r in json.loads((out / "eval.json").read_text())] == ["cfg1-b0", "cfg1-b0.5"]


def test_eval_fd_dinov2_and_kid_end_to_end(tiny_run, tmp_path, inception_weights, dinov2_weights, fast_sqrtm):
    from dcdit_cli.data.datasets import make_dataset
    from dcdit_cli.sampling.sampler import to_uint8

    shapes = make_dataset(load_recipe("tiny").data, seed=1)
    (tmp_path / "real").mkdir()
    for i in range(12):
        Image.fromarray(to_uint8(shapes[i][0][None])[0]).save(tmp_path / "real" / f"{i:02d}.png")
    weights = ["--inception-weights", str(inception_weights), "--dinov2-weights", str(dinov2_weights)]
    result = _invoke("fid", "--make-ref", str(tmp_path / "real"), "--out", str(tmp_path / "ref.npz"), "--image-size", "8",
                     "--metrics", "all", *weights)
    assert "mu_dinov2, sigma_dinov2" in " ".join(result.output.split())  # rich wraps long paths at the terminal width

    out = tmp_path / "eval"
    result = _invoke("eval", "--ckpt", str(tiny_run), "--ref", str(tmp_path / "ref.npz"), "--num", "8", "--budgets", "0,0.5",
                     "--cfg-scales", "1.0", "--steps", "3", "--batch-size", "4", "--out", str(out),
                     "--metrics", "fid,fd_dinov2,kid", "--pareto-metric", "fd_dinov2", *weights)
    assert "FD-DINOv2" in result.output and "KID" in result.output and "sFID" not in result.output
    records = json.loads((out / "eval.json").read_text())
    for r in records:
        assert r["fd_dinov2"] > 0 and np.isfinite(r["kid"]) and r["kid_subset_size"] == 8 and r["metrics"] == ["fid", "fd_dinov2", "kid"]
        assert r["sfid"] is None and r["precision"] is None and r["dinov2_weights"] == str(dinov2_weights)
    with Image.open(out / "elastic.png") as im:
        assert im.size == (1360, 950)  # FID, FD-DINOv2, KID and cost panels
    with Image.open(out / "pareto.png") as im:
        assert im.size == (760, 520)


def test_eval_bad_input_is_one_line_before_sampling(tiny_run, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for extra, message in ((["--budgets", "0,1.2"], "outside [0, 1)"), (["--cfg-scales", "x"], "--cfg-scales 'x'")):
        proc = subprocess.run([sys.executable, "-m", "dcdit_cli", "eval", "--ckpt", str(tiny_run), "--ref", str(tmp_path / "none.npz"),
                               *extra], capture_output=True, text=True, env=env)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr and message in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "dcdit_cli", "eval", "--ckpt", str(tiny_run), "--ref", str(tmp_path / "none.npz")],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "reference batch not found" in proc.stderr
    assert not (tiny_run / "eval").exists()


def test_eval_refuses_bad_inception_weights_and_compare_records_before_sampling(tiny_run, tmp_path, inception_weights):
    np.savez(tmp_path / "ref.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    (tmp_path / "bad.pth").write_text("not weights")
    good = tmp_path / "good.json"
    good.write_text(json.dumps([{"fid": 3.0, "tflops_per_img": 1.0}]))
    (tmp_path / "noflops.json").write_text(json.dumps([{"fid": 3.0}]))
    base = ["eval", "--ckpt", str(tiny_run), "--ref", str(tmp_path / "ref.npz"), "--num", "4", "--steps", "2",
            "--out", str(tmp_path / "out")]
    for extra, words in (
        (["--inception-weights", str(tmp_path / "bad.pth")], "cannot read Inception weights"),
        (["--inception-weights", str(inception_weights), "--compare", str(good), str(tmp_path / "noflops.json")],
         "finite fid and tflops_per_img"),
        (["--inception-weights", str(inception_weights), "--compare", str(good), str(tmp_path / "nowhere")], "nowhere"),
        (["--inception-weights", str(inception_weights), "stray"], "unexpected argument(s) stray"),
        (["--inception-weights", str(inception_weights), "--pr-distances", "half"], "--pr-distances 'half'"),
        (["--inception-weights", str(inception_weights), "--metrics", "fid,fdd"], "--metrics 'fid,fdd'"),
        (["--inception-weights", str(inception_weights), "--metrics", "fd_dinov2", "--dinov2-weights", str(tmp_path / "no.pth")],
         "DINOv2 weights not found"),
        (["--inception-weights", str(inception_weights), "--pareto-metric", "fd_dinov2"], "not among --metrics fid,sfid,is,pr: add fd_dinov2"),
        (["--inception-weights", str(inception_weights), "--pareto-metric", "speed"], "--pareto-metric 'speed'"),
        (["--inception-weights", str(inception_weights), "--metrics", "fid,kid", "--pareto-metric", "kid", "--compare", str(good)],
         "no record has a finite kid"),
    ):
        result = CliRunner().invoke(app, base + extra)  # `dcdit` prints a DcditError as one line, exit 2
        assert isinstance(result.exception, DcditError) and words in str(result.exception), (extra, result.output)
        assert not (tmp_path / "out" / "samples").exists()
