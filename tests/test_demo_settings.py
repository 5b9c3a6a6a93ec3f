"""benchmarks/demo_settings.py: its shapes variants draw what they say, and leave the shipped set alone."""

import sys
from pathlib import Path
from unittest import mock

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import demo_settings  # noqa: E402
import shape_classifier  # noqa: E402

from dcdit_cli.data.datasets import ShapesDataset  # noqa: E402


def _batch(variant: str, n: int = 64):
    with mock.patch.object(ShapesDataset, "_params", demo_settings.drawn(demo_settings.VARIANTS[variant])):
        return ShapesDataset(16, 6, seed=3).batch(torch.arange(n))


def test_the_default_variant_is_the_shipped_set():
    x, y, m = _batch("default")
    x0, y0, m0 = ShapesDataset(16, 6, seed=3).batch(torch.arange(64))
    assert torch.equal(x, x0) and torch.equal(y, y0) and torch.equal(m, m0)


def test_mono_flat_shapes_are_grey_and_flat_filled():
    x, y, m = _batch("mono-flat")
    assert torch.equal(y, ShapesDataset(16, 6, seed=3).batch(torch.arange(64))[1])  # same classes, same order
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])  # grey everywhere
    inside, fill = x[:, 0][m], torch.tensor(0.85 * 2 - 1)
    assert torch.isclose(inside, fill).float().mean() > 0.5 and inside.max() <= fill + 1e-6  # one flat fill; edges blend


def test_centred_variants_keep_the_shape_near_the_middle_and_unrotated():
    _, _, m = _batch("mono-centred")
    ys, xs = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    area = m.sum(dim=(1, 2)).float()
    cy, cx = (m * ys).sum(dim=(1, 2)) / area, (m * xs).sum(dim=(1, 2)) / area
    # jitter 0.1 of the side = 1.6 px (+ half a pixel of rasterising); unrotated mirror-symmetric shapes
    # have their centroid on the centre's column, the triangle's sits up to ~1.3 px below its box centre
    assert (cx - 7.5).abs().max() < 2.2 and (cy - 7.5).abs().max() < 3.2
    _, _, m_default = _batch("default")
    spread = lambda masks: ((masks * xs).sum(dim=(1, 2)) / masks.sum(dim=(1, 2))).std()  # noqa: E731
    assert spread(m) < 0.5 * spread(m_default)


def test_the_classifier_is_cached_where_it_is_told(tmp_path):
    model, acc = shape_classifier.trained_classifier(8, 2, steps=2, batch=8, cache=tmp_path)
    assert (tmp_path / "shape-classifier-8-2-robust.safetensors").is_file() and 0.0 <= acc <= 1.0
    again, acc_again = shape_classifier.trained_classifier(8, 2, steps=2, batch=8, cache=tmp_path)
    assert acc_again == acc and all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_denoising_real_shapes_reports_each_start_at_its_sampled_step(tmp_path):
    """--from-real: each t0 is taken to the nearest step of the spaced sampler and reported as that step's t,
    for each of the three readings (one-step x_0, DDPM chain, DDIM chain)."""
    from dcdit_cli.config.recipe import load_recipe
    from dcdit_cli.training.loop import train

    train(load_recipe("tiny", ["train.max_steps=2"]), tmp_path / "run")
    shape_classifier.trained_classifier(8, 6, steps=2, batch=8, cache=tmp_path)  # cached: not retrained below
    r = shape_classifier.denoised_recognition(tmp_path / "run", starts=(0, 500, 999), num=6, steps=10, cache=tmp_path,
                                              grid=tmp_path / "rows.png")
    # 10 steps over 1000: t = 0, 111, …, 999; 500 is nearest to 555 (55 away; 444 is 56)
    readings = ("one_step_from_t0", "recognised_from_t0", "ddim_from_t0")
    assert all(list(r[name]) == [0, 555, 999] for name in readings)
    assert all(0.0 <= a <= 1.0 for name in readings for a in r[name].values())
    # From t = 0 (the last spaced step) DDPM adds no noise and DDIM's step is the same x_0 prediction:
    # all three readings see the same image.
    assert r["one_step_from_t0"][0] == r["recognised_from_t0"][0] == r["ddim_from_t0"][0]
    # the grid: 6 shapes across; the real row, then x_t, one-step, DDPM, DDIM for each of the 3 starts
    # (8-pixel images, 2-pixel gaps, upscaled ×32 by save_grid)
    assert Image.open(tmp_path / "rows.png").size == (32 * (6 * 10 + 2), 32 * ((1 + 3 * 4) * 10 + 2))


def test_the_robust_classifiers_training_view_blurs_and_noises_each_image_by_its_own_amount():
    x, _, _ = ShapesDataset(16, 6, seed=3).batch(torch.arange(4))
    same = shape_classifier.blurred(x, torch.zeros(4))
    assert torch.allclose(same, x, atol=1e-6)  # σ = 0 leaves the image alone
    flat = shape_classifier.blurred(torch.full((2, 3, 16, 16), 0.3), torch.tensor([0.5, 1.0]))
    assert torch.allclose(flat, torch.full_like(flat, 0.3))  # a normalised kernel, edges replicated
    soft = shape_classifier.blurred(x, torch.tensor([0.0, 1.0, 0.0, 1.0]))
    edges = lambda a: (a[..., 1:] - a[..., :-1]).abs().mean(dim=(1, 2, 3))  # noqa: E731
    assert torch.allclose(soft[[0, 2]], x[[0, 2]], atol=1e-6) and (edges(soft[[1, 3]]) < 0.8 * edges(x[[1, 3]])).all()
    noisy = shape_classifier.degraded(x, torch.Generator().manual_seed(0))
    assert noisy.min() >= -1 and noisy.max() <= 1 and not torch.equal(noisy, x)


def test_the_fixed_variant_trains_the_shipped_fixed_set_and_the_others_the_varied_one():
    assert demo_settings.variant_recipe("fixed", "toy", []).data.shapes == "fixed"
    assert demo_settings.variant_recipe("mono-centred", "demo", ["train.lr=0.001"]).data.shapes == "varied"
    x, y, m = _batch("fixed-colours", 96)  # the fixed layout in the varied set's colours
    for c in range(6):
        masks = m[y == c]
        assert len(masks) > 1 and bool((masks == masks[0]).all())
    assert x[:, 0][m].std() > 0.2  # colours vary


def test_noise_error_is_the_noise_variance_for_a_model_that_predicts_zero(tmp_path):
    """`noise_error`: a model two steps from DiT's init (zeroed output layer) predicts ε ≈ 0, so its
    ε-MSE is E[ε²] ≈ 1 at every t, with the router's boundaries and with every token kept; a DiT has
    no boundaries to force."""
    from dcdit_cli.config.recipe import load_recipe
    from dcdit_cli.training.loop import train

    train(load_recipe("tiny", ["train.max_steps=2"]), tmp_path / "dcdit")
    r = shape_classifier.noise_error(tmp_path / "dcdit", ts=(10, 500), num=16)
    assert set(r["eps_mse"]) == {"router", "all_kept"}
    for by_t in r["eps_mse"].values():
        assert list(by_t) == [10, 500] and all(0.85 < e < 1.15 for e in by_t.values())
    train(load_recipe("toy-dit", ["train.max_steps=1", "train.global_batch=4"]), tmp_path / "dit")
    assert set(shape_classifier.noise_error(tmp_path / "dit", ts=(10,), num=4)["eps_mse"]) == {"router"}


def test_a_missing_or_foreign_checkpoint_or_unknown_recipe_is_one_line_and_exit_2_before_any_work(tmp_path):
    import subprocess

    from safetensors.torch import save_file

    script = Path(demo_settings.__file__)
    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))  # not dcdit weights: no recipe inside
    for args, named in ((["--ckpt", str(tmp_path / "nope")], "nope does not exist"), (["--recipe", "no-such"], "unknown recipe"),
                        (["--ckpt", str(tmp_path / "foreign.safetensors")], "has no dcdit recipe")):
        out = subprocess.run([sys.executable, str(script), *args, "--json", str(tmp_path / "rows.jsonl")],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and named in out.stderr.splitlines()[-1]
        assert not (tmp_path / "rows.jsonl").exists()
