"""photos.py: crops of scikit-image's sample photographs and the detail map."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch

from dcdit_cli.common.console import DcditError
from dcdit_cli.data import photos
from dcdit_cli.data.datasets import make_dataset
from dcdit_cli.data.photos import PhotosDataset, detail_map, detail_mask

needs_photos = pytest.mark.skipif(importlib.util.find_spec("skimage") is None,
                                  reason="scikit-image (the photos extra) is not installed")


def test_detail_map_marks_edges_not_flat_regions():
    img = torch.zeros(1, 3, 16, 16)
    img[:, :, :, 8:] = 1.0  # one vertical edge between columns 7 and 8
    d = detail_map(img)[0]
    assert d.shape == (16, 16)
    assert torch.all(d[:, :5] == 0) and torch.all(d[:, 11:] == 0)  # flat: no energy
    assert torch.all(d[:, 7] > 0) and torch.all(d[:, 8] > 0) and d[:, 7].equal(d[:, 8])
    noise = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    m = detail_mask(noise)
    assert m.shape == (2, 16, 16) and m.dtype == torch.bool
    assert abs(m.float().mean().item() - 0.25) < 0.02  # the top quarter


def test_missing_scikit_image_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(photos.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DcditError, match=r"pip install 'dcdit\[photos\]'"):
        PhotosDataset(16)


@needs_photos
def test_photos_deterministic_split_and_masks():
    a, b = PhotosDataset(16, seed=1), PhotosDataset(16, seed=1)
    x, y, m = a.batch(torch.arange(40))
    x2, y2, m2 = b.batch(torch.arange(40))
    assert torch.equal(x, x2) and torch.equal(y, y2) and torch.equal(m, m2)
    assert x.shape == (40, 3, 16, 16) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    assert set(y.tolist()) == {0, 1, 2, 3} and a.num_classes == 4 and a.sample_shape == (3, 16, 16)
    assert torch.equal(a[3][0], x[3]) and a[3][1] == int(y[3])
    assert not torch.equal(x, PhotosDataset(16, seed=2).batch(torch.arange(40))[0])
    assert (x.std(dim=(2, 3)) > 0).any(dim=1).all()  # real content, not constant crops
    # The masks select the high-detail pixels: their gradient energy exceeds the rest's.
    d = detail_map(x)
    assert (d[m].mean() > 3 * d[~m].mean()).item()
    # train and val crop disjoint columns of every photo
    train, val = PhotosDataset(16, split="train"), PhotosDataset(16, split="val")
    for level_t, level_v in zip(train._pyramid[0], val._pyramid[0]):
        assert level_t.shape == level_v.shape
    xv = val.batch(torch.arange(8))[0]
    assert not any(torch.equal(v, t) for v in xv for t in x)


@needs_photos
def test_make_dataset_photos_and_bad_class_count():
    cfg = SimpleNamespace(kind="photos", path="", image_size=16, num_classes=4, flip="random")
    assert isinstance(make_dataset(cfg), PhotosDataset)
    with pytest.raises(DcditError, match="num_classes"):
        make_dataset(SimpleNamespace(**{**vars(cfg), "num_classes": 6}))
    with pytest.raises(DcditError, match="data.kind must be"):
        make_dataset(SimpleNamespace(**{**vars(cfg), "kind": "pictures"}))


def test_recipe_accepts_photos_kind():
    from dcdit_cli.config.recipe import load_recipe

    recipe = load_recipe("toy", ["data.kind=photos", "data.num_classes=4", "model.num_classes=4"])
    assert recipe.data.kind == "photos"
    with pytest.raises(DcditError, match="photos"):
        load_recipe("toy", ["data.kind=pictures"])
