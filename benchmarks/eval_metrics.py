"""Peak memory and time of `dcdit eval`'s metric step (FID, sFID, IS, precision / recall) on CPU.

The metric step is what follows the Inception pass: covariances from the running sums, two
2048-d / 2023-d Fréchet distances (scipy sqrtm), the Inception Score over chunks of 5,000 and
precision / recall (k = 3) against 10,000 reference features. Features are random (the cost
does not depend on their values). Each configuration runs in a fresh subprocess; the table gives
the peak of the process's resident memory during the metric step above its resident size once the
features are in memory, i.e. what the metric step itself adds (the kernel's high-water mark reset
just before the step, so building the features, whose temporaries peak higher, does not hide it).

    python benchmarks/eval_metrics.py                       # N = 10,000 and 20,000, ADM distances
    python benchmarks/eval_metrics.py --num 10000 --distances float64 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def child(num: int, distances: str, threads: int) -> dict:
    import time

    import numpy as np
    import torch

    from dcdit_cli.common.host_memory import peak_growth_mib
    from dcdit_cli.data.image_batches import POOL_DIM, SPATIAL_DIM, Reference
    from dcdit_cli.evaluation import fid

    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    pool = np.abs(rng.standard_normal((num, POOL_DIM), dtype=np.float32))  # pool_3 is post-ReLU-like: >= 0
    logits = rng.standard_normal((num, 1008), dtype=np.float32) * 3
    acts = fid.Activations(pool, logits, fid.RunningStats(POOL_DIM), fid.RunningStats(SPATIAL_DIM))
    for i in range(0, num, 1000):  # what the Inception pass accumulates batch by batch
        acts.pool_stats.update(pool[i : i + 1000])
        acts.spatial_stats.update(np.abs(rng.standard_normal((min(1000, num - i), SPATIAL_DIM), dtype=np.float32)))
    ref_pool = np.abs(rng.standard_normal((fid.PR_REF_IMAGES, POOL_DIM), dtype=np.float32)) * 1.05
    ref_stats = fid.RunningStats(POOL_DIM)
    ref_stats.update(ref_pool)
    ref = Reference("random", *ref_stats.result(), *acts.spatial_stats.result())
    t0, c0 = time.perf_counter(), time.process_time()
    metrics, peak_mib = peak_growth_mib(lambda: fid.sample_metrics(acts, ref, ref_pool, distances=distances, device="cpu"))
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    return {"num": num, "distances": distances, "threads": threads, "seconds": seconds, "cpu_seconds": cpu_seconds,
            "features_mib": (pool.nbytes + logits.nbytes + ref_pool.nbytes) / 2**20,
            "metric_step_peak_extra_mib": peak_mib,
            "precision": metrics["precision"], "recall": metrics["recall"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num", type=int, nargs="+", default=[10_000, 20_000], help="sample counts to measure")
    parser.add_argument("--distances", nargs="+", default=["adm"], choices=["adm", "float32", "float64"])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.num[0], args.distances[0], args.threads)))
        return
    print(f"{'N':>7} {'distances':>9} {'threads':>7} {'wall s':>8} {'CPU s':>8} {'CPU s / 10k':>11} {'features MiB':>12} "
          f"{'peak extra MiB':>14}", flush=True)
    for num in args.num:
        for distances in args.distances:
            cmd = [sys.executable, __file__, "--child", "--num", str(num), "--distances", distances, "--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
            if proc.returncode:
                raise SystemExit(proc.stderr[-2000:])
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{r['num']:>7,} {r['distances']:>9} {r['threads']:>7} {r['seconds']:>8.1f} {r['cpu_seconds']:>8.1f} "
                  f"{r['cpu_seconds'] * 1e4 / r['num']:>11.1f} {r['features_mib']:>12.0f} "
                  f"{r['metric_step_peak_extra_mib']:>14.0f}", flush=True)
    print("CPU s: process CPU time (robust on a shared machine, = wall time on an idle one with 1 thread); peak extra: "
          "resident memory the metric step adds on top of the features (a fresh process each).")


if __name__ == "__main__":
    main()
