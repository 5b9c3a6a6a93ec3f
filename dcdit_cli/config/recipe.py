"""Recipes: one strict, typed TOML schema shared by every subcommand.

A recipe is a flat TOML file with the sections below (no inheritance: one file tells the
whole setting). Loading is strict in the manner of litgpt's ``validate_args``: unknown
sections or keys and wrong types are errors with a did-you-mean, and every problem in a
file is reported at once. Each field's allowed values are declared on the field itself,
``bounded("[1, inf)", 32)`` (a range in interval notation; floats must also be finite) or
``one_of("dcdit", "dit")`` (``fields.py``); constraints between fields are in ``_cross_checks``. A new key
gets its range the same way, so this schema stays the one place that says what is valid. ``--set section.key=value`` overrides are parsed as TOML
literals (a bare word that is not valid TOML is taken as a string).

Recipes are found by name in ``recipes/`` (the checkout's, or the copy installed inside
the package) or given as a path.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import tomli_w

from dcdit_cli.common.console import DcditError
from dcdit_cli.config.fields import any_of, bounded, check_value, field_problem, one_of, suggest

# ----------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    """Run name: the default output directory is runs/<name>."""
    seed: int = bounded("[0, 2**63)", 0)
    """Global seed: data order, noise and label dropout are functions of (seed, step, rank)."""
    description: str = ""
    """One line saying what the recipe is for (shown in docs and stored with the run)."""


@dataclass(frozen=True)
class ModelConfig:
    kind: str = one_of("dcdit", "dit")
    """'dcdit' (learned dynamic chunking over P×P patches, P = patch_size) or 'dit' (fixed patchify)."""
    input_size: int = bounded("[1, 4096]", 32)
    """Side of the model's input grid (latent side for VAE runs: image_size / 8)."""
    in_channels: int = bounded("[1, inf)", 4)
    """Channels of the model's input (4 for SD-VAE latents, 3 for the pixel-space shapes set)."""
    hidden_size: int = bounded("[1, 65536]", 768)
    """Transformer width D."""
    depth: int = bounded("[1, 1024]", 12)
    """Number of DiT blocks in the inner network."""
    num_heads: int = bounded("[1, 1024]", 12)
    """Attention heads of every block (hidden_size must be divisible by it)."""
    mlp_ratio: float = bounded("(0, inf)", 4.0)
    """MLP hidden width as a multiple of the block width."""
    num_classes: int = bounded("[1, inf)", 1000)
    """Class labels; one more embedding row is the null class for classifier-free guidance."""
    learn_sigma: bool = True
    """Predict the learned-range variance (output channels 2·C)."""
    patch_size: int = bounded("[1, inf)", 1)
    """Patch size P: DiT's fixed patchify (DiT/2: 2), or DC-DiT's patch stem, whose router chunks a grid of
    (input_size / P)² patches (1: the paper's DC-DiT, one token per latent pixel; 4 or 8 in pixel space,
    docs/pixels.md)."""
    scaffold_width: int = bounded("[1, 65536]", 192)
    """DC-DiT only: encoder/decoder width e (paper: D/4)."""
    encoder_blocks: int = bounded("[1, 256]", 2)
    """DC-DiT only: full-resolution blocks of width e before the router."""
    decoder_blocks: int = bounded("[1, 256]", 2)
    """DC-DiT only: full-resolution blocks of width e after the de-chunk layer."""
    router: str = one_of("cosine", "random", "predictive")
    """'cosine' (paper §3.3), 'random' (the random-boundary ablation, paper §4.3) or 'predictive'
    (the authors' released router, docs/reference.md#predictive-router; their checkpoints need it)."""
    dynamic: str = one_of("none", "dydit")
    """'none', or 'dydit': DyDiT's timestep-wise dynamic width and spatial dynamic tokens in every
    DiT block (paper §4.5, docs/reference.md#dydit; models/dydit.py), trained with the FLOPs loss."""
    target_ratio: float = bounded("(1, inf)", 4.0)
    """Target compression N of the ratio loss (paper §3.5)."""
    smoothing_sigma: float = bounded("(0, inf)", 1.0)
    """Gaussian smoothing σ of the de-chunk layer (docs/reference.md#smoothing; 2.0 suggested at 512 px)."""
    pos_grid_scale: float = bounded("(0, inf)", 1.0)
    """Sin-cos positions are evaluated at (r + 0.5)·scale − 0.5 (0.5 when upcycling a DiT/2)."""
    cond_adaptor: bool = False
    """LayerNorm adaptor on the condition inside encoder and decoder (upcycling, docs/reference.md#upcycling)."""
    force_endpoints: bool = False
    """DC-DiT only: p = 1 at raster positions 0 and L − 1, as the authors' release does (official recipes)."""
    norm_eps: float = bounded("(0, 1)", 1e-5)
    """DC-DiT only: epsilon of the scaffold's GroupNorms and every RMSNorm (the authors' 1e-5;
    the DiT blocks' LayerNorms keep DiT's 1e-6)."""
    norm_groups: int = bounded("[1, inf)", 32)
    """DC-DiT only: GroupNorm groups in the scaffold's res-blocks (paper: 32, i.e. 6 channels per group
    at e = 192 and 9 at e = 288; the largest divisor of the width that is at most this). Keep at least 2
    channels per group: with one, GroupNorm removes every per-channel constant, including the
    condition c that each res-block adds before its second norm, so the scaffold and its router cannot
    see t or the class. Loading a recipe that does this prints a warning with a value that fixes it."""
    init: str = one_of("dit", "torch")
    """DC-DiT only: 'dit' (DiT's init, the paper's: xavier linears, N(0, 0.02) label table and t-MLP) or
    'torch' (PyTorch's default init of linears and embeddings; not the paper's, used by the toy recipe,
    see docs/router-study.md). Identity router, averaging k̄ and every zero init are kept in both."""


@dataclass(frozen=True)
class DiffusionConfig:
    num_timesteps: int = bounded("[1, inf)", 1000)
    """Diffusion steps T of the linear β schedule (1e-4 to 0.02, DiT / ADM)."""
    sampling_steps: int = bounded("[1, inf)", 250)
    """Respaced sampler steps: the default of `sample`, `viz-boundaries` and `eval`, and the
    step count of the FLOP convention (TFLOPs/img counts steps − 1 forwards)."""


@dataclass(frozen=True)
class DataConfig:
    kind: str = one_of("latents", "images", "shapes", "photos")
    """'latents' (shards written by `dcdit extract`), 'images' (pixel space, no VAE: an image folder or
    the shards of `dcdit extract --pixels`, docs/pixels.md), 'shapes' (the built-in procedural set) or
    'photos' (16×16-ish crops of four photographs shipped by scikit-image, `pip install 'dcdit[photos]'`)."""
    path: str = ""
    """Directory of latent shards (kind = 'latents'); of class subfolders of images, or of pixel shards (kind = 'images')."""
    image_size: int = bounded("[1, inf)", 256)
    """Pixel size of the images (shapes: the generated size)."""
    num_classes: int = bounded("[1, inf)", 1000)
    """Classes in the data (must equal model.num_classes)."""
    flip: str = one_of("random", "none")
    """'random': a random horizontal flip when the shards do not store both flips; 'none'."""
    shapes: str = one_of("varied", "fixed")
    """The shapes set's draws (kind = 'shapes'): 'varied' (random size, place, tilt, colours, fill texture
    and background) or 'fixed' (one light-grey, flat, upright shape per class at the centre, 60 % of the
    side, on dark grey: the class alone decides the image, up to the background's slope; the README demo)."""


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = bounded("[0, inf)", 400_000)
    """Optimizer steps of the run (paper: 400K)."""
    global_batch: int = bounded("[1, inf)", 256)
    """Images per optimizer step over all processes (paper: 256)."""
    micro_batch: int = bounded("[0, inf)", 0)
    """Per-process batch; 0 means global_batch / world_size (no accumulation)."""
    lr: float = bounded("[0, inf)", 1e-4)
    """AdamW learning rate, constant after warm-up (DiT: 1e-4)."""
    warmup_steps: int = bounded("[0, inf)", 0)
    """Linear learning-rate warm-up steps (0: none, as DiT)."""
    betas: list[float] = bounded("[0, 1)", factory=lambda: [0.9, 0.999])
    """AdamW (β1, β2)."""
    weight_decay: float = bounded("[0, inf)", 0.0)
    """AdamW weight decay (DiT: 0)."""
    grad_clip: float = bounded("[0, inf)", 1.0)
    """Gradient-norm clipping (reference code: 1.0)."""
    ema_decay: float = bounded("[0, 1]", 0.9999)
    """Decay of the EMA weights that `sample` and `eval` use."""
    mixed_precision: str = one_of("bf16", "fp16", "no")
    """'bf16', 'fp16' or 'no'."""
    label_dropout: float = bounded("[0, 1)", 0.1)
    """Probability of replacing a label by the null class (trains the unconditional half of CFG)."""
    ratio_loss_weight: float = bounded("[0, inf)", 0.03)
    """λ of the ratio loss (paper §4.1)."""
    flops_target: float = bounded("(0, 1]", 0.7)
    """λ of DyDiT's FLOPs loss (F_dynamic/F_static − λ)², read when model.dynamic = 'dydit' (paper §4.5: 0.7)."""
    flops_loss_weight: float = bounded("[0, inf)", 2.0)
    """Weight of the FLOPs loss (DyDiT's train.py: 2.0)."""
    flops_target_warmup_steps: int = bounded("[0, inf)", 0)
    """DyDiT's target warm-up: 1 for 100 steps, then linear from 1 to λ until this step (DyDiT: 5000; 0: λ throughout)."""
    log_every_steps: int = bounded("[1, inf)", 100)
    """Steps between log lines and metrics.jsonl records."""
    ckpt_every_steps: int = bounded("[1, inf)", 10_000)
    """Steps between checkpoints (and exported EMA weights)."""
    keep_last: int = bounded("[1, inf)", 3)
    """Checkpoints kept on disk; older ones are pruned."""
    log_with: list[str] = any_of("tensorboard", "wandb", "mlflow", "aim", "comet_ml", "clearml", "dvclive", "swanlab", "trackio")
    """Experiment trackers that accelerate logs to besides metrics.jsonl (docs/tracking.md); [] = none."""
    image_every_steps: int = bounded("[0, inf)", 5000)
    """Steps between the trackers' router probe: samples, boundary maps, p's histogram, kept tokens vs t (0: never)."""
    multi_budget_start_step: int = bounded("[-1, inf)", -1)
    """From this step on, draw one tail-dropping fraction per step (-1: off)."""
    multi_budget_fractions: list[float] = bounded("[0, 1)", factory=lambda: [0.0, 0.1, 0.2, 0.3])
    """The fractions drawn from in multi-budget training (README default {0, 0.1, 0.2, 0.3})."""
    grad_checkpointing: bool = False
    """Recompute each transformer and scaffold block in the backward pass instead of storing its
    activations: less memory (`dcdit flops --memory`), about one more forward of compute."""


@dataclass(frozen=True)
class UpcycleConfig:
    source_patch_size: int = bounded("[1, inf)", 2)
    """Patch size P of the pretrained DiT that `upcycle` / `distill` copy from."""
    source_input_size: int = bounded("[1, inf)", 32)
    """Latent grid side of the pretrained DiT (32 for 256 px)."""
    freeze_embedders: bool = True
    """Keep the copied timestep and class embedders frozen (paper §4.4)."""


@dataclass(frozen=True)
class DistillConfig:
    steps: int = bounded("[0, inf)", 0)
    """Activation-distillation warm-up steps before the diffusion objective (0: none)."""
    weight: float = bounded("[0, inf)", 1.0)
    """Weight of the activation-distillation MSE during the warm-up."""


@dataclass(frozen=True)
class SampleConfig:
    cfg_scale: float = bounded("[1, inf)", 4.0)
    """Classifier-free guidance scale; 1 turns guidance off (one forward per step), below 1 is refused."""
    guided_channels: int = bounded("[0, inf)", 3)
    """CFG guides the first N epsilon channels (DiT convention: 3); 0 means all channels."""
    method: str = one_of("ddpm", "ddim", "dpm-solver", "unipc", "euler", "euler-a")
    """Sampler: 'ddpm' or 'ddim' (η = 0), dcdit's ADM sampler as in the paper; or a diffusers scheduler
    on the same diffusion: 'dpm-solver' (DPM-Solver++ 2M), 'unipc', 'euler', 'euler-a' (docs/diffusers.md)."""
    budget: float = bounded("[0, 1)", 0.0)
    """Tail-dropping fraction f in [0, 1) of elastic inference (0 keeps every boundary)."""
    uncond_budget: float = bounded("[-1, 1)", -1.0)
    """Lite-CFG budget of the unconditional half; -1 means the same as budget."""


@dataclass(frozen=True)
class EvalConfig:
    num_samples: int = bounded("[1, inf)", 50_000)
    """Samples per setting in `dcdit eval` (ADM and the paper: 50,000)."""
    cfg_scale: float = bounded("[1, inf)", 1.5)
    """Guidance scale of `dcdit eval` when --cfg-scales is not given (DiT's FID setting: 1.5)."""
    batch_size: int = bounded("[1, inf)", 64)
    """Images per sampling batch and process in `dcdit eval` (the unit of resume)."""


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

REMOVED_KEYS: dict[str, str] = {
    "diffusion.noise_schedule": "the β schedule is always DiT's linear one",
    "data.num_workers": "data loading needs no worker processes",
}
"""Keys that recipes once had: dropped from recipes stored in old checkpoints, an error in files."""


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


# Common names from other codebases, suggested for a misspelt key.
ALIASES = {"learning_rate": "lr", "batch_size": "global_batch", "steps": "max_steps", "num_steps": "max_steps",
           "ema": "ema_decay", "precision": "mixed_precision", "clip_grad": "grad_clip", "max_grad_norm": "grad_clip"}


def _suggest(word: str, options) -> str:
    return suggest(word, options, ALIASES)


def _cross_checks(recipe: Recipe) -> list[str]:
    """Constraints between fields (each field is already in its own range)."""
    m, t, d, s = recipe.model, recipe.train, recipe.data, recipe.sample
    problems = []
    if m.hidden_size % m.num_heads:
        problems.append(f"model.hidden_size {m.hidden_size} is not divisible by model.num_heads {m.num_heads}")
    if m.hidden_size % 4:
        problems.append(f"model.hidden_size {m.hidden_size} is not a multiple of 4 (the 2-D sin-cos position embedding)")
    if t.multi_budget_start_step >= 0 and not t.multi_budget_fractions:
        problems.append("train.multi_budget_fractions is empty but train.multi_budget_start_step turns multi-budget "
                        "training on: give the fractions, or set the start step to -1")
    if not recipe.run.name.strip() or any(c in recipe.run.name for c in "/\\") or recipe.run.name in (".", ".."):
        problems.append(f"run.name {recipe.run.name!r} must be a non-empty name without path separators (it names runs/<name>)")
    if m.input_size % m.patch_size:
        problems.append(f"model.input_size {m.input_size} is not divisible by model.patch_size {m.patch_size}")
    if m.num_classes != d.num_classes:
        problems.append(f"model.num_classes {m.num_classes} differs from data.num_classes {d.num_classes}: set both")
    if d.kind in ("images", "shapes", "photos") and (d.image_size != m.input_size or m.in_channels != 3):
        problems.append(
            f"data.kind = '{d.kind}' makes 3 × {d.image_size}² pixel images but the model takes {m.in_channels} × "
            f"{m.input_size}²: set model.input_size = data.image_size and model.in_channels = 3"
        )
    if d.shapes != "varied" and d.kind != "shapes":
        problems.append(f"data.shapes = '{d.shapes}' draws the shapes set but data.kind = '{d.kind}': set data.kind = 'shapes', "
                        "or data.shapes = 'varied'")
    if d.kind == "latents" and d.image_size % m.input_size:
        problems.append(f"data.image_size {d.image_size} is not a multiple of model.input_size {m.input_size} (the latent side)")
    if t.micro_batch > t.global_batch:
        problems.append(f"train.micro_batch {t.micro_batch} exceeds train.global_batch {t.global_batch}")
    if len(t.betas) != 2:
        problems.append(f"train.betas must have two values, got {t.betas}")
    if recipe.diffusion.sampling_steps > recipe.diffusion.num_timesteps:
        problems.append("diffusion.sampling_steps must be in [1, diffusion.num_timesteps]")
    if s.guided_channels > m.in_channels:
        problems.append(f"sample.guided_channels {s.guided_channels} exceeds model.in_channels {m.in_channels} (0 guides all)")
    if -1.0 < s.uncond_budget < 0.0:
        problems.append(f"sample.uncond_budget {s.uncond_budget}: give -1 (same as sample.budget) or a value in [0, 1)")
    u = recipe.upcycle
    if u.source_input_size % u.source_patch_size:
        problems.append(f"upcycle.source_input_size {u.source_input_size} is not divisible by upcycle.source_patch_size {u.source_patch_size}")
    return problems


def norm_group_count(channels: int, max_groups: int) -> int:
    """GroupNorm groups over ``channels`` for ``model.norm_groups = max_groups``: the largest divisor
    of ``channels`` that is at most ``max_groups`` (the paper's 32, fewer where the width does not divide)."""
    return max(g for g in range(1, min(max_groups, channels) + 1) if channels % g == 0)


def scaffold_channels_per_group(model: ModelConfig) -> int:
    """Channels per GroupNorm group at the scaffold width e."""
    return model.scaffold_width // norm_group_count(model.scaffold_width, model.norm_groups)


def recipe_warnings(recipe: Recipe) -> list[str]:
    """Settings that are valid but defeat the model; the CLI prints each as one warning line."""
    m = recipe.model
    warnings = []
    if m.kind == "dcdit" and scaffold_channels_per_group(m) < 2:
        e = m.scaffold_width
        fix = norm_group_count(e, e // min(4, e))  # 4 channels per group (all of them when e < 4)
        warnings.append(
            f"model.norm_groups = {m.norm_groups} leaves {scaffold_channels_per_group(m)} channel per GroupNorm group at "
            f"model.scaffold_width = {e}: GroupNorm then erases the condition (t and class) inside the scaffold, so "
            f"the router cannot see it; set model.norm_groups = {fix} ({e // fix} channels per group; the paper has 6)")
    return warnings


def recipe_from_dict(data: dict[str, Any], source: str = "<recipe>", drop_removed: bool = False) -> Recipe:
    """Validates a nested dict against the schema, collecting every problem. ``drop_removed``:
    ignore :data:`REMOVED_KEYS` (recipes stored by older versions) instead of reporting them."""
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
        metas = {f.name: f.metadata for f in fields(cls)}
        kwargs = {}
        for key, value in values.items():
            full = f"{name}.{key}"
            if full in REMOVED_KEYS:
                if not drop_removed:
                    problems.append(f"{full} was removed ({REMOVED_KEYS[full]}): delete the line")
                continue
            if key not in hints:
                problems.append(f"unknown key {full}{_suggest(key, hints)}")
                continue
            coerced, problem = check_value(full, value, hints[key])
            if problem:
                problems.append(problem)
                continue
            problem = field_problem(full, coerced, metas[key])
            if problem:
                problems.append(problem)
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
    package = Path(__file__).resolve().parent.parent  # dcdit_cli/
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
        if path.is_dir():
            raise DcditError(f"recipe {path} is a directory: give a .toml file in it, or a shipped name")
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
        data = tomllib.loads(path.read_text(encoding="utf-8-sig"))  # a byte-order mark, as some editors write, is fine
    except tomllib.TOMLDecodeError as e:
        raise DcditError(f"{path}: not valid TOML ({e}); fix the file") from None
    except UnicodeDecodeError as e:
        raise DcditError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason}): save the recipe as UTF-8") from None
    except OSError as e:
        raise DcditError(f"{path} cannot be read ({e.strerror}): check the path and its permissions") from None
    for text in overrides:
        section, key, value = parse_override(text)
        data.setdefault(section, {})[key] = value
    return recipe_from_dict(data, source=str(path) if not overrides else f"{path} with --set")


def recipe_from_toml(text: str, source: str) -> Recipe:
    """A recipe stored in a checkpoint's metadata or a run directory."""
    try:
        return recipe_from_dict(tomllib.loads(text), source=source, drop_removed=True)
    except tomllib.TOMLDecodeError as e:
        raise DcditError(f"{source}: the stored recipe is not valid TOML ({e})") from None


def read_stored_recipe(path: Path) -> Recipe:
    """A run directory's recipe.toml (a DcditError naming the file when it is not UTF-8 or not valid)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DcditError(f"{path} is not UTF-8 text: restore the run's recipe, or write to a new directory") from None
    return recipe_from_toml(text, source=str(path))


def recipe_diff(old: Recipe, new: Recipe) -> list[str]:
    """Keys whose values differ, as 'section.key: old → new'."""
    a, b = old.to_dict(), new.to_dict()
    return [
        f"{s}.{k}: {a[s][k]!r} → {b[s][k]!r}"
        for s in SECTIONS
        for k in a[s]
        if a[s][k] != b[s][k]
    ]
