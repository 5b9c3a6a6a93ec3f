"""De-chunk cost against the token count: grid smoothing + distance-transform plug-back versus
the direct O(M²) / O(L·M) oracles, measured in one run. Prints time ratios, not seconds.

    python benchmarks/dechunk_speed.py [--dim 256] [--batch 8] [--ratio 4]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from dcdit_cli.models.chunking import ChunkLayer, DeChunkLayer, raster_to_rc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from dechunk_reference import plug_back_reference, smooth_reference  # noqa: E402  (the tests' oracles)


def timed(fn, repeat: int = 5) -> float:
    fn()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--ratio", type=float, default=4.0, help="target compression N (kept ≈ L/N)")
    parser.add_argument("--sides", type=int, nargs="+", default=[16, 32, 64])
    args = parser.parse_args()
    torch.manual_seed(0)
    layer = DeChunkLayer(1.0)
    base = None
    print(f"{'grid':>7} {'L':>6} {'M':>6} {'direct/fast':>12} {'fast time vs smallest grid':>27} {'L ratio':>8}")
    for side in args.sides:
        L = side * side
        p = torch.rand(args.batch, L)
        mask = torch.rand(args.batch, L) < 1 / args.ratio
        h = torch.randn(args.batch, L, args.dim)
        _, order, valid, _, _ = ChunkLayer()(h, mask, p)
        z = h.gather(1, order[..., None].expand(-1, -1, args.dim))
        p_kept = p.gather(1, order).clamp(1e-4, 1 - 1e-4)
        pos = raster_to_rc(order, side)

        def fast():
            nearest = DeChunkLayer.plug_back_index(order, valid, side)
            return layer.smooth(z, order, valid, p_kept, side).gather(1, nearest[..., None].expand(-1, -1, args.dim))

        def direct():
            nearest = plug_back_reference(pos, valid, side)
            return smooth_reference(z, pos, p_kept, valid, layer.sigma).gather(1, nearest[..., None].expand(-1, -1, args.dim))

        t_fast, t_direct = timed(fast), timed(direct)
        base = base or (t_fast, L)
        print(f"{side:>4}x{side:<2} {L:>6} {int(valid.sum(1).float().mean()):>6} {t_direct / t_fast:>12.2f} "
              f"{t_fast / base[0]:>27.2f} {L / base[1]:>8.0f}")


if __name__ == "__main__":
    main()
