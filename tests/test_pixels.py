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
from dcdit_cli.data.datasets import PixelShardDataset, make_dataset
from dcdit_cli.data.extract import extract
from dcdit_cli.data.images import ImageFolderDataset
from dcdit_cli.data.imaging import center_crop_arr


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """Two classes of small random images of different sizes and aspect ratios."""
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
    from dcdit_cli.config.recipe import load_recipe
    from dcdit_cli.models import build_model

    want = np.load(P1_REFERENCE)
    got = p1_reference_run()
    assert got["names"].tolist() == want["names"].tolist() and got["shapes"].tolist() == want["shapes"].tolist()
    assert np.array_equal(got["kept"], want["kept"])
    model = build_model(load_recipe("tiny").model)
    x = torch.randn(1, 3, 8, 8)
    assert model.patchify(x) is x and model.unpatchify(x) is x  # by construction: no reshape runs at P = 1
    # bit for bit on the machine that wrote the file (max difference 0.0); other CPUs may round float sums differently
    np.testing.assert_allclose(got["p"], want["p"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["out"], want["out"], rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
    P1_REFERENCE.parent.mkdir(exist_ok=True)
    np.savez(P1_REFERENCE, **p1_reference_run())
    print(f"wrote {P1_REFERENCE}")


# ---------------------------------------------------------------------------------------------
# The patch stem
# ---------------------------------------------------------------------------------------------


def _tiny_model(*overrides: str):
    from dcdit_cli.config.recipe import load_recipe
    from dcdit_cli.models import build_model

    cfg = load_recipe("tiny", list(overrides)).model
    torch.manual_seed(0)
    net = build_model(cfg).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for tensor in net.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=gen))
    return net


def test_patch_stem_makes_the_router_chunk_patches():
    """A DC-DiT at P = 2 on 3 × 8² images is exactly a P = 1 DC-DiT on the 12 × 4² grid of its 2×2 patches
    (same weights: the state dicts have the same names and shapes), its output pixel-shuffled back."""
    import torch.nn.functional as F

    patched = _tiny_model("model.patch_size=2")
    on_patches = _tiny_model("model.input_size=4", "model.in_channels=12", "data.kind=latents", "sample.guided_channels=0")
    assert {k: v.shape for k, v in patched.state_dict().items()} == {k: v.shape for k, v in on_patches.state_dict().items()}
    assert patched.encoder.stem.weight.shape[1] == 12 and patched.final_layer.linear.out_features == 2 * 3 * 4
    on_patches.load_state_dict(patched.state_dict())
    gen = torch.Generator().manual_seed(2)
    x, t, y = torch.randn(3, 3, 8, 8, generator=gen), torch.tensor([5, 400, 999]), torch.tensor([0, 2, 6])
    with torch.no_grad():
        out, stats = patched(x, t, y)
        ref, ref_stats = on_patches(F.pixel_unshuffle(x, 2), t, y)
    # [ε | v] halves: channels 0..C·P²−1 of the token output are ε's pixels, so pixel-shuffle keeps them apart
    assert out.shape == (3, 6, 8, 8) and stats.p.shape == (3, 16)
    assert torch.equal(stats.kept, ref_stats.kept) and torch.allclose(stats.p, ref_stats.p)
    torch.testing.assert_close(out, F.pixel_shuffle(ref, 2))
    assert torch.equal(patched.unpatchify(patched.patchify(x)), x)


def test_flops_count_the_patch_grid():
    from dcdit_cli.config.recipe import load_recipe
    from dcdit_cli.models.flops import dcdit_cost, flops_row

    p1, p2 = load_recipe("tiny"), load_recipe("tiny", ["model.patch_size=2"])
    r1, r2 = flops_row("p1", p1), flops_row("p2", p2)
    assert r1.compression == pytest.approx(4.0) and r2.compression == pytest.approx(16.0)  # 64 px per 16 / 4 kept tokens
    c1, c2 = dcdit_cost(p1.model), dcdit_cost(p2.model)
    # the inner network's cost per kept token is the same; the scaffold runs on 16 tokens instead of 64,
    # its stem and final layer on 4× the channels: constant part smaller, by more than 3× here
    assert c2.b == pytest.approx(c1.b, rel=0.02) and c2.c == pytest.approx(c1.c, rel=1e-9)
    assert c2.a < c1.a / 3


# ---------------------------------------------------------------------------------------------
# The photos set at 64×64 pixels, P = 4 (16×16 tokens), through the real CLI
# ---------------------------------------------------------------------------------------------

PHOTOS_P4 = ["data.kind=photos", "data.image_size=64", "data.num_classes=4", "model.num_classes=4",
             "model.input_size=64", "model.patch_size=4", "train.ckpt_every_steps=2"]


def _dcdit(*args, cwd):
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "dcdit_cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.skipif(__import__("importlib").util.find_spec("skimage") is None, reason="needs the photos extra")
def test_photos_at_64_px_with_p4_trains_resumes_samples_and_draws_boundaries(tmp_path):
    from dcdit_cli.sampling.viz_boundaries import sheet_layout

    sets = lambda steps: sum((["--set", o] for o in PHOTOS_P4 + [f"train.max_steps={steps}"]), [])  # noqa: E731
    _dcdit("train", "--recipe", "tiny", *sets(2), "--out", "runs/px", cwd=tmp_path)
    _dcdit("train", "--recipe", "tiny", *sets(4), "--out", "runs/px", cwd=tmp_path)  # the same command, more steps: resumes
    steps = [json.loads(line)["step"] for line in (tmp_path / "runs/px/metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4] and (tmp_path / "runs/px/checkpoints/step-0000004").is_dir()

    _dcdit("sample", "--ckpt", "runs/px", "--num", "3", "--steps", "3", "--npz", "s.npz", "--batch-size", "3", cwd=tmp_path)
    images = np.load(tmp_path / "s.npz")["arr_0"]
    assert images.shape == (3, 64, 64, 3) and images.dtype == np.uint8 and images.std() > 0  # pixels, no VAE

    proc = _dcdit("viz-boundaries", "--ckpt", "runs/px", "--num", "1", "--timesteps", "2", "--steps", "3", "--out", "vb",
                  "--json", cwd=tmp_path)
    result = json.loads(proc.stdout)
    assert result["tokens"] == 256 and all(0 < k <= 256 for col in result["kept"] for k in col)
    sheet = Image.open(tmp_path / result["pngs"][0])
    layout = sheet_layout(2, 16, 64)
    assert sheet.size == layout.size and layout.cell % 4 == 0  # each 4×4-pixel patch gets a whole cell


def test_pixel_recipes_load_and_their_dits_match_their_flops():
    from dcdit_cli.config.recipe import load_recipe
    from dcdit_cli.models.flops import flops_row

    for side, patch, dit_patch in ((64, 2, 4), (256, 8, 16)):
        dc, dit = load_recipe(f"b-n4-px{side}"), load_recipe(f"dit-b-p{dit_patch}-px{side}-isoflop")
        for r in (dc, dit):
            assert (r.data.kind, r.data.image_size, r.model.input_size, r.model.in_channels) == ("images", side, side, 3)
        assert dc.model.patch_size == patch and (side // patch) ** 2 == 1024  # the 256 px latent grid, 32×32
        a, b = flops_row("dc", dc), flops_row("dit", dit)
        assert (side // dit_patch) ** 2 == 256 == 1024 / dc.model.target_ratio  # the DiT runs as many tokens as DC-DiT keeps
        assert abs(b.tflops_per_img / a.tflops_per_img - 1) < 0.03, (a, b)  # within 3%: 16 blocks, 15 would be −4%
        assert a.compression == b.compression == dit_patch**2


def test_weights_stored_with_the_old_unused_patch_size_load_as_p1(tmp_path):
    """A DC-DiT recipe stored before the patch stem could carry model.patch_size = 2 (the old default, ignored
    by DC-DiT then): its weights are a P = 1 model, and they load as one."""
    from dcdit_cli.config.recipe import load_recipe
    from dcdit_cli.models import build_model
    from dcdit_cli.training.checkpoint import export_weights, load_weights

    recipe = load_recipe("tiny")
    model = build_model(recipe.model)
    old_toml = recipe.to_toml().replace("patch_size = 1\n", "patch_size = 2\n", 1)
    assert "patch_size = 2" in old_toml
    path = export_weights(tmp_path, 3, model.state_dict(), old_toml, keep_last=1)
    loaded, stored, step = load_weights(path)
    assert stored.model.patch_size == 1 and step == 3
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    p2 = build_model(load_recipe("tiny", ["model.patch_size=2"]).model)  # real P = 2 weights keep their P
    loaded, stored, _ = load_weights(export_weights(tmp_path / "p2", 3, p2.state_dict(), old_toml, keep_last=1))
    assert stored.model.patch_size == 2 and loaded.encoder.stem.weight.shape[1] == 12


def test_upcycling_counts_the_source_grid_in_tokens_and_distillation_needs_p1():
    """A DiT/2 on 8×8 has a 4×4 token grid: a DC-DiT with P = 2 on the same 8×8 input routes the same grid,
    so its positions need no scaling (pos_grid_scale 1); at P = 1 they are scaled by 1/2."""
    from dcdit_cli.config.recipe import load_recipe
    from dcdit_cli.training.upcycle import check_upcycle_recipe

    def scale_warning(*overrides):
        return any("pos_grid_scale" in w for w in check_upcycle_recipe(load_recipe("tiny-upcycle", list(overrides)), False))

    assert not scale_warning() and scale_warning("model.patch_size=2")
    assert not scale_warning("model.patch_size=2", "model.pos_grid_scale=1.0")
    with pytest.raises(DcditError, match="needs model.patch_size = 1"):
        check_upcycle_recipe(load_recipe("tiny-upcycle-distill", ["model.patch_size=2"]), True)


def test_an_image_folder_and_its_pixel_shards_train_and_sample_through_the_cli(image_folder, tmp_path):
    """`dcdit train` on the folder itself and on `dcdit extract --pixels` shards of it; `dcdit sample` writes
    pixels with no VAE anywhere (the tiny recipe's 8×8 RGB model, 2 classes)."""
    sets = sum((["--set", o] for o in ("data.kind=images", "data.image_size=8", "data.num_classes=2",
                                        "model.num_classes=2", "train.max_steps=2")), [])
    _dcdit("train", "--recipe", "tiny", *sets, "--set", f"data.path={image_folder}", "--out", "runs/folder", cwd=tmp_path)
    _dcdit("extract", "--data-path", str(image_folder), "--out", "px", "--pixels", "--image-size", "8", "--flip", "none",
           cwd=tmp_path)
    assert json.loads((tmp_path / "px/index.json").read_text())["format"] == "dcdit-pixels-v1"
    _dcdit("train", "--recipe", "tiny", *sets, "--set", "data.path=px", "--out", "runs/shards", cwd=tmp_path)
    _dcdit("sample", "--ckpt", "runs/shards", "--num", "2", "--steps", "2", "--out", "grid.png", cwd=tmp_path)
    assert Image.open(tmp_path / "grid.png").size[0] >= 16


@pytest.mark.skipif(__import__("importlib").util.find_spec("skimage") is None, reason="needs the photos extra")
def test_pixel_patch_benchmark_runs(tmp_path):
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "benchmarks/pixel_patch.py"), "--steps", "1", "--batch", "2"],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    for row in ("P = 4, 64×64 px: model only, forced", "P = 1, 16×16 px: forced M = L/N"):
        assert row in proc.stdout


def test_memory_model_counts_the_patch_grid():
    """`dcdit flops --memory` at P > 1: the router's grid is (input_size / P)², and the fitted model stays
    within 15% of the measured peak of a P = 4 model on 64×64 pixels (16×16 tokens)."""
    import dataclasses

    from dcdit_cli.config.recipe import load_recipe
    from dcdit_cli.training import memory

    base = dataclasses.replace(load_recipe("tiny").model, hidden_size=80, scaffold_width=20, depth=2, num_heads=4,
                               norm_groups=4)
    p4, p1 = dataclasses.replace(base, input_size=64, patch_size=4), dataclasses.replace(base, input_size=16)
    assert memory.grid_tokens(p4) == memory.grid_tokens(p1) == 256 and memory.kept_tokens(p4) == 64
    measured = memory.measure_peak_bytes(p4, 2, "no", False)
    predicted = memory.predict_peak_bytes(p4, 2, "no", False, scores=True)
    assert abs(predicted / measured - 1) < 0.15, (predicted, measured)


def test_diffusers_pipeline_returns_boundaries_on_the_patch_grid():
    from dcdit_cli.config.recipe import load_recipe
    from dcdit_cli.diffusion.schedulers import make_scheduler
    from dcdit_cli.pipelines import DCDiTPipeline, DCDiTTransformer2DModel

    recipe = load_recipe("tiny", ["model.patch_size=2"])
    pipe = DCDiTPipeline(DCDiTTransformer2DModel(recipe=recipe.to_dict()), make_scheduler("ddpm", 1000))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(class_labels=[1, 2], num_inference_steps=2, output_type="pt", return_boundaries=True,
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (2, 3, 8, 8) and out.boundaries.shape == (2, 2, 4, 4)  # (steps, B, 8/2, 8/2)
