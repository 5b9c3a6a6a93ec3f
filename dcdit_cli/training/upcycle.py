"""Upcycling: a pretrained DiT → DC-DiT (paper §4.4, docs/reference.md#upcycling).

The inner network of a DC-DiT is a stack of DiT blocks with the official names
(``blocks.i.attn.qkv`` …) and it conditions on the same c = t_emb(t) + y_emb(y), so a
DiT checkpoint's blocks and embedders load into it unchanged. What does not transfer is
what depends on the patch size: ``x_embedder`` (P×P patchify), ``pos_embed`` (the fixed
table of the P = 2 grid) and ``final_layer`` (P²·2C outputs); DC-DiT has its own stem,
scaffold and final layer at P = 1, which start from their usual initialisation.

The paper's recipe for stable upcycling, as implemented here:

- the timestep and class embedders are frozen (``upcycle.freeze_embedders``);
- a trainable LayerNorm adaptor on c sits before each encoder and decoder block's
  conditioning projection (``model.cond_adaptor = true``, models/scaffold.py);
- [choice, docs/reference.md#source-grid-positions] the sin-cos embedding is evaluated on the source grid,
  (r + 0.5)·s − 0.5 with s = ``model.pos_grid_scale`` = 1/P for a DiT/P at the same
  resolution, so the pretrained blocks see positions on the scale they learned.

The mapping is a pure function of two state dicts (:func:`map_dit_to_dcdit`), so it runs
on meta tensors for a shape check of the full-size model; :func:`upcycle` then trains
the result with the shared loop (``train(..., model_setup=...)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch
from rich.table import Table

from dcdit_cli.common.atomic import check_output, write_json
from dcdit_cli.common.console import DcditError, is_main_process, print0
from dcdit_cli.config.recipe import Recipe
from dcdit_cli.models import build_model
from dcdit_cli.training.loop import train
from dcdit_cli.training.released_checkpoints import DiTShape, inspect_dit, load_dit_checkpoint

# What transfers from a DiT (same names and shapes in DCDiT) and what is frozen.
TRANSFER_PREFIXES = ("t_embedder.", "y_embedder.", "blocks.")
EMBEDDER_PREFIXES = ("t_embedder.", "y_embedder.")


#################################################################################
#                        Does the DiT fit the recipe?                           #
#################################################################################


def check_fit(shape: DiTShape, recipe: Recipe, source="the checkpoint") -> None:
    """One DcditError naming both sides of every size that differs between checkpoint and recipe."""
    m, u = recipe.model, recipe.upcycle
    pairs = [
        ("width", shape.hidden_size, "model.hidden_size", m.hidden_size),
        ("depth", shape.depth, "model.depth", m.depth),
        ("patch size", shape.patch_size, "upcycle.source_patch_size", u.source_patch_size),
        ("input channels", shape.in_channels, "model.in_channels", m.in_channels),
        ("classes", shape.num_classes, "model.num_classes", m.num_classes),
        ("MLP width", shape.mlp_hidden, "model.hidden_size × model.mlp_ratio", int(m.hidden_size * m.mlp_ratio)),
    ]
    if shape.num_tokens is not None and shape.patch_size == u.source_patch_size:
        pairs.append(("tokens", shape.num_tokens, "(upcycle.source_input_size / P)²", (u.source_input_size // u.source_patch_size) ** 2))
    problems = [f"{what} {have} in the checkpoint vs {key} = {want}" for what, have, key, want in pairs if have != want]
    if m.kind != "dcdit":
        problems.append(f"model.kind = {m.kind!r} (upcycling makes a DC-DiT: use a 'dcdit' recipe)")
    if problems:
        raise DcditError(
            f"{source} ({shape.describe()}) does not fit recipe '{recipe.run.name}': {'; '.join(problems)}. "
            f"Use the recipe that matches the checkpoint (DiT-XL/2 → xl-n4-upcycle) or fix the keys with --set"
        )


#################################################################################
#                    The mapping: DiT state dict → DC-DiT state dict            #
#################################################################################


@dataclass
class UpcycleReport:
    """What :func:`map_dit_to_dcdit` did, key by key, and the sizes of every tensor."""

    copied: list[str] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)
    numel: dict[str, int] = field(default_factory=dict)

    @property
    def adaptors(self) -> list[str]:
        return [k for k in self.new if ".cond_norm." in k]

    def rows(self) -> list[tuple[str, str, int, int]]:
        """(status, modules, tensors, parameters) per table row."""
        frozen = set(self.frozen)
        adaptors = set(self.adaptors)
        groups = [
            ("copied, frozen", [k for k in self.copied if k in frozen]),
            ("copied", [k for k in self.copied if k not in frozen]),
            ("new: adaptors on c", [k for k in self.new if k in adaptors]),
            ("new", [k for k in self.new if k not in adaptors]),
            ("left out", self.left_out),
        ]
        return [(status, _modules(keys), len(keys), sum(self.numel[k] for k in keys)) for status, keys in groups if keys]

    def table(self, title: str = "upcycling"):
        table = Table(title=title, title_justify="left")
        for name, justify in (("", "left"), ("modules", "left"), ("tensors", "right"), ("parameters", "right")):
            table.add_column(name, justify=justify)
        for status, modules, tensors, params in self.rows():
            table.add_row(status, modules, str(tensors), f"{params:,}")
        return table

    def to_dict(self) -> dict:
        return {"copied": self.copied, "frozen": self.frozen, "new": self.new, "left_out": self.left_out}


def _modules(keys: list[str]) -> str:
    """A short label for a set of keys: module paths with block indices collapsed."""
    names: dict[str, set[int]] = {}
    for key in keys:
        parts = key.split(".")[:-1] or [key]
        if parts[0] == "blocks":
            names.setdefault("blocks", set()).add(int(parts[1]))
        elif parts[-1] == "cond_norm":
            names.setdefault(f"{parts[0]}.*.cond_norm", set())
        else:
            names.setdefault(parts[0], set())
    labels = []
    for name, idx in names.items():
        labels.append(f"blocks.{min(idx)}–{max(idx)}" if idx and len(idx) > 1 else (f"blocks.{min(idx)}" if idx else name))
    return ", ".join(labels)


def map_dit_to_dcdit(
    source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], *, freeze_embedders: bool = True
) -> tuple[dict[str, torch.Tensor], UpcycleReport]:
    """A pure function: (DiT state dict, freshly initialised DC-DiT state dict) → (DC-DiT state
    dict, report). Blocks and embedders come from ``source``; everything else keeps ``target``'s
    tensor. Nothing is modified in place; meta tensors work (a shape-only check)."""
    out = dict(target)
    report = UpcycleReport(numel={**{k: v.numel() for k, v in source.items()}, **{k: v.numel() for k, v in target.items()}})
    problems = []
    for key, value in source.items():
        if not key.startswith(TRANSFER_PREFIXES):
            report.left_out.append(key)
        elif key not in target:
            problems.append(f"{key} has no place in the DC-DiT")
        elif value.shape != target[key].shape:
            problems.append(f"{key} is {tuple(value.shape)} in the checkpoint vs {tuple(target[key].shape)} in the DC-DiT")
        else:
            out[key] = value.to(dtype=target[key].dtype)
            report.copied.append(key)
    problems += [f"{k} is missing from the checkpoint" for k in target if k.startswith(TRANSFER_PREFIXES) and k not in source]
    if problems:
        raise DcditError(f"the DiT checkpoint does not fit the DC-DiT ({len(problems)} tensors): {'; '.join(problems[:3])}")
    copied = set(report.copied)
    report.new = [k for k in target if k not in copied]
    report.frozen = [k for k in report.copied if freeze_embedders and k.startswith(EMBEDDER_PREFIXES)]
    return out, report


def freeze(model: torch.nn.Module, names: list[str]) -> None:
    """requires_grad = False for the named parameters (they stay out of the optimizer)."""
    params = dict(model.named_parameters())
    for name in names:
        params[name].requires_grad_(False)


#################################################################################
#                                  Running it                                   #
#################################################################################


def check_upcycle_recipe(recipe: Recipe, distill: bool) -> list[str]:
    """Refuses recipes that cannot be upcycled; returns warnings for settings that can."""
    m, u, d = recipe.model, recipe.upcycle, recipe.distill
    if m.kind != "dcdit":
        raise DcditError(f"recipe '{recipe.run.name}' has model.kind = {m.kind!r}: upcycling makes a DC-DiT, use an *-upcycle recipe")
    if distill and d.steps <= 0:
        raise DcditError(f"recipe '{recipe.run.name}' has distill.steps = {d.steps}: set --set distill.steps=5000 "
                         f"(e.g. recipe xl-n4-upcycle-distill), or run `dcdit upcycle` without distillation")
    if not distill and d.steps > 0:
        raise DcditError(f"recipe '{recipe.run.name}' asks for {d.steps} distillation steps: run `dcdit distill` "
                         f"with it, or --set distill.steps=0 for plain upcycling")
    if distill and u.source_input_size != m.input_size:
        raise DcditError(f"the teacher sees the student's input: upcycle.source_input_size = {u.source_input_size} "
                         f"must equal model.input_size = {m.input_size} for distillation")
    warnings = []
    if distill and m.patch_size != 1:
        raise DcditError(f"distillation maps each DC-DiT token to the teacher's patch on the latent grid, which needs "
                         f"model.patch_size = 1 (got {m.patch_size}): --set model.patch_size=1, or upcycle without distillation")
    grid_scale = (u.source_input_size / u.source_patch_size) / (m.input_size / m.patch_size)  # source tokens per DC-DiT token
    if abs(m.pos_grid_scale - grid_scale) > 1e-9:
        warnings.append(f"model.pos_grid_scale = {m.pos_grid_scale}, but the source grid is at {grid_scale:g} of the "
                        f"DC-DiT grid: the pretrained blocks will see positions on a different scale (docs/reference.md#source-grid-positions)")
    if u.freeze_embedders and not m.cond_adaptor:
        warnings.append("model.cond_adaptor = false with frozen embedders: the scaffold conditions on c without "
                        "the LayerNorm adaptor the paper uses (§4.4)")
    return warnings


def prepare_student(model: torch.nn.Module, source: Mapping[str, torch.Tensor], recipe: Recipe) -> UpcycleReport:
    """Loads the DiT's blocks and embedders into ``model`` (a fresh DCDiT) and freezes the embedders."""
    state, report = map_dit_to_dcdit(source, model.state_dict(), freeze_embedders=recipe.upcycle.freeze_embedders)
    model.load_state_dict(state)
    freeze(model, report.frozen)
    return report


def upcycle(
    recipe: Recipe,
    source: Path,
    out_dir: Path,
    *,
    resume: Path | None = None,
    command: str = "",
    torch_compile: bool = False,
    distill_objectives: Callable[[Mapping[str, torch.Tensor], Recipe], list] | None = None,
) -> Path | None:
    """`dcdit upcycle` (and `dcdit distill`, training/distill.py): DiT checkpoint → DC-DiT,
    then the shared training loop into ``out_dir``; returns the last exported EMA weights.
    torch_compile: ``torch.compile`` the whole student, two graphs (``--compile``, :func:`dcdit_cli.models.compile_model`).
    distill_objectives: for `dcdit distill`, builds the warm-up and diffusion objectives from
    the DiT's weights (a frozen teacher); None for plain upcycling.

    Everything is checked (file, sizes, recipe) and the report printed before the run
    directory is touched. Rerunning the same command resumes (the checkpoint is read again:
    the frozen teacher and the freezing need it). With ``distill`` the first
    ``distill.steps`` steps are the activation-distillation warm-up (dcdit_cli/training/distill.py).
    """
    distill = distill_objectives is not None
    check_output(Path(out_dir), "--out", directory=True)
    warnings = check_upcycle_recipe(recipe, distill)
    state = load_dit_checkpoint(source)
    shape = inspect_dit(state, source)
    check_fit(shape, recipe, source)
    with torch.device("meta"):  # the mapping on shapes only, before anything is written
        _, report = map_dit_to_dcdit(state, build_model(recipe.model).state_dict(), freeze_embedders=recipe.upcycle.freeze_embedders)
    print0(report.table(f"upcycling {source} ({shape.describe()}) → DC-DiT '{recipe.run.name}'"))
    for line in warnings:
        print0(f"[yellow]warning:[/] {line}")
    objectives = None
    if distill:
        objectives = distill_objectives(state, recipe)  # a frozen teacher DiT built from the same weights

    pending = [state]  # handed to the model once, then released
    del state

    def model_setup(model):
        report = prepare_student(model, pending.pop(), recipe)
        if is_main_process():
            info = {"source": str(source), "source_shape": shape.__dict__, "distill_steps": recipe.distill.steps if distill else 0,
                    **report.to_dict()}
            write_json(Path(out_dir) / "upcycle.json", info)
        return model

    return train(recipe, Path(out_dir), resume=resume, command=command, model_setup=model_setup, objectives=objectives,
                 torch_compile=torch_compile)

