"""The `dcdit` command line: one Typer app, thin commands.

Each command parses its options, loads the recipe and makes one library call. Heavy
imports (torch, accelerate, diffusers) happen inside the commands so `dcdit --help` is
instant. Every failure becomes one line on stderr (dcdit_cli/errors.py): exit code 2 for bad
input, with the problem and its fix.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from dcdit_cli.common.console import DcditError, console, print_table, warn

app = typer.Typer(
    name="dcdit",
    help=(
        "Dynamic Chunking Diffusion Transformers: train, upcycle, distill, sample and evaluate DC-DiT.\n\n"
        "Examples:\n\n"
        "  dcdit flops --all\n\n"
        "  dcdit train --recipe toy\n\n"
        "  dcdit train --recipe xl-n16 --print-recipe"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

RecipeOpt = typer.Option(None, "--recipe", "-r", help="Recipe name (recipes/NAME.toml) or path to a .toml file.")
SetOpt = typer.Option(None, "--set", help="Override a recipe key, e.g. --set train.lr=2e-4 (TOML literal; repeatable).")
PrintOpt = typer.Option(False, "--print-recipe", help="Print the resolved recipe and exit.")
CompileOpt = typer.Option(
    False, "--compile", help="torch.compile the whole model (two graphs for a DC-DiT, dynamic shapes: no recompiles as the kept count changes).")
OutOpt = typer.Option(None, "--out", "-o", help="Run directory (default: runs/<run.name>).")
ResumeOpt = typer.Option(None, "--resume", help="Resume from this run dir or checkpoints/step-N.")
PrDistancesOpt = typer.Option(
    "adm", "--pr-distances",
    help="Precision/recall distances: adm (ADM's default: float16 per 10,000² block, float32 where that overflows), float32 or float64.")
MetricsOpt = typer.Option(
    "fid,sfid,is,pr", "--metrics",
    help="Comma-separated: fid, sfid, is, pr (ADM's set, the default), fd_dinov2 (DINOv2 ViT-L/14), kid; or all. FID is always computed.")
Dinov2Opt = typer.Option(
    None, "--dinov2-weights",
    help="Local DINOv2 ViT-L/14 weights for fd_dinov2 (or $DCDIT_DINOV2_WEIGHTS; default: the HF cache). Never downloaded.")

# Sampling options: None = the checkpoint recipe's value ([sample], diffusion.sampling_steps).
CfgOpt = typer.Option(None, "--cfg-scale", help="Classifier-free guidance scale, 1 = off (default: the recipe's sample.cfg_scale).")
StepsOpt = typer.Option(None, "--steps", help="Respaced sampler steps (default: the recipe's diffusion.sampling_steps).")
BudgetOpt = typer.Option(None, "--budget", help="Tail-dropping fraction in [0, 1) (default: the recipe's sample.budget).")
UncondOpt = typer.Option(None, "--uncond-budget", help="Lite-CFG: the unconditional half's budget; -1 = as --budget (default: the recipe's).")
SchedulerOpt = typer.Option(
    None, "--scheduler", "--method",
    help="Sampler: ddpm or ddim (dcdit's ADM sampler, the paper's), dpm-solver, unipc, euler or euler-a (diffusers) "
         "(default: the recipe's sample.method).")
AllChannelsOpt = typer.Option(False, "--guide-all-channels", help="Guide all ε channels (default: the recipe's sample.guided_channels).")


@app.callback(invoke_without_command=True)
def _root(
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True),
) -> None:
    if version:
        from dcdit_cli import __version__

        console.print(f"dcdit {__version__}")
        raise typer.Exit(0)


def _recipe(name: Optional[str], overrides: Optional[List[str]]):
    from dcdit_cli.config.recipe import load_recipe, recipe_warnings

    if not name:
        raise DcditError("no recipe given: pass --recipe NAME (e.g. --recipe toy) or --recipe path/to/recipe.toml")
    recipe = load_recipe(name, overrides or [])
    for message in recipe_warnings(recipe):
        warn(message)
    return recipe


def _maybe_print(recipe, print_recipe: bool) -> None:
    if print_recipe:
        sys.stdout.write(recipe.to_toml())
        raise typer.Exit(0)


@app.command(
    epilog=(
        "Examples:\n\n"
        "  dcdit flops --all                       # paper Table 1, every shipped recipe\n\n"
        "  dcdit flops --recipe b-n4 --recipe dit-b-p2-isoflop\n\n"
        "  dcdit flops --ckpt runs/toy --num 8     # kept tokens measured by sampling a checkpoint\n\n"
        "  dcdit flops --recipe xl-n4 --convention authors   # beside the authors' flop_counter count\n\n"
        "  dcdit flops --recipe xl-n4-512 --memory --batch 32   # predicted peak training GiB per GPU\n\n"
        "  dcdit flops --all --json > flops.json"
    )
)
def flops(
    recipe: Optional[List[str]] = typer.Option(None, "--recipe", "-r", help="Recipe(s) to report (repeatable)."),
    all_: bool = typer.Option(False, "--all", help="Report every shipped recipe."),
    ckpt: Optional[Path] = typer.Option(None, "--ckpt", help="Run dir, dcdit weights, the authors' .pt or hf:…: count kept tokens by sampling."),
    num: int = typer.Option(4, "--num", help="Images sampled with --ckpt (one batch) to measure kept tokens."),
    classes: Optional[str] = typer.Option(None, "--classes", help="With --ckpt: comma-separated class labels cycled over the images."),
    set_: Optional[List[str]] = SetOpt,
    json_: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    convention: str = typer.Option("dcdit", "--convention", help="dcdit (what runs) or authors: also their flop_counter's count (--ckpt rows always show both)."),
    memory: bool = typer.Option(False, "--memory", help="Predicted peak training memory per GPU (GiB) instead, with and without checkpointing."),
    batch: int = typer.Option(32, "--batch", help="With --memory: samples per GPU (the paper's 256 over 8 GPUs is 32)."),
    precision: Optional[str] = typer.Option(None, "--precision", help="With --memory: bf16 or no (default: the recipe's train.mixed_precision)."),
):
    """Parameters, TFLOPs per image and average compression, as in paper Table 1."""
    from dcdit_cli.models.flops import check_convention, run_flops

    check_convention(convention)
    if memory:
        from dcdit_cli.training.memory import run_memory

        run_memory(recipe or [], set_ or [], batch, precision, as_json=json_)
        return
    measured = None
    if ckpt is not None:
        from dcdit_cli.sampling.sampler import measure_kept_tokens

        measured = measure_kept_tokens(ckpt, num=num, classes=_classes(classes))
    run_flops(recipes=recipe or [], all_recipes=all_, measured=measured, overrides=set_ or [], as_json=json_,
              convention=convention)


@app.command(
    epilog=(
        "Examples:\n\n"
        "  dcdit train --recipe toy                          # built-in shapes set, CPU, minutes\n\n"
        "  dcdit train --recipe toy --set train.max_steps=3000   # rerun: resumes from runs/toy and goes on\n\n"
        "  dcdit train --recipe xl-n16 --print-recipe        # the paper's setting\n\n"
        "  dcdit train --recipe b-n4 --set data.path=features/imagenet256 --out runs/b-n4\n\n"
        "  dcdit train --recipe b-n4 --resume runs/b-n4/checkpoints/step-0100000\n\n"
        "  dcdit train --recipe s-n4-official --init-from 0400000.pt --set train.max_steps=450000   # fine-tune a release\n\n"
        "  dcdit train --recipe toy-dydit --init-from runs/toy   # DyDiT gates fine-tuned onto a trained DC-DiT\n\n"
        "  dcdit train --recipe b-n4 --compile   # torch.compile the whole model\n\n"
        "  dcdit train --recipe toy --log-with tensorboard   # then: tensorboard --logdir runs\n\n"
        "  accelerate launch --multi_gpu --num_processes 8 -m dcdit_cli train --recipe xl-n16\n\n"
        "To resume, run the same command again: it continues from the newest complete checkpoint. "
        "On SIGTERM or SIGUSR1 (a cluster's preemption) the run finishes its step, checkpoints and exits with code 75."
    )
)
def train(
    recipe: Optional[str] = RecipeOpt,
    set_: Optional[List[str]] = SetOpt,
    out: Optional[Path] = OutOpt,
    resume: Optional[Path] = ResumeOpt,
    init_from: Optional[Path] = typer.Option(
        None, "--init-from", help="Start from these weights: a run dir, dcdit .safetensors, the authors' .pt or hf:amd/…; new DyDiT gates keep their init."),
    compile_: bool = CompileOpt,
    log_with: Optional[List[str]] = typer.Option(
        None, "--log-with", help="Experiment trackers, comma-separated or repeated: tensorboard, wandb, mlflow, … (sets train.log_with)."),
    print_recipe: bool = PrintOpt,
):
    """Train a DC-DiT or DiT from a recipe (resumes automatically when the run exists)."""
    trackers = [name.strip() for item in log_with or [] for name in item.split(",") if name.strip()]
    cfg = _recipe(recipe, [*(set_ or []), *([f"train.log_with={json.dumps(trackers)}"] if log_with else [])])
    _maybe_print(cfg, print_recipe)
    from dcdit_cli.training.loop import train as run_train

    out_dir = out or Path("runs") / cfg.run.name
    weights = run_train(cfg, out_dir, resume=resume, command=" ".join(["dcdit", *sys.argv[1:]]), init_from=init_from,
                        torch_compile=compile_)
    _next_steps(out_dir, weights)


@app.command(
    epilog=(
        "Examples:\n\n"
        "  dcdit convert --from 0400000.pt --out runs/s-256-official        # the authors' S-256 release\n\n"
        "  dcdit convert --from hf:amd/DynamicChunkingDiT/XL-256/FILE.pt --out runs/xl-256-official\n\n"
        "  dcdit convert --from 0400000.pt --out runs/s-256-raw --weights model\n\n"
        "Writes OUT/weights/step-N-ema.safetensors (the recipe in its metadata) and OUT/recipe.toml; then "
        "dcdit sample --ckpt OUT reads it without any pickle."
    )
)
def convert(
    source: Path = typer.Option(..., "--from", help="The authors' DC-DiT .pt (or hf:amd/DynamicChunkingDiT/…), or dcdit weights."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory to write (a run directory layout: weights/, recipe.toml)."),
    weights: str = typer.Option("ema", "--weights", help="ema (default, what the authors sample from) or model (raw weights)."),
):
    """Convert the authors' released DC-DiT checkpoint into dcdit weights (safetensors, no pickle)."""
    from dcdit_cli.common.console import print0
    from dcdit_cli.training.checkpoint import convert_weights

    if weights not in ("ema", "model"):
        raise DcditError(f"--weights {weights!r}: use 'ema' (default) or 'model'")
    written = convert_weights(source, out, weights)
    print0(f"[bold green]wrote[/] {written}")
    print0(f"next: dcdit sample --ckpt {out} --vae VAE_DIR --out {out}/samples.png")


@app.command(
    epilog=(
        "Examples:\n\n"
        "  dcdit export --ckpt runs/toy --out exports/toy\n\n"
        "  dcdit export --ckpt runs/toy --out exports/toy --push-to-hub me/dcdit-toy      # huggingface-cli login first\n\n"
        "  dcdit export --ckpt runs/xl-n4 --out exports/xl-n4 --vae VAE_DIR --scheduler ddpm\n\n"
        "Then, in Python: DCDiTPipeline.from_pretrained(\"exports/toy\") (from dcdit_cli.pipelines); "
        "dcdit sample --ckpt exports/toy (or hf:OWNER/NAME from the local Hugging Face cache) reads it too."
    )
)
def export(
    ckpt: Path = typer.Option(..., "--ckpt", help="Run directory, EMA weights (.safetensors), the authors' .pt or hf:…"),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write: model_index.json, transformer/, scheduler/, vae/, README.md."),
    push_to_hub: Optional[str] = typer.Option(None, "--push-to-hub", help="Also upload the folder to this Hub repo (OWNER/NAME)."),
    scheduler: str = typer.Option("dpm-solver", "--scheduler", help="The folder's scheduler: ddpm (learned range), ddim, dpm-solver, unipc, euler, euler-a."),
    vae: Optional[str] = typer.Option(None, "--vae", help="Latent runs: the VAE dir or hub id to include (default sd-vae-ft-ema from the HF cache)."),
    measure: bool = typer.Option(True, "--measure/--no-measure", help="Sample a few images for the card's TFLOPs/img and figures."),
):
    """Export a run as a diffusers folder (DCDiTPipeline) with a model card; optionally push it to the Hub."""
    from dcdit_cli.hub.export import export as run_export

    run_export(ckpt, out, scheduler=scheduler, vae=vae, push_to_hub=push_to_hub, measure=measure)


def _next_steps(out_dir: Path, weights) -> None:
    from dcdit_cli.common.console import print0

    if weights is None:
        return
    print0(f"[bold green]done.[/] EMA weights: {weights}")
    print0(f"next: dcdit sample --ckpt {out_dir} --out {out_dir}/samples.png")
    print0(f"      dcdit viz-boundaries --ckpt {out_dir} --out {out_dir}/boundaries")


FromOpt = typer.Option(
    None, "--from", help="Pretrained DiT: the official DiT-XL-2-256x256.pt, a DiT train.py checkpoint (its EMA) or .safetensors."
)


@app.command(
    epilog=(
        "Examples:\n\n"
        "  dcdit upcycle --recipe xl-n4-upcycle --from DiT-XL-2-256x256.pt       # paper Table 3, 100K steps\n\n"
        "  dcdit upcycle --recipe xl-n4-upcycle-20k --from DiT-XL-2-256x256.pt --set data.path=features/imagenet256\n\n"
        "  dcdit upcycle --recipe xl-n4-upcycle --print-recipe\n\n"
        "  accelerate launch --multi_gpu --num_processes 8 -m dcdit_cli upcycle --recipe xl-n4-upcycle --from DiT-XL-2-256x256.pt\n\n"
        "Copies the DiT's blocks and its timestep and class embedders (frozen), adds LayerNorm adaptors on c, prints what "
        "was copied, frozen, new and left out, then trains. To resume, run the same command again (same --from)."
    )
)
def upcycle(
    recipe: Optional[str] = RecipeOpt,
    source: Optional[Path] = FromOpt,
    set_: Optional[List[str]] = SetOpt,
    out: Optional[Path] = OutOpt,
    resume: Optional[Path] = ResumeOpt,
    compile_: bool = CompileOpt,
    print_recipe: bool = PrintOpt,
):
    """Upcycle a pretrained DiT into a DC-DiT and train it (paper §4.4, Table 3)."""
    from dcdit_cli.training.upcycle import upcycle as run_upcycle

    _run_from_dit(run_upcycle, recipe, source, set_, out, resume, compile_, print_recipe)


@app.command(
    epilog=(
        "Examples:\n\n"
        "  dcdit distill --recipe xl-n4-upcycle-distill --from DiT-XL-2-256x256.pt   # 5K distill + diffusion to 100K\n\n"
        "  dcdit distill --recipe xl-n4-upcycle-distill-50k --from DiT-XL-2-256x256.pt --out runs/up-distill-50k\n\n"
        "  dcdit distill --recipe xl-n4-upcycle-distill --from DiT-XL-2-256x256.pt --set distill.steps=2000\n\n"
        "  accelerate launch --multi_gpu --num_processes 8 -m dcdit_cli distill --recipe xl-n4-upcycle-distill --from DiT-XL-2-256x256.pt\n\n"
        "Upcycles as `dcdit upcycle` does, then trains distill.steps steps on the MSE between the DC-DiT's and the frozen "
        "DiT teacher's block outputs, then the diffusion loss, in one run directory (metrics.jsonl 'phase'). "
        "To resume on either side of the switch, run the same command again (same --from)."
    )
)
def distill(
    recipe: Optional[str] = RecipeOpt,
    source: Optional[Path] = FromOpt,
    set_: Optional[List[str]] = SetOpt,
    out: Optional[Path] = OutOpt,
    resume: Optional[Path] = ResumeOpt,
    compile_: bool = CompileOpt,
    print_recipe: bool = PrintOpt,
):
    """Upcycle a DiT with an activation-distillation warm-up, then diffusion (paper §4.4, Table 3)."""
    from dcdit_cli.training.distill import distill as run_distill

    _run_from_dit(run_distill, recipe, source, set_, out, resume, compile_, print_recipe)


def _run_from_dit(run, recipe, source, set_, out, resume, compile_, print_recipe) -> None:
    """Shared by upcycle and distill: recipe, --from check, run, next steps."""
    cfg = _recipe(recipe, set_)
    _maybe_print(cfg, print_recipe)
    if source is None:
        raise DcditError("no --from given: pass the pretrained DiT checkpoint, e.g. --from DiT-XL-2-256x256.pt")
    out_dir = out or Path("runs") / cfg.run.name
    weights = run(cfg, source, out_dir, resume=resume, command=" ".join(["dcdit", *sys.argv[1:]]), torch_compile=compile_)
    _next_steps(out_dir, weights)


@app.command(
    epilog=(
        "Examples:\n\n"
        "  dcdit extract --data-path imagenet/train --out features/imagenet256 --vae vae/\n\n"
        "  accelerate launch --multi_gpu --num_processes 8 -m dcdit_cli extract \\\n"
        "      --data-path imagenet/train --out features/imagenet256 --vae vae/\n\n"
        "  dcdit extract --data-path imagenet/train --out features/in256-mean --vae stabilityai/sd-vae-ft-ema --mean --flip none\n\n"
        "  dcdit extract --data-path imagenet/train --out pixels/imagenet64 --pixels --image-size 64 --flip none   # no VAE\n\n"
        "Killed? Run the same command again: finished shards are skipped. The VAE is never downloaded: on a machine "
        "with internet run `huggingface-cli download stabilityai/sd-vae-ft-ema --local-dir vae/` and copy vae/ here. "
        "Then: dcdit train --recipe b-n4 --set data.path=features/imagenet256"
    )
)
def extract(
    data_path: Path = typer.Option(..., "--data-path", help="Image folder with one subfolder per class (ImageNet train/ layout)."),
    out: Path = typer.Option(..., "--out", help="Directory for the latent shards and index.json."),
    vae: str = typer.Option("stabilityai/sd-vae-ft-ema", "--vae", help="diffusers AutoencoderKL directory, or a hub id in the HF cache."),
    image_size: int = typer.Option(256, "--image-size", help="ADM centre-crop size in pixels (512 for the *-512 recipes: 64×64 latents)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per VAE call per process (x2 with --flip both)."),
    flip: str = typer.Option("both", "--flip", help="both: original + mirrored latent; random: one frozen random flip; none."),
    mean: bool = typer.Option(False, "--mean", help="Store the posterior mean instead of a sample."),
    shard_size: int = typer.Option(1024, "--shard-size", help="Images per shard: the unit of work split and resume."),
    seed: int = typer.Option(0, "--seed", help="Seed of the posterior noise and random flips."),
    num_workers: int = typer.Option(8, "--num-workers", help="Image-decoding threads per process."),
    pixels: bool = typer.Option(False, "--pixels", help="Store the uint8 centre crops, no VAE (pixel space: data.kind = images)."),
):
    """Encode an image folder into VAE latent shards for training (resumable, multi-GPU); --pixels keeps the pixels."""
    from accelerate import PartialState

    from dcdit_cli.data.extract import extract as run_extract

    run_extract(data_path, out, vae, image_size=image_size, batch_size=batch_size, flip=flip, mean=mean,
                seed=seed, shard_size=shard_size, num_workers=num_workers, pixels=pixels)
    PartialState().destroy_process_group()  # clean exit of multi-process runs (docs/reference.md#multi-process-runs-on-cpu)


@app.command(
    epilog=(
        "Examples:\n\n"
        "  dcdit fid --samples runs/xl-n4/samples.npz --ref VIRTUAL_imagenet256_labeled.npz \\\n"
        "      --inception-weights weights-inception-2015-12-05-6726825d.pth\n\n"
        "  DCDIT_INCEPTION_WEIGHTS=inception.pth dcdit fid --samples samples/ --ref ref.npz --num 10000 --json\n\n"
        "  dcdit fid --make-ref imagenet/val --out ref.npz --inception-weights inception.pth   # a reference batch\n\n"
        "  dcdit fid --make-ref imagenet/train --out ref.npz --metrics all --dinov2-weights model.safetensors   # + DINOv2 stats\n\n"
        "  dcdit fid --samples samples.npz --ref ref.npz --metrics fid,fd_dinov2,kid\n\n"
        "FID, sFID, Inception Score, precision and recall as the ADM evaluator computes them, on torch-fidelity's "
        "port of the 2015-12-05 Inception graph read from a local file; on request FD-DINOv2 (dgm-eval's protocol) "
        "and KID (torch-fidelity's)."
    )
)
def fid(
    samples: Optional[Path] = typer.Option(None, "--samples", help="Samples: an ADM .npz (arr_0) or a folder of images."),
    ref: Optional[Path] = typer.Option(None, "--ref", help="Reference: an ADM .npz (with mu/sigma when present) or a folder."),
    inception_weights: Optional[Path] = typer.Option(None, "--inception-weights", help="Local Inception weights (or $DCDIT_INCEPTION_WEIGHTS)."),
    num: Optional[int] = typer.Option(None, "--num", help="Use the first N samples (default: all)."),
    batch_size: int = typer.Option(50, "--batch-size"),
    make_ref: Optional[Path] = typer.Option(None, "--make-ref", help="Write a reference batch from this image folder."),
    out: Optional[Path] = typer.Option(None, "--out", help="With --make-ref: the .npz to write."),
    image_size: int = typer.Option(256, "--image-size", help="With --make-ref: ADM centre-crop size."),
    json_: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    pr_distances: str = PrDistancesOpt,
    metric_names: str = MetricsOpt,
    dinov2_weights: Optional[Path] = Dinov2Opt,
):
    """FID / sFID / IS / precision / recall (ADM evaluator), FD-DINOv2 and KID of samples against a reference batch."""
    import json

    from dcdit_cli.evaluation import fid as metrics
    from dcdit_cli.evaluation.metrics import parse_metrics

    names = parse_metrics(metric_names)
    if make_ref is not None:
        if out is None:
            raise DcditError("--make-ref needs --out REF.npz: where to write the reference batch")
        result = metrics.make_reference(make_ref, out, image_size=image_size, inception_weights=inception_weights,
                                        num=num, batch_size=batch_size, metrics=names, dinov2_weights=dinov2_weights)
    elif samples is None or ref is None:
        raise DcditError("pass --samples S.npz and --ref REF.npz (or --make-ref DIR --out REF.npz to build a reference)")
    else:
        result = metrics.evaluate(samples, ref, inception_weights, num=num, batch_size=batch_size, distances=pr_distances,
                                  metrics=names, dinov2_weights=dinov2_weights)
    if json_:
        print(json.dumps(result, indent=2, default=str))
    elif make_ref is None:
        print_table(metrics.report_table(result))
    else:
        console.print(f"wrote {result['path']}: {result['num_images']} images ({result['skipped']} skipped), "
                      f"statistics {', '.join(result['statistics'])}")


def _classes(text: Optional[str]) -> Optional[List[int]]:
    if not text:
        return None
    try:
        return [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise DcditError(f"--classes {text!r}: give comma-separated class indices, e.g. --classes 207,360,387") from None


@app.command(
    epilog=(
        "Examples:\n\n"
        "  dcdit sample --ckpt runs/toy --num 16 --out samples.png\n\n"
        "  dcdit sample --ckpt runs/xl-n4 --classes 207,360,387,974 --cfg-scale 4 --budget 0.2\n\n"
        "  dcdit sample --ckpt runs/xl-n4 --cfg-scale 1.25 --budget 0.0 --uncond-budget 0.9   # Lite-CFG\n\n"
        "  accelerate launch --multi_gpu --num_processes 8 -m dcdit_cli sample --ckpt runs/xl-n4 \\\n"
        "      --num 50000 --cfg-scale 1.5 --npz samples.npz        # ADM evaluator layout; rerun resumes"
    )
)
def sample(
    ckpt: Path = typer.Option(..., "--ckpt", help="Run directory, EMA weights (.safetensors), a `dcdit export` folder, hf:OWNER/NAME, the authors' .pt or hf:amd/DynamicChunkingDiT/…"),
    num: int = typer.Option(16, "--num", help="Number of images."),
    classes: Optional[str] = typer.Option(None, "--classes", help="Comma-separated classes (default: random)."),
    cfg_scale: Optional[float] = CfgOpt,
    steps: Optional[int] = StepsOpt,
    seed: int = typer.Option(0, "--seed"),
    budget: Optional[float] = BudgetOpt,
    uncond_budget: Optional[float] = UncondOpt,
    method: Optional[str] = SchedulerOpt,
    all_channels: bool = AllChannelsOpt,
    out: Path = typer.Option(Path("sample.png"), "--out", help="PNG grid to write."),
    npz: Optional[Path] = typer.Option(None, "--npz", help="Write an ADM-evaluator .npz instead of a grid."),
    batch_size: int = typer.Option(16, "--batch-size"),
    vae: Optional[str] = typer.Option(None, "--vae", help="VAE dir or hub id (latent runs; default sd-vae-ft-ema)."),
):
    """Sample images from a checkpoint: PNG grid or ADM .npz, with elastic budgets and Lite-CFG.

    Sampling options default to the checkpoint recipe's \\[sample] section and diffusion.sampling_steps."""
    from dcdit_cli.sampling.sampler import run_sample

    flags = dict(cfg_scale=cfg_scale, steps=steps, method=method, budget=budget, uncond_budget=uncond_budget,
                 guided_channels=0 if all_channels else None, seed=seed)
    run_sample(ckpt, num, flags, classes=_classes(classes), out=out, npz=npz, batch_size=batch_size, vae=vae)


@app.command(
    "viz-boundaries",
    epilog=(
        "Examples:\n\n"
        "  dcdit viz-boundaries --ckpt runs/toy --out runs/toy/boundaries\n\n"
        "  dcdit viz-boundaries --ckpt runs/toy --budget 0.5 --timesteps 6 --out b05\n\n"
        "  dcdit viz-boundaries --ckpt runs/toy --steps 50 --json > compression.json\n\n"
        "  dcdit viz-boundaries --ckpt runs/xl-n4 --classes 207,360 --num 2 --vae VAE_DIR\n\n"
        "  dcdit viz-boundaries --ckpt runs/toy-dydit   # a DyDiT-gated run also gets gates_vs_t.png (a gated DiT: that alone)"
    ),
)
def viz_boundaries(
    ckpt: Path = typer.Option(..., "--ckpt", help="DC-DiT run directory, EMA weights (.safetensors), a `dcdit export` folder, hf:OWNER/NAME, the authors' .pt or hf:amd/DynamicChunkingDiT/…"),
    num: int = typer.Option(4, "--num", help="Number of images (one sheet each)."),
    classes: Optional[str] = typer.Option(None, "--classes", help="Comma-separated classes (default: random)."),
    timesteps: int = typer.Option(8, "--timesteps", help="Columns: evenly spaced sampler steps, first and last included."),
    budget: Optional[float] = BudgetOpt,
    out: Path = typer.Option(Path("boundaries"), "--out", help="Output directory (sample-NNN.png, compression_vs_t.png)."),
    seed: int = typer.Option(0, "--seed"),
    cfg_scale: Optional[float] = CfgOpt,
    steps: Optional[int] = StepsOpt,
    vae: Optional[str] = typer.Option(None, "--vae", help="VAE dir or hub id (latent runs; default sd-vae-ft-ema)."),
    as_json: bool = typer.Option(False, "--json", help="Print kept tokens and compression per timestep as JSON."),
    method: Optional[str] = SchedulerOpt,
):
    """Draw the router's boundaries along the sampling trajectory and plot compression against t (paper Fig. 4)."""
    from dcdit_cli.sampling.viz_boundaries import run_viz

    run_viz(ckpt, num, _classes(classes), timesteps, budget, out, seed, cfg_scale, steps, vae, as_json, method=method)


@app.command(
    "eval",
    context_settings={"allow_extra_args": True},  # --compare A B C: the values after A arrive as extra args
    epilog=(
        "Examples:\n\n"
        "  dcdit eval --ckpt runs/xl-n4 --ref VIRTUAL_imagenet256_labeled.npz --num 50000 --cfg-scales 1.0   # a Table 1 row\n\n"
        "  dcdit eval --ckpt runs/b-n4-multibudget --ref REF.npz --budgets 0,0.1,0.2,0.3 --compare runs/dit-b-p2 runs/b-n4-random\n\n"
        "  dcdit eval --ckpt runs/xl-n4 --ref REF.npz --cfg-scales 1.25 --budgets 0 --uncond-budget 0.9   # Lite-CFG\n\n"
        "  accelerate launch --multi_gpu --num_processes 8 -m dcdit_cli eval --ckpt runs/xl-n4 --ref REF.npz\n\n"
        "  dcdit eval --ckpt runs/toy --ref ref.npz --num 64 --steps 20 --inception-weights inception.pth\n\n"
        "  dcdit eval --ckpt runs/xl-n4 --ref REF.npz --metrics all --pareto-metric fd_dinov2   # FD-DINOv2 and KID too\n\n"
        "Defaults come from the checkpoint's recipe (\\[eval] num_samples, cfg_scale, batch_size; \\[sample] budget; "
        "diffusion.sampling_steps). Killed? Run the same command again: finished parts are skipped. "
        "Writes eval.json, pareto.png (--pareto-metric against TFLOPs/img) and elastic.png to --out (default RUN/eval)."
    ),
)
def eval_(
    ctx: typer.Context,
    ckpt: Path = typer.Option(..., "--ckpt", help="Run directory, EMA weights (.safetensors), a `dcdit export` folder, hf:OWNER/NAME, the authors' .pt or hf:amd/DynamicChunkingDiT/…"),
    ref: Path = typer.Option(..., "--ref", help="Reference batch: ADM's VIRTUAL_imagenet256_labeled.npz or `dcdit fid --make-ref`."),
    num: Optional[int] = typer.Option(None, "--num", help="Samples per setting (default: the recipe's eval.num_samples)."),
    budgets: Optional[str] = typer.Option(None, "--budgets", help="Comma-separated tail-dropping budgets (default: sample.budget)."),
    uncond_budget: Optional[float] = UncondOpt,
    cfg_scales: Optional[str] = typer.Option(None, "--cfg-scales", help="Comma-separated guidance scales (default: eval.cfg_scale)."),
    steps: Optional[int] = StepsOpt,
    method: Optional[str] = SchedulerOpt,
    seed: int = typer.Option(0, "--seed"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per part and process (default: eval.batch_size)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output directory (default: RUN/eval)."),
    inception_weights: Optional[Path] = typer.Option(None, "--inception-weights", help="Local Inception weights (or $DCDIT_INCEPTION_WEIGHTS)."),
    vae: Optional[str] = typer.Option(None, "--vae", help="VAE dir or hub id (latent runs; default sd-vae-ft-ema)."),
    compare: Optional[List[Path]] = typer.Option(
        None, "--compare", help="Other runs' eval.json (file, eval dir or run dir) to overlay: --compare A B C, or repeated."),
    pr_distances: str = PrDistancesOpt,
    metric_names: str = MetricsOpt,
    dinov2_weights: Optional[Path] = Dinov2Opt,
    pareto_metric: str = typer.Option(
        "fid", "--pareto-metric", help="The quality axis of pareto.png: fid, sfid, is, precision, recall, fd_dinov2 or kid."),
):
    """Sample and evaluate a checkpoint over budgets and guidance scales: FID, sFID, IS, precision, recall, TFLOPs/img
    (and FD-DINOv2, KID with --metrics)."""
    from accelerate import PartialState

    from dcdit_cli.evaluation.evaluate import parse_floats, run_eval
    from dcdit_cli.evaluation.metrics import parse_metrics

    if ctx.args and not compare:
        raise DcditError(f"unexpected argument(s) {' '.join(ctx.args)}: eval takes options only (see dcdit eval --help)")
    compare = [*(compare or []), *map(Path, ctx.args)]
    run_eval(ckpt, ref, num=num, budgets=parse_floats(budgets, "--budgets"), uncond_budget=uncond_budget,
             cfg_scales=parse_floats(cfg_scales, "--cfg-scales"), steps=steps, seed=seed, batch_size=batch_size, out=out,
             inception_weights=inception_weights, vae=vae, compare=compare, distances=pr_distances,
             metrics=parse_metrics(metric_names), dinov2_weights=dinov2_weights, pareto_metric=pareto_metric,
             command=" ".join(["dcdit", *sys.argv[1:]]), method=method)
    PartialState().destroy_process_group()  # clean exit of multi-process runs (docs/reference.md#multi-process-runs-on-cpu)


def main() -> None:
    """The console script: every failure ends as one line on stderr (dcdit_cli/errors.py)."""
    from dcdit_cli.common.host_memory import use_huge_pages

    use_huge_pages()  # before the process's first tensor (dcdit_cli/common/host_memory.py)
    from dcdit_cli.errors import report

    try:
        code = app(prog_name="dcdit", standalone_mode=False)
    except (Exception, KeyboardInterrupt) as e:
        code = report(e)
    sys.exit(code if isinstance(code, int) else 0)


__all__ = ["app", "main", "console"]
