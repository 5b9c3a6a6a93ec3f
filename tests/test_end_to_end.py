"""Issue 5's pipeline through the real CLI: image folder → extract (tiny VAE) → train (tiny,
2 steps, on the latent shards) → sample --npz (VAE decode) → fid (random Inception)."""

import json
import subprocess
import sys

import numpy as np
from PIL import Image


def dcdit(*args, cwd):
    proc = subprocess.run([sys.executable, "-m", "dcdit_cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_images_to_fid(tmp_path, vae_dir, inception_weights):
    rng = np.random.default_rng(0)
    for c, cls in enumerate(("red", "blue")):
        (tmp_path / "images" / cls).mkdir(parents=True)
        for k in range(4):
            arr = rng.integers(0, 80, (40, 48, 3), dtype=np.uint8)
            arr[..., 0 if c == 0 else 2] += 150
            Image.fromarray(arr).save(tmp_path / "images" / cls / f"{k}.png")
    (tmp_path / "images" / "red" / "corrupt.png").write_bytes(b"not an image")

    dcdit("extract", "--data-path", "images", "--out", "features", "--vae", str(vae_dir), "--image-size", "32",
          "--batch-size", "4", "--shard-size", "4", cwd=tmp_path)
    index = json.loads((tmp_path / "features/index.json").read_text())
    assert index["num_images"] == 8 and len(index["skipped"]) == 1 and index["latent_shape"] == [4, 16, 16]

    overrides = ["data.kind=latents", "data.path=features", "data.image_size=32", "data.num_classes=2",
                 "model.num_classes=2", "model.in_channels=4", "model.input_size=16", "train.max_steps=2"]
    dcdit("train", "--recipe", "tiny", *sum((["--set", o] for o in overrides), []), "--out", "runs/lat", cwd=tmp_path)

    dcdit("sample", "--ckpt", "runs/lat", "--num", "6", "--steps", "4", "--cfg-scale", "1.5", "--vae", str(vae_dir),
          "--npz", "samples.npz", "--batch-size", "3", cwd=tmp_path)
    arr = np.load(tmp_path / "samples.npz")["arr_0"]
    assert arr.shape == (6, 32, 32, 3) and arr.dtype == np.uint8

    dcdit("fid", "--make-ref", "images", "--out", "ref.npz", "--image-size", "32", "--inception-weights",
          str(inception_weights), cwd=tmp_path)
    proc = dcdit("fid", "--samples", "samples.npz", "--ref", "ref.npz", "--inception-weights", str(inception_weights),
                 "--json", cwd=tmp_path)
    result = json.loads(proc.stdout)  # logs go to stderr: stdout is exactly the JSON
    assert result["num_samples"] == 6 and np.isfinite(result["fid"]) and result["fid"] > 0
    assert result["inception_score"] >= 1.0
