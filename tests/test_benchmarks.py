"""The GPU benchmark runs end to end on the CPU with tiny models (its figures need a GPU)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_smoke_on_cpu():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu.py"), "--device", "cpu", "--smoke"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "b-n4 [sdpa_pad]" in out.stdout and "dit-b-p2-isoflop" in out.stdout
    assert "MFU relative to dit-b-p2-isoflop" in out.stdout and "Lite-CFG 0.0 / 0.9" in out.stdout


def test_scaling_benchmark_smoke():
    """benchmarks/scaling.py end to end at toy grids: rows for the three models and the per-doubling ratios."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/scaling.py"), "--grids", "8", "16", "--width", "64",
                          "--depth", "1", "--repeats", "1"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "16²  scaffold" in out.stdout and "DC-DiT / DiT at each grid" in out.stdout
    scaffold = next(line for line in out.stdout.splitlines() if line.startswith("  16²  scaffold"))
    assert 3.9 < float(scaffold.split()[-1]) <= 4.0  # the scaffold's FLOPs: linear in L plus the per-image embeddings
