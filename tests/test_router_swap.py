"""The swap test's placements (benchmarks/router_swap.py): exact counts, graded densities, even spread."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from router_swap import PLACEMENTS, graded, hilbert_order, placement  # noqa: E402


def test_hilbert_order_is_a_path_of_unit_steps_over_every_cell():
    for side in (4, 16, 32):
        order = hilbert_order(side)
        assert sorted(order.tolist()) == list(range(side * side))
        r, c = order // side, order % side
        assert ((r.diff().abs() + c.diff().abs()) == 1).all()  # consecutive cells are neighbours
    with pytest.raises(ValueError):
        hilbert_order(12)


def _objects(B=64, side=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    rr, cc = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    centre = torch.randint(4, side - 4, (B, 2), generator=g)
    radius = torch.randint(2, 5, (B,), generator=g)
    d2 = (rr[None] - centre[:, 0, None, None]) ** 2 + (cc[None] - centre[:, 1, None, None]) ** 2
    return (d2 <= radius[:, None, None] ** 2).flatten(1)  # (B, L) discs


def test_every_placement_keeps_exactly_m_per_row():
    obj = _objects()
    m = torch.randint(20, 90, (obj.shape[0],), generator=torch.Generator().manual_seed(1))
    router = torch.rand(obj.shape) < 0.25
    for name in PLACEMENTS:
        b = placement(name, obj, m, router, torch.Generator().manual_seed(2))
        assert b.dtype == torch.bool and b.shape == obj.shape
        if name != "router":
            assert torch.equal(b.sum(1), m), name


def test_graded_density_follows_the_weight():
    """The object's share of the kept tokens grows with the weight and matches w·n_obj / (w·n_obj + n_rest)."""
    obj = _objects(B=256)
    m = torch.full((256,), 48)
    shares = []
    for w in (1, 2, 4, 8):
        b = graded(obj, m, w, torch.Generator().manual_seed(w))
        share = (b & obj).sum().item() / b.sum().item()
        n_obj = obj.sum(1).double()
        expected = (torch.minimum(w * n_obj * 48 / (w * n_obj + (256 - n_obj)), n_obj)).sum().item() / (48 * 256)
        assert abs(share - expected) < 0.02, (w, share, expected)
        shares.append(share)
    assert shares == sorted(shares) and shares[-1] > 2 * shares[0]


def test_even_density_is_stratified_one_token_per_2x2_block():
    """At m = L/4 and weight 1:1 each aligned run of 4 Hilbert cells, a 2 × 2 block, holds exactly one
    token: an even spread, unlike i.i.d. random placement."""
    obj = _objects(B=8)
    m = torch.full((8,), 64)
    b = graded(obj, m, 1, torch.Generator().manual_seed(0)).view(8, 8, 2, 8, 2)
    assert (b.sum(dim=(2, 4)) == 1).all()
    r = placement("random", obj, m, obj, torch.Generator().manual_seed(0)).view(8, 8, 2, 8, 2)
    assert not (r.sum(dim=(2, 4)) == 1).all()


def test_swap_run_end_to_end(tmp_path):
    """A few training steps, then every placement is measured and the table prints."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/router_swap.py"), "run", "--name", "smoke", "--steps", "2",
                          "--num", "8", "--set", "model.norm_groups=8", "--results", str(tmp_path / "r.jsonl")],
                         capture_output=True, text=True, cwd=ROOT / "benchmarks", timeout=300,
                         env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("| smoke | random | shapes | 2 | 0 |") == 4 and "best density vs random" in out.stdout
    assert (tmp_path / "r.jsonl").read_text().count("\n") == 1
