"""Recipes: one strict, typed TOML schema shared by every subcommand.

A recipe is a flat TOML file with the sections below (no inheritance: one file tells the
whole setting). Loading is strict in the manner of litgpt's ``validate_args``: unknown
sections or keys and wrong types are errors with a did-you-mean, and every problem in a
file is reported at once. ``--set section.key=value`` overrides are parsed as TOML
literals (a bare word that is not valid TOML is taken as a string).

Recipes are found by name in ``recipes/`` (the checkout's, or the copy installed inside
the package) or given as a path.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from dcdit_cli.console import DcditError


# ----------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    """Run name: the default output directory is runs/<name>."""
    seed: int = 0
    """Global seed: data order, noise and label dropout are functions of (seed, step, rank)."""
    description: str = ""


@dataclass(frozen=True)
class ModelConfig:
    kind: str = "dcdit"
    """'dcdit' (learned dynamic chunking, P = 1) or 'dit' (fixed patchify with patch_size)."""
    input_size: int = 32
    """Side of the model's input grid (latent side for VAE runs: image_size / 8)."""
    in_channels: int = 4
    hidden_size: int = 768
    """Transformer width D."""
    depth: int = 12
    """Number of DiT blocks in the inner network."""
    num_heads: int = 12
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    learn_sigma: bool = True
    """Predict the learned-range variance (output channels 2·C)."""
    patch_size: int = 2
    """DiT baseline only: the fixed patch size P."""
    scaffold_width: int = 192
    """DC-DiT only: encoder/decoder width e (paper: D/4)."""
    encoder_blocks: int = 2
    decoder_blocks: int = 2
    router: str = "cosine"
    """'cosine' (paper §3.3) or 'random' (the random-boundary ablation, paper §4.3)."""
    target_ratio: float = 4.0
    """Target compression N of the ratio loss (paper §3.5)."""
    smoothing_sigma: float = 1.0
    """Gaussian smoothing σ of the de-chunk layer (REFERENCE §1.7; 2.0 suggested at 512 px)."""
    pos_grid_scale: float = 1.0
    """Sin-cos positions are evaluated at (r + 0.5)·scale − 0.5 (0.5 when upcycling a DiT/2)."""
    cond_adaptor: bool = False
    """LayerNorm adaptor on the condition inside encoder and decoder (upcycling, REFERENCE §6)."""
    norm_groups: int = 32
    """DC-DiT only: GroupNorm groups in the scaffold's res-blocks (paper: 32, i.e. 6 channels per group
    at e = 192; the largest divisor of the width that is at most this). The toy recipe uses 8: at
    e = 32, 32 groups would be one channel per group (docs/router-study.md)."""
    init: str = "dit"
    """DC-DiT only: 'dit' (DiT's init, the paper's: xavier linears, N(0, 0.02) label table and t-MLP) or
    'torch' (PyTorch's default init of linears and embeddings; not the paper's, used by the toy recipe,
    see docs/router-study.md). Identity router, averaging k̄ and every zero init are kept in both."""


@dataclass(frozen=True)
class DiffusionConfig:
    num_timesteps: int = 1000
    noise_schedule: str = "linear"
    sampling_steps: int = 250
    """Respaced DDPM steps used for sampling (and for the FLOP convention)."""


@dataclass(frozen=True)
class DataConfig:
    kind: str = "latents"
    """'latents' (shards written by `dcdit extract`), 'shapes' (the built-in procedural set) or 'photos'
    (16×16-ish crops of four photographs shipped by scikit-image, `pip install 'dcdit[photos]'`)."""
    path: str = ""
    """Directory of latent shards (kind = 'latents')."""
    image_size: int = 256
    """Pixel size of the images (shapes: the generated size)."""
    num_classes: int = 1000
    flip: str = "random"
    """'random': a random horizontal flip when the shards do not store both flips; 'none'."""
    num_workers: int = 4


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 400_000
    global_batch: int = 256
    micro_batch: int = 0
    """Per-process batch; 0 means global_batch / world_size (no accumulation)."""
    lr: float = 1e-4
    warmup_steps: int = 0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    mixed_precision: str = "bf16"
    """'bf16', 'fp16' or 'no'."""
    label_dropout: float = 0.1
    ratio_loss_weight: float = 0.03
    """λ of the ratio loss (paper §4.1)."""
    log_every_steps: int = 100
    ckpt_every_steps: int = 10_000
    keep_last: int = 3
    multi_budget_start_step: int = -1
    """From this step on, draw one tail-dropping fraction per step (-1: off)."""
    multi_budget_fractions: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3])


@dataclass(frozen=True)
class UpcycleConfig:
    source_patch_size: int = 2
    source_input_size: int = 32
    freeze_embedders: bool = True


@dataclass(frozen=True)
class DistillConfig:
    steps: int = 0
    """Activation-distillation warm-up steps before the diffusion objective (0: none)."""
    weight: float = 1.0


@dataclass(frozen=True)
class SampleConfig:
    cfg_scale: float = 4.0
    guided_channels: int = 3
    """CFG guides the first N epsilon channels (DiT convention: 3); 0 means all channels."""
    method: str = "ddpm"
    budget: float = 0.0
    uncond_budget: float = -1.0
    """Lite-CFG budget of the unconditional half; -1 means the same as budget."""


@dataclass(frozen=True)
class EvalConfig:
    num_samples: int = 50_000
    cfg_scale: float = 1.5
    batch_size: int = 64


SECTIONS: dict[str, type] = {
    "run": RunConfig,
    "model": ModelConfig,
    "diffusion": DiffusionConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "upcycle": UpcycleConfig,
    "distill": DistillConfig,
    "sample": SampleConfig,
    "eval": EvalConfig,
}

CHOICES: dict[str, tuple] = {
    "model.kind": ("dcdit", "dit"),
    "model.router": ("cosine", "random"),
    "model.init": ("dit", "torch"),
    "diffusion.noise_schedule": ("linear",),
    "data.kind": ("latents", "shapes", "photos"),
    "data.flip": ("random", "none"),
    "train.mixed_precision": ("bf16", "fp16", "no"),
    "sample.method": ("ddpm", "ddim"),
}


@dataclass(frozen=True)
class Recipe:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    upcycle: UpcycleConfig = field(default_factory=UpcycleConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps(self.to_dict())

    def replace(self, **overrides: dict[str, Any]) -> "Recipe":
        """A copy with some keys of some sections replaced: ``r.replace(train={"lr": 1e-3})``."""
        data = self.to_dict()
        for section, values in overrides.items():
            data[section].update(values)
        return recipe_from_dict(data, source="<replace>")


# ----------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------


# Common names from other codebases, suggested when difflib finds nothing close.
ALIASES = {"learning_rate": "lr", "batch_size": "global_batch", "steps": "max_steps", "num_steps": "max_steps",
           "ema": "ema_decay", "precision": "mixed_precision", "clip_grad": "grad_clip", "max_grad_norm": "grad_clip"}


def _suggest(word: str, options) -> str:
    if ALIASES.get(word) in options:
        return f" (did you mean '{ALIASES[word]}'?)"
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(sorted(options))})"


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _check_value(key: str, value: Any, tp) -> tuple[Any, str | None]:
    """Returns (coerced value, problem or None)."""
    if get_origin(tp) is list:
        (item_tp,) = get_args(tp)
        if not isinstance(value, list):
            return value, f"{key}: expected a list of {_type_name(item_tp)}, got {value!r}"
        out = []
        for v in value:
            coerced, problem = _check_value(key, v, item_tp)
            if problem:
                return value, f"{key}: expected a list of {_type_name(item_tp)}, got {value!r}"
            out.append(coerced)
        return out, None
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value), None
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value, None
    elif isinstance(value, tp):
        return value, None
    return value, f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}"


def _cross_checks(recipe: Recipe) -> list[str]:
    m, t = recipe.model, recipe.train
    problems = []
    if m.hidden_size % m.num_heads:
        problems.append(f"model.hidden_size {m.hidden_size} is not divisible by model.num_heads {m.num_heads}")
    if m.kind == "dit" and m.input_size % m.patch_size:
        problems.append(f"model.input_size {m.input_size} is not divisible by model.patch_size {m.patch_size}")
    if m.target_ratio <= 1:
        problems.append(f"model.target_ratio must be > 1, got {m.target_ratio}")
    if m.smoothing_sigma <= 0:
        problems.append(f"model.smoothing_sigma must be > 0, got {m.smoothing_sigma}")
    if m.num_classes != recipe.data.num_classes:
        problems.append(
            f"model.num_classes {m.num_classes} differs from data.num_classes {recipe.data.num_classes}: set both"
        )
    if t.max_steps < 0 or t.global_batch < 1 or t.micro_batch < 0:
        problems.append("train.max_steps must be >= 0, train.global_batch >= 1 and train.micro_batch >= 0")
    if t.log_every_steps < 1 or t.ckpt_every_steps < 1 or t.keep_last < 1:
        problems.append("train.log_every_steps, train.ckpt_every_steps and train.keep_last must be >= 1")
    if len(t.betas) != 2:
        problems.append(f"train.betas must have two values, got {t.betas}")
    for f_ in t.multi_budget_fractions:
        if not 0.0 <= f_ < 1.0:
            problems.append(f"train.multi_budget_fractions: {f_} is outside [0, 1)")
    if not 0.0 <= recipe.sample.budget < 1.0:
        problems.append(f"sample.budget {recipe.sample.budget} is outside [0, 1)")
    if recipe.diffusion.sampling_steps < 1 or recipe.diffusion.sampling_steps > recipe.diffusion.num_timesteps:
        problems.append("diffusion.sampling_steps must be in [1, diffusion.num_timesteps]")
    return problems


def recipe_from_dict(data: dict[str, Any], source: str = "<recipe>") -> Recipe:
    """Validates a nested dict against the schema, collecting every problem."""
    problems: list[str] = []
    sections: dict[str, Any] = {}
    for name, values in data.items():
        if name not in SECTIONS:
            problems.append(f"unknown section [{name}]{_suggest(name, SECTIONS)}")
            continue
        if not isinstance(values, dict):
            problems.append(f"[{name}] must be a table, got {values!r}")
            continue
        cls = SECTIONS[name]
        hints = get_type_hints(cls)
        kwargs = {}
        for key, value in values.items():
            full = f"{name}.{key}"
            if key not in hints:
                problems.append(f"unknown key {full}{_suggest(key, hints)}")
                continue
            coerced, problem = _check_value(full, value, hints[key])
            if problem:
                problems.append(problem)
                continue
            if full in CHOICES and coerced not in CHOICES[full]:
                problems.append(f"{full}: {coerced!r} is not one of {', '.join(CHOICES[full])}{_suggest(str(coerced), CHOICES[full])}")
                continue
            kwargs[key] = coerced
        sections[name] = cls(**kwargs)
    if not problems:
        recipe = Recipe(**sections)
        problems = _cross_checks(recipe)
        if not problems:
            return recipe
    if len(problems) == 1:
        raise DcditError(f"{source}: {problems[0]}")
    raise DcditError(f"{source}: {len(problems)} problems: " + "; ".join(problems))


# ----------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------


def recipes_dir() -> Path:
    """The directory of shipped recipes: the checkout's, else the one inside the package."""
    package = Path(__file__).resolve().parent
    for candidate in (package.parent / "recipes", package / "recipes"):
        if candidate.is_dir():
            return candidate
    raise DcditError("the shipped recipes are missing: reinstall dcdit (`pip install -e '.[test]'`)")


def available_recipes() -> list[str]:
    """Names of all shipped recipes (recursively: 'name' or 'sub/name')."""
    root = recipes_dir()
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.toml"))


def resolve_recipe_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise DcditError(f"recipe file {path} does not exist: give a shipped name ({', '.join(available_recipes())}) or a path")
        return path
    candidate = recipes_dir() / f"{name_or_path}.toml"
    if candidate.is_file():
        return candidate
    raise DcditError(f"unknown recipe '{name_or_path}'{_suggest(name_or_path, available_recipes())}; list them with `dcdit flops --all`")


def parse_override(text: str) -> tuple[str, str, Any]:
    """'train.lr=2e-4' → ('train', 'lr', 2e-4). Values are TOML literals; bare words are strings."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise DcditError(f"--set {text!r}: expected section.key=value, e.g. --set train.lr=2e-4")
    key, raw = text.split("=", 1)
    section, name = key.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return section, name, value


def load_recipe(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Loads a recipe by name or path and applies ``--set`` overrides."""
    path = resolve_recipe_path(name_or_path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise DcditError(f"{path}: not valid TOML ({e}); fix the file") from None
    for text in overrides:
        section, key, value = parse_override(text)
        data.setdefault(section, {})[key] = value
    return recipe_from_dict(data, source=str(path) if not overrides else f"{path} with --set")


def recipe_from_toml(text: str, source: str) -> Recipe:
    """A recipe stored in a checkpoint's metadata or a run directory."""
    try:
        return recipe_from_dict(tomllib.loads(text), source=source)
    except tomllib.TOMLDecodeError as e:
        raise DcditError(f"{source}: the stored recipe is not valid TOML ({e})") from None


def recipe_diff(old: Recipe, new: Recipe) -> list[str]:
    """Keys whose values differ, as 'section.key: old → new'."""
    a, b = old.to_dict(), new.to_dict()
    return [
        f"{s}.{k}: {a[s][k]!r} → {b[s][k]!r}"
        for s in SECTIONS
        for k in a[s]
        if a[s][k] != b[s][k]
    ]


def section_keys(section: str) -> list[str]:
    return [f.name for f in fields(SECTIONS[section])]
