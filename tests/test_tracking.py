"""Experiment trackers through accelerate (training/tracking.py): a tiny run with TensorBoard
leaves event files holding every metrics.jsonl scalar at its step, the probe's images and p's
histogram; W&B offline; a tracker that is not installed is one line and exit 2 before any work."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from sync_counter import SyncCounter
from test_bad_input import _run_main

from dcdit_cli.config.recipe import load_recipe
from dcdit_cli.data.datasets import make_dataset
from dcdit_cli.models import build_model
from dcdit_cli.training import tracking
from dcdit_cli.training.loop import train

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_event_files_hold_the_scalars_images_and_histogram(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "dcdit_cli", "train", "--recipe", "tiny", "--log-with", "tensorboard",
                    "--set", "train.max_steps=4", "--set", "train.image_every_steps=2", "--set", "train.log_every_steps=2",
                    "--out", str(run)], env=ENV, check=True, capture_output=True, timeout=300)
    (hparams,) = (run / "trackers/dcdit").glob("*/hparams.yml")  # the recipe as the run's configuration
    assert "run.name: tiny" in hparams.read_text() and "train.image_every_steps: 2" in hparams.read_text()
    events = EventAccumulator(str(run / "trackers/dcdit"), size_guidance={"scalars": 0, "images": 0, "histograms": 0})
    events.Reload()
    records = _records(run)
    numbers = {k for k, v in records[0].items() if isinstance(v, (int, float)) and k != "step"}
    assert {"loss", "mse", "vb", "ratio_loss", "compression", "kept_tokens", "lr", "images_per_s"} <= numbers
    for key in numbers:  # every metrics.jsonl number, at the same steps, the same value (float32 in the file)
        logged = events.Scalars(key)
        assert [e.step for e in logged] == [r["step"] for r in records] == [2, 4], key
        assert np.allclose([e.value for e in logged], [r[key] for r in records], rtol=1e-6), key

    side, K, n = 8, tracking.PROBE_TIMESTEPS, tracking.PROBE_IMAGES
    for tag, rows in (("probe/samples", 1), ("probe/boundaries", K)):
        images = events.Images(tag)
        assert [i.step for i in images] == [2, 4], tag
        scale = tracking.MIN_SIDE // side
        assert (images[0].width, images[0].height) == (n * side * scale, rows * side * scale), tag
    assert [i.step for i in events.Images("probe/kept_tokens_vs_t")] == [2, 4]
    histogram = events.Histograms("probe/p")
    assert [h.step for h in histogram] == [2, 4]
    p = histogram[0].histogram_value
    assert p.num == K * n * side * side and 0.0 <= p.min <= p.max <= 1.0
    kept = [events.Scalars(f"probe/kept_tokens/t{int(t):04d}")[0].value for t in torch.linspace(0, 999, K).round()]
    assert all(1 <= k <= side * side for k in kept)
    assert all(e.value > 0 for e in events.Scalars("probe/seconds"))


def test_the_probe_reads_the_routers_decisions_at_each_t():
    """The probe's kept tokens vs t and its histogram are the model's own, recomputed independently."""
    recipe = load_recipe("tiny")
    torch.manual_seed(0)
    model = build_model(recipe.model).eval()
    probe = tracking.RouterProbe(recipe, make_dataset(recipe.data, seed=0), "cpu")
    images, histograms, scalars = probe(model)
    again = probe(model)[0]
    assert all(np.array_equal(images[k], again[k]) for k in images)  # fixed batch, fixed noise: same weights, same pictures
    from dcdit_cli.diffusion.gaussian import make_diffusion

    diffusion = make_diffusion(num_timesteps=recipe.diffusion.num_timesteps)
    for t in probe.ts.tolist():
        tt = torch.full((len(probe.y),), t)
        _, stats = model(diffusion.q_sample(probe.x0, tt, probe.noise), tt, probe.y)
        assert scalars[f"probe/kept_tokens/t{t:04d}"] == pytest.approx(stats.num_kept.float().mean().item())
    assert histograms["probe/p"].size == len(probe.ts) * len(probe.y) * 64


def test_a_dit_probe_logs_the_samples_only():
    recipe = load_recipe("toy-dit", ["diffusion.sampling_steps=2"])
    images, histograms, scalars = tracking.RouterProbe(recipe, make_dataset(recipe.data), "cpu")(build_model(recipe.model).eval())
    assert list(images) == ["probe/samples"] and not histograms and list(scalars) == ["probe/seconds"]


def test_trackers_add_no_host_synchronisation(tmp_path):
    pytest.importorskip("tensorboard")

    def syncs(steps):
        recipe = load_recipe("tiny", [f"train.max_steps={steps}", "train.log_every_steps=1000", "train.ckpt_every_steps=1000",
                                      'train.log_with=["tensorboard"]', "train.image_every_steps=0"])
        with SyncCounter() as s:
            train(recipe, tmp_path / f"run{steps}")
        return s.total

    assert syncs(5) - syncs(2) == 3  # one per step, the forward's kept count, as without trackers


def _wandb_records(path) -> tuple[list[dict], dict]:
    """(history rows, config) of an offline W&B run file: a ':W&B' header (7 bytes), then LevelDB's log
    format (32 KiB blocks of records, each a 7-byte header: CRC, length, type) holding protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    data, pos, chunk, rows, config = path.read_bytes(), 7, b"", [], {}
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if left < 7 or kind == 0:  # the block's zero padding
            pos += left
            continue
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            if record.WhichOneof("record_type") == "config":
                config.update({item.key: json.loads(item.value_json) for item in record.config.update})
            if record.WhichOneof("record_type") == "history":
                row: dict = {}
                for item in record.history.item:  # a media value comes as one item per field: (tag, field)
                    *parents, leaf = [item.key] if item.key else list(item.nested_key)
                    node = row
                    for key in parents:
                        node = node.setdefault(key, {})
                    node[leaf] = json.loads(item.value_json)
                rows.append(row)
            chunk = b""
    return rows, config


def test_wandb_offline_run_has_the_scalars_images_and_histogram(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    train(load_recipe("tiny", ["train.max_steps=2", 'train.log_with=["wandb"]', "train.image_every_steps=2"]), run)
    (offline,) = (run / "wandb").glob("offline-run-*")
    import wandb

    wandb.teardown()  # W&B's service process writes the run file out as it ends
    rows, config = _wandb_records(next(offline.glob("run-*.wandb")))
    assert config["run.name"] == "tiny" and config["train.max_steps"] == 2 and config["out"] == str(run)
    steps = {}
    for row in rows:
        steps.setdefault(row["_step"], {}).update(row)
    records = _records(run)
    assert sorted(steps) == [r["step"] for r in records] == [1, 2]
    assert all(steps[r["step"]]["loss"] == pytest.approx(r["loss"]) for r in records)
    assert steps[2]["probe/p"]["_type"] == "histogram" and steps[2]["probe/samples"]["_type"] == "image-file"
    assert (offline / "files" / steps[2]["probe/boundaries"]["path"]).is_file()


@pytest.mark.parametrize("name, package", [("wandb", "dcdit[wandb]"), ("tensorboard", "dcdit[tensorboard]"), ("mlflow", "mlflow")])
def test_a_tracker_not_installed_is_one_line_naming_the_extra(name, package, tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda module, *a: None if module == name else real(module, *a))
    code, err = _run_main(["train", "--recipe", "tiny", "--log-with", name, "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert f"asks for {name} but {name} is not installed: pip install '{package}'" in err
    assert not (tmp_path / "run").exists()


def test_log_with_flag_and_set_fill_the_recipe_and_a_run_resumes_with_other_trackers(tmp_path, capsys):
    code = subprocess.run([sys.executable, "-m", "dcdit_cli", "train", "--recipe", "tiny", "--log-with", "tensorboard, wandb",
                           "--log-with", "aim", "--print-recipe"], env=ENV, capture_output=True, text=True, timeout=120)
    assert 'log_with = [\n    "tensorboard",\n    "wandb",\n    "aim",\n]' in code.stdout
    assert load_recipe("tiny", ['train.log_with=["mlflow"]']).train.log_with == ["mlflow"]
    code, err = _run_main(["train", "--recipe", "tiny", "--log-with", "tensorbord"], capsys)
    assert code == 2 and "did you mean 'tensorboard'" in err
    run = tmp_path / "run"
    train(load_recipe("tiny", ["train.max_steps=2"]), run)
    pytest.importorskip("tensorboard")
    train(load_recipe("tiny", ["train.max_steps=3", 'train.log_with=["tensorboard"]', "train.image_every_steps=0"]), run)
    assert _records(run)[-1]["step"] == 3 and list((run / "trackers/dcdit").glob("events.out.tfevents.*"))


def test_latents_are_shown_by_their_first_three_channels_each_stretched():
    x = torch.randn(2, 4, 8, 8) * torch.tensor([1.0, 5.0])[:, None, None, None]
    shown = tracking.to_unit(x)
    assert shown.shape == (2, 3, 8, 8) and torch.equal(shown.amin(dim=(1, 2, 3)), torch.zeros(2))
    assert torch.allclose(shown.amax(dim=(1, 2, 3)), torch.ones(2))
    assert torch.allclose(shown[1], (x[1, :3] - x[1, :3].min()) / (x[1, :3].max() - x[1, :3].min()))
