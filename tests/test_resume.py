"""Checkpoints you can trust: kill -9 and resume is bitwise exact, damaged checkpoints are
found by their checksums and skipped with a warning, ``latest`` may lag, killed writes
leave nothing behind, a failed new run leaves no directory, a dead rank is named."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dcdit_cli.common.atomic import file_sha256
from dcdit_cli.common.console import DcditError
from dcdit_cli.config.recipe import load_recipe
from dcdit_cli.training.checkpoint import CKPT_FILES, find_latest
from dcdit_cli.training.loop import train

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _sums(ckpt: Path) -> dict[str, str]:
    return {name: file_sha256(ckpt / name) for name in CKPT_FILES}


def _garble(path: Path) -> None:
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    data[header + 5] ^= 0x01  # one bit of one weight
    path.write_bytes(bytes(data))


def _weights(path: Path):
    """(tensors, metadata) of an exported weights file (the header's key order is not fixed)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        return load_file(str(path)), f.metadata()


def _metrics_lines(run: Path) -> int:
    path = run / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


@pytest.mark.slow
def test_kill_9_at_random_points_then_resume_is_bitwise_exact(tmp_path):
    """Five SIGKILLs at random moments (mid-step and mid-checkpoint-write alike), then the same
    command finishes the run: every checkpoint file equals a straight run's, byte for byte."""
    steps = 40  # enough steps that five kills land before the run ends, also on a fast machine
    cmd = [sys.executable, "-m", "dcdit_cli", "train", "--recipe", "tiny", "--set", f"train.max_steps={steps}",
           "--set", "train.ckpt_every_steps=1"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run([*cmd, "--out", str(straight)], env=ENV, check=True, capture_output=True, timeout=300)

    rng, kills = random.Random(14), 0
    while kills < 5:
        seen = _metrics_lines(killed)
        proc = subprocess.Popen([*cmd, "--out", str(killed)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while proc.poll() is None and _metrics_lines(killed) <= seen and time.time() < deadline:
            time.sleep(0.01)  # wait for a step of progress, then kill at a random moment after it
        time.sleep(rng.uniform(0.0, 0.15))
        if proc.poll() is not None:
            break  # finished before the kill: too fast a machine for this many kills
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        if (killed / "checkpoints").is_dir():
            find_latest(killed)  # never a damaged checkpoint: raises if none is intact
    assert kills == 5, "the run finished before five kills: raise max_steps"
    done = subprocess.run([*cmd, "--out", str(killed)], env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    last = f"step-{steps:07d}"
    assert _sums(killed / "checkpoints" / last) == _sums(straight / "checkpoints" / last)
    a, b = (_weights(r / f"weights/{last}-ema.safetensors") for r in (killed, straight))
    assert a[1] == b[1] and a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    assert not list(killed.rglob(".*.tmp-*")), "a killed write was left behind"


def test_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, capsys):
    recipe = load_recipe("tiny", ["train.max_steps=4", "train.ckpt_every_steps=2", "train.keep_last=2"])
    train(recipe, tmp_path / "straight")
    run = tmp_path / "run"
    train(recipe, run)
    _garble(run / "checkpoints/step-0000004/ema.safetensors")
    capsys.readouterr()
    assert find_latest(run).name == "step-0000002"
    warning = capsys.readouterr().err
    assert "step-0000004 is damaged (ema.safetensors does not match its checksum)" in warning and "step-0000002" in warning

    # Rerunning redoes steps 3-4 from the intact checkpoint: the result is the straight run's.
    shutil.rmtree(run / "checkpoints/step-0000004")
    train(recipe.replace(train={"max_steps": 4}), run)
    assert _sums(run / "checkpoints/step-0000004") == _sums(tmp_path / "straight/checkpoints/step-0000004")


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(tmp_path):
    recipe = load_recipe("tiny", ["train.max_steps=2", "train.ckpt_every_steps=2"])
    train(recipe, tmp_path / "run")
    (tmp_path / "run/checkpoints/step-0000002/model.safetensors").write_bytes(b"")
    with pytest.raises(DcditError, match="no intact checkpoint .* delete .* or pass --out"):
        train(recipe.replace(train={"max_steps": 4}), tmp_path / "run")
    assert not (tmp_path / "run/checkpoints/step-0000004").exists()


def test_latest_lagging_behind_and_stale_temps(tmp_path):
    recipe = load_recipe("tiny", ["train.max_steps=4", "train.ckpt_every_steps=2"])
    run = tmp_path / "run"
    train(recipe, run)
    (run / "checkpoints/latest").write_text("step-0000002\n")  # killed between the rename and `latest`
    assert find_latest(run).name == "step-0000004"
    stale = [run / "checkpoints/.step-0000006.tmp-999", run / ".recipe.toml.tmp-999", run / "weights/.x.safetensors.tmp-9"]
    stale[0].mkdir()
    (stale[0] / "model.safetensors").write_bytes(b"half")
    stale[1].write_text("half")
    stale[2].write_bytes(b"half")
    train(recipe.replace(train={"max_steps": 6}), run)
    assert find_latest(run).name == "step-0000006" and not any(p.exists() for p in stale)
    meta = json.loads((run / "checkpoints/step-0000006/meta.json").read_text())
    assert meta["sha256"] == _sums(run / "checkpoints/step-0000006")  # recorded before the rename, and right


def test_a_failed_new_run_leaves_no_directory(tmp_path, monkeypatch):
    import dcdit_cli.training.loop as train_mod

    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash in the first step")

    monkeypatch.setattr(train_mod, "update_ema", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        train(load_recipe("tiny"), tmp_path / "new")
    assert not (tmp_path / "new").exists()
    # An existing run with checkpoints is kept whole when a later attempt fails.
    monkeypatch.undo()
    train(load_recipe("tiny", ["train.max_steps=2"]), tmp_path / "old")
    monkeypatch.setattr(train_mod, "update_ema", boom)
    with pytest.raises(RuntimeError):
        train(load_recipe("tiny", ["train.max_steps=4"]), tmp_path / "old")
    assert find_latest(tmp_path / "old").name == "step-0000002"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_pid(port: str, rank: int, timeout: float = 120) -> int:
    """The process id of ``rank`` of the run launched with DCDIT_TEST_PORT=port (from /proc)."""
    want = {f"RANK={rank}".encode(), f"DCDIT_TEST_PORT={port}".encode()}
    deadline = time.time() + timeout
    while time.time() < deadline:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                env = set(Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"))
            except OSError:
                continue
            if want <= env:
                return int(pid)
        time.sleep(0.1)
    raise AssertionError(f"rank {rank} did not start")


@pytest.mark.slow
def test_a_dead_rank_stops_the_others_and_is_named(tmp_path):
    """kill -9 of rank 1 in a 2-process run: rank 0 stops within seconds and its last line names
    rank 1 and the command to resume; the checkpoint already written stays intact."""
    port = str(_free_port())
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port,
           "-m", "dcdit_cli", "train", "--recipe", "tiny", "--set", "train.max_steps=100000", "--set", "train.ckpt_every_steps=2",
           "--out", str(run)]
    launcher = subprocess.Popen(cmd, env={**ENV, "DCDIT_TEST_PORT": port}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        victim = _rank_pid(port, 1)
        deadline = time.time() + 120
        while not (run / "checkpoints/latest").is_file() and time.time() < deadline:
            time.sleep(0.05)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.time()
        out, err = launcher.communicate(timeout=60)
        stopped_in = time.time() - killed_at
    finally:
        launcher.kill()
    assert launcher.returncode != 0 and stopped_in < 30
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err[-3000:]
    assert "rank 1 of 2 stopped" in lines[0] and "resume with the same command" in lines[0] and "dcdit train --recipe tiny" in lines[0]
    assert "Grad strides do not match bucket view strides" not in err
    assert find_latest(run) is not None
