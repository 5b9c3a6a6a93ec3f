"""dcdit models as diffusers models: the transformer's round trip, DiT in diffusers' class, the
pipeline against `dcdit sample`'s own sampler, pixel-space and latent."""

from __future__ import annotations

import pytest
import torch

from dcdit_cli.config.recipe import ModelConfig
from dcdit_cli.diffusion.schedulers import adm_timesteps, make_scheduler
from dcdit_cli.models.dit import DiT
from dcdit_cli.pipelines import DCDiTPipeline, DCDiTTransformer2DModel, to_diffusers_dit
from dcdit_cli.sampling.sampler import SampleOptions, image_seed, sample_batch


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Zero-initialised layers (adaLN-Zero, the final layer) make a fresh model's output constant:
    every weight is nudged so the outputs depend on the input, the step and the class."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.fixture
def transformer(tiny_recipe):
    return perturbed(DCDiTTransformer2DModel(recipe=tiny_recipe.to_dict(), step=12))


@pytest.mark.parametrize("kind", ["dcdit", "dit"])
def test_save_pretrained_round_trip_is_bit_for_bit(tiny_recipe, tmp_path, kind):
    recipe = tiny_recipe.replace(model={"kind": kind, "patch_size": 2})
    model = perturbed(DCDiTTransformer2DModel(recipe=recipe.to_dict(), step=12))
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    loaded = DCDiTTransformer2DModel.from_pretrained(tmp_path)
    assert type(loaded.model) is type(model.model) and loaded.config.step == 12 and loaded.recipe == recipe
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) and ours[k].dtype == theirs[k].dtype for k in ours)
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([5, 900]), torch.tensor([1, 6])
    with torch.no_grad():
        assert torch.equal(model(x, t, y, budget=0.2).sample, loaded(x, t, y, budget=0.2).sample)


def test_the_wrapped_module_is_the_one_dcdit_trains(tiny_recipe):
    from dcdit_cli.models import build_model

    model = DCDiTTransformer2DModel(recipe=tiny_recipe.to_dict())
    built = build_model(tiny_recipe.model)
    assert type(model.model) is type(built)
    assert {k: v.shape for k, v in model.model.state_dict().items()} == {k: v.shape for k, v in built.state_dict().items()}


def test_a_dit_baseline_loads_into_diffusers_dit_class():
    """The weights map one to one; outputs are equal once diffusers' timestep frequencies use DiT's
    denominator (downscale_freq_shift 0), and differ with diffusers' own (1), as docs/diffusers.md says."""
    dit = perturbed(DiT(ModelConfig(kind="dit", input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2,
                                    num_heads=2, num_classes=5)))
    theirs = to_diffusers_dit(dit)
    x, t, y = torch.randn(3, 3, 8, 8), torch.tensor([0, 300, 999]), torch.tensor([0, 4, 5])
    with torch.no_grad():
        ours = dit(x, t, y)[0]
        stock = theirs(x, timestep=t, class_labels=y).sample
        for block in theirs.transformer_blocks:
            block.norm1.emb.time_proj.downscale_freq_shift = 0
        aligned = theirs(x, timestep=t, class_labels=y).sample
    assert torch.allclose(ours, aligned, atol=1e-6)
    assert (ours - stock).abs().max() > 1e-3


def test_pipeline_ddpm_learned_range_equals_dcdit_sample(tiny_recipe, transformer):
    """DDPMScheduler(variance_type="learned_range") at ADM's 250 respaced timesteps, fed the same
    per-image noise, reproduces dcdit's ADM sampler with CFG and Lite-CFG budgets."""
    classes, seed = [1, 4, 2], 3
    opts = SampleOptions.from_recipe(tiny_recipe, steps=250, budget=0.2, uncond_budget=0.5, cfg_scale=2.0, seed=seed)
    x0, _, log = sample_batch(transformer.model, tiny_recipe, [0, 1, 2], opts, classes=classes)
    pipe = DCDiTPipeline(transformer, make_scheduler("ddpm", 1000, clip_sample=True))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(class_labels=classes, guidance_scale=2.0, num_inference_steps=250, budget=0.2, uncond_budget=0.5,
               generator=[torch.Generator().manual_seed(image_seed(seed, i)) for i in range(3)],
               output_type="latent", return_boundaries=True, timesteps=adm_timesteps(250), guided_channels=0)
    assert torch.allclose(out.images, x0, atol=1e-4), (out.images - x0).abs().max()
    assert (out.kept == log.as_array()).all()
    assert out.boundaries.shape == (250, 3, 8, 8) and out.boundaries.dtype == torch.bool
    assert torch.equal(out.boundaries.sum(dim=(2, 3)), torch.as_tensor(out.kept[..., 0]))


def test_pipeline_images_and_no_boundaries_by_default(transformer):
    pipe = DCDiTPipeline(transformer, make_scheduler("dpm-solver"))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(class_labels=[0, 5], num_inference_steps=4, budget=0.3, generator=torch.Generator().manual_seed(0))
    assert [im.size for im in out.images] == [(8, 8), (8, 8)] and out.boundaries is None and out.kept is None
    array = pipe(class_labels=[0], num_inference_steps=4, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert array.shape == (1, 8, 8, 3) and 0 <= array.min() and array.max() <= 1


def test_latent_pipeline_with_a_vae_saves_and_loads(tiny_recipe, vae_dir, tmp_path):
    from diffusers import AutoencoderKL

    recipe = tiny_recipe.replace(model={"in_channels": 4}, data={"kind": "latents", "path": "x"})
    transformer = perturbed(DCDiTTransformer2DModel(recipe=recipe.to_dict()))
    pipe = DCDiTPipeline(transformer, make_scheduler("dpm-solver"), vae=AutoencoderKL.from_pretrained(vae_dir))
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(class_labels=[2, 3], num_inference_steps=3, output_type="np", return_boundaries=True)
    images = pipe(generator=torch.Generator().manual_seed(1), **kwargs).images
    assert images.shape == (2, 16, 16, 3)  # 8×8 latents, ×2 VAE
    pipe.save_pretrained(tmp_path)
    assert {"transformer", "scheduler", "vae", "model_index.json"} <= {p.name for p in tmp_path.iterdir()}
    again = DCDiTPipeline.from_pretrained(tmp_path)
    again.set_progress_bar_config(disable=True)
    assert (again(generator=torch.Generator().manual_seed(1), **kwargs).images == images).all()


def test_pixel_pipeline_saves_without_a_vae(transformer, tmp_path):
    DCDiTPipeline(transformer, make_scheduler("euler")).save_pretrained(tmp_path)
    loaded = DCDiTPipeline.from_pretrained(tmp_path)
    assert loaded.vae is None and type(loaded.scheduler).__name__ == "EulerDiscreteScheduler"


def test_the_recipe_offers_every_scheduler():
    from dataclasses import fields

    from dcdit_cli.config.recipe import SampleConfig
    from dcdit_cli.diffusion.schedulers import METHODS

    method = next(f for f in fields(SampleConfig) if f.name == "method")
    assert tuple(method.metadata["choices"]) == METHODS


@pytest.mark.parametrize("method", ["dpm-solver", "unipc", "euler", "euler-a"])
def test_sample_batch_runs_diffusers_schedulers_on_the_same_noise(tiny_recipe, transformer, method):
    """`dcdit sample --scheduler NAME`: the images depend only on (seed, index), as with dcdit's own sampler."""
    opts = SampleOptions.from_recipe(tiny_recipe, steps=6, budget=0.2, cfg_scale=2.0, seed=1, method=method)
    batch, _, log = sample_batch(transformer.model, tiny_recipe, [0, 1, 2], opts)
    alone, _, _ = sample_batch(transformer.model, tiny_recipe, [2], opts)
    assert batch.shape == (3, 3, 8, 8) and torch.isfinite(batch).all() and log.as_array().shape == (6, 3, 2)
    assert (batch[2] - alone[0]).abs().max() < 5e-4


def test_the_scheduler_flag_reaches_every_sampling_command(tiny_recipe):
    import typer.main

    from dcdit_cli.cli import app

    for command in ("sample", "eval", "viz-boundaries"):
        click_command = typer.main.get_command(app).commands[command]
        assert any("--scheduler" in p.opts for p in click_command.params), command
    from dcdit_cli.common.console import DcditError

    with pytest.raises(DcditError, match="--scheduler"):
        SampleOptions.from_recipe(tiny_recipe, method="heun")


def test_diffusers_spacings_against_adm_respacing():
    """docs/reference.md#respacing-in-diffusers: only explicit timesteps are ADM's at every count."""
    from diffusers import DDPMScheduler

    def spaced(spacing: str, n: int) -> list[int]:
        scheduler = DDPMScheduler(timestep_spacing=spacing)
        scheduler.set_timesteps(n)
        return scheduler.timesteps.tolist()

    assert adm_timesteps(250)[:2] == [999, 995] and adm_timesteps(250)[-2:] == [4, 0]
    assert spaced("leading", 250) != adm_timesteps(250) and spaced("trailing", 250) != adm_timesteps(250)
    assert spaced("linspace", 250) == adm_timesteps(250)
    assert spaced("linspace", 21) != adm_timesteps(21)


@pytest.mark.parametrize("name", ["dpm-solver", "unipc"])
def test_pixel_space_clipping_of_the_multistep_solvers_is_adm_clamp(name):
    """clip_sample for DPM-Solver++ and UniPC is their thresholding with the bound fixed at 1: x_0 clamped to [−1, 1]."""
    x = 3 * torch.randn(2, 3, 8, 8)
    assert torch.equal(make_scheduler(name, clip_sample=True)._threshold_sample(x), x.clamp(-1, 1))
    assert not make_scheduler(name).config.thresholding
