"""Reading diffusers folders that ``dcdit export`` writes, from disk or the local Hugging Face cache.

Every file is checked before anything is built (one ``DcditError`` line naming the file and the
fix): ``model_index.json`` names dcdit's pipeline and known component classes; the transformer's
``config.json`` holds a valid recipe; its weights are a complete safetensors file whose tensor
names and shapes are those of the model the recipe builds. Weights are safetensors only: a
folder with pickled weights (``.bin``) is refused, never unpickled. Nothing is downloaded: a
``hf:OWNER/NAME`` reference is looked up in the local cache (``HF_HUB_CACHE``).
"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from huggingface_hub import constants as hf_constants
from huggingface_hub import snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from dcdit_cli.common.console import DcditError
from dcdit_cli.config.recipe import Recipe, recipe_from_dict
from dcdit_cli.models import build_model
from dcdit_cli.pipelines.pipeline import DCDiTPipeline
from dcdit_cli.pipelines.transformer import DCDiTTransformer2DModel

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
PIPELINE_CLASS = DCDiTPipeline.__name__
TRANSFORMER_CLASS = DCDiTTransformer2DModel.__name__
EXPORT_FIX = "export the run again with `dcdit export --ckpt RUN --out DIR`"


def hub_repo(reference) -> str | None:
    """``hf:OWNER/NAME`` → ``OWNER/NAME`` (a repo of a diffusers folder); None for anything else
    (a local path, or ``hf:OWNER/REPO/FILE``: one checkpoint file)."""
    text = str(reference)
    parts = text[len("hf:"):].strip("/").split("/") if text.startswith("hf:") else []
    return "/".join(parts) if len(parts) == 2 else None


def is_diffusers_folder(reference) -> bool:
    """Whether ``reference`` names a diffusers folder: ``hf:OWNER/NAME``, or a directory holding
    ``model_index.json`` or a transformer's ``config.json``."""
    path = Path(str(reference))
    return hub_repo(reference) is not None or (path.is_dir() and (
        (path / "model_index.json").is_file() or (path / "config.json").is_file()))


def resolve_folder(reference) -> Path:
    """The local directory of a diffusers folder: the path itself, or the snapshot of
    ``hf:OWNER/NAME`` in the local Hugging Face cache."""
    repo = hub_repo(reference)
    if repo is None:
        return Path(str(reference))
    try:
        return Path(snapshot_download(repo, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        raise DcditError(f"{reference} is not in the local Hugging Face cache ({hf_constants.HF_HUB_CACHE}): on a machine "
                         f"with internet run `huggingface-cli download {repo}` and copy the cache here (or set "
                         f"HF_HUB_CACHE), or pass the downloaded folder's path") from None


def _json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise DcditError(f"{path} is missing: {path.parent} is not a complete {what}; {EXPORT_FIX}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DcditError(f"{path} is not readable JSON ({type(e).__name__}): {EXPORT_FIX}") from None
    if not isinstance(data, dict):
        raise DcditError(f"{path} is not a JSON object: {EXPORT_FIX}")
    return data


def _component_class(index: dict, name: str) -> str | None:
    entry = index.get(name)
    return entry[1] if isinstance(entry, list) and len(entry) == 2 else None


def check_pipeline_index(folder: Path) -> None:
    """``model_index.json`` names dcdit's pipeline, its transformer and a diffusers scheduler (and a
    diffusers ``AutoencoderKL`` or no VAE)."""
    index = _json(folder / "model_index.json", "diffusers pipeline folder")
    problems = []
    if index.get("_class_name") != PIPELINE_CLASS:
        problems.append(f"pipeline class {index.get('_class_name')!r} (expected {PIPELINE_CLASS})")
    if _component_class(index, "transformer") != TRANSFORMER_CLASS:
        problems.append(f"transformer class {_component_class(index, 'transformer')!r} (expected {TRANSFORMER_CLASS})")
    scheduler = _component_class(index, "scheduler")
    if not (isinstance(scheduler, str) and isinstance(getattr(diffusers, scheduler, None), type)
            and issubclass(getattr(diffusers, scheduler), SchedulerMixin)):
        problems.append(f"scheduler class {scheduler!r} (expected a diffusers scheduler)")
    if _component_class(index, "vae") not in (None, "AutoencoderKL"):
        problems.append(f"vae class {_component_class(index, 'vae')!r} (expected AutoencoderKL or none)")
    if problems:
        raise DcditError(f"{folder / 'model_index.json'} names an unknown {'; '.join(problems)}: "
                         f"dcdit reads folders written by `dcdit export`")


def check_transformer(folder: Path) -> tuple[Recipe, int]:
    """(recipe, step) of a transformer folder, after checking its config and weights file
    (complete, safetensors, and the tensors of the model the config builds)."""
    config = _json(folder / "config.json", "diffusers model folder")
    if config.get("_class_name") != TRANSFORMER_CLASS:
        raise DcditError(f"{folder / 'config.json'} names an unknown class {config.get('_class_name')!r} "
                         f"(expected {TRANSFORMER_CLASS}): dcdit reads folders written by `dcdit export`")
    if not isinstance(config.get("recipe"), dict):
        raise DcditError(f"{folder / 'config.json'} has no dcdit recipe: {EXPORT_FIX}")
    recipe = recipe_from_dict(config["recipe"], source=f"{folder / 'config.json'} (recipe)", drop_removed=True)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        pickled = sorted(p.name for p in folder.glob("*.bin"))
        why = f"only pickled weights ({pickled[0]}), which dcdit never unpickles" if pickled else "no weights"
        raise DcditError(f"{folder} holds {why}: it needs {WEIGHTS_NAME}; {EXPORT_FIX}")
    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise DcditError(f"{weights} is damaged or truncated ({e}): download or export it again") from None
    own = {f"model.{k}": tuple(v.shape) for k, v in build_model(recipe.model).state_dict().items()}
    if shapes != own:
        wrong = sorted(set(shapes) ^ set(own)) or sorted(k for k in own if shapes[k] != own[k])
        raise DcditError(f"{folder / 'config.json'} does not match {WEIGHTS_NAME} ({len(wrong)} tensors differ, e.g. "
                         f"{wrong[0]}: {shapes.get(wrong[0])} in the file vs {own.get(wrong[0])} from the config): "
                         f"{EXPORT_FIX}")
    return recipe, int(config.get("step", 0))


def transformer_dir(folder: Path) -> Path:
    """The transformer's directory of a pipeline folder (``transformer/``) or of a model folder (itself)."""
    return folder / "transformer" if (folder / "model_index.json").is_file() else folder


def read_folder_weights(reference) -> tuple[dict[str, torch.Tensor], Recipe, int]:
    """(dcdit state dict, recipe, step) of a diffusers folder, checked: what ``dcdit sample`` and
    the other ``--ckpt`` commands read from ``dcdit export``'s output or ``hf:OWNER/NAME``."""
    folder = resolve_folder(reference)
    if (folder / "model_index.json").is_file():
        check_pipeline_index(folder)
    inner = transformer_dir(folder)
    recipe, step = check_transformer(inner)
    state = load_file(str(inner / WEIGHTS_NAME))
    return {k[len("model."):]: v for k, v in state.items()}, recipe, step


def load_pipeline(reference, device: str | torch.device = "cpu") -> DCDiTPipeline:
    """``DCDiTPipeline.from_pretrained`` on a checked folder (or ``hf:OWNER/NAME`` from the cache)."""
    folder = resolve_folder(reference)
    check_pipeline_index(folder)
    check_transformer(folder / "transformer")
    return DCDiTPipeline.from_pretrained(str(folder), use_safetensors=True).to(device)
