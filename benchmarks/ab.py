"""A code change's effect on a training step: the working tree against an earlier commit, interleaved.

Two versions of the package cannot share one interpreter, so each runs in a worker process of its
own (the commit's files from ``git archive``, its own ``benchmarks/perf.py``); the workers build the
same model from the same seed and inputs, and the parent asks them for one timed step in turn
(before, after, DiT, then DiT, after, before, …), so only one runs at a time and drift in machine load
hits all alike. It prints the medians and the ratios after / before, and each against the
FLOP-matched DiT of the working tree per FLOP, as ``perf.py train`` does.

    python benchmarks/ab.py --before HEAD~1 [--size toy|b] [--compile] [--shuffle] [--repeats 21] [--processes 1] [--batch 8] [--spread 0.3]

The commit must have ``benchmarks/perf.py`` with ``build``, ``inputs`` and ``WithBoundary`` (every
commit since the whole-model compile).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def export_commit(rev: str, into: Path) -> Path:
    """The files of ``rev`` under ``into`` (no checkout, the working tree is not touched)."""
    archive = into / "tree.tar"
    with archive.open("wb") as out:
        subprocess.run(["git", "-C", str(ROOT), "archive", rev], stdout=out, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into / "tree", filter="data")
    return into / "tree"


def worker(args) -> None:
    """Build one model of ``args.size`` from the tree on sys.path, then time a step per line read."""
    sys.argv = [sys.argv[0]]  # perf.py reads --small-pages from argv at import; this worker runs as dcdit does
    # The tree's own perf.py (the worker runs in it): sys.path[0] is this script's folder, the working tree's.
    sys.path[0] = str(Path.cwd() / "benchmarks")
    import perf
    import torch

    torch.set_num_threads(args.threads)
    index = {"dcdit": 0, "dit": 1}[args.model]
    name, recipe, model, loss_fn = perf.build(args.size, args.batch, args.spread)[index]
    if args.order and isinstance(model, perf.WithBoundary):  # --shuffle, in the order the parent chose
        model.boundary = model.boundary[[int(i) for i in args.order.split(",")]]
    x, y, t = perf.inputs(recipe, args.batch)
    params = list((model.model if isinstance(model, perf.WithBoundary) else model).parameters())
    flops = perf.useful_flops(model, loss_fn, x, y, t)  # on the eager model, as perf.py counts them
    if args.compile:
        from dcdit_cli.models import compile_model

        compile_model(model.model if isinstance(model, perf.WithBoundary) else model)

    def step():
        torch.manual_seed(0)
        loss, _, _ = loss_fn(model, x, y, t=t)
        loss.backward()
        for p in params:
            p.grad = None
        return loss.item()

    loss = step()  # the cold compile, outside the timings
    print(json.dumps({"name": name, "loss": loss, "flops": flops}), flush=True)
    for _ in sys.stdin:
        print(perf.timed(step), flush=True)


def start(tree: Path, model: str, args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{tree / 'benchmarks'}", "OMP_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", model, "--size", args.size, "--batch",
           str(args.batch), "--spread", str(args.spread), "--threads", str(args.threads), *(["--compile"] * args.compile),
           *(["--order", args.order] if args.order else [])]
    return subprocess.Popen(cmd, cwd=tree, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def ask(proc: subprocess.Popen) -> str:
    proc.stdin.write("step\n")
    proc.stdin.flush()
    line = proc.stdout.readline()
    if not line:
        raise SystemExit(f"a worker stopped (exit code {proc.wait()})")
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", help="the commit to compare the working tree with (e.g. HEAD~1, a hash)")
    parser.add_argument("--size", choices=["toy", "b"], default="toy")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--spread", type=float, default=0.3)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--processes", type=int, default=1,
                        help="worker processes per version: a process's memory layout moves its step time by a few "
                             "percent, so several processes give a steadier median (docs/performance.md)")
    parser.add_argument("--compile", action="store_true", help="every model compiled whole (compile_model)")
    parser.add_argument("--shuffle", action="store_true", help="kept counts in a random batch order (perf.py --shuffle)")
    parser.add_argument("--worker", choices=["dcdit", "dit"], help=argparse.SUPPRESS)
    parser.add_argument("--order", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.model = args.worker
        return worker(args)
    if not args.before:
        parser.error("--before REV is required: the commit to compare the working tree with")
    for option in ("repeats", "batch", "threads", "processes"):
        if getattr(args, option) < 1:
            parser.error(f"--{option} must be at least 1, got {getattr(args, option)}")
    if args.shuffle:  # the working tree's perf.py chooses the order, the same for every worker
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from perf import shuffled_order

        args.order = ",".join(map(str, shuffled_order(args.batch)))
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.before], capture_output=True, text=True)
    if rev.returncode != 0:
        parser.error(f"--before {args.before}: not a commit of this repository ({rev.stderr.strip()})")
    labels = ("before", "after", "dit")
    with tempfile.TemporaryDirectory(prefix="dcdit-ab-") as tmp:
        old = export_commit(args.before, Path(tmp))
        trees = {"before": (old, "dcdit"), "after": (ROOT, "dcdit"), "dit": (ROOT, "dit")}
        workers, info = [], {}
        for _ in range(args.processes):
            workers.append({})
            for label in labels:
                proc = workers[-1][label] = start(*trees[label], args)  # one at a time: each cold start alone
                line = proc.stdout.readline()
                if not line:
                    raise SystemExit(f"the {label} worker failed to start (exit code {proc.wait()})")
                info[label] = json.loads(line)
        samples = [{label: [] for label in labels} for _ in workers]
        for i in range(args.repeats):
            for j, seats in enumerate(workers):  # A B C, then C B A: no seat is favoured
                for label in (labels if (i + j) % 2 == 0 else reversed(labels)):
                    samples[j][label].append(float(ask(seats[label])))
        for seats in workers:
            for proc in seats.values():
                proc.stdin.close()
                proc.wait()
    per_process = {label: [statistics.median(seat[label]) for seat in samples] for label in labels}
    times = {label: statistics.median(t) for label, t in per_process.items()}  # the median process's median
    mode = "compiled (whole model)" if args.compile else "eager"
    shuffled = ", kept counts shuffled over the batch" if args.shuffle else ""
    print(f"train step, {args.size}, batch {args.batch}, kept spread ±{args.spread:.0%}{shuffled}, fp32, {mode}, torch threads "
          f"{args.threads}, median of {args.repeats} (interleaved across processes) in each of {args.processes} process(es) "
          "per version, then the median over the processes")
    print(f"  before = {rev.stdout.strip()} ({args.before}), after = the working tree; loss before {info['before']['loss']:.6f}, "
          f"after {info['after']['loss']:.6f}")
    for label in labels:
        spread = f"  (processes: {', '.join(f'{t * 1e3:.1f}' for t in per_process[label])})" if args.processes > 1 else ""
        print(f"  {label:<7} {info[label]['name']:<10} {times[label] * 1e3:9.2f} ms{spread}")
    print(f"  after / before = {times['after'] / times['before']:.3f}")
    for label in ("before", "after"):
        tr, fr = times[label] / times["dit"], info[label]["flops"] / info["dit"]["flops"]
        print(f"  {label} vs DiT: time ratio {tr:.3f} / FLOP ratio {fr:.3f} = {tr / fr:.3f} per FLOP")


if __name__ == "__main__":
    main()
