"""Run directories, atomic checkpoints, retention and EMA weight export.

    runs/<name>/  recipe.toml  command.txt  env.json  metrics.jsonl
                  checkpoints/step-0000100/  model, ema, optimizer (.safetensors) + state.json + meta.json (last)
                  checkpoints/latest         names the newest complete checkpoint
                  weights/step-0000100-ema.safetensors   EMA weights + the resolved recipe in the metadata

Everything is safetensors or JSON: our checkpoints never need unpickling. A checkpoint is
written under a temporary name, fsynced and renamed; ``latest`` is updated last, so a run
killed at any point leaves either the previous or the new checkpoint, never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dcdit_cli.console import DcditError

WEIGHTS_FORMAT = "dcdit-weights-v1"
CKPT_FORMAT = "dcdit-checkpoint-v1"


def step_name(step: int) -> str:
    return f"step-{step:07d}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata=metadata)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


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
    """Writes checkpoints/step-N atomically, updates ``latest``, prunes to ``keep_last``."""
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / step_name(step)
    tmp = ckpt_root / f".tmp-{step_name(step)}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    _save_tensors(model_state, tmp / "model.safetensors")
    _save_tensors(ema_state, tmp / "ema.safetensors")
    optim_tensors, optim_meta = optimizer_to_tensors(optim_state)
    _save_tensors(optim_tensors, tmp / "optimizer.safetensors")
    atomic_write_text(tmp / "optimizer.json", json.dumps(optim_meta))
    atomic_write_text(tmp / "state.json", json.dumps(state, indent=2))
    atomic_write_text(tmp / "meta.json", json.dumps({"format": CKPT_FORMAT, "step": step}))  # last: marks complete
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(ckpt_root)
    atomic_write_text(ckpt_root / "latest", final.name + "\n")
    prune_checkpoints(ckpt_root, keep_last)
    return final


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints (meta.json present), oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.glob("step-*") if (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def prune_checkpoints(ckpt_root: Path, keep_last: int) -> None:
    for old in complete_checkpoints(ckpt_root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in ckpt_root.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)


def find_latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint: the one ``latest`` names, else the newest with meta.json."""
    ckpt_root = Path(run_dir) / "checkpoints"
    latest = ckpt_root / "latest"
    if latest.is_file():
        named = ckpt_root / latest.read_text().strip()
        if (named / "meta.json").is_file():
            return named
    complete = complete_checkpoints(ckpt_root)
    return complete[-1] if complete else None


def load_checkpoint(path: Path) -> dict:
    """Loads a training checkpoint directory (written by :func:`save_checkpoint`)."""
    path = Path(path)
    if path.is_dir() and not (path / "meta.json").exists():
        inner = find_latest(path)
        if inner is None:
            raise DcditError(f"{path} holds no complete checkpoint: pass a run dir or a checkpoints/step-N directory")
        path = inner
    try:
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("format") != CKPT_FORMAT:
            raise ValueError(f"format {meta.get('format')!r}")
        optim_meta = json.loads((path / "optimizer.json").read_text())
        return {
            "path": path,
            "step": meta["step"],
            "model": load_file(str(path / "model.safetensors")),
            "ema": load_file(str(path / "ema.safetensors")),
            "optimizer": optimizer_from_tensors(load_file(str(path / "optimizer.safetensors")), optim_meta),
            "state": json.loads((path / "state.json").read_text()),
        }
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise DcditError(f"{path} is not a readable dcdit checkpoint ({e}); pass another --resume or delete it") from None


# ----------------------------------------------------------------------------------------
# EMA weights: what sample / viz-boundaries / fid / flops --ckpt read
# ----------------------------------------------------------------------------------------


def export_weights(run_dir: Path, step: int, ema_state: dict, recipe_toml: str, keep_last: int) -> Path:
    weights = Path(run_dir) / "weights"
    weights.mkdir(parents=True, exist_ok=True)
    final = weights / f"{step_name(step)}-ema.safetensors"
    tmp = weights / f".{final.name}.tmp"
    _save_tensors(ema_state, tmp, metadata={"format": WEIGHTS_FORMAT, "recipe": recipe_toml, "step": str(step)})
    os.replace(tmp, final)
    _fsync_dir(weights)
    for old in sorted(weights.glob("step-*-ema.safetensors"))[:-keep_last]:
        old.unlink(missing_ok=True)
    return final


def resolve_weights(path: Path) -> Path:
    """A run dir → its newest exported EMA weights; ``hf:OWNER/REPO/FILE`` → the file in the local
    Hugging Face cache; a file → itself."""
    if str(path).startswith("hf:"):
        from dcdit_cli.foreign import resolve_hf

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
    whose ``weights`` ('ema' or 'model') are mapped to dcdit's names (dcdit_cli/foreign.py)."""
    from safetensors import safe_open

    from dcdit_cli.foreign import is_safetensors, read_official
    from dcdit_cli.recipe import recipe_from_toml

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
    return load_file(str(file), device="cpu"), recipe, int(meta.get("step", 0))


def load_weights(path: Path, device="cpu"):
    """(model in eval mode, recipe, step) from anything :func:`read_weights` reads."""
    from dcdit_cli.models import build_model

    state, recipe, step = read_weights(path)
    model = build_model(recipe.model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise DcditError(f"{path} does not match its recipe (missing {missing[:3]}, unexpected {unexpected[:3]}): re-export it")
    return model.to(device).eval(), recipe, step


def load_into(model: torch.nn.Module, path: Path) -> list[str]:
    """``train --init-from``: ``path``'s weights into a freshly built ``model``; returns the keys
    left at their initialisation. Keys must match exactly, except the DyDiT gate parameters
    (a ``.dydit.`` component) that a model may add on top of a DC-DiT (issue 12)."""
    state, _, _ = read_weights(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in state and state[k].shape != v.shape]
    fatal = [k for k in missing if ".dydit." not in f".{k}"]
    if fatal or unexpected or shapes:
        what = "; ".join(x for x in (f"missing {fatal[:3]}" if fatal else "", f"unexpected {unexpected[:3]}" if unexpected else "",
                                     f"shapes {shapes[:2]}" if shapes else "") if x)
        raise DcditError(f"--init-from {path} does not fit the recipe's model ({what}): use the recipe it was trained with")
    model.load_state_dict(state, strict=False)
    return missing


def convert_weights(source: Path, out_dir: Path, weights: str = "ema") -> Path:
    """`dcdit convert`: any checkpoint :func:`read_weights` reads → dcdit weights (safetensors
    with the resolved recipe in the metadata) under ``out_dir``/weights, plus ``out_dir``/recipe.toml."""
    state, recipe, step = read_weights(source, weights)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "recipe.toml", recipe.to_toml())
    return export_weights(out_dir, step, state, recipe.to_toml(), keep_last=1_000_000)
