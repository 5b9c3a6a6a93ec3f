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
