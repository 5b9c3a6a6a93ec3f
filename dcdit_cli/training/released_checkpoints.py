"""Readers of checkpoints that dcdit did not write: the official DiT release and the authors'
DC-DiT release (AMD-AGI/DynamicChunkingDiT, Hugging Face ``amd/DynamicChunkingDiT``).

Both are pickles. They are read with ``torch.load(weights_only=True)``, whose unpickler only
constructs allow-listed globals, so no code from the file runs; the authors' file is also
scanned first and any global outside its exact format is refused with one line naming it.
The authors' pickled config dataclasses (module ``config``) are rebuilt as inert stand-in
classes that only hold attributes. Nothing here imports from the rest of dcdit except the
recipe schema and the console: upcycle, distill and checkpoint import this module, never
the other way round.

- :func:`load_dit_checkpoint`, :func:`inspect_dit`: a DiT state dict and its sizes (upcycling);
- :func:`read_official`: the authors' DC-DiT file → (dcdit state dict, recipe, step), with the
  key map, the sin-cos check of ``pos_embed`` and the recipe derived from their config;
- :func:`resolve_hf`: ``hf:amd/DynamicChunkingDiT/XL-256/FILE`` → a file in the local HF cache.
"""

from __future__ import annotations

import argparse
import pickletools
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import try_to_load_from_cache
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from dcdit_cli.common.console import DcditError, load_error_reason
from dcdit_cli.config.recipe import Recipe
from dcdit_cli.models import build_model
from dcdit_cli.models.dit import grid_positions, sincos_2d

# Keys every DiT state dict has (facebookresearch/DiT models.py; docs/reference.md#official-dit-checkpoint).
DIT_KEYS = (
    "x_embedder.proj.weight",
    "t_embedder.mlp.0.weight",
    "y_embedder.embedding_table.weight",
    "blocks.0.attn.qkv.weight",
    "blocks.0.mlp.fc1.weight",
    "final_layer.linear.weight",
)
DCDIT_KEYS = ("encoder.stem.weight", "router.q_proj.weight", "router.proj.weight", "residual_proj.weight")
_HINT = "pass the official DiT checkpoint (e.g. DiT-XL-2-256x256.pt) or a DiT train.py checkpoint"
# Prefixes that training wrappers put on parameter names (DDP, torch.compile, FSDP).
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.")


def strip_wrappers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        while key.startswith(WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


_KNOWN_GLOBALS = {
    "config.": "is the authors' DC-DiT release: read it with `dcdit convert --from`, `--ckpt` or `train --init-from`",
    "argparse.Namespace": "is an official DiT training checkpoint, not a DC-DiT release: upcycle it with "
                          "`dcdit upcycle --from`",
}
"""Globals that identify another kind of checkpoint than the reader expects: the line says which."""


def _refuse_known(path: Path, name: str) -> None:
    """A DcditError saying which kind of checkpoint ``path`` is when the refused global ``name`` tells."""
    for prefix, what in _KNOWN_GLOBALS.items():
        if name.startswith(prefix):
            raise DcditError(f"{path} {what} (it pickles {name}, which this reader does not load)")


def safe_torch_load(path: Path, allowed: Mapping[str, object], hint: str, mmap: bool = False):
    """``torch.load(weights_only=True)`` with the stand-ins in ``allowed`` ({'module.Name': class}).

    torch's restricted unpickler resolves a GLOBAL by '__module__.__qualname__' against its own
    allow-list (tensors, storages, OrderedDict …) and the classes given here; instances of those
    classes are made with ``cls.__new__`` and filled by ``__dict__.update``: nothing else runs.
    ``mmap`` (zip files only) maps the tensors instead of reading them all: an XL file holds model,
    EMA and optimizer state (~11 GB) of which one state dict is used.
    """
    try:
        with torch.serialization.safe_globals(list(allowed.values())):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # any unreadable input is the user's to fix
        refused = re.search(r"GLOBAL (\S+)", str(e))
        if refused:
            _refuse_known(path, refused.group(1))
            raise DcditError(f"{path} wants to load the global {refused.group(1)}, which a checkpoint never needs: "
                             f"refused (nothing from it was run); {hint}") from None
        raise DcditError(f"{path} is not a readable PyTorch checkpoint ({load_error_reason(e)}): {hint}") from None


def pickle_globals(path: Path) -> list[str] | None:
    """The globals a torch zip checkpoint's pickle names, read without unpickling (None: not a zip)."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            data = archive.read(name) if name else b""
    except (zipfile.BadZipFile, OSError, KeyError, EOFError):
        return None
    found = []
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("GLOBAL", "INST"):
                found.append(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL":  # protocol ≥ 4: the name is on the stack, not in the opcode
                found.append("<a global named on the pickle stack>")
    except Exception as e:  # a truncated or corrupt pickle
        raise DcditError(f"{path} is truncated or corrupt ({load_error_reason(e)}): download it again") from None
    return found


#################################################################################
#                        The official DiT checkpoint                            #
#################################################################################


@dataclass(frozen=True)
class DiTShape:
    """The sizes of a DiT read off its state dict (the head count is not stored in it)."""

    hidden_size: int
    depth: int
    patch_size: int
    in_channels: int
    num_classes: int
    mlp_hidden: int
    out_features: int
    num_tokens: int | None
    num_params: int

    @property
    def learn_sigma(self) -> bool:
        return self.out_features == 2 * self.patch_size**2 * self.in_channels

    def describe(self) -> str:
        return f"DiT/{self.patch_size}, width {self.hidden_size}, {self.depth} blocks, {self.num_params / 1e6:.1f}M parameters"


def load_dit_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The DiT state dict in ``path``: a flat state dict (the official release), DiT train.py's
    {model, ema, opt, args} (the ``ema`` weights are used), or a safetensors file (also the
    EMA weights a ``model.kind = "dit"`` run of ``dcdit train`` exports).

    Pickles are read with ``torch.load(weights_only=True)`` (plus ``argparse.Namespace``, the
    ``args`` of DiT's train.py); anything else is a DcditError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DcditError(f"--from {path} does not exist: {_HINT}")
    if is_safetensors(path):
        state = _load_safetensors(path)
    else:
        state = _unwrap(safe_torch_load(path, {"argparse.Namespace": argparse.Namespace}, _HINT), path)
    inspect_dit(state, path)  # raises when it is not a DiT
    return state


def is_safetensors(path: Path) -> bool:
    """By name, or by content: a u64 header length, then the JSON header."""
    if Path(path).suffix == ".safetensors":
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    return head[8:9] == b"{"


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            exported = (f.metadata() or {}).get("format", "").startswith("dcdit-weights")  # checkpoint.WEIGHTS_FORMAT
        state = load_file(str(path), device="cpu")  # includes the weights of a `dcdit train` DiT run
    except (SafetensorError, OSError) as e:
        raise DcditError(f"{path} is not a readable safetensors file ({load_error_reason(e)}): {_HINT}") from None
    if exported and any(k in state for k in DCDIT_KEYS):
        raise DcditError(f"{path} is the weights of a DC-DiT run (exported by dcdit), not a DiT checkpoint: {_HINT}; "
                         f"to continue that run, rerun its command or pass --resume")
    return state


def _unwrap(obj, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and isinstance(obj.get("ema"), dict):
        obj = obj["ema"]  # DiT train.py: {model, ema, opt, args}; sample from the EMA
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        kind = f"a dict with keys {', '.join(list(map(str, obj))[:4])}" if isinstance(obj, dict) else type(obj).__name__
        raise DcditError(f"{path} holds {kind}, not a DiT state dict: {_HINT}")
    return strip_wrappers(obj)


def inspect_dit(state: Mapping[str, torch.Tensor], source="the checkpoint") -> DiTShape:
    """The sizes of the DiT in ``state``; a DcditError when it is not a DiT state dict."""
    missing = [k for k in DIT_KEYS if k not in state]
    if missing:
        if any(k in state for k in DCDIT_KEYS) or any(k.startswith("hnet.") for k in state):
            raise DcditError(f"{source} is a DC-DiT state dict, not a DiT checkpoint: {_HINT}")
        found = ", ".join(list(state)[:3])
        raise DcditError(f"{source} is not a DiT checkpoint (no {', '.join(missing[:2])}; it has {found}, …): {_HINT}")
    patch = state["x_embedder.proj.weight"]
    if patch.ndim != 4 or patch.shape[2] != patch.shape[3]:
        raise DcditError(f"{source}: x_embedder.proj.weight has shape {tuple(patch.shape)}, not a square patch embedding: {_HINT}")
    indices = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    if indices != set(range(len(indices))):
        raise DcditError(f"{source}: its blocks are numbered {sorted(indices)[:5]}…, not 0..n−1: {_HINT}")
    pos = state.get("pos_embed")
    return DiTShape(
        hidden_size=patch.shape[0],
        depth=len(indices),
        patch_size=patch.shape[2],
        in_channels=patch.shape[1],
        num_classes=state["y_embedder.embedding_table.weight"].shape[0] - 1,
        mlp_hidden=state["blocks.0.mlp.fc1.weight"].shape[0],
        out_features=state["final_layer.linear.weight"].shape[0],
        num_tokens=None if pos is None else pos.shape[1],
        num_params=sum(v.numel() for v in state.values()),
    )


#################################################################################
#                 The authors' DC-DiT release (AMD-AGI/DynamicChunkingDiT)      #
#################################################################################

# Their train.py saves {"model", "ema", "opt", "config"}; "config" is a tree of these dataclasses
# from their module `config`. Each becomes an inert stand-in: a class with that module and name
# and no methods, which torch's unpickler fills through __dict__ (no __setstate__ to run).
OFFICIAL_CONFIG_CLASSES = ("Config", "ModelConfig", "HNetConfig", "TrainingConfig", "DataConfig", "DiffusionConfig", "LoggingConfig")
_STAND_INS = {f"config.{name}": type(name, (), {"__module__": "config", "__qualname__": name}) for name in OFFICIAL_CONFIG_CLASSES}
# Every global their file may name: the stand-ins, the state-dict container and fp32 tensors
# (plus the other storage types an optimizer state may hold). Anything else is refused.
OFFICIAL_GLOBALS = {*_STAND_INS, "collections.OrderedDict", "torch._utils._rebuild_tensor_v2",
                    *(f"torch.{t}Storage" for t in ("Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool"))}
_OFFICIAL_HINT = ("pass a checkpoint of the authors' DC-DiT release (amd/DynamicChunkingDiT S-256/XL-256 .pt), "
                  "dcdit weights (.safetensors) or a dcdit run directory")


def _plain(obj):
    """Stand-in instances → nested dicts (what :func:`official_recipe` reads)."""
    if type(obj) in _STAND_INS.values():
        return {k: _plain(v) for k, v in vars(obj).items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _official_key(key: str) -> str | None:
    """Their state-dict name → dcdit's (None: not part of their DC-DiT). ``pos_embed`` is handled apart."""
    if key.startswith(("t_embedder.", "y_embedder.", "final_layer.")):
        return key
    rules = (
        (r"x_embedder\.proj\.(\w+)", r"encoder.stem.\1"),
        (r"hnet\.residual_proj\.(\w+)", r"residual_proj.\1"),
        (r"hnet\.(encoder|decoder)\.layers\.(\d+)\.(norm1|norm2|conv1|conv2)\.(\w+)", r"\1.blocks.\2.\3.\4"),
        (r"hnet\.(encoder|decoder)\.layers\.(\d+)\.skip_proj\.(\w+)", r"\1.blocks.\2.skip.\3"),
        (r"hnet\.(encoder|decoder)\.layers\.(\d+)\.cond_proj\.1\.(\w+)", r"\1.blocks.\2.cond_proj.\3"),
        (r"hnet\.(encoder|decoder)\.rmsnorm\.weight", r"\1.norm.weight"),
        (r"hnet\.main_network\.main_network\.layers\.(\d+)\.(.+)", r"blocks.\1.\2"),
        (r"hnet\.main_network\.main_network\.rmsnorm\.weight", r"inner_norm.weight"),
        (r"hnet\.routing_module\.(proj|context_predictor|residual_scorer\.[013])\.(\w+)", r"router.\1.\2"),
    )
    for pattern, target in rules:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, target, key)
    return None


def _layout(arch_layout, source) -> tuple[int, int, int]:
    """(encoder blocks, DiT blocks, decoder blocks) of a one-stage layout such as ["c2", ["D12"], "c2"]."""
    def count(text, letters):
        parts = re.findall(r"([a-zA-Z])(\d+)", text) if isinstance(text, str) else None
        if not parts or "".join(f"{a}{n}" for a, n in parts) != text or any(a not in letters for a, _ in parts):
            return None
        return sum(int(n) for _, n in parts)

    ok = isinstance(arch_layout, list) and len(arch_layout) == 3 and isinstance(arch_layout[1], list) and len(arch_layout[1]) == 1
    counts = (count(arch_layout[0], "cC"), count(arch_layout[1][0], "D"), count(arch_layout[2], "cC")) if ok else (None,)
    if None in counts:
        raise DcditError(f"{source}: arch_layout {arch_layout!r} is not one stage of conv blocks around DiT blocks with MLPs "
                         f"(e.g. ['c2', ['D12'], 'c2']): dcdit cannot express it")
    return counts


def official_recipe(cfg: dict, source, name: str):
    """The dcdit recipe of the authors' config (their config.py field names)."""
    try:
        hnet, tr, data, diff = cfg["model"]["hnet"], cfg["training"], cfg["data"], cfg["diffusion"]
        d_model, heads, factors = hnet["d_model"], hnet["num_heads"], hnet.get("enc_dec_dim_factor") or [None, None]
        enc, depth, dec = _layout(hnet["arch_layout"], source)
        problems = []
        if len(d_model) != 2 or d_model[0] != d_model[1]:
            problems.append(f"d_model {d_model} (dcdit needs one width for both stages)")
        if len(factors) > 1 and factors[1] not in (None, 1):
            problems.append(f"enc_dec_dim_factor {factors} (the inner stage must not reduce)")
        n = tr["downsample_factor"]
        n = n[0] if isinstance(n, list) and len(n) == 1 else n
        if not isinstance(n, (int, float)):
            problems.append(f"downsample_factor {n} (one stage, one N)")
        if tr.get("downsample_factor_start") is not None and tr.get("downsample_factor_warmup_steps", 0) > 0:
            problems.append(f"downsample_factor_start {tr['downsample_factor_start']} (a curriculum on N: dcdit trains at one N)")
        if hnet.get("fp32_router_dechunk", True) is not True:
            problems.append("fp32_router_dechunk false (dcdit always routes and de-chunks in fp32)")
        if diff["noise_schedule"] != "linear":
            problems.append(f"noise_schedule {diff['noise_schedule']!r} (dcdit has DiT's linear β schedule)")
        if tr["class_dropout_prob"] <= 0:
            problems.append("class_dropout_prob 0 (dcdit's label table always has the CFG null row)")
        if problems:
            raise DcditError(f"{source}: its config has {'; '.join(problems)}: dcdit cannot express it")
        width = d_model[0]
        scaffold = width // factors[0] if factors[0] else width
        mb_start = tr.get("multi_budget_start_step")
        if mb_start is None:
            mb_start = tr.get("downsample_factor_warmup_steps", 0)
        image = data["image_size"]
        accum = int(tr.get("gradient_accumulation_steps", 1))
        replace = dict(
            run={"name": name, "description": f"the authors' DC-DiT release, read from {Path(str(source)).name}"},
            model={"kind": "dcdit", "input_size": image // 8, "in_channels": 4, "hidden_size": width, "depth": depth,
                   "num_heads": heads[-1], "mlp_ratio": float(cfg["model"]["mlp_ratio"]), "num_classes": data["num_classes"],
                   "learn_sigma": tr["learn_sigma"], "patch_size": 1, "scaffold_width": scaffold, "encoder_blocks": enc,
                   "decoder_blocks": dec, "router": "predictive", "target_ratio": float(n),
                   "smoothing_sigma": float(hnet["dechunk_kernel_sigma"]), "force_endpoints": True, "norm_eps": 1e-5},
            diffusion={"num_timesteps": diff["diffusion_steps"]},
            data={"path": f"features/imagenet{image}", "image_size": image, "num_classes": data["num_classes"]},
            train={"global_batch": tr["global_batch_size"] * accum, "lr": float(tr["learning_rate"]),  # images per update
                   "weight_decay": float(tr["weight_decay"]), "grad_clip": float(tr["max_grad_norm"]),
                   "ema_decay": float(tr["ema_decay"]), "label_dropout": float(tr["class_dropout_prob"]),
                   "ratio_loss_weight": float(tr["ratio_loss_weight"]),
                   "multi_budget_start_step": mb_start if tr["multi_budget_training"] else -1,
                   "multi_budget_fractions": [float(f) for f in tr["multi_budget_drop_fractions"]],
                   "log_every_steps": cfg["logging"]["log_every"], "ckpt_every_steps": cfg["logging"]["ckpt_every"]},
        )
    except (KeyError, TypeError, IndexError, AttributeError, ValueError) as e:
        raise DcditError(f"{source}: its config lacks or mistypes {load_error_reason(e)}: {_OFFICIAL_HINT}") from None
    try:
        return Recipe().replace(**replace)
    except DcditError as e:  # a value dcdit's recipe checks refuse (Recipe.replace names no file)
        reason = str(e).removeprefix("<replace>: ")
        raise DcditError(f"{source}: its config gives a recipe dcdit cannot run ({reason}): dcdit cannot express it") from None


def map_official_state(state: Mapping[str, torch.Tensor], source) -> dict[str, torch.Tensor]:
    """Their state dict → dcdit names. Every key is mapped or accounted for: ``pos_embed`` must be
    dcdit's sin-cos table (checked, then dropped: dcdit computes it); any other key is an error."""
    out, unknown = {}, []
    for key, value in strip_wrappers(state).items():
        if key == "pos_embed":
            side = int(round(value.shape[1] ** 0.5))
            table = sincos_2d(grid_positions(side), value.shape[-1])[None]
            if value.shape != table.shape or not torch.allclose(value.float(), table, atol=1e-5):
                raise DcditError(f"{source}: pos_embed is not the fixed 2-D sin-cos table dcdit uses: {_OFFICIAL_HINT}")
            continue
        target = _official_key(key)
        if target is None:
            unknown.append(key)
        else:
            out[target] = value
    if unknown:
        raise DcditError(f"{source} has {len(unknown)} tensors that are not part of the authors' DC-DiT "
                         f"({', '.join(unknown[:3])}…): {_OFFICIAL_HINT}")
    return out


def read_official(path: Path, weights: str = "ema"):
    """(dcdit state dict, recipe, step) from a checkpoint of the authors' release.

    ``weights``: 'ema' (default, what they sample from) or 'model' (the raw weights).
    """
    path = Path(path)
    names = pickle_globals(path)
    if names is None:
        raise DcditError(f"{path} is truncated or not a PyTorch zip checkpoint: download it again, or {_OFFICIAL_HINT}")
    refused = [n for n in names if n not in OFFICIAL_GLOBALS]
    if refused:
        _refuse_known(path, refused[0])
        raise DcditError(f"{path} wants to load the global {refused[0]}, which the authors' checkpoint format never "
                         f"contains: refused (nothing from it was run); {_OFFICIAL_HINT}")
    obj = safe_torch_load(path, _STAND_INS, _OFFICIAL_HINT, mmap=True)
    if not isinstance(obj, dict) or not {"ema", "model", "config"} <= set(obj):
        if isinstance(obj, dict) and ("x_embedder.proj.weight" in obj or isinstance(obj.get("ema"), dict)):
            raise DcditError(f"{path} is a DiT checkpoint, not a DC-DiT: upcycle it with `dcdit upcycle --from {path}`, "
                             f"or {_OFFICIAL_HINT}")
        keys = ", ".join(map(str, list(obj)[:4])) if isinstance(obj, dict) else type(obj).__name__
        raise DcditError(f"{path} holds {keys}, not the authors' {{model, ema, opt, config}}: {_OFFICIAL_HINT}")
    if weights not in ("ema", "model"):
        raise DcditError(f"--weights {weights!r}: use 'ema' (default) or 'model'")
    state = obj[weights]
    if any(k.startswith("blocks.") for k in state) and not any(k.startswith("hnet.") for k in state):
        raise DcditError(f"{path} is a DiT checkpoint, not a DC-DiT: upcycle it with `dcdit upcycle --from {path}`")
    step = int(path.stem) if path.stem.isdigit() else 0  # their files are named by step: 0400000.pt
    recipe = official_recipe(_plain(obj["config"]), path, name=f"official-{path.stem}")
    mapped = map_official_state(state, path)
    _check_against(mapped, recipe, path)
    return mapped, recipe, step


def _check_against(state: Mapping[str, torch.Tensor], recipe, source) -> None:
    """Every tensor of the model the config describes is present with its shape (checked on meta tensors)."""
    with torch.device("meta"):
        expected = build_model(recipe.model).state_dict()
    problems = [f"{k} is missing" for k in expected if k not in state]
    problems += [f"{k} is {tuple(v.shape)} vs {tuple(expected[k].shape)} in its config's model"
                 for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    problems += [f"{k} is not in its config's model" for k in state if k not in expected]
    if problems:
        raise DcditError(f"{source}: its weights do not match its own config ({len(problems)} tensors: "
                         f"{'; '.join(problems[:2])}): the file is damaged or from another code version")


def resolve_hf(reference: str) -> Path:
    """``hf:OWNER/REPO/PATH/IN/REPO`` → the file in the local Hugging Face hub cache (never downloads)."""
    parts = reference[len("hf:"):].strip("/").split("/")
    if len(parts) < 3:
        raise DcditError(f"{reference}: write hf:OWNER/REPO/FILE, e.g. hf:amd/DynamicChunkingDiT/XL-256/FILE.pt")
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:])

    found = try_to_load_from_cache(repo, filename)
    if not isinstance(found, str):
        raise DcditError(f"{reference} is not in the local Hugging Face cache ({hf_constants.HF_HUB_CACHE}): on a machine with internet run "
                         f"`huggingface-cli download {repo} {filename}` and copy the cache here (or set HF_HUB_CACHE), "
                         f"or pass the downloaded file's path")
    return Path(found)
