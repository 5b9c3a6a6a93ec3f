"""Pixel-space DC-DiT (issue 23 item 2, docs/pixels.md): image folders and pixel shards as training
data, the P×P patch stem of DC-DiT, its FLOPs, and the photos set at 64×64 with P = 4 through the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from dcdit_cli.common.console import DcditError
from dcdit_cli.data.datasets import LatentShardDataset, PixelShardDataset, make_dataset
from dcdit_cli.data.extract import extract
from dcdit_cli.data.images import ImageFolderDataset
from dcdit_cli.data.imaging import center_crop_arr


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """Two classes of small random images of different sizes and aspect ratios, plus a non-image."""
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    for c, sizes in enumerate([[(40, 30), (24, 24)], [(30, 50), (64, 20), (33, 33)]]):
        (root / f"class{c}").mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"class{c}" / f"{i}.png")
    return root


def _crops(root: Path, size: int) -> list[np.ndarray]:
    files = sorted(p for p in root.rglob("*.png"))
    return [center_crop_arr(Image.open(f), size) for f in files]


def test_image_folder_reads_adm_crops_and_flips_by_the_bits(image_folder):
    ds = ImageFolderDataset(image_folder, 16)
    assert len(ds) == 5 and ds.num_classes == 2 and ds.sample_shape == (3, 16, 16)
    x, y, mask = ds.batch(torch.tensor([0, 3, 3]), torch.tensor([False, False, True]))
    crops = _crops(image_folder, 16)
    want = torch.from_numpy(np.stack([crops[0], crops[3]])).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert mask is None and x.dtype == torch.float32 and x.shape == (3, 3, 16, 16)
    assert torch.equal(x[:2], want) and torch.equal(x[2], want[1].flip(-1))
    assert y.tolist() == [0, 1, 1]
    still, _, _ = ImageFolderDataset(image_folder, 16, flip="none").batch(torch.tensor([3]), torch.tensor([True]))
    assert torch.equal(still[0], want[1])


@pytest.mark.parametrize("flip", ["none", "both"])
def test_extract_pixels_writes_the_same_crops_without_a_vae(image_folder, tmp_path, flip):
    (image_folder / "class1" / "notes.txt").write_text("not an image")
    index = extract(image_folder, tmp_path / "px", vae="no-such-vae-is-read", image_size=16, flip=flip, pixels=True,
                    shard_size=3, num_workers=1)
    assert index["format"] == "dcdit-pixels-v1" and index["sample_shape"] == [3, 16, 16] and index["vae"] is None
    assert index["num_images"] == 5 and [s["path"] for s in index["skipped"]] == ["class1/notes.txt"]
    ds = PixelShardDataset(tmp_path / "px", flip="random")
    assert ds.num_flips == (2 if flip == "both" else 1) and ds.sample_shape == (3, 16, 16)
    folder = ImageFolderDataset(image_folder, 16)
    idx, bits = torch.arange(5), torch.tensor([True, False, True, False, True])
    a, la, _ = ds.batch(idx, bits)
    b, lb, _ = folder.batch(idx, bits)
    assert torch.equal(a, b) and torch.equal(la, lb)  # shards and folder give the same batches
    stored = np.load(tmp_path / "px" / "shard-000000.pixels.npy")
    assert stored.dtype == np.uint8 and stored.shape[1:] == (ds.num_flips, 3, 16, 16)


def _data(kind: str, path, size: int = 16, classes: int = 2, flip: str = "random"):
    return SimpleNamespace(kind=kind, path=str(path), image_size=size, num_classes=classes, flip=flip)


def test_make_dataset_picks_folder_or_shards_and_names_the_wrong_kind(image_folder, tmp_path):
    assert isinstance(make_dataset(_data("images", image_folder)), ImageFolderDataset)
    extract(image_folder, tmp_path / "px", vae=None, image_size=16, flip="none", pixels=True, num_workers=1)
    assert isinstance(make_dataset(_data("images", tmp_path / "px")), PixelShardDataset)
    with pytest.raises(DcditError, match=r"holds pixel shards \(dcdit-pixels-v1\), not latent shards: set data.kind = 'images'"):
        make_dataset(_data("latents", tmp_path / "px"))
    with pytest.raises(DcditError, match="extracted at 16 px but data.image_size = 32: .* extract --pixels at --image-size 32"):
        make_dataset(_data("images", tmp_path / "px", size=32))
    with pytest.raises(DcditError, match="have 2 classes but data.num_classes = 1"):
        make_dataset(_data("images", image_folder, classes=1))


# ---------------------------------------------------------------------------------------------
# P = 1 is the DC-DiT of before the patch stem, bit for bit
# ---------------------------------------------------------------------------------------------

P1_REFERENCE = Path(__file__).parent / "data" / "dcdit_p1_reference.npz"
"""Written by ``python tests/test_pixels.py`` at commit fd4672a, before DC-DiT had a patch stem: the
tiny recipe's DC-DiT with seeded random weights, its state-dict names and shapes, and its output on
seeded inputs. The P = 1 model of every later commit must reproduce it."""


def p1_reference_run() -> dict[str, np.ndarray]:
    """The tiny recipe's DC-DiT (P = 1) with every parameter drawn from N(0, 0.1²) in state-dict order
    (the zero inits would make the output 0 and the check empty); its prediction and router p."""
    from dcdit_cli.config.recipe import load_recipe
    from dcdit_cli.models import build_model

    model = build_model(load_recipe("tiny").model).eval()
    gen = torch.Generator().manual_seed(23)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=gen))
        x = torch.randn(2, 3, 8, 8, generator=gen)
        out, stats = model(x, torch.tensor([10, 500]), torch.tensor([1, 3]))
    names = model.state_dict()
    return {"names": np.array(list(names)), "shapes": np.array([str(tuple(v.shape)) for v in names.values()]),
            "out": out.numpy(), "p": stats.p.numpy(), "kept": stats.kept.numpy()}


def test_p1_dcdit_is_the_model_before_the_patch_stem():
    want = np.load(P1_REFERENCE)
    got = p1_reference_run()
    assert got["names"].tolist() == want["names"].tolist() and got["shapes"].tolist() == want["shapes"].tolist()
    assert np.array_equal(got["kept"], want["kept"])
    # bit for bit on the machine that wrote the file; other CPUs may round float sums differently
    np.testing.assert_allclose(got["p"], want["p"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["out"], want["out"], rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
    P1_REFERENCE.parent.mkdir(exist_ok=True)
    np.savez(P1_REFERENCE, **p1_reference_run())
    print(f"wrote {P1_REFERENCE}")
