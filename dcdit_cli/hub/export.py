"""`dcdit export`: a run → a complete diffusers folder with a model card, optionally pushed to the Hub.

    OUT/  model_index.json          DCDiTPipeline: transformer + scheduler (+ vae)
          transformer/              config.json (the recipe, the step) + diffusion_pytorch_model.safetensors
          scheduler/                scheduler_config.json (--scheduler, on DiT's β schedule)
          vae/                      latent runs whose VAE is at hand; otherwise the card points to it
          pipeline_dcdit.py         one import line, for DiffusionPipeline.from_pretrained(custom_pipeline=…)
          README.md  figures/       the model card and its figures

The folder is written under a hidden temporary name and renamed into place when complete, so an
interrupted export leaves no half folder. Pushing uploads that folder with ``huggingface_hub``'s
``HfApi.upload_folder``; nothing else touches the network.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from huggingface_hub import HfApi

from dcdit_cli.common.atomic import check_output, fsync_dir, temp_path, write_text
from dcdit_cli.common.console import DcditError, print0, warn
from dcdit_cli.data.vae import DEFAULT_VAE, load_vae
from dcdit_cli.diffusion.schedulers import METHODS, make_scheduler
from dcdit_cli.evaluation.evaluate import EVAL_FILE, load_records
from dcdit_cli.hub.card import CardFacts, model_card
from dcdit_cli.models.flops import param_count
from dcdit_cli.pipelines import DCDiTPipeline, DCDiTTransformer2DModel
from dcdit_cli.sampling.sampler import SampleOptions, sample_batch, summarise
from dcdit_cli.sampling.viz_boundaries import run_viz
from dcdit_cli.training.checkpoint import read_weights

SHIM = "pipeline_dcdit.py"
CARD_BUDGETS = (0.0, 0.1, 0.2, 0.3)
"""Budgets whose TFLOPs/img the card reports (the paper's multi-budget fractions)."""


def check_export_options(ckpt, out: Path, scheduler: str, push_to_hub: str | None) -> Path:
    """Every problem with the options, before any work: the output folder, the scheduler, the repo id."""
    out = check_output(Path(out), "--out", directory=True)
    if out.is_dir() and any(out.iterdir()) and not (out / "model_index.json").is_file():
        raise DcditError(f"--out {out} is a non-empty folder that is not an earlier export: pass a new or empty folder")
    if Path(str(ckpt)).resolve() == out.resolve():
        raise DcditError(f"--out {out} is the --ckpt folder itself: pass another folder")
    if scheduler not in METHODS:
        raise DcditError(f"--scheduler {scheduler!r}: use one of {', '.join(METHODS)}")
    if push_to_hub is not None and (push_to_hub.count("/") != 1 or not all(push_to_hub.split("/"))):
        raise DcditError(f"--push-to-hub {push_to_hub!r}: write OWNER/NAME, e.g. --push-to-hub me/dcdit-toy")
    return out


def measured_costs(model, recipe, steps: int) -> list[tuple[float, float, float]]:
    """(budget, TFLOPs/img, compression) per card budget, from 2 sampled images' kept tokens."""
    rows = []
    for budget in CARD_BUDGETS if recipe.model.kind == "dcdit" else (0.0,):
        opts = SampleOptions.from_recipe(recipe, steps=steps, budget=budget, seed=0)
        _, _, log = sample_batch(model, recipe, [0, 1], opts)
        report = summarise(recipe, [log.as_array()], 2, 0.0, [log.saved_array()])
        rows.append((budget, report.table1_tflops, report.compression))
    return rows


def _vae_for(recipe, vae: str | None):
    """(AutoencoderKL or None, its name or None, the card's VAE line): a latent run's VAE if it is
    at hand, else a pointer to it."""
    if recipe.data.kind != "latents":
        return None, None, "none: a pixel-space model, its x_0 is the image."
    name = vae or DEFAULT_VAE
    try:
        return load_vae(name), name, f"`vae/` ({name}, diffusers `AutoencoderKL`; latents × its scaling factor)."
    except DcditError as e:
        warn(f"the VAE is not in the folder ({e}); the card tells users to pass it")
        return None, None, (f"not included: pass `vae=AutoencoderKL.from_pretrained(\"{name}\")` to "
                            f"`DCDiTPipeline.from_pretrained` (latents × its scaling factor).")


def _figures(ckpt, recipe, folder: Path, measure: bool, vae: str | None) -> list[tuple[str, str]]:
    """The boundary sheet and compression-vs-t figures (``dcdit viz-boundaries``; a latent run's
    need its VAE, ``vae``, None: not at hand), and the eval figures of the run."""
    figures = []
    if measure and recipe.model.kind == "dcdit" and (recipe.data.kind != "latents" or vae is not None):
        result = run_viz(ckpt, num=1, timesteps=6, out_dir=folder / "figures", vae=vae)
        figures += [("Router boundaries along the sampling trajectory", "figures/" + Path(result["pngs"][0]).name),
                    ("Compression against t", "figures/" + Path(result["summary"]).name)]
    run_eval = Path(str(ckpt)) / "eval"
    for name, caption in (("pareto.png", "FID against TFLOPs/img"), ("elastic.png", "Quality and cost across budgets")):
        if (run_eval / name).is_file():
            (folder / "figures").mkdir(exist_ok=True)
            shutil.copyfile(run_eval / name, folder / "figures" / name)
            figures.append((caption, f"figures/{name}"))
    return figures


def _run_commands(ckpt, recipe, out: Path, scheduler: str, push_to_hub: str | None) -> list[str]:
    """The run's own command lines (its command.txt), else training from the card's recipe; then the export and a sample."""
    command_file = Path(str(ckpt)) / "command.txt"
    trained = [line for line in command_file.read_text(encoding="utf-8").splitlines() if line.strip()] \
        if command_file.is_file() else []
    trained = trained or [f"# save the recipe below as {recipe.run.name}.toml", f"dcdit train --recipe {recipe.run.name}.toml"]
    export = f"dcdit export --ckpt {ckpt} --out {out} --scheduler {scheduler}"
    return trained + [export + (f" --push-to-hub {push_to_hub}" if push_to_hub else ""),
                      f"dcdit sample --ckpt {out} --scheduler dpm-solver --steps 25 --budget 0.2"]


def export(ckpt, out: Path, scheduler: str = "dpm-solver", vae: str | None = None, push_to_hub: str | None = None,
           measure: bool = True) -> Path:
    """What `dcdit export` does; returns the folder. ``measure``: sample a few images for the
    card's TFLOPs/img and figures (off: a card without them, nothing sampled)."""
    out = check_export_options(ckpt, out, scheduler, push_to_hub)
    state, recipe, step = read_weights(ckpt)
    transformer = DCDiTTransformer2DModel.from_dcdit(state, recipe, step)
    vae_model, vae_name, vae_line = _vae_for(recipe, vae)
    pipe = DCDiTPipeline(transformer, make_scheduler(scheduler, recipe.diffusion.num_timesteps,
                                                     clip_sample=recipe.data.kind != "latents"), vae=vae_model)
    tmp = temp_path(out)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        write_text(tmp / SHIM, "# Lets DiffusionPipeline.from_pretrained(..., custom_pipeline=\"pipeline_dcdit\") find the class.\n"
                               "from dcdit_cli.pipelines import DCDiTPipeline  # noqa: F401\n")
        eval_json = Path(str(ckpt)) / "eval" / EVAL_FILE
        with torch.no_grad():
            costs = measured_costs(transformer.model, recipe, recipe.diffusion.sampling_steps) if measure else []
        facts = CardFacts(recipe=recipe, step=step, params=param_count(recipe.model), source=str(ckpt),
                          location=push_to_hub or str(out), cli_location=f"hf:{push_to_hub}" if push_to_hub else str(out),
                          scheduler=type(pipe.scheduler).__name__, vae=vae_line,
                          cost_steps=recipe.diffusion.sampling_steps, costs=costs,
                          metrics=load_records(eval_json) if eval_json.is_file() else [],
                          figures=_figures(ckpt, recipe, tmp, measure, vae_name),
                          commands=_run_commands(ckpt, recipe, out, scheduler, push_to_hub))
        write_text(tmp / "README.md", model_card(facts))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
        fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print0(f"wrote {out} (DCDiTPipeline: transformer, {type(pipe.scheduler).__name__}"
           f"{', vae' if vae_model is not None else ''}; README.md model card)")
    if push_to_hub:
        push(out, push_to_hub)
    return out


def push(folder: Path, repo_id: str) -> str:
    """Uploads the folder to the Hub repo (created if missing) with ``HfApi.upload_folder``; returns its URL."""
    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", exist_ok=True)
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                   commit_message="dcdit export")
    except OSError as e:  # huggingface_hub's HTTP and connection errors are OSErrors
        raise DcditError(f"--push-to-hub {repo_id}: the upload failed ({str(e).splitlines()[0]}); the folder is at "
                         f"{folder}: log in with `huggingface-cli login` and push again") from None
    url = getattr(commit, "commit_url", None) or f"https://huggingface.co/{repo_id}"
    print0(f"pushed {folder} to {url}")
    return url
