"""Run directories, atomic checksummed checkpoints, retention and EMA weight export.

    runs/<name>/  recipe.toml  command.txt  env.json  metrics.jsonl
                  checkpoints/step-0000100/  model, ema, optimizer (.safetensors) + state.json + meta.json (last)
                  checkpoints/latest         names the newest checkpoint (a hint: the newest intact one wins)
                  weights/step-0000100-ema.safetensors   EMA weights + the resolved recipe in the metadata

Everything is safetensors or JSON: our checkpoints never need unpickling. A checkpoint is
written into a hidden temporary folder; ``meta.json``, written last, records the SHA-256 of
every other file; the folder is then renamed into place (dcdit_cli/common/atomic.py). Resume
verifies the checksums and, when the newest checkpoint is damaged, falls back to the newest
intact one with a warning naming both. Exported weights carry a checksum of their tensors
in the safetensors metadata, verified by every command that reads them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from dcdit_cli.common.atomic import (
    check_output,
    file_sha256,
    fsync_dir,
    remove_stale_temps,
    temp_path,
    tensors_sha256,
    write_json,
    write_safetensors,
    write_text,
)
from dcdit_cli.common.console import DcditError, warn
from dcdit_cli.config.recipe import read_stored_recipe, recipe_diff, recipe_from_toml
from dcdit_cli.models import build_model
from dcdit_cli.pipelines.folders import is_diffusers_folder, read_folder_weights
from dcdit_cli.training.released_checkpoints import is_safetensors, read_official, resolve_hf

WEIGHTS_FORMAT = "dcdit-weights-v1"
CKPT_FORMAT = "dcdit-checkpoint-v1"
CKPT_FILES = ("model.safetensors", "ema.safetensors", "optimizer.safetensors", "optimizer.json", "state.json")


def step_name(step: int) -> str:
    return f"step-{step:07d}"


# ----------------------------------------------------------------------------------------
# Optimizer state ⇄ tensors + JSON (no pickle)
# ----------------------------------------------------------------------------------------


def optimizer_to_tensors(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for pid, state in state_dict["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for full, value in list(tensors.items()) + list(meta["scalars"].items()):
        pid, key = full.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


# ----------------------------------------------------------------------------------------
# Training checkpoints
# ----------------------------------------------------------------------------------------


def save_checkpoint(run_dir: Path, step: int, model_state, ema_state, optim_state, state: dict, keep_last: int) -> Path:
    """Writes checkpoints/step-N atomically with checksums, updates ``latest``, prunes to ``keep_last``."""
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / step_name(step)
    tmp = temp_path(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write_safetensors(tmp / "model.safetensors", model_state)
    write_safetensors(tmp / "ema.safetensors", ema_state)
    optim_tensors, optim_meta = optimizer_to_tensors(optim_state)
    write_safetensors(tmp / "optimizer.safetensors", optim_tensors)
    write_json(tmp / "optimizer.json", optim_meta, indent=None)
    write_json(tmp / "state.json", state, indent=2)
    sums = {name: file_sha256(tmp / name) for name in CKPT_FILES}  # read back: what is on disk
    write_json(tmp / "meta.json", {"format": CKPT_FORMAT, "step": step, "sha256": sums})  # last: marks complete
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(ckpt_root)
    write_text(ckpt_root / "latest", final.name + "\n")
    prune_checkpoints(ckpt_root, keep_last)
    return final


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint directory ``path`` cannot be trusted, or None when every checksum matches."""
    try:
        meta = json.loads((Path(path) / "meta.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "no meta.json: an unfinished write"
    except (OSError, ValueError) as e:
        return f"meta.json is unreadable ({type(e).__name__})"
    if not isinstance(meta, dict) or meta.get("format") != CKPT_FORMAT or not isinstance(meta.get("sha256"), dict):
        return "meta.json is not a dcdit checkpoint record with checksums"
    for name in CKPT_FILES:
        try:
            if file_sha256(Path(path) / name) != meta["sha256"].get(name):
                return f"{name} does not match its checksum"
        except OSError:
            return f"{name} is missing or unreadable"
    return None


def checkpoint_dirs(ckpt_root: Path) -> list[Path]:
    """Every step-N directory, complete or not, oldest first."""
    if not ckpt_root.is_dir():
        return []
    return sorted((p for p in ckpt_root.glob("step-*") if p.is_dir()), key=lambda p: p.name)


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints (meta.json present), oldest first (no checksum check: cheap)."""
    return [p for p in checkpoint_dirs(ckpt_root) if (p / "meta.json").is_file()]


def prune_checkpoints(ckpt_root: Path, keep_last: int) -> None:
    for old in complete_checkpoints(ckpt_root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    remove_stale_temps(ckpt_root)


def find_latest(run_dir: Path) -> Path | None:
    """The newest intact checkpoint of a run (whatever ``latest`` says: it may lag after a kill).

    Damaged or unfinished newer checkpoints are skipped with a warning naming both; when
    checkpoints exist but none is intact the run is not silently restarted: a DcditError says so.
    """
    ckpt_root = Path(run_dir) / "checkpoints"
    damaged = []
    for candidate in reversed(checkpoint_dirs(ckpt_root)):
        problem = checkpoint_problem(candidate)
        if problem is None:
            for bad, why in damaged:
                warn(f"checkpoint {bad} is damaged ({why}): resuming from {candidate} instead")
            return candidate
        damaged.append((candidate, problem))
    if damaged:
        bad, why = damaged[0]
        raise DcditError(
            f"no intact checkpoint in {ckpt_root} (newest: {bad.name}, {why}): delete {ckpt_root} to start "
            f"over, or pass --out for a new run"
        )
    return None


def load_checkpoint(path: Path) -> dict:
    """Loads a training checkpoint directory (written by :func:`save_checkpoint`), checksums verified."""
    path = Path(path)
    if path.is_dir() and not (path / "meta.json").exists() and (path / "checkpoints").is_dir():
        inner = find_latest(path)
        if inner is None:
            raise DcditError(f"{path} holds no complete checkpoint: pass a run dir or a checkpoints/step-N directory")
        path = inner
    problem = checkpoint_problem(path) if path.is_dir() else "not a directory"
    if problem is not None:
        raise DcditError(
            f"{path} is not an intact dcdit checkpoint ({problem}): pass the run directory to resume from its "
            f"newest intact checkpoint, or another checkpoints/step-N"
        )
    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        optim_meta = json.loads((path / "optimizer.json").read_text(encoding="utf-8"))
        return {
            "path": path,
            "step": int(meta["step"]),
            "model": load_file(str(path / "model.safetensors")),
            "ema": load_file(str(path / "ema.safetensors")),
            "optimizer": optimizer_from_tensors(load_file(str(path / "optimizer.safetensors")), optim_meta),
            "state": json.loads((path / "state.json").read_text(encoding="utf-8")),
        }
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        raise DcditError(f"{path} is not a readable dcdit checkpoint ({e}); pass another --resume or delete it") from None


def _check_optimizer_shapes(optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    """ValueError when a per-parameter state tensor (AdamW's moments) does not have its parameter's
    shape: torch would load it and fail only at the first step."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, state in state_dict.get("state", {}).items():
        if not isinstance(index, int) or not 0 <= index < len(params):
            raise ValueError(f"optimizer state for parameter {index!r} of {len(params)}")
        for name, value in state.items():
            if torch.is_tensor(value) and value.dim() > 0 and tuple(value.shape) != tuple(params[index].shape):
                raise ValueError(f"optimizer {name} of parameter {index}: {tuple(value.shape)} vs {tuple(params[index].shape)}")


def load_into(module, state_dict: dict, source: Path, what: str, may_be_new: str | None = None) -> list[str]:
    """``module.load_state_dict(state_dict)`` with a one-line DcditError when the shapes or names
    differ (a checkpoint of another recipe) instead of torch's dump of every tensor.

    ``may_be_new``: a key component (e.g. ``".dydit."``) whose keys may be missing from
    ``state_dict`` and keep their initialisation (gates added on top of a pretrained model);
    returns those keys."""
    try:
        if isinstance(module, torch.optim.Optimizer):
            _check_optimizer_shapes(module, state_dict)
            module.load_state_dict(state_dict)
            return []
        own = module.state_dict()
        wrong = [k for k, v in state_dict.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
        new = [k for k in own if k not in state_dict and may_be_new is not None and may_be_new in f".{k}"]
        missing = sorted(set(own) - set(state_dict) - set(new))
        unexpected = sorted(set(state_dict) - set(own))
        if wrong or missing or unexpected:
            detail = (f"{len(wrong)} tensors of other shapes (e.g. {wrong[0]}: {tuple(state_dict[wrong[0]].shape)} vs "
                      f"{tuple(own[wrong[0]].shape)})" if wrong else
                      f"{len(missing)} missing (e.g. {(missing or ['-'])[0]}) / {len(unexpected)} unexpected tensors "
                      f"(e.g. {(unexpected or ['-'])[0]})")
            raise ValueError(detail)
        module.load_state_dict(state_dict, strict=not new)
        return new
    except (ValueError, RuntimeError, KeyError) as e:
        raise DcditError(
            f"the {what} in {source} was made by a different model ({str(e).splitlines()[0]}): use the recipe it was "
            f"trained with (its run's recipe.toml), or another checkpoint"
        ) from None


# ----------------------------------------------------------------------------------------
# EMA weights: what sample / viz-boundaries / fid / flops --ckpt read
# ----------------------------------------------------------------------------------------


def export_weights(run_dir: Path, step: int, ema_state: dict, recipe_toml: str, keep_last: int) -> Path:
    weights = Path(run_dir) / "weights"
    weights.mkdir(parents=True, exist_ok=True)
    final = weights / f"{step_name(step)}-ema.safetensors"
    meta = {"format": WEIGHTS_FORMAT, "recipe": recipe_toml, "step": str(step), "sha256": tensors_sha256(ema_state)}
    write_safetensors(final, ema_state, metadata=meta)
    for old in sorted(weights.glob("step-*-ema.safetensors"))[:-keep_last]:
        old.unlink(missing_ok=True)
    return final


def resolve_weights(path: Path) -> Path:
    """A run dir → its newest exported EMA weights; ``hf:OWNER/REPO/FILE`` → the file in the local
    Hugging Face cache; a file → itself."""
    if str(path).startswith("hf:"):
        return resolve_hf(str(path))
    path = Path(path)
    if path.is_dir():
        found = sorted((path / "weights").glob("step-*-ema.safetensors"))
        if not found:
            raise DcditError(f"{path} has no exported weights (weights/step-*-ema.safetensors): train it first, or pass the .safetensors file")
        return found[-1]
    if not path.is_file():
        raise DcditError(f"{path} does not exist: pass a run directory (runs/NAME) or a weights .safetensors file")
    return path


def read_weights(path: Path, weights: str = "ema"):
    """(state dict, recipe, step) from a run dir, exported dcdit weights (.safetensors), or a
    checkpoint of the authors' DC-DiT release (.pt, also as ``hf:amd/DynamicChunkingDiT/…``),
    whose ``weights`` ('ema' or 'model') are mapped to dcdit's names (dcdit_cli/training/released_checkpoints.py),
    or a diffusers folder of `dcdit export` (also as ``hf:OWNER/NAME``, dcdit_cli/pipelines/folders.py)."""
    if is_diffusers_folder(path):
        return read_folder_weights(path)
    file = resolve_weights(path)
    if not is_safetensors(file):
        return read_official(file, weights)
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise DcditError(f"{file} is not a safetensors file ({e}); pass weights exported by `dcdit train`") from None
    if meta.get("format") != WEIGHTS_FORMAT or "recipe" not in meta:
        raise DcditError(f"{file} has no dcdit recipe in its metadata: pass weights exported by `dcdit train` (runs/NAME/weights/*.safetensors)")
    recipe = recipe_from_toml(meta["recipe"], source=f"{file} (stored recipe)")
    try:
        state = load_file(str(file), device="cpu")
    except (SafetensorError, OSError) as e:
        raise DcditError(f"{file} is damaged ({e}): export the weights again from the run's checkpoint") from None
    if "sha256" in meta and tensors_sha256(state) != meta["sha256"]:
        raise DcditError(f"{file} is damaged (its tensors do not match their checksum): use another weights file of the run")
    return state, with_stored_patch_size(recipe, state), int(meta.get("step", 0))


def with_stored_patch_size(recipe, state):
    """The recipe with the patch size its DC-DiT weights were trained at. Before DC-DiT had a patch stem
    (docs/pixels.md), a recipe that left ``model.patch_size`` out stored the old default 2, which DC-DiT
    ignored; its weights are a P = 1 model (a stem conv on C input channels, not C·P²), so P = 1 it is."""
    m, stem = recipe.model, state.get("encoder.stem.weight")
    if m.kind == "dcdit" and m.patch_size > 1 and stem is not None and stem.shape[1] == m.in_channels:
        return recipe.replace(model={"patch_size": 1})
    return recipe


def load_weights(path: Path, device="cpu"):
    """(model in eval mode, recipe, step) from anything :func:`read_weights` reads."""
    state, recipe, step = read_weights(path)
    model = build_model(recipe.model)
    load_into(model, state, path, "weights")
    return model.to(device).eval(), recipe, step


def init_from(model: torch.nn.Module, path: Path) -> list[str]:
    """``train --init-from``: ``path``'s weights into a freshly built ``model``; returns the keys
    left at their initialisation. Keys must match exactly, except the DyDiT gate parameters
    (a ``.dydit.`` component) that a model may add on top of a DC-DiT (issue 12)."""
    state, _, _ = read_weights(path)
    return load_into(model, state, path, "--init-from weights", may_be_new=".dydit.")


def convert_weights(source: Path, out_dir: Path, weights: str = "ema") -> Path:
    """`dcdit convert`: any checkpoint :func:`read_weights` reads → dcdit weights (safetensors
    with the resolved recipe in the metadata) under ``out_dir``/weights, plus ``out_dir``/recipe.toml."""
    out_dir = check_output(Path(out_dir), "--out", directory=True)
    if (out_dir / "checkpoints").exists():
        raise DcditError(f"--out {out_dir} holds a training run: write the converted weights to a new directory")
    state, recipe, step = read_weights(source, weights)
    stored = out_dir / "recipe.toml"
    if stored.is_file():
        try:
            changed = recipe_diff(read_stored_recipe(stored), recipe)
        except DcditError:
            changed = ["its recipe.toml does not load"]
        if changed:
            raise DcditError(f"--out {out_dir} holds weights of another recipe ({'; '.join(changed[:3])}): "
                             f"write to a new directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(stored, recipe.to_toml())
    return export_weights(out_dir, step, state, recipe.to_toml(), keep_last=1_000_000)
