"""FD-DINOv2 and KID: dgm-eval's DINOv2 protocol checked against a computation written here
(PIL resize, numpy normalisation, a plain-torch ViT forward, numpy bicubic weights), torch-fidelity's
KID against a numpy MMD, the weights lookup, and `dcdit fid` with both metrics. A tiny random ViT
of DINOv2's layout stands in for ViT-L/14 (the real weights are not on this machine)."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console
from safetensors.torch import save_file

from conftest import random_dinov2_state_dict
from dcdit_cli.common.console import DcditError
from dcdit_cli.evaluation import dinov2 as dv
from dcdit_cli.evaluation import fid
from dcdit_cli.evaluation.inception import load_inception
from dcdit_cli.evaluation.metrics import parse_metrics

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])  # ImageNet's, as dgm-eval


def _images(seed: int, n: int, size: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def tiny(dinov2_weights):
    return dv.load_dinov2(dinov2_weights, device="cpu")


# ------------------------------------------------------------------ the protocol, step by step


def _pil_normalised(images: np.ndarray) -> np.ndarray:
    """dgm-eval's transform written out: PIL bicubic to 224 × 224, /255, ImageNet mean / std."""
    out = np.stack([np.asarray(Image.fromarray(im).resize((224, 224), Image.BICUBIC)) for im in images])
    return ((out / 255.0 - MEAN) / STD).transpose(0, 3, 1, 2)  # (N, 3, 224, 224)


@pytest.mark.parametrize("size", [256, 64, 8])
def test_preprocess_is_pil_bicubic_to_224_and_imagenet_normalisation(tiny, size):
    images = _images(size, 3, size)
    got = tiny.preprocess(images).numpy()
    want = _pil_normalised(images)
    assert got.shape == (3, 3, 224, 224)
    diff = np.abs(got - want) * STD[None, :, None, None] * 255  # in grey levels
    assert diff.max() <= 2.01 and (diff > 0.01).mean() < 0.01  # PIL's fixed-point rounding, nothing more
    # the same check fails for what the protocol is not: bilinear, no two-pass rounding, no normalisation
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    bilinear = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", antialias=True).numpy() / 255
    assert (np.abs((bilinear - MEAN[None, :, None, None]) / STD[None, :, None, None] - want) * 255 * STD[None, :, None, None]).max() > 5
    unnormalised = got * STD[None, :, None, None] + MEAN[None, :, None, None]
    assert np.abs(unnormalised - want).max() > 0.5


def _bicubic_matrix(m: int, n: int, scale_factor: float) -> np.ndarray:
    """(n, m) weights of PyTorch's non-antialiased bicubic (Keys, a = −0.75, align_corners False,
    border taps clamped) when a scale factor, not a size, is given: source = (i + 0.5) / s − 0.5."""
    def keys(t):
        t, a = abs(t), -0.75
        return ((a + 2) * t - (a + 3)) * t * t + 1 if t <= 1 else (((t - 5) * t + 8) * t - 4) * a if t < 2 else 0.0

    w = np.zeros((n, m))
    for i in range(n):
        src = (i + 0.5) / scale_factor - 0.5
        x0 = math.floor(src)
        for tap in range(x0 - 1, x0 + 3):
            w[i, min(max(tap, 0), m - 1)] += keys(src - tap)
    return w


def test_position_embeddings_are_resized_as_the_hub_model_does():
    pos = torch.randn(1, 1 + 37 * 37, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = dv.resize_pos_embed(pos, 16)
    w = _bicubic_matrix(37, 16, 16.1 / 37)  # the hub: scale factor (16 + 0.1) / 37
    grid = pos[0, 1:].numpy().reshape(37, 37, 8)
    want = np.einsum("ia,jb,abc->ijc", w, w, grid).reshape(256, 8)
    assert got.shape == (1, 257, 8)
    np.testing.assert_allclose(got[0, 0].numpy(), pos[0, 0].numpy())  # the CLS position is kept
    np.testing.assert_allclose(got[0, 1:].numpy(), want, rtol=1e-5, atol=1e-5)  # float32, as the hub computes it
    w_size = _bicubic_matrix(37, 16, 16 / 37)  # what a plain size=(16, 16) resize would give
    assert np.abs(np.einsum("ia,jb,abc->ijc", w_size, w_size, grid).reshape(256, 8) - want).max() > 1e-2


def _reference_forward(state: dict, x: torch.Tensor) -> torch.Tensor:
    """DINOv2's forward written out from the weights: patches, CLS, positions, pre-norm blocks with
    layer scale, final LayerNorm; returns all tokens (N, 1 + 256, D)."""
    f = torch.nn.functional
    d = state["cls_token"].shape[-1]
    heads = d // 64
    ln = lambda t, p: f.layer_norm(t, (d,), state[p + ".weight"], state[p + ".bias"], eps=1e-6)  # noqa: E731
    t = f.conv2d(x, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=14).flatten(2).transpose(1, 2)
    t = torch.cat([state["cls_token"].expand(len(x), -1, -1), t], 1) + dv.resize_pos_embed(state["pos_embed"], 16)
    for i in range(len({k.split(".")[1] for k in state if k.startswith("blocks.")})):
        b = f"blocks.{i}."
        h = ln(t, b + "norm1")
        q, k, v = f.linear(h, state[b + "attn.qkv.weight"], state[b + "attn.qkv.bias"]).reshape(len(x), -1, 3, heads, 64).unbind(2)
        att = torch.softmax(torch.einsum("bqhc,bkhc->bhqk", q, k) / 8.0, dim=-1)
        h = torch.einsum("bhqk,bkhc->bqhc", att, v).reshape(len(x), -1, d)
        t = t + state[b + "ls1.gamma"] * f.linear(h, state[b + "attn.proj.weight"], state[b + "attn.proj.bias"])
        h = f.gelu(f.linear(ln(t, b + "norm2"), state[b + "mlp.fc1.weight"], state[b + "mlp.fc1.bias"]))
        t = t + state[b + "ls2.gamma"] * f.linear(h, state[b + "mlp.fc2.weight"], state[b + "mlp.fc2.bias"])
    return ln(t, "norm")


def test_feature_is_the_cls_token_after_the_final_norm(tiny):
    state = random_dinov2_state_dict()
    images = _images(5, 4, 256)
    got = tiny(images)
    assert got.shape == (4, 128) and got.dtype == np.float32
    with torch.no_grad():
        tokens = _reference_forward(state, tiny.preprocess(images))
        np.testing.assert_allclose(got, tokens[:, 0].numpy(), atol=2e-4, rtol=1e-4)
        assert np.abs(got - tokens[:, 1:].mean(1).numpy()).max() > 0.1  # not the mean patch token
        # end to end against the PIL-resized input: within what PIL's rounding moves
        pil = _reference_forward(state, torch.from_numpy(_pil_normalised(images)).float())[:, 0].numpy()
    assert np.abs(got - pil).max() < 0.05 * np.abs(pil).max()
    assert tiny.dim == 128 and not tiny.is_vit_l


# ------------------------------------------------------------------ weights


def test_weights_lookup_order_and_missing_weights_line(tmp_path, monkeypatch, dinov2_weights):
    def no_network(*args, **kwargs):
        raise AssertionError("the DINOv2 lookup tried the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)  # never downloaded: any connection fails the test
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.delenv(dv.DINOV2_WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(DcditError) as err:
        dv.resolve_dinov2_weights()
    message = str(err.value)
    for words in ("--dinov2-weights", dv.DINOV2_WEIGHTS_ENV, dv.DINOV2_HF_REPO, dv.DINOV2_HUB_FILE, "HF_HUB_CACHE"):
        assert words in message
    # torch hub's checkpoint, then the HF cache (preferred), then the environment, then the argument
    hub = tmp_path / "torch" / "hub" / "checkpoints" / dv.DINOV2_HUB_FILE
    hub.parent.mkdir(parents=True)
    torch.save(random_dinov2_state_dict(), hub)
    assert dv.resolve_dinov2_weights() == hub
    repo = tmp_path / "hf" / "models--timm--vit_large_patch14_dinov2.lvd142m"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "model.safetensors").write_bytes(dinov2_weights.read_bytes())
    assert dv.resolve_dinov2_weights() == repo / "snapshots" / "abc123" / "model.safetensors"
    monkeypatch.setenv(dv.DINOV2_WEIGHTS_ENV, str(hub))
    assert dv.resolve_dinov2_weights() == hub
    assert dv.resolve_dinov2_weights(dinov2_weights) == dinov2_weights
    with pytest.raises(DcditError, match="DINOv2 weights not found"):
        dv.resolve_dinov2_weights(tmp_path / "nope.safetensors")
    # the hub layout (.pth, with mask_token) gives the same features as timm's .safetensors
    images = _images(3, 2, 32)
    np.testing.assert_allclose(dv.load_dinov2(hub, "cpu")(images), dv.load_dinov2(dinov2_weights, "cpu")(images), atol=1e-6)


def test_bad_weights_files_are_one_line(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(DcditError, match="cannot read DINOv2 weights"):
        dv.load_dinov2(tmp_path / "junk.safetensors")
    state = random_dinov2_state_dict()
    registers = {**state, "register_tokens": torch.zeros(1, 4, 128)}
    del registers["cls_token"]
    save_file(registers, tmp_path / "reg.safetensors")
    with pytest.raises(DcditError, match="registers"):
        dv.load_dinov2(tmp_path / "reg.safetensors")
    save_file({k: v for k, v in state.items() if k != "blocks.1.mlp.fc2.bias"}, tmp_path / "short.safetensors")
    with pytest.raises(DcditError, match="does not fit timm's vit_large_patch14_dinov2"):
        dv.load_dinov2(tmp_path / "short.safetensors")
    save_file({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.safetensors")
    with pytest.raises(DcditError, match="not a DINOv2 ViT"):
        dv.load_dinov2(tmp_path / "other.safetensors")


# ------------------------------------------------------------------ KID


def _kid_numpy(real: np.ndarray, fake: np.ndarray, subsets: int, size: int) -> np.ndarray:
    """Bińkowski et al.'s unbiased MMD² with k(x, y) = (x·y / d + 1)³ over random subsets drawn as
    torch-fidelity draws them (RandomState(2020), samples first, then reference)."""
    rng, d, out = np.random.RandomState(2020), real.shape[1], []
    k = lambda a, b: (a @ b.T / d + 1.0) ** 3  # noqa: E731
    for _ in range(subsets):
        x = fake[rng.choice(len(fake), size, replace=False)].astype(np.float64)
        y = real[rng.choice(len(real), size, replace=False)].astype(np.float64)
        kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
        out.append((kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (size * (size - 1)) - 2 * kxy.mean())
    return np.array(out)


def test_kid_is_torch_fidelitys_definition():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(60, 16)).astype(np.float32)
    fake = rng.normal(0.4, 1.2, size=(50, 16)).astype(np.float32)
    mean, std, size = fid.kernel_inception_distance(real, fake, subset_size=20)
    want = _kid_numpy(real, fake, 100, 20)
    assert size == 20
    assert mean == pytest.approx(want.mean(), rel=1e-4) and std == pytest.approx(want.std(), rel=1e-3)
    assert mean > 0.05
    same, _, _ = fid.kernel_inception_distance(real, rng.normal(size=(60, 16)).astype(np.float32), subset_size=20)
    assert abs(same) < 0.1 * mean  # unbiased: about 0 for two draws of one distribution
    # fewer rows than the subset size: the subset shrinks to the smaller set (torch-fidelity refuses)
    assert fid.kernel_inception_distance(real, fake)[2] == 50
    with pytest.raises(DcditError, match="at least 2"):
        fid.kernel_inception_distance(real, fake[:1])


def test_parse_metrics():
    assert parse_metrics(None) == ("fid", "sfid", "is", "pr")
    assert parse_metrics("kid, fd_dinov2") == ("fid", "fd_dinov2", "kid")  # FID always, table order
    assert parse_metrics("all") == ("fid", "sfid", "is", "pr", "fd_dinov2", "kid")
    with pytest.raises(DcditError, match="--metrics 'fid,fdd'"):
        parse_metrics("fid,fdd")


# ------------------------------------------------------------------ reference and `dcdit fid`


@pytest.fixture(scope="module")
def inception(inception_weights):
    return load_inception(inception_weights, device="cpu")


def _smooth(seed, n, size=32, scale=1.0, offset=0.0):
    x = offset + scale * np.random.default_rng(seed).random((n, size // 8, size // 8, 3))
    return (np.kron(x, np.ones((1, 8, 8, 1))) * 255).clip(0, 255).astype(np.uint8)


def test_make_reference_stores_dinov2_statistics_and_fd_dinov2_kid(tmp_path, inception, tiny, monkeypatch):
    monkeypatch.setattr(fid.scipy.linalg, "sqrtm", lambda a: np.diag(np.sqrt(np.linalg.eigvals(a).astype(complex))))
    real, other = _smooth(1, 8), _smooth(2, 8, scale=0.3, offset=0.6)
    (tmp_path / "real").mkdir()
    for i, im in enumerate(real):
        Image.fromarray(im).save(tmp_path / "real" / f"{i:02d}.png")
    summary = fid.make_reference(tmp_path / "real", tmp_path / "ref.npz", image_size=32, extractor=inception, dinov2=tiny,
                                 metrics=parse_metrics("all"), batch_size=4)
    assert summary["statistics"] == ["mu", "sigma", "mu_s", "sigma_s", "mu_dinov2", "sigma_dinov2"]
    ref = fid.load_reference(tmp_path / "ref.npz")
    feats = tiny(real)
    np.testing.assert_allclose(ref.mu_dinov2, feats.mean(0), atol=1e-5)
    np.testing.assert_allclose(ref.sigma_dinov2, np.cov(feats, rowvar=False), atol=1e-5)

    np.savez(tmp_path / "same.npz", arr_0=real)
    np.savez(tmp_path / "other.npz", arr_0=other)
    kw = dict(extractor=inception, dinov2=tiny, metrics=parse_metrics("fid,fd_dinov2,kid"), batch_size=8)
    same, far = fid.evaluate(tmp_path / "same.npz", ref, **kw), fid.evaluate(tmp_path / "other.npz", ref, **kw)
    assert abs(same["fd_dinov2"]) < 1e-3 and far["fd_dinov2"] > 0.1
    assert far["kid"] > same["kid"] and far["kid_subset_size"] == 8
    assert same["sfid"] is None and same["precision"] is None  # not asked
    want = _kid_numpy(inception(real)["pool"], inception(other)["pool"], 100, 8)
    assert far["kid"] == pytest.approx(want.mean(), rel=1e-3)  # KID on the Inception pool features
    console = Console(record=True, width=100)
    console.print(fid.report_table(far))
    text = console.export_text()
    assert "FD-DINOv2" in text and "KID subset size" in text and "sFID" not in text

    # a reference with Inception statistics but no DINOv2 ones: one line naming the fix, before any work
    np.savez(tmp_path / "old.npz", **{k: np.load(tmp_path / "ref.npz")[k] for k in ("arr_0", "mu", "sigma", "mu_s", "sigma_s")})
    with pytest.raises(DcditError, match="no DINOv2 ones.*--make-ref"):
        fid.evaluate(tmp_path / "other.npz", tmp_path / "old.npz", extractor=inception, metrics=parse_metrics("fd_dinov2"))
    # an images-only reference: DINOv2 statistics from arr_0, like the Inception ones
    np.savez(tmp_path / "images.npz", arr_0=real)
    assert abs(fid.evaluate(tmp_path / "same.npz", tmp_path / "images.npz", **kw)["fd_dinov2"]) < 1e-3


def test_fid_without_dinov2_weights_is_one_line_before_work(tmp_path, inception_weights):
    np.savez(tmp_path / "s.npz", arr_0=_smooth(1, 4))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_CACHE": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "t")}
    env.pop(dv.DINOV2_WEIGHTS_ENV, None)
    (tmp_path / "real").mkdir()
    Image.fromarray(_smooth(1, 1)[0]).save(tmp_path / "real" / "a.png")
    for args in (["--samples", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "s.npz")],
                 ["--make-ref", str(tmp_path / "real"), "--out", str(tmp_path / "out" / "ref.npz")]):
        proc = subprocess.run([sys.executable, "-m", "dcdit_cli", "fid", *args, "--metrics", "fid,fd_dinov2",
                               "--inception-weights", str(inception_weights)], capture_output=True, text=True, env=env)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert "no DINOv2 ViT-L/14 weights" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_reference_dinov2_statistics_are_checked_before_work(tmp_path, tiny):
    stats = {"mu": np.zeros(2048), "sigma": np.eye(2048), "mu_s": np.zeros(2023), "sigma_s": np.eye(2023)}
    np.savez(tmp_path / "r64.npz", **stats, mu_dinov2=np.zeros(64), sigma_dinov2=np.eye(64))
    ref = fid.load_reference(tmp_path / "r64.npz")
    assert ref.mu_dinov2.shape == (64,)
    with pytest.raises(DcditError, match="64-d DINOv2 statistics but .* gives 128-d"):
        fid.check_reference(ref, parse_metrics("fd_dinov2"), tiny)
    fid.check_reference(ref, parse_metrics("fid"), tiny)  # not asked: nothing to check
    np.savez(tmp_path / "bad.npz", **stats, mu_dinov2=np.zeros(64), sigma_dinov2=np.eye(32))
    with pytest.raises(DcditError, match="mu_dinov2 .* are not a mean and covariance of one width"):
        fid.load_reference(tmp_path / "bad.npz")
    with pytest.raises(DcditError, match="no arr_0 images, which KID compares"):
        fid.check_reference(ref, parse_metrics("kid"), None)
