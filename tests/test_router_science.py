"""benchmarks/router_science.py: its AUROC readings tell where the router's p goes from what it sees."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from router_science import auroc, auroc_at_equal_position  # noqa: E402

from dcdit_cli.data.datasets import ShapesDataset  # noqa: E402


def test_auroc_at_equal_position_is_a_half_for_a_score_of_place_alone_and_sees_content():
    _, _, masks = ShapesDataset(16, 6, seed=5, variety="fixed").batch(torch.arange(48))
    obj = masks.flatten(1)  # (N, L): the six silhouettes, all centred
    place = obj.float().mean(0).expand_as(obj)  # how often each pixel is object: ignores the image
    assert auroc(place, obj) > 0.9  # a centre-keeper looks like an object detector on this set ...
    assert auroc_at_equal_position(place, obj) == 0.5  # ... and is exposed at equal position
    noise = 0.1 * torch.rand(obj.shape, generator=torch.Generator().manual_seed(0))
    assert auroc_at_equal_position(obj.float() + noise, obj) == 1.0
    assert auroc_at_equal_position(1 - obj.float() + noise, obj) == 0.0
    assert auroc_at_equal_position(place + noise, obj) == pytest.approx(0.5, abs=0.1)  # noise alone: chance


def test_auroc_counts_ties_half():
    assert auroc(torch.tensor([0.0, 1.0, 1.0, 2.0]), torch.tensor([False, True, False, True])) == 0.875
