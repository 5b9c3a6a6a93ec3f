"""extract.py and vae.py with a tiny random AutoencoderKL (offline)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dcdit_cli.common.console import DcditError  # noqa: E402
from dcdit_cli.data import extract as extract_mod  # noqa: E402
from dcdit_cli.data.datasets import LatentShardDataset  # noqa: E402
from dcdit_cli.data.extract import extract  # noqa: E402
from dcdit_cli.data.imaging import center_crop_arr  # noqa: E402
from dcdit_cli.data.vae import decode, encode, load_vae  # noqa: E402


@pytest.fixture()
def image_dir(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    sizes = [(40, 40), (64, 48), (33, 90)]  # (w, h): square, landscape-ish, tall non-square
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for k, (w, h) in enumerate(sizes):
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            ext = ".png" if k % 2 == 0 else ".JPEG"
            Image.fromarray(arr).save(root / cls / f"{k}{ext}")
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "cat" / "notes.txt").write_text("hello")
    (root / "cat" / ".hidden.png").write_bytes(b"")  # hidden files are ignored
    return root


def test_extract_round_trip_and_flips(vae_dir, image_dir, tmp_path):
    out = tmp_path / "feat"
    index = extract(image_dir, out, str(vae_dir), image_size=32, batch_size=2, flip="both", mean=True, shard_size=3)
    assert index["classes"] == ["cat", "dog"] and index["num_images"] == 6
    assert sorted(s["path"] for s in index["skipped"]) == ["cat/notes.txt", "dog/broken.jpg"]
    assert index["latent_shape"] == [4, 16, 16] and index["flips"] == "both"
    assert json.loads((out / "index.json").read_text()) == index
    assert not list(out.glob(".*.tmp-*"))

    ds = LatentShardDataset(out)
    assert len(ds) == 6 and ds.num_classes == 2 and ds.sample_shape == (4, 16, 16)
    assert np.load(out / f"{index['shards'][0]['name']}.latents.npy", mmap_mode="r").shape[1] == 2
    _, labels, _ = ds.batch(torch.arange(6))
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]

    vae = load_vae(str(vae_dir))
    crop = center_crop_arr(Image.open(image_dir / "dog" / "2.png"), 32)  # the tall image, 6th overall
    x = torch.from_numpy(np.array(crop)).permute(2, 0, 1)[None].float() / 127.5 - 1.0
    want, want_flip = encode(vae, torch.cat([x, x.flip(-1)]), sample=False)
    got, _, _ = ds.batch(torch.tensor([5, 5]), torch.tensor([False, True]))
    torch.testing.assert_close(got[0], want, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(got[1], want_flip, atol=2e-3, rtol=2e-3)
    assert decode(vae, got[:1]).shape == (1, 3, 32, 32)


def test_extract_resumes_and_redoes_half_written_shards(vae_dir, image_dir, tmp_path, monkeypatch):
    out = tmp_path / "feat"
    first = extract(image_dir, out, str(vae_dir), image_size=32, flip="random", shard_size=3)
    assert np.load(out / "shard-000000.latents.npy").shape[1] == 1
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}

    def fail(*args, **kwargs):
        raise AssertionError("a finished shard was encoded again")

    monkeypatch.setattr(extract_mod, "encode", fail)
    assert extract(image_dir, out, str(vae_dir), image_size=32, flip="random", shard_size=3) == first
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")} == before

    # A killed run: shard 1's marker never written, a torn temporary file left behind.
    (out / "shard-000001.done.json").unlink()
    (out / ".shard-000001.latents.npy.tmp-999").write_bytes(b"torn")  # a killed write (atomic.py naming)
    calls = []
    monkeypatch.undo()
    real = extract_mod.encode
    monkeypatch.setattr(extract_mod, "encode", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = extract(image_dir, out, str(vae_dir), image_size=32, flip="random", shard_size=3)
    assert calls and again == first  # same per-shard seeds → same result
    assert (out / "shard-000000.latents.npy").stat().st_mtime_ns == before["shard-000000.latents.npy"]
    assert not list(out.glob(".*.tmp-*"))
    np.testing.assert_array_equal(
        np.load(out / "shard-000001.latents.npy").shape, (2, 1, 4, 16, 16)
    )  # shard 1: dog/0, dog/1 (dog/2 is in shard 2 with broken.jpg)

    with pytest.raises(DcditError, match="other settings.*image_size"):
        extract(image_dir, out, str(vae_dir), image_size=16, flip="random", shard_size=3)


def test_errors(vae_dir, tmp_path):
    with pytest.raises(DcditError, match="huggingface-cli download .*`--vae vae/`"):
        load_vae(str(tmp_path / "no-such-vae"))
    with pytest.raises(DcditError, match="huggingface-cli download stabilityai/sd-vae-ft-ema"):
        load_vae("stabilityai/sd-vae-ft-ema-not-cached-here")
    with pytest.raises(DcditError, match="does not exist"):
        extract(tmp_path / "nothing", tmp_path / "o", str(vae_dir), image_size=32)
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(DcditError, match="no class folders"):
        extract(tmp_path / "flat", tmp_path / "o", str(vae_dir), image_size=32)
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DcditError, match="hold no files"):
        extract(tmp_path / "empty", tmp_path / "o", str(vae_dir), image_size=32)
    (tmp_path / "junk" / "cls").mkdir(parents=True)
    (tmp_path / "junk" / "cls" / "x.jpg").write_text("nope")
    with pytest.raises(DcditError, match="none of the 1 files"):
        extract(tmp_path / "junk", tmp_path / "o2", str(vae_dir), image_size=32)
    with pytest.raises(DcditError, match="--flip"):
        extract(tmp_path / "junk", tmp_path / "o3", str(vae_dir), flip="sometimes")


def test_unreadable_images_end_in_one_short_line(vae_dir, tmp_path, capsys, monkeypatch):
    """When no file is an image, the error names the count and one example, short enough for one
    terminal line (it listed three files and the layout hint, four lines at 80 columns)."""
    import sys

    from dcdit_cli import cli

    data = tmp_path / "data" / "cls"
    data.mkdir(parents=True)
    for i in range(4):
        (data / f"{i}.png").write_text("not an image")
    buf = tmp_path / "whole.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(buf)
    (data / "truncated.png").write_bytes(buf.read_bytes()[:60])
    monkeypatch.chdir(tmp_path)
    args = ["extract", "--data-path", "data", "--out", "out", "--vae", str(vae_dir), "--image-size", "32"]
    monkeypatch.setattr(sys, "argv", ["dcdit", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    error = [i for i, line in enumerate(lines) if line.startswith("error:")]
    assert exit_info.value.code == 2 and error == [len(lines) - 1], lines  # the last line, nothing wrapped after it
    assert "none of the 5 files" in lines[-1] and "cls/0.png" in lines[-1]
    assert len(lines[-1]) <= 130, lines[-1]  # one line of a 132-column terminal
