"""Improved precision and recall (Kynkäänniemi et al. 2019) exactly as OpenAI's ADM evaluator computes them.

ADM's ``ManifoldEstimator`` cuts the (rows × cols) squared-distance matrix into blocks of
10,000 × 10,000 and, per block, uses float16 distances when all of them are finite, else
float32 (its ``DistanceBlock``). dcdit reproduces that decision block by block but computes
each block in slices of rows, so memory stays at a few slices of (rows × 10,000) values
whatever N is: no N × N matrix is ever held. Exact distances are available as 'float64'.
"""

from __future__ import annotations

import numpy as np
import torch

from dcdit_cli.common.console import DcditError

DISTANCE_PRECISIONS = ("adm", "float32", "float64")
"""'adm': ADM's default (float16 per block where finite, else float32); 'float32'; 'float64'."""
ADM_BLOCK = 10_000  # ADM's row_batch_size and col_batch_size
_SLICE_VALUES = 1 << 22  # distance values per slice of a block (16 MiB in float32)


def check_distances(distances: str) -> None:
    """One line naming the option when ``distances`` is not a known precision."""
    if distances not in DISTANCE_PRECISIONS:
        raise DcditError(f"--pr-distances {distances!r}: use one of {', '.join(DISTANCE_PRECISIONS)}")


def _round16(x: torch.Tensor) -> torch.Tensor:
    """Round float32 values to float16 and back (overflow becomes ±inf, as in float16)."""
    return x.half().float()


def _side(x: torch.Tensor, half: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One side of the distance formula: (x as it enters the product, ‖x‖² per row). ``half``: as
    TensorFlow computes it in float16 on a GPU: the values, their squares and each sum rounded to
    float16, accumulations in float32 (products of float16 values are exact in float32)."""
    if half:
        x = _round16(x.float())
        return x, _round16(_round16(x * x).sum(1))
    return x, x.square().sum(1)


def _sq_dists(u: torch.Tensor, columns: tuple[torch.Tensor, torch.Tensor], half: bool) -> torch.Tensor:
    """Squared distances (n, m) = max(‖u‖² − 2 u·v + ‖v‖², 0), ADM's formula, from the rows u and the
    columns' :func:`_side` (prepared once per block, not once per row slice); ``half`` as there,
    the matmul and each sum rounded to float16 too. Otherwise in the inputs' dtype."""
    (u, nu), (v, nv) = _side(u, half), columns
    if half:
        d = _round16(_round16(nu[:, None] - _round16(2.0 * _round16(u @ v.T))) + nv[None, :])  # 2·u·v may overflow to inf
    else:
        d = nu[:, None] - 2.0 * (u @ v.T) + nv[None, :]
    return d.clamp_min_(0)


def _block_slices(rows: torch.Tensor, cols: torch.Tensor, mode: str, fn) -> list:
    """``fn(d, lo)`` on every row slice [lo, lo + s) of one ADM block's distances; in 'adm' mode
    the whole block is recomputed in float32 if any float16 distance is not finite."""
    step = max(1, _SLICE_VALUES // max(len(cols), 1))
    for half in ((True, False) if mode == "adm" else (False,)):
        out, columns = [], _side(cols, half)
        for lo in range(0, len(rows), step):
            d = _sq_dists(rows[lo : lo + step], columns, half)
            if half and not bool(torch.isfinite(d).all()):
                break
            out.append(fn(d, lo))
        else:
            return out
    raise AssertionError("unreachable: the float32 pass always completes")


def manifold_radii(feats: torch.Tensor, k: int, mode: str = "adm", block: int = ADM_BLOCK) -> torch.Tensor:
    """Squared distance of each row to its k-th nearest neighbour in ``feats`` (itself, at
    distance ~0, counts as the 0-th): the radii of Kynkäänniemi et al.'s k-NN balls."""
    n = len(feats)
    radii = torch.empty(n, dtype=feats.dtype if mode == "float64" else torch.float32, device=feats.device)
    for r0 in range(0, n, block):
        rows = feats[r0 : r0 + block]
        best = None  # (rows, k + 1): the k + 1 smallest distances seen so far, per row
        for c0 in range(0, n, block):
            parts = _block_slices(rows, feats[c0 : c0 + block], mode, lambda d, lo: d.topk(min(k + 1, d.shape[1]), 1, largest=False).values)
            cand = torch.cat(parts).to(radii.dtype)
            best = cand if best is None else torch.cat([best, cand], 1)
            best = best.topk(min(k + 1, best.shape[1]), 1, largest=False).values
        radii[r0 : r0 + block] = best[:, k]
    return radii


def _inside(a: torch.Tensor, radii_a: torch.Tensor, b: torch.Tensor, radii_b: torch.Tensor, mode: str,
            block: int = ADM_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """ADM's ``evaluate_pr``: which rows of a lie in some ball of b, and which rows of b lie in some ball of a."""
    a_in = torch.zeros(len(a), dtype=torch.bool, device=a.device)
    b_in = torch.zeros(len(b), dtype=torch.bool, device=a.device)
    for r0 in range(0, len(a), block):
        rows, r_rows = a[r0 : r0 + block], radii_a[r0 : r0 + block]
        for c0 in range(0, len(b), block):
            cols, r_cols = b[c0 : c0 + block], radii_b[c0 : c0 + block]

            def compare(d, lo, r_rows=r_rows, r_cols=r_cols):
                d = d.to(r_rows.dtype)  # (s, cols)
                return (d <= r_cols[None, :]).any(1), (d <= r_rows[lo : lo + len(d), None]).any(0)

            parts = _block_slices(rows, cols, mode, compare)
            a_in[r0 : r0 + block] |= torch.cat([p[0] for p in parts])
            b_in[c0 : c0 + block] |= torch.stack([p[1] for p in parts]).any(0)
    return a_in, b_in


def precision_recall(real_feats, fake_feats, k: int = 3, device: str | torch.device | None = None,
                     distances: str = "adm") -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) as the ADM evaluator computes them.

    Each set's manifold is the union of balls around its points with radius = distance to the
    k-th nearest neighbour in the same set. Precision: share of fakes inside the real manifold;
    recall: share of reals inside the fake manifold. ``distances``: 'adm' (ADM's default:
    float16 per 10,000 × 10,000 block where finite, else float32; this moves the second decimal
    against exact distances on 2048-d features), 'float32' (ADM's fallback path) or 'float64'.
    """
    check_distances(distances)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float64 if distances == "float64" else torch.float32
    real = torch.as_tensor(np.asarray(real_feats), dtype=dtype, device=device)
    fake = torch.as_tensor(np.asarray(fake_feats), dtype=dtype, device=device)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise DcditError(f"precision/recall: features must be (N, D) with one D, got {tuple(real.shape)} and {tuple(fake.shape)}")
    if min(len(real), len(fake)) <= k:
        raise DcditError(f"precision/recall with k={k} need more than {k} images per set, got {len(real)} and {len(fake)}")
    real_radii, fake_radii = manifold_radii(real, k, distances), manifold_radii(fake, k, distances)
    real_in, fake_in = _inside(real, real_radii, fake, fake_radii, distances)
    return float(fake_in.double().mean()), float(real_in.double().mean())
