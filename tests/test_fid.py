"""dcdit_cli.evaluation.fid: the ADM-evaluator metrics, the readers and the whole pipeline with a
randomly initialised Inception (the real weights are not on this machine)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

from dcdit_cli.common.console import DcditError
from dcdit_cli.data.imaging import center_crop_arr
from dcdit_cli.evaluation import fid
from dcdit_cli.evaluation.inception import INCEPTION_WEIGHTS_ENV, INCEPTION_WEIGHTS_URL, load_inception, resolve_inception_weights
from dcdit_cli.evaluation import precision_recall as pr

# ------------------------------------------------------------------ Fréchet distance


def _random_cov(rng, d):
    a = rng.normal(size=(d, 2 * d))
    return a @ a.T / (2 * d)


def test_frechet_identical_stats_is_zero():
    rng = np.random.default_rng(0)
    mu, sigma = rng.normal(size=6), _random_cov(rng, 6)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_frechet_diagonal_gaussians_match_closed_form():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = rng.uniform(0.1, 3, size=5), rng.uniform(0.1, 3, size=5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-9)


def test_frechet_retries_with_offset_when_sqrtm_is_not_finite(monkeypatch):
    real_sqrtm, calls = fid.scipy.linalg.sqrtm, []

    def flaky_sqrtm(a):
        calls.append(a.copy())
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(fid.scipy.linalg, "sqrtm", flaky_sqrtm)
    s1, s2 = np.diag([1.0, 0.0, 2.0]), np.diag([0.0, 1.0, 2.0])  # singular
    value = fid.frechet_distance(np.zeros(3), s1, np.zeros(3), s2)
    assert len(calls) == 2
    eps = 1e-6
    np.testing.assert_allclose(calls[1], (s1 + eps * np.eye(3)) @ (s2 + eps * np.eye(3)))
    expected = np.sum(np.diag(s1) + np.diag(s2) - 2 * np.sqrt((np.diag(s1) + eps) * (np.diag(s2) + eps)))
    assert value == pytest.approx(expected, abs=1e-5)


def test_frechet_imaginary_part(monkeypatch):
    s = np.eye(3)
    monkeypatch.setattr(fid.scipy.linalg, "sqrtm", lambda a: np.eye(3) + 1e-5j * np.eye(3))
    assert fid.frechet_distance(np.zeros(3), s, np.zeros(3), s) == pytest.approx(0.0, abs=1e-9)
    monkeypatch.setattr(fid.scipy.linalg, "sqrtm", lambda a: np.eye(3) + 0.1j * np.eye(3))
    with pytest.raises(DcditError, match="imaginary"):
        fid.frechet_distance(np.zeros(3), s, np.zeros(3), s)


def test_frechet_shape_mismatch():
    with pytest.raises(DcditError, match="do not match"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_running_stats_match_np_cov():
    x = np.random.default_rng(2).normal(size=(37, 5))
    stats = fid.RunningStats(5)
    for i in range(0, 37, 10):
        stats.update(x[i : i + 10])
    mu, sigma = stats.result()
    np.testing.assert_allclose(mu, x.mean(0), atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), atol=1e-12)


# ------------------------------------------------------------------ Inception Score


def test_inception_score_uniform_is_one():
    assert fid.inception_score(np.zeros((40, 1008))) == pytest.approx(1.0)  # logits
    assert fid.inception_score(np.full((40, 10), 0.1)) == pytest.approx(1.0)  # probabilities


def test_inception_score_one_hot_over_k_classes_is_k():
    k = 4
    probs = np.eye(10)[np.arange(40) % k]  # every split of 4 holds each class once
    assert fid.inception_score(probs, split_size=4) == pytest.approx(k)
    assert fid.inception_score(probs, split_size=40) == pytest.approx(k)
    logits = np.where(probs > 0, 50.0, -50.0)  # near one-hot after the softmax
    assert fid.inception_score(logits, split_size=4) == pytest.approx(k, rel=1e-6)


def test_inception_score_uses_adm_contiguous_chunks_of_5000():
    """N = 10,000: ADM scores two chunks of 5,000 (3.0); ten equal splits of 1,000 give 2.6."""
    eye = np.eye(8)
    first = eye[np.repeat([0, 1], 2500)]  # 2,500 × class 0 then 2,500 × class 1: chunk IS 2
    second = eye[np.arange(5000) % 4]  # classes 0..3 cycling: chunk IS 4
    probs = np.concatenate([first, second])
    assert fid.inception_score(probs) == pytest.approx((2 + 4) / 2)
    # the old rule (10 equal splits = chunks of 1,000): splits of one class score 1, the one
    # across the switch at 2,500 scores 2
    assert fid.inception_score(probs, split_size=1000) == pytest.approx((1 + 1 + 2 + 1 + 1 + 5 * 4) / 10)
    # N = 12,000: chunks 5,000 / 5,000 / 2,000, the last one shorter, as ADM
    third = eye[np.arange(2000) % 8]
    assert fid.inception_score(np.concatenate([probs, third])) == pytest.approx((2 + 4 + 8) / 3)


# ------------------------------------------------------------------ precision / recall


def test_precision_recall_identical_clouds():
    x = np.random.default_rng(3).normal(size=(60, 8))
    assert fid.precision_recall(x, x.copy(), k=3, device="cpu") == (1.0, 1.0)


def test_precision_recall_disjoint_clouds():
    x = np.random.default_rng(4).normal(size=(60, 8))
    assert fid.precision_recall(x, x + 1000.0, k=3, device="cpu") == (0.0, 0.0)


def test_precision_recall_fake_inside_part_of_real():
    real = np.random.default_rng(5).normal(size=(300, 2))
    fake = real[real[:, 0] < -0.5]  # one corner of the real cloud: every fake is realistic
    precision, recall = fid.precision_recall(real, fake, k=3, device="cpu")
    assert precision == 1.0
    assert recall < 0.6


def test_precision_recall_fp16_rounding_flips_a_neighbour():
    """ADM's default distances are float16: a fake that lies inside a real ball falls outside.

    Real 69.25 has radius² 20.25 (its 3rd neighbour is 64.75); fake 73.5 is at distance²
    18.0625 from it, so it is inside. In float16 (spacing 4 between 4096 and 8192):
    ‖u‖² = 4795.5625 → 4796, ‖v‖² = 5402.25 → 5404, u·v = 5089.875 → 5088, so
    d² = (4796 − 10176) + 5404 = 24, while the radius² becomes 20: outside, precision 3/4.
    """
    real = np.array([62.25, 64.75, 68.0, 68.25, 69.25])[:, None]
    fake = np.array([60.25, 63.75, 65.75, 73.5])[:, None]
    assert fid.precision_recall(real, fake, device="cpu", distances="float64") == (1.0, 1.0)
    assert fid.precision_recall(real, fake, device="cpu", distances="float32") == (1.0, 1.0)
    assert fid.precision_recall(real, fake, device="cpu") == (0.75, 1.0)  # distances="adm"
    radii = pr.manifold_radii(torch.tensor(real, dtype=torch.float32), 3, "adm")
    assert radii[-1] == 20.0


def test_adm_falls_back_to_float32_per_block():
    """A block whose float16 distances overflow (300² > 65504) is recomputed in float32; the
    other blocks keep float16 (the radius² of 64 and 67 is 8 there, not 9)."""
    x = torch.tensor([64.0, 65.0, 66.0, 67.0, 300.0, 301.0, 302.0, 303.0])[:, None]
    exact = [9.0, 4.0, 4.0, 9.0, 9.0, 4.0, 4.0, 9.0]
    assert pr.manifold_radii(x, 3, "adm", block=4).tolist() == [8.0, 4.0, 4.0, 8.0, 9.0, 4.0, 4.0, 9.0]
    assert pr.manifold_radii(x, 3, "adm", block=8).tolist() == exact  # one block, it overflows
    assert pr.manifold_radii(x, 3, "float32", block=4).tolist() == exact
    assert pr.manifold_radii(x.double(), 3, "float64", block=3).tolist() == exact


def test_fp16_distance_where_two_u_dot_v_overflows_is_zero_as_in_tensorflow():
    """ADM computes ‖u‖² − 2·(u·v) + ‖v‖² in float16: u·v = 36100 is finite but 2·u·v overflows to
    inf, so the distance is max(−inf, 0) = 0, finite, and the float16 block is kept."""
    u, v = torch.tensor([[190.0, 0.0]]), torch.tensor([[190.0, 50.0]])
    assert pr._sq_dists(u, pr._side(v, True), half=True).item() == 0.0
    assert pr._sq_dists(u, pr._side(v, False), half=False).item() == 2500.0


def test_evaluate_checks_the_distance_option_before_reading_anything(tmp_path):
    with pytest.raises(DcditError, match="--pr-distances 'half'"):
        fid.evaluate(tmp_path / "missing.npz", tmp_path / "missing-ref.npz", distances="half")


def test_precision_recall_blocks_match_one_block(monkeypatch):
    """Slicing blocks into rows changes nothing: tiny slices give the same answer as whole blocks."""
    rng = np.random.default_rng(7)
    real, fake = rng.normal(size=(70, 16)), rng.normal(0.3, 1.0, size=(50, 16))
    whole = fid.precision_recall(real, fake, device="cpu")
    monkeypatch.setattr(pr, "_SLICE_VALUES", 40)
    assert fid.precision_recall(real, fake, device="cpu") == whole
    assert 0.0 < whole[0] < 1.0 and 0.0 < whole[1] < 1.0


def test_precision_recall_rejects_unknown_precision():
    with pytest.raises(DcditError, match="adm, float32, float64"):
        fid.precision_recall(np.zeros((5, 2)), np.zeros((5, 2)), distances="half")


def test_precision_recall_needs_more_than_k_points():
    with pytest.raises(DcditError, match="more than 3"):
        fid.precision_recall(np.zeros((3, 4)), np.zeros((10, 4)), k=3, device="cpu")


# ------------------------------------------------------------------ readers and cropping


def _images(rng, n, size=64, scale=1.0, offset=0.0):
    """Smooth random uint8 (n, size, size, 3) images: 8×8 colour blocks."""
    x = offset + scale * rng.random((n, size // 8, size // 8, 3))
    x = np.kron(x, np.ones((1, 8, 8, 1)))
    return (x * 255).clip(0, 255).astype(np.uint8)


def test_center_crop_arr_adm():
    rng = np.random.default_rng(6)
    image = Image.fromarray(rng.integers(0, 256, size=(300, 600, 3), dtype=np.uint8))  # W 600, H 300
    out = center_crop_arr(image, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    gray = Image.new("L", (100, 80), color=77)
    np.testing.assert_array_equal(center_crop_arr(gray, 32), np.full((32, 32, 3), 77, np.uint8))
    exact = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(center_crop_arr(Image.fromarray(exact), 32), exact)


def test_npz_samples_stream_in_batches(tmp_path):
    x = _images(np.random.default_rng(7), 11, size=16)
    np.savez(tmp_path / "s.npz", arr_0=x)
    samples = fid.load_samples(tmp_path / "s.npz")
    assert samples.num == 11
    np.testing.assert_array_equal(np.concatenate(list(samples.batches(4))), x)
    np.testing.assert_array_equal(np.concatenate(list(samples.batches(4, limit=6))), x[:6])
    np.savez_compressed(tmp_path / "c.npz", arr_0=x)
    np.testing.assert_array_equal(np.concatenate(list(fid.load_samples(tmp_path / "c.npz").batches(5))), x)


def test_load_samples_errors(tmp_path):
    with pytest.raises(DcditError, match="not found"):
        fid.load_samples(tmp_path / "missing.npz")
    np.savez(tmp_path / "no_arr0.npz", images=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(DcditError, match="no arr_0"):
        fid.load_samples(tmp_path / "no_arr0.npz")
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(DcditError, match="uint8"):
        fid.load_samples(tmp_path / "float.npz")
    np.savez(tmp_path / "nchw.npz", arr_0=np.zeros((2, 3, 8, 8), np.uint8))
    with pytest.raises(DcditError, match="channels-first"):
        fid.load_samples(tmp_path / "nchw.npz")
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(DcditError, match="not a readable .npz"):
        fid.load_samples(tmp_path / "text.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DcditError, match="no images"):
        fid.load_samples(tmp_path / "empty")


def test_folder_samples_skip_corrupt_and_reject_mixed_sizes(tmp_path):
    x = _images(np.random.default_rng(8), 3, size=16)
    for i, img in enumerate(x):
        Image.fromarray(img).save(tmp_path / f"{i}.png")
    (tmp_path / "1b.png").write_bytes(b"not a png")
    samples = fid.load_samples(tmp_path)
    np.testing.assert_array_equal(np.concatenate(list(samples.batches(2))), x)
    assert [p.name for p in samples.skipped] == ["1b.png"]
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "9.png")
    with pytest.raises(DcditError, match="share one size"):
        list(fid.load_samples(tmp_path).batches(8))


def test_load_reference_errors(tmp_path):
    with pytest.raises(DcditError, match="reference batch not found"):
        fid.load_reference(tmp_path / "ref.npz")
    np.savez(tmp_path / "junk.npz", foo=np.zeros(3))
    with pytest.raises(DcditError, match="neither arr_0 nor"):
        fid.load_reference(tmp_path / "junk.npz")
    np.savez(tmp_path / "half.npz", mu=np.zeros(2048))
    with pytest.raises(DcditError, match="only one of"):
        fid.load_reference(tmp_path / "half.npz")


def test_compute_activations_rejects_bad_batches():
    with pytest.raises(DcditError, match="uint8"):
        fid.compute_activations(np.zeros((2, 8, 8, 3), np.float32), extractor=None)


def test_evaluate_refuses_more_samples_than_stored(tmp_path, monkeypatch):
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    np.savez(tmp_path / "r.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(DcditError, match="asked for 10 samples"):
        fid.evaluate(tmp_path / "s.npz", tmp_path / "r.npz", num=10)  # before any weights are needed


def test_missing_inception_weights(tmp_path, monkeypatch):
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    with pytest.raises(DcditError) as err:
        load_inception(None)
    message = str(err.value)
    assert INCEPTION_WEIGHTS_URL in message and "--inception-weights" in message and INCEPTION_WEIGHTS_ENV in message
    with pytest.raises(DcditError, match="not found"):
        load_inception(tmp_path / "nope.pth")
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(weights))
    assert resolve_inception_weights() == weights
    with pytest.raises(DcditError, match="cannot read"):
        load_inception()
    torch.save({"fc.weight": torch.zeros(2, 2)}, weights)
    with pytest.raises(DcditError, match="not torch-fidelity's Inception"):
        load_inception(weights, device="cpu")


# ------------------------------------------------------------------ the whole pipeline


@pytest.fixture(scope="module")
def inception(inception_weights):
    return load_inception(inception_weights, device="cpu")


@pytest.fixture
def fast_sqrtm(monkeypatch):
    """scipy's sqrtm of a 2048² matrix takes ~10 s on this 2-core machine. Where a test needs
    only the value, use a matrix with the same trace, diag(√λ(σ1σ2)); sqrtm itself is covered
    by the Fréchet tests and by test_evaluate_same_set."""
    monkeypatch.setattr(fid.scipy.linalg, "sqrtm", lambda a: np.diag(np.sqrt(np.linalg.eigvals(a).astype(complex))))


IMAGES_A = _images(np.random.default_rng(10), 16)
IMAGES_B = _images(np.random.default_rng(11), 16, scale=0.3, offset=0.6)  # brighter, flatter


def test_inception_features_shapes(inception):
    feats = inception(IMAGES_A[:2])
    assert feats["pool"].shape == (2, 2048) and feats["logits"].shape == (2, 1008) and feats["spatial"].shape == (2, 2023)
    assert feats["pool"].std() > 0 and feats["spatial"].std() > 0


def test_evaluate_same_set(tmp_path, inception):
    np.savez(tmp_path / "samples.npz", arr_0=IMAGES_A)
    np.savez(tmp_path / "ref.npz", arr_0=IMAGES_A)  # no stats: computed from arr_0
    results = fid.evaluate(tmp_path / "samples.npz", tmp_path / "ref.npz", extractor=inception, batch_size=8)
    assert abs(results["fid"]) < 1e-3 and abs(results["sfid"]) < 1e-3
    assert results["precision"] == 1.0 and results["recall"] == 1.0
    assert np.isfinite(results["inception_score"]) and results["inception_score"] >= 1.0
    assert results["num_samples"] == 16 and results["num_ref"] == 16
    console = Console(record=True, width=100)
    console.print(fid.report_table(results))
    text = console.export_text()
    assert "FID" in text and "Recall" in text and "1.0000" in text


def test_make_reference_then_evaluate_another_distribution(tmp_path, inception, fast_sqrtm):
    images = tmp_path / "real"
    (images / "sub").mkdir(parents=True)
    for i, img in enumerate(IMAGES_A):
        Image.fromarray(img).save(images / ("sub" if i % 2 else ".") / f"{i:02d}.png")
    (images / "broken.png").write_bytes(b"\x89PNG truncated")
    summary = fid.make_reference(images, tmp_path / "ref.npz", image_size=64, extractor=inception, batch_size=8)
    assert summary["num_images"] == 16 and summary["num_stored"] == 16 and summary["skipped"] == 1

    ref = fid.load_reference(tmp_path / "ref.npz")
    assert ref.has_stats and ref.images.num == 16
    assert ref.mu.shape == (2048,) and ref.sigma.shape == (2048, 2048) and ref.mu_s.shape == (2023,)
    stored = np.concatenate(list(ref.images.batches(16)))  # the crops of 64² images are the images
    assert sorted(map(bytes, stored)) == sorted(map(bytes, IMAGES_A))

    np.savez(tmp_path / "samples.npz", arr_0=IMAGES_B)
    results = fid.evaluate(tmp_path / "samples.npz", ref, extractor=inception, batch_size=8, num=12)
    assert results["num_samples"] == 12 and results["num_ref"] == 16
    assert results["fid"] > 1.0 and results["sfid"] > 0.01
    assert results["precision"] < 1.0 and results["recall"] < 1.0


def test_make_reference_keeps_images_spread_over_the_sorted_files(tmp_path):
    """arr_0 samples every class folder of a class-sorted tree, not its first folders (KID and
    precision / recall compare with it)."""
    for c in range(3):
        (tmp_path / "real" / f"class{c}").mkdir(parents=True)
        for i in range(10):
            Image.fromarray(np.full((8, 8, 3), 10 * c + i, np.uint8)).save(tmp_path / "real" / f"class{c}" / f"{i}.png")

    def fake_inception(batch):  # the statistics do not matter here
        n = len(batch)
        return {"pool": np.ones((n, 2048), np.float32) * batch[:, :1, 0, 0], "logits": np.zeros((n, 1008), np.float32),
                "spatial": np.ones((n, 2023), np.float32) * batch[:, :1, 0, 0]}

    summary = fid.make_reference(tmp_path / "real", tmp_path / "ref.npz", image_size=8, extractor=fake_inception,
                                 keep_images=6, batch_size=4)
    assert summary["num_images"] == 30 and summary["num_stored"] == 6
    stored = np.load(tmp_path / "ref.npz")["arr_0"][:, 0, 0, 0].tolist()
    assert stored == [0, 6, 12, 17, 23, 29]  # files 0, 6, 12, 17, 23 and 29 of 30: all three classes
