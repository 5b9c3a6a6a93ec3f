"""Preemption loses nothing: SIGTERM or SIGUSR1 mid-run → the step completes, a checkpoint is
written, the run exits with code 75 and one line; the same command resumes, bitwise equal to a
run that was never stopped (1 process and 2 processes, through the real command line)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_resume import ENV, _free_port, _metrics_lines, _rank_pid, _sums

from dcdit_cli.common.console import Preempted
from dcdit_cli.config.recipe import load_recipe
from dcdit_cli.training.checkpoint import find_latest
from dcdit_cli.training.loop import train

STEPS = 24
CMD = ["-m", "dcdit_cli", "train", "--recipe", "tiny", "--set", f"train.max_steps={STEPS}", "--set", "train.ckpt_every_steps=1000"]
# The stopped runs also log to TensorBoard with a router probe every 5 steps, where it is installed: the
# uninterrupted runs do not, so the bitwise comparison also shows that the trackers leave training alone.
TRACKED = ["--log-with", "tensorboard", "--set", "train.image_every_steps=5"] if importlib.util.find_spec("tensorboard") else []


def _signal_after(proc: subprocess.Popen, run: Path, sig: int, pid: int | None = None, lines: int = 4) -> None:
    """Sends ``sig`` to ``pid`` (default: the process) once ``lines`` steps are logged."""
    deadline = time.time() + 120
    while proc.poll() is None and _metrics_lines(run) < lines and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before the signal: raise STEPS"
    os.kill(pid or proc.pid, sig)


def _stopped_step(run: Path) -> int:
    return int(find_latest(run).name.split("-")[1])


def test_sigterm_checkpoints_exits_75_and_resumes_bitwise(tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    # The same command, never stopped, in a process of its own: with the same ENV (one thread), so the
    # float reductions, and therefore the weights, can be equal bit for bit.
    subprocess.run([sys.executable, *CMD, "--out", str(straight)], env=ENV, check=True, capture_output=True, timeout=300)
    proc = subprocess.Popen([sys.executable, *CMD, *TRACKED, "--out", str(stopped)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _signal_after(proc, stopped, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == Preempted.exit_code == 75, err[-2000:]
    step = _stopped_step(stopped)
    assert 4 <= step < STEPS
    lines = [line for line in err.splitlines() if line.startswith(("stopped:", "error:"))]
    assert lines == [f"stopped: SIGTERM: finished step {step}/{STEPS} and wrote {stopped}/checkpoints/step-{step:07d}; "
                     "rerun the same command to resume (exit code 75)"], err[-2000:]
    # every step up to the stop is logged once, the last one included
    assert [json.loads(line)["step"] for line in (stopped / "metrics.jsonl").read_text().splitlines()] == list(range(1, step + 1))

    done = subprocess.run([sys.executable, *CMD, *TRACKED, "--out", str(stopped)], env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming" in done.stdout and f"step-{step:07d}" in done.stdout  # from the stop's checkpoint
    last = f"step-{STEPS:07d}"
    assert _sums(stopped / "checkpoints" / last) == _sums(straight / "checkpoints" / last)
    if TRACKED:  # both attempts logged, each step once, the probe every 5 steps
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(stopped / "trackers/dcdit"), size_guidance={"scalars": 0, "images": 0})
        events.Reload()
        assert [e.step for e in events.Scalars("loss")] == list(range(1, STEPS + 1))
        assert [i.step for i in events.Images("probe/boundaries")] == list(range(5, STEPS + 1, 5))


def test_a_signal_in_process_stops_after_the_step_then_ignores_further_signals(tmp_path):
    """The library call raises Preempted (no CLI) and leaves SIGTERM/SIGUSR1 ignored, so that nothing
    cuts the exit short; a run that finishes leaves the handlers as it found them."""
    before = signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)
    train(load_recipe("tiny", ["train.max_steps=1"]), tmp_path / "finished")
    assert (signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)) == before
    run = tmp_path / "run"

    def send():
        while _metrics_lines(run) < 2:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGUSR1)

    threading.Thread(target=send, daemon=True).start()
    try:
        with pytest.raises(Preempted, match=r"SIGUSR1: finished step \d+/1000"):
            train(load_recipe("tiny", ["train.max_steps=1000"]), run)
        assert signal.getsignal(signal.SIGUSR1) == signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGUSR1, before[0])
        signal.signal(signal.SIGTERM, before[1])
    assert 2 <= _stopped_step(run) < 1000


def test_a_resumed_log_window_averages_only_its_own_steps(tmp_path):
    """Resuming from a checkpoint between two log steps: the next record averages the steps run
    since the resume, not log_every_steps of them (a preemption checkpoint is usually there)."""
    straight = tmp_path / "straight"
    train(load_recipe("tiny", ["train.max_steps=3"]), straight)
    run = tmp_path / "run"
    train(load_recipe("tiny", ["train.max_steps=2"]), run)
    train(load_recipe("tiny", ["train.max_steps=3", "train.log_every_steps=3"]), run)
    a, b = (json.loads((r / "metrics.jsonl").read_text().splitlines()[-1]) for r in (straight, run))
    assert a["step"] == b["step"] == 3 and a["loss"] == b["loss"]


@pytest.mark.slow
def test_two_processes_stop_at_the_same_step_when_one_rank_is_signalled(tmp_path):
    """SIGUSR1 to rank 1 only: the ranks agree (common/preemption.py), rank 0 checkpoints, both exit
    75; the same launch resumes and ends bitwise equal to an uninterrupted 2-process run."""
    def launch(out: Path, port: str, tracked=()):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
               "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port, *CMD, *tracked,
               "--set", "train.log_every_steps=3", "--out", str(out)]
        return subprocess.Popen(cmd, env={**ENV, "DCDIT_TEST_PORT": port}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    proc = launch(straight, str(_free_port()))
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-2000:]
    port = str(_free_port())
    proc = launch(stopped, port, TRACKED)
    _signal_after(proc, stopped, signal.SIGUSR1, pid=_rank_pid(port, 1), lines=1)
    _, err = proc.communicate(timeout=120)
    assert "exitcode  : 75" in err and "exitcode  : 75" in err.split("exitcode  : 75", 1)[1], err[-3000:]
    step = _stopped_step(stopped)
    assert step < STEPS and (step % 10 == 0 or step % 3 == 0)  # a stop check: every 10 steps or a log step
    assert [line for line in err.splitlines() if line.startswith("stopped:")] == [
        f"stopped: a stop signal on another rank: finished step {step}/{STEPS} and wrote {stopped}/checkpoints/"
        f"step-{step:07d}; rerun the same command to resume (exit code 75)"]
    proc = launch(stopped, str(_free_port()), TRACKED)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-2000:]
    last = f"step-{STEPS:07d}"
    assert _sums(stopped / "checkpoints" / last) == _sums(straight / "checkpoints" / last)
    if TRACKED:  # rank 0 alone writes events: one file per launch
        assert len(list((stopped / "trackers/dcdit").glob("events.out.tfevents.*"))) == 2
