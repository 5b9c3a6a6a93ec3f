"""The `dcdit` command line: one Typer app, thin commands.

Each command parses its options, loads the recipe and makes one library call. Heavy
imports (torch, accelerate, diffusers) happen inside the commands so `dcdit --help` is
instant. A :class:`~dcdit_cli.console.DcditError` becomes one red line and exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from dcdit_cli.console import DcditError, console, error_line

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


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True),
) -> None:
    if version:
        from dcdit_cli import __version__

        console.print(f"dcdit {__version__}")
        raise typer.Exit(0)


def _recipe(name: Optional[str], overrides: Optional[List[str]]):
    from dcdit_cli.recipe import load_recipe

    if not name:
        raise DcditError("no recipe given: pass --recipe NAME (e.g. --recipe toy) or --recipe path/to/recipe.toml")
    return load_recipe(name, overrides or [])


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
        "  dcdit flops --all --json > flops.json"
    )
)
def flops(
    recipe: Optional[List[str]] = typer.Option(None, "--recipe", "-r", help="Recipe(s) to report (repeatable)."),
    all_: bool = typer.Option(False, "--all", help="Report every shipped recipe."),
    ckpt: Optional[Path] = typer.Option(None, "--ckpt", help="Run dir or EMA weights: count kept tokens by sampling."),
    num: int = typer.Option(4, "--num", help="Images sampled with --ckpt to measure kept tokens."),
    set_: Optional[List[str]] = SetOpt,
    json_: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
):
    """Parameters, TFLOPs per image and average compression, as in paper Table 1."""
    from dcdit_cli.flops import run_flops

    run_flops(recipes=recipe or [], all_recipes=all_, ckpt=ckpt, num=num, overrides=set_ or [], as_json=json_)


@app.command(
    epilog=(
        "Examples:\n\n"
        "  dcdit train --recipe toy                          # built-in shapes set, CPU, minutes\n\n"
        "  dcdit train --recipe toy --set train.max_steps=3000   # rerun: resumes from runs/toy and goes on\n\n"
        "  dcdit train --recipe xl-n16 --print-recipe        # the paper's setting\n\n"
        "  dcdit train --recipe b-n4 --set data.path=features/imagenet256 --out runs/b-n4\n\n"
        "  dcdit train --recipe b-n4 --resume runs/b-n4/checkpoints/step-0100000\n\n"
        "  accelerate launch --multi_gpu --num_processes 8 -m dcdit_cli train --recipe xl-n16\n\n"
        "To resume, run the same command again: it continues from the newest complete checkpoint."
    )
)
def train(
    recipe: Optional[str] = RecipeOpt,
    set_: Optional[List[str]] = SetOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory (default: runs/<run.name>)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Resume from this run dir or checkpoints/step-N."),
    print_recipe: bool = PrintOpt,
):
    """Train a DC-DiT or DiT from a recipe (resumes automatically when the run exists)."""
    cfg = _recipe(recipe, set_)
    _maybe_print(cfg, print_recipe)
    from dcdit_cli.train import train as run_train

    out_dir = out or Path("runs") / cfg.run.name
    weights = run_train(cfg, out_dir, resume=resume, command=" ".join(["dcdit", *sys.argv[1:]]))
    _next_steps(out_dir, weights)


def _next_steps(out_dir: Path, weights) -> None:
    from dcdit_cli.console import print0

    if weights is None:
        return
    print0(f"[bold green]done.[/] EMA weights: {weights}")
    print0(f"next: dcdit sample --ckpt {out_dir} --out {out_dir}/samples.png")
    print0(f"      dcdit viz-boundaries --ckpt {out_dir} --out {out_dir}/boundaries")


def main() -> None:
    try:
        app()
    except DcditError as e:
        error_line(str(e))
        sys.exit(2)
    except KeyboardInterrupt:
        error_line("interrupted")
        sys.exit(130)


__all__ = ["app", "main", "console"]
