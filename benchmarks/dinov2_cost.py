"""Cost of FD-DINOv2's feature pass: DINOv2 ViT-L/14 (dgm-eval's protocol) per 10,000 images,
against the Inception pass that FID already pays, measured interleaved in one process.

The ViT-L/14 has random weights in the real layout (1024-d, 24 blocks, 37 × 37 position
embeddings resized to 16 × 16) and runs through :class:`dcdit_cli.evaluation.dinov2.DinoV2Features`,
the code `dcdit eval --metrics fd_dinov2` runs, resize and normalisation included; the
baseline is torch-fidelity's Inception with random weights (:class:`dcdit_cli.evaluation.inception.InceptionFeatures`).
Both see the same uint8 256 × 256 batches (ADM's sample size). A few batches are timed, one
network after the other, and the medians are extrapolated to 10,000 images; process CPU time
is reported beside wall time because this machine is shared (on an idle core they agree).
KID's cost does not grow with N (100 subsets of 1,000 whatever the set sizes); it is timed once
on random 2048-d features.

    python benchmarks/dinov2_cost.py                        # CPU, 1 thread, 3 batches of 2
    python benchmarks/dinov2_cost.py --device cuda --batch 50 --reps 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _timed(fn, images, sync) -> tuple[float, float]:
    """(wall s, process CPU s) of one call."""
    sync()
    w, c = time.perf_counter(), time.process_time()
    fn(images)
    sync()
    return time.perf_counter() - w, time.process_time() - c


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=2, help="images per timed batch")
    parser.add_argument("--reps", type=int, default=3, help="timed batches per network (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import numpy as np
    import timm
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import random_inception_state_dict

    from dcdit_cli.evaluation.dinov2 import DINOV2_TIMM_ARCH, DinoV2Features
    from dcdit_cli.evaluation.fid import kernel_inception_distance
    from dcdit_cli.evaluation.inception import InceptionFeatures

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    vit = timm.create_model(DINOV2_TIMM_ARCH, pretrained=False, num_classes=0)  # the real layout, 518-pixel positions
    dinov2 = DinoV2Features(vit.state_dict(), args.device, Path("random ViT-L/14"))
    del vit
    inception = InceptionFeatures(random_inception_state_dict(), args.device)
    print(f"built both networks in {time.perf_counter() - t0:.1f} s; DINOv2 ViT-L/14: {dinov2.is_vit_l}, "
          f"{sum(p.numel() for p in dinov2.net.parameters()) / 1e6:.0f} M parameters, {dinov2.dim}-d features")

    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    images = np.random.default_rng(0).integers(0, 256, (args.batch, 256, 256, 3), dtype=np.uint8)
    nets = {"DINOv2 ViT-L/14": dinov2, "Inception (FID)": inception}
    for net in nets.values():
        _timed(net, images, sync)  # warm-up
    times = {name: [] for name in nets}
    for _ in range(args.reps):  # interleaved: one batch of each network in turn
        for name, net in nets.items():
            times[name].append(_timed(net, images, sync))

    per10k = 10_000 / args.batch
    print(f"\ndevice {args.device}, {args.threads} thread(s), {args.reps} interleaved batches of {args.batch} images "
          f"(256 × 256 uint8), medians:\n")
    print("| network | wall s / batch | CPU s / batch | wall per 10,000 images | CPU per 10,000 images |")
    print("| --- | --- | --- | --- | --- |")
    med = {}
    for name, ts in times.items():
        wall, cpu = statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts)
        med[name] = (wall, cpu)
        print(f"| {name} | {wall:.3f} | {cpu:.3f} | {wall * per10k / 3600:.2f} h | {cpu * per10k / 3600:.2f} h |")
    ratios = [d[0] / i[0] for d, i in zip(times["DINOv2 ViT-L/14"], times["Inception (FID)"])]
    print(f"\nDINOv2 / Inception, per interleaved pair (wall): median {statistics.median(ratios):.1f}x "
          f"(pairs: {', '.join(f'{r:.1f}' for r in ratios)})")
    d, i = med["DINOv2 ViT-L/14"][1], med["Inception (FID)"][1]
    print(f"DINOv2 / Inception (CPU time of the medians): {d / i:.1f}x")

    rng = np.random.default_rng(1)
    real, fake = (np.abs(rng.standard_normal((n, 2048), dtype=np.float32)) for n in (10_000, 10_000))
    wall, cpu = _timed(lambda _: kernel_inception_distance(real, fake), None, sync)
    print(f"KID (torch-fidelity, 100 subsets of 1,000, 2048-d, once): {wall:.1f} s wall, {cpu:.1f} s CPU")


if __name__ == "__main__":
    main()
