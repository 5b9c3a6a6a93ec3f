"""The model card (``README.md``) of an exported dcdit model: what it is and how it was made.

Every number in the card is measured or read at export time: parameters from the recipe's model,
TFLOPs/img and compression from kept tokens counted while sampling at each budget, metrics from
the run's ``eval.json`` when it has one. The card says where a number is missing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dcdit_cli import __version__
from dcdit_cli.config.recipe import Recipe


@dataclass
class CardFacts:
    """What the card reports. ``costs``: (budget, TFLOPs/img in paper Table 1's convention, mean
    compression) per budget; ``metrics``: ``eval.json`` records; ``figures``: (caption, path
    relative to the folder); ``commands``: the run's own command line(s), then the export's."""

    recipe: Recipe
    step: int
    params: int
    source: str
    location: str
    """Where users load it from: the Hub repo when pushed, else the folder."""
    cli_location: str
    """The same for ``dcdit --ckpt``: ``hf:OWNER/NAME`` for a Hub repo."""
    scheduler: str
    vae: str
    cost_steps: int
    costs: list[tuple[float, float, float]] = field(default_factory=list)
    metrics: list[dict] = field(default_factory=list)
    figures: list[tuple[str, str]] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)


METRIC_COLUMNS = (("setting", "setting"), ("fid", "FID"), ("sfid", "sFID"), ("inception_score", "IS"),
                  ("precision", "precision"), ("recall", "recall"), ("fd_dinov2", "FD-DINOv2"), ("kid", "KID"),
                  ("tflops_per_img", "TFLOPs/img"),
                  ("steps", "steps"), ("method", "sampler"))


def _cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def model_card(f: CardFacts) -> str:
    r, m = f.recipe, f.recipe.model
    classes = r.model.num_classes
    kind = "DC-DiT (dynamic chunking)" if m.kind == "dcdit" else f"DiT baseline (patch size {m.patch_size})"
    space = "pixel space" if r.data.kind != "latents" else "SD-VAE latent space"
    lines = [
        "---", "library_name: diffusers", "tags:", "- dcdit", "- dc-dit", "- diffusion-transformer",
        "- class-conditional-image-generation", "---", "",
        f"# {r.run.name}: {kind}", "",
        (r.run.description or "A dcdit model.") + "", "",
        f"Trained with dcdit {__version__} for {f.step:,} steps on `{r.data.kind}` data, "
        f"{m.input_size}×{m.input_size}×{m.in_channels} in {space}, {classes} classes (label {classes} is the "
        f"null class of classifier-free guidance). Exported from `{f.source}`.", "",
        "## Use", "",
        "```python",
        "import torch",
        "from dcdit_cli.pipelines import DCDiTPipeline   # the dcdit package, installed from its repository",
        "from diffusers import DPMSolverMultistepScheduler",
        "",
        f'pipe = DCDiTPipeline.from_pretrained("{f.location}")',
        "pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)",
        "out = pipe(class_labels=[0, 1], num_inference_steps=25, budget=0.2,",
        "           generator=torch.Generator().manual_seed(0), return_boundaries=True)",
        "out.images[0].save('sample.png')   # out.boundaries: (steps, B, H, W); out.kept: (steps, B, halves)",
        "```", "",
        f"`DiffusionPipeline.from_pretrained(\"{f.location}\", custom_pipeline=\"pipeline_dcdit\", trust_remote_code=True)` "
        "also works: `pipeline_dcdit.py` only imports the class from the installed `dcdit` package. "
        f"The folder's scheduler is `{f.scheduler}`; `dcdit sample --ckpt {f.cli_location}` samples it with dcdit's own "
        "ADM sampler, and `--scheduler dpm-solver` with diffusers'.", "",
        f"VAE: {f.vae}", "",
        "## Model", "",
        f"| parameters | {f.params / 1e6:.2f}M |", "| --- | --- |",
    ]
    lines += [f"| {k} | {_cell(v)} |" for k, v in r.to_dict()["model"].items()]
    lines += ["", "## Inference cost", ""]
    if f.costs:
        lines += [f"Measured from the kept tokens of 2 images sampled at each budget ({f.cost_steps} steps, "
                  f"cfg {r.sample.cfg_scale:g}); TFLOPs/img in paper Table 1's convention (2 FLOPs per MAC, "
                  f"both CFG halves, {r.diffusion.sampling_steps} − 1 forwards).", "",
                  "| budget | TFLOPs/img | compression L/M |", "| --- | --- | --- |"]
        lines += [f"| {b:g} | {t:.4g} | {c:.2f} |" for b, t, c in f.costs]
    else:
        lines += ["Not measured (`dcdit export --no-measure`)."]
    lines += ["", "## Metrics", ""]
    if f.metrics:
        lines += ["From the run's `eval.json` (`dcdit eval`).", "",
                  "| " + " | ".join(name for _, name in METRIC_COLUMNS) + " |",
                  "| " + " | ".join("---" for _ in METRIC_COLUMNS) + " |"]
        lines += ["| " + " | ".join(_cell(rec.get(key, "")) for key, _ in METRIC_COLUMNS) + " |" for rec in f.metrics]
    else:
        lines += ["No `eval.json` in the run: not evaluated. `dcdit eval --ckpt RUN --ref REF.npz` writes one."]
    if f.figures:
        lines += ["", "## Figures", ""]
        for caption, path in f.figures:
            lines += [f"**{caption}**", "", f"![{caption}]({path})", ""]
    lines += ["", "## Reproduce", "", "```bash"] + f.commands + ["```", "",
              "## Recipe", "", "```toml", r.to_toml().rstrip(), "```", ""]
    return "\n".join(lines)
