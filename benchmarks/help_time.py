"""`dcdit --help` start-up time of this checkout against a baseline checkout (issue 19: imports at
the top of library modules must not slow the CLI's help).

    git worktree add /tmp/dcdit-base 27305ac   # the commit before the layout by pipeline stage
    python benchmarks/help_time.py --baseline /tmp/dcdit-base --runs 21
    python benchmarks/help_time.py --baseline /tmp/dcdit-base --command="sample --help"

Each run is a fresh interpreter, ``python -m dcdit_cli --help`` with the checkout first on the path;
the two checkouts alternate (interleaved), and the medians and their ratio are printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def help_seconds(checkout: Path, command: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dcdit_cli", *command], cwd=checkout, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, required=True, help="a checkout to compare against")
    parser.add_argument("--runs", type=int, default=21)
    parser.add_argument("--command", default="--help", help='arguments after `dcdit`, one string (default "--help")')
    args = parser.parse_args()
    command = args.command.split()
    checkouts = {"baseline": args.baseline.resolve(), "this": HERE}
    for path in checkouts.values():
        help_seconds(path, command)  # warm the file cache
    times: dict[str, list[float]] = {name: [] for name in checkouts}
    for _ in range(args.runs):
        for name, path in checkouts.items():
            times[name].append(help_seconds(path, command))
    base, this = statistics.median(times["baseline"]), statistics.median(times["this"])
    print(f"dcdit {args.command}: median over {args.runs} interleaved runs")
    print(f"  baseline {args.baseline}: {base * 1000:.0f} ms")
    print(f"  this checkout:            {this * 1000:.0f} ms")
    print(f"  ratio this / baseline:    {this / base:.3f}")


if __name__ == "__main__":
    main()
