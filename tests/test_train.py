"""The training loop: exact resume, checkpoints, multi-process launch, divergence, refusals."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dcdit_cli.common.console import DcditError
from dcdit_cli.config.recipe import load_recipe
from dcdit_cli.training.checkpoint import find_latest, load_weights
from dcdit_cli.training.loop import batch_plan, budget_for_step, learning_rate, train


def _weights(run: Path, step: int) -> dict:
    return load_file(str(run / "checkpoints" / f"step-{step:07d}" / "model.safetensors"))


def test_exact_resume_is_bitwise(tmp_path):
    recipe = load_recipe("tiny", ["train.max_steps=6", "train.ckpt_every_steps=3"])
    straight = tmp_path / "straight"
    train(recipe, straight)
    # k = 3 steps, "kill", then the same command resumes and runs N − k more.
    resumed = tmp_path / "resumed"
    train(recipe.replace(train={"max_steps": 3}), resumed)
    assert find_latest(resumed).name == "step-0000003"
    train(recipe, resumed)
    a, b = _weights(straight, 6), _weights(resumed, 6)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ema_a = load_file(str(straight / "checkpoints/step-0000006/ema.safetensors"))
    ema_b = load_file(str(resumed / "checkpoints/step-0000006/ema.safetensors"))
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    lines = [json.loads(l) for l in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2, 3, 4, 5, 6]


def test_run_dir_layout_retention_and_weights(tmp_path):
    recipe = load_recipe("tiny", ["train.max_steps=6", "train.ckpt_every_steps=2", "train.keep_last=2"])
    weights = train(recipe, tmp_path / "run")
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-0000004", "step-0000006"]
    assert (run / "checkpoints/latest").read_text().strip() == "step-0000006"
    assert {"recipe.toml", "command.txt", "env.json", "metrics.jsonl", "curves.png"} <= {p.name for p in run.iterdir()}
    from PIL import Image

    assert Image.open(run / "curves.png").size[0] > 400
    env = json.loads((run / "env.json").read_text())
    assert env["world_size"] == 1 and env["attention_backend"] == "sdpa_pad"  # CPU: the portable fallback
    model, stored, step = load_weights(run)
    assert step == 6 and stored == recipe and weights.name == "step-0000006-ema.safetensors"
    assert not list(run.rglob(".tmp*"))


def test_incomplete_checkpoint_is_ignored(tmp_path):
    recipe = load_recipe("tiny", ["train.max_steps=2"])
    train(recipe, tmp_path / "run")
    half = tmp_path / "run/checkpoints/step-0000009"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"partial")  # killed before meta.json
    assert find_latest(tmp_path / "run").name == "step-0000002"


def test_changed_recipe_on_resume_is_refused_with_diff(tmp_path):
    train(load_recipe("tiny", ["train.max_steps=2"]), tmp_path / "run")
    with pytest.raises(DcditError, match=r"train.lr: 0.001 → 0.002"):
        train(load_recipe("tiny", ["train.max_steps=4", "train.lr=0.002"]), tmp_path / "run")
    train(load_recipe("tiny", ["train.max_steps=3"]), tmp_path / "run")  # max_steps is allowed
    assert find_latest(tmp_path / "run").name == "step-0000003"


def test_missing_resume_path(tmp_path):
    with pytest.raises(DcditError, match="does not exist"):
        train(load_recipe("tiny"), tmp_path / "run", resume=tmp_path / "nope")


def test_nan_stops_with_step_and_last_checkpoint(tmp_path):
    recipe = load_recipe("tiny", ["train.max_steps=6", "train.lr=1e30", "train.grad_clip=0.0", "train.ckpt_every_steps=1"])
    with pytest.raises(DcditError, match=r"diverged at step \d+.*last good checkpoint: .*step-"):
        train(recipe, tmp_path / "run")


def test_pure_helpers():
    assert learning_rate(0, 1e-4, 0) == 1e-4 and learning_rate(4, 1e-4, 10) == pytest.approx(5e-5)
    assert batch_plan(256, 0, 8) == (32, 1) and batch_plan(256, 16, 8) == (16, 2)
    with pytest.raises(DcditError, match="not divisible"):
        batch_plan(256, 24, 8)
    fr = [0.0, 0.1, 0.2, 0.3]
    assert budget_for_step(10, -1, fr, 0) == 0.0 and budget_for_step(10, 50, fr, 0) == 0.0
    draws = {budget_for_step(s, 0, fr, 0) for s in range(100)}
    assert draws == set(fr) and budget_for_step(77, 0, fr, 0) == budget_for_step(77, 0, fr, 0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_accelerate_launch(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "dcdit_cli", "train", "--recipe", "tiny", "--set", "train.max_steps=4", "--out", str(tmp_path / "run")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0/2: finished at step 4" in proc.stdout and "rank 1/2: finished at step 4" in proc.stdout
    assert json.loads((tmp_path / "run/env.json").read_text())["world_size"] == 2
    assert find_latest(tmp_path / "run").name == "step-0000004"


def test_multi_budget_training_draws_one_fraction_per_step(tmp_path):
    recipe = load_recipe("tiny", ["train.max_steps=8", "train.multi_budget_start_step=2",
                                  "train.multi_budget_fractions=[0.0, 0.3, 0.6]"])
    train(recipe, tmp_path / "run")
    lines = [json.loads(l) for l in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    budgets = [l["budget"] for l in lines]
    assert budgets[:2] == [0.0, 0.0]  # before the start step
    assert set(budgets[2:]) <= {0.0, 0.3, 0.6} and len(set(budgets[2:])) > 1
    assert budgets[2:] == [budget_for_step(s, 2, [0.0, 0.3, 0.6], 0) for s in range(2, 8)]


def test_rate_meter_returns_a_number():
    """The loop logs the rate as a number and formats it only where it prints it (issue 19)."""
    from dcdit_cli.common.console import RateMeter

    rate = RateMeter().update(8)
    assert isinstance(rate, float) and rate > 0
