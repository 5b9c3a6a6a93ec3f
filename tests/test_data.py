"""data.py: the shapes set, latent shards and deterministic batch sampling."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dcdit_cli.common.console import DcditError
from dcdit_cli.data.datasets import (
    SHAPE_CLASSES,
    LatentShardDataset,
    ShapesDataset,
    batch_indices,
    make_dataset,
)

# ------------------------------------------------------------------------------- shapes


def test_shapes_deterministic_and_in_range():
    a, b = ShapesDataset(image_size=16, seed=3), ShapesDataset(image_size=16, seed=3)
    x0, y0 = a[5]
    x1, y1 = b[5]
    assert torch.equal(x0, x1) and y0 == y1
    assert x0.shape == (3, 16, 16) and x0.dtype == torch.float32
    assert not torch.equal(a[5][0], a[6][0])
    assert not torch.equal(a[5][0], ShapesDataset(image_size=16, seed=4)[5][0])
    images, labels, masks = a.batch(torch.arange(64))
    assert images.shape == (64, 3, 16, 16) and labels.shape == (64,) and masks.shape == (64, 16, 16)
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert torch.equal(images[5], x0) and int(labels[5]) == y0  # batch == items


def test_shapes_masks_mark_the_shape_and_all_classes_appear():
    ds = ShapesDataset(image_size=32, seed=0)
    images, labels, masks = ds.batch(torch.arange(120))
    assert set(labels.tolist()) == set(range(len(SHAPE_CLASSES)))
    for image, mask in zip(images, masks):
        assert 0 < int(mask.sum()) < mask.numel()
        inside = image[:, mask].mean(dim=1)  # (3,) mean colour of the shape
        outside = image[:, ~mask].mean(dim=1)
        assert (inside - outside).abs().max() > 0.2
    image, label, mask = ds.item_with_mask(7)
    assert torch.equal(mask, masks[7]) and label == int(labels[7])


def test_shapes_fewer_classes_and_bad_count():
    labels = ShapesDataset(image_size=16, num_classes=2).batch(torch.arange(50))[1]
    assert set(labels.tolist()) == {0, 1}
    with pytest.raises(DcditError, match="num_classes"):
        ShapesDataset(num_classes=7)


# ------------------------------------------------------------------------------- batch order


def test_batch_indices_pure_and_distinct():
    i0, f0 = batch_indices(0, 10, 0, 32, 1000)
    i1, f1 = batch_indices(0, 10, 0, 32, 1000)
    assert torch.equal(i0, i1) and torch.equal(f0, f1)
    assert i0.dtype == torch.int64 and f0.dtype == torch.bool and i0.shape == f0.shape == (32,)
    assert 0 <= int(i0.min()) and int(i0.max()) < 1000
    assert not torch.equal(i0, batch_indices(0, 11, 0, 32, 1000)[0])
    assert not torch.equal(i0, batch_indices(0, 10, 1, 32, 1000)[0])
    assert not torch.equal(i0, batch_indices(1, 10, 0, 32, 1000)[0])
    assert 0 < int(f0.sum()) < 32


# ------------------------------------------------------------------------------- latent shards


def _write_shards(root, flips="both", num_flips=2, counts=(3, 2), shape=(4, 2, 2), classes=("a", "b")):
    """A hand-written shard directory; latent value = 100·global_index + 10·flip + channel."""
    root.mkdir(parents=True, exist_ok=True)
    shards, start = [], 0
    for s, n in enumerate(counts):
        g = np.arange(start, start + n).reshape(n, 1, 1, 1, 1)
        f = np.arange(num_flips).reshape(1, num_flips, 1, 1, 1)
        c = np.arange(shape[0]).reshape(1, 1, shape[0], 1, 1)
        lat = (100 * g + 10 * f + c).astype(np.float16) * np.ones((1, 1, 1, *shape[1:]), np.float16)
        lat[..., 0] += 0.5  # left column marked, so a horizontal flip shows
        np.save(root / f"s{s}.latents.npy", lat.astype(np.float16))
        np.save(root / f"s{s}.labels.npy", (np.arange(start, start + n) % len(classes)).astype(np.int64))
        shards.append({"name": f"s{s}", "count": n})
        start += n
    index = {
        "format": "dcdit-latents-v1", "image_size": 16, "latent_shape": list(shape), "vae": "x",
        "scale": 0.18215, "flips": flips, "mean": True, "classes": list(classes), "shards": shards,
        "skipped": [], "num_images": start,
    }
    (root / "index.json").write_text(json.dumps(index))
    return root


def test_shards_round_trip_with_stored_flips(tmp_path):
    ds = LatentShardDataset(_write_shards(tmp_path / "f"), flip="random")
    assert len(ds) == 5 and ds.num_classes == 2 and ds.sample_shape == (4, 2, 2)
    x, y = ds[3]
    assert x.dtype == torch.float32 and y == 1 and x[2, 0, 1] == 302  # unflipped, shard 1
    lat, labels, mask = ds.batch(torch.tensor([4, 0, 3, 4]), torch.tensor([True, False, False, False]))
    assert lat.shape == (4, 4, 2, 2) and labels.tolist() == [0, 0, 1, 0] and mask is None  # (x, y, mask) for every dataset
    assert lat[:, 1, 0, 1].tolist() == [411, 1, 301, 401]  # flip bit 1 → the stored copy (F index 1)
    assert lat[0, 1, 0, 0] == 411.5  # stored flip is not flipped again
    lat_none, _, _ = LatentShardDataset(tmp_path / "f", flip="none").batch(torch.tensor([4]), torch.tensor([True]))
    assert lat_none[0, 1, 0, 1] == 401


def test_shards_single_copy_flips_on_the_fly(tmp_path):
    root = _write_shards(tmp_path / "n", flips="none", num_flips=1)
    lat, _, _ = LatentShardDataset(root, flip="random").batch(torch.tensor([1, 1]), torch.tensor([True, False]))
    assert lat[0, 0, 0].tolist() == [100, 100.5] and lat[1, 0, 0].tolist() == [100.5, 100]
    lat, _, _ = LatentShardDataset(root, flip="none").batch(torch.tensor([1]), torch.tensor([True]))
    assert lat[0, 0, 0].tolist() == [100.5, 100]


def test_shards_errors(tmp_path):
    for bad in (tmp_path / "missing", tmp_path):
        with pytest.raises(DcditError, match="dcdit extract --data-path"):
            LatentShardDataset(bad)
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(DcditError, match="dcdit extract"):
        LatentShardDataset(tmp_path)
    root = _write_shards(tmp_path / "zero", counts=(0,))
    with pytest.raises(DcditError, match="zero images.*dcdit extract"):
        LatentShardDataset(root)


def test_make_dataset(tmp_path):
    root = _write_shards(tmp_path / "f")
    cfg = SimpleNamespace(kind="latents", path=str(root), image_size=16, num_classes=2, flip="random")
    ds = make_dataset(cfg)
    assert isinstance(ds, LatentShardDataset) and ds.sample_shape == (4, 2, 2)
    with pytest.raises(DcditError, match="data.image_size=16"):
        make_dataset(SimpleNamespace(**{**vars(cfg), "image_size": 32}))
    with pytest.raises(DcditError, match="num_classes"):
        make_dataset(SimpleNamespace(**{**vars(cfg), "num_classes": 1}))
    shapes = make_dataset(SimpleNamespace(kind="shapes", path="", image_size=16, num_classes=6, flip="random"))
    assert isinstance(shapes, ShapesDataset) and shapes.sample_shape == (3, 16, 16) and shapes.num_classes == 6


def test_the_fixed_shapes_set_draws_one_grey_shape_per_class_at_the_centre():
    """data.shapes = "fixed" (the demo's set): the class alone decides the shape, its size and place;
    labels and backgrounds are the varied set's of the same (seed, index)."""
    fixed, varied = ShapesDataset(16, 6, seed=3, variety="fixed"), ShapesDataset(16, 6, seed=3)
    x, y, m = fixed.batch(torch.arange(96))
    for c in range(6):
        masks = m[y == c]
        assert len(masks) > 1 and bool((masks == masks[0]).all())  # one silhouette per class
    assert not torch.equal(m[y == 0][0], m[y == 1][0])
    assert torch.isclose(x[:, 0][m], torch.tensor(0.85 * 2 - 1)).float().mean() > 0.5  # flat light-grey fill
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])  # grey everywhere
    ys, xs = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    disc = m[y == 0][0].float()
    assert torch.allclose(torch.stack([(disc * ys).sum(), (disc * xs).sum()]) / disc.sum(), torch.tensor([7.5, 7.5]))
    assert torch.equal(y, varied.batch(torch.arange(96))[1])
    with pytest.raises(DcditError, match="data.shapes"):
        ShapesDataset(16, 6, variety="few")


def test_make_dataset_draws_the_recipes_shapes_set():
    from dcdit_cli.config.recipe import load_recipe

    assert make_dataset(load_recipe("demo").data).variety == "fixed"
    assert make_dataset(load_recipe("toy").data).variety == "varied"
    with pytest.raises(DcditError, match="data.kind = 'shapes'"):
        load_recipe("toy", ["data.kind=photos", "data.shapes=fixed"])
