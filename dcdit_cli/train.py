"""The one training loop (train, upcycle and distill share it), on accelerate.

Straight-line code with small pure helpers above it, in the manner of DiT's and EDM2's
training loops. Determinism: the data indices, flips, timesteps, noise, label dropout and
random-router draws of step s on rank r are functions of (seed, s, r) only, so resuming
from a checkpoint reproduces an uninterrupted run bit for bit on CPU in fp32.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import platform
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from dcdit_cli.console import DcditError, MetricsWriter, RateMeter, plain_log, print0, progress_bar
from dcdit_cli.recipe import Recipe, recipe_diff, recipe_from_toml

# Keys that may change when a run is resumed; any other change is refused with the diff.
RESUME_ALLOWED = {"train.max_steps", "train.log_every_steps", "train.ckpt_every_steps", "train.keep_last", "data.path"}


#################################################################################
#                               Pure helpers                                    #
#################################################################################


def learning_rate(step: int, base_lr: float, warmup_steps: int) -> float:
    """Constant after an optional linear warm-up: a pure function of the step."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    return base_lr


def step_seed(seed: int, step: int, rank: int, micro: int = 0, stream: str = "train") -> int:
    """A 63-bit seed from (seed, step, rank, micro-step, stream)."""
    digest = hashlib.blake2b(f"{stream}:{seed}:{step}:{rank}:{micro}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def budget_for_step(step: int, start: int, fractions: list[float], seed: int) -> float:
    """Multi-budget training (REFERENCE §2): from ``start`` on, one fraction per optimizer
    step, drawn by a generator seeded with the step, the same on every rank; 0 before."""
    if start < 0 or step < start or not fractions:
        return 0.0
    g = torch.Generator().manual_seed(step_seed(seed, step, 0, stream="budget"))
    return float(fractions[int(torch.randint(len(fractions), (1,), generator=g))])


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    ema_params = dict(ema.named_parameters())
    for name, param in model.named_parameters():
        ema_params[name].mul_(decay).add_(param.detach(), alpha=1 - decay)


def requires_grad(model: torch.nn.Module, flag: bool) -> None:
    for p in model.parameters():
        p.requires_grad_(flag)


def batch_plan(global_batch: int, micro_batch: int, world_size: int) -> tuple[int, int]:
    """(per-process micro batch, accumulation steps) with micro × accum × world = global."""
    micro = micro_batch or global_batch // world_size
    if micro < 1 or global_batch % (micro * world_size):
        raise DcditError(
            f"train.global_batch {global_batch} is not divisible by micro_batch {micro} × {world_size} processes: "
            f"set train.micro_batch so that it divides {global_batch // max(world_size, 1)}, or change the process count"
        )
    return micro, global_batch // (micro * world_size)


def write_curves(out_dir: Path, name: str) -> None:
    """curves.png beside the checkpoints: loss terms and compression against the step."""
    from dcdit_cli.plots import training_curves

    metrics = out_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size:
        tmp = out_dir / ".curves.png.tmp"
        training_curves(metrics, f"{name}: training curves ({metrics})").save(tmp, format="PNG")
        os.replace(tmp, out_dir / "curves.png")


def environment(accelerator) -> dict:
    import accelerate

    return {
        "world_size": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
        "device": str(accelerator.device),
        "mixed_precision": accelerator.mixed_precision,
        "torch": torch.__version__,
        "accelerate": accelerate.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cuda_devices": torch.cuda.device_count(),
    }


#################################################################################
#                                 The loop                                      #
#################################################################################


@dataclass
class Objective:
    """What a phase of training minimises; the default is diffusion + λ·ratio loss.

    ``extra_loss(model, x_t, t, y, stats) -> (loss, {name: value})`` adds a term (distillation).
    ``until_step`` ends the phase (the distill warm-up); None runs to train.max_steps.
    """

    name: str = "diffusion"
    diffusion_weight: float = 1.0
    extra_loss: Callable | None = None
    until_step: int | None = None
    log_terms: dict = field(default_factory=dict)


def _run_dir_setup(recipe: Recipe, out_dir: Path, resume: Path | None, command: str, accelerator):
    """Prepares runs/<name>; returns the checkpoint to resume from (or None)."""
    from dcdit_cli.checkpoint import atomic_write_text, find_latest

    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    stored = out_dir / "recipe.toml"
    ckpt = None
    if resume is not None:
        if not Path(resume).exists():
            raise DcditError(f"--resume {resume} does not exist: pass a run directory or a checkpoints/step-N directory")
        ckpt = Path(resume)
    elif stored.exists():
        ckpt = find_latest(out_dir)
    if stored.exists() and ckpt is not None:
        old = recipe_from_toml(stored.read_text(), source=str(stored))
        changed = [d for d in recipe_diff(old, recipe) if d.split(":")[0] not in RESUME_ALLOWED]
        if changed:
            raise DcditError(
                f"{out_dir} was trained with a different recipe ({'; '.join(changed)}): resume with the same recipe, "
                f"or pass --out to start a new run"
            )
    if accelerator.is_main_process:
        atomic_write_text(stored, recipe.to_toml())
        with open(out_dir / "command.txt", "a", encoding="utf-8") as f:
            f.write(command + "\n")
        atomic_write_text(out_dir / "env.json", json.dumps(environment(accelerator), indent=2))
    return ckpt


def train(
    recipe: Recipe,
    out_dir: Path,
    *,
    resume: Path | None = None,
    command: str = "",
    model_setup: Callable | None = None,
    objectives: list[Objective] | None = None,
) -> Path | None:
    """Trains ``recipe`` into ``out_dir``; returns the last exported EMA weights.

    model_setup(model) → model: used by upcycling to load and freeze pretrained weights
    before the optimizer is built. objectives: consecutive phases (distillation warm-up,
    then diffusion); by default one diffusion phase.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from dcdit_cli.checkpoint import export_weights, load_checkpoint, save_checkpoint
    from dcdit_cli.data import batch_indices, make_dataset
    from dcdit_cli.diffusion import make_diffusion
    from dcdit_cli.models import build_model
    from dcdit_cli.models.chunking import ratio_loss

    t_cfg, m_cfg = recipe.train, recipe.model
    accelerator = Accelerator(mixed_precision=t_cfg.mixed_precision, cpu=not torch.cuda.is_available())
    world, rank = accelerator.num_processes, accelerator.process_index
    micro, accum = batch_plan(t_cfg.global_batch, t_cfg.micro_batch, world)
    out_dir = Path(out_dir)
    ckpt_path = _run_dir_setup(recipe, out_dir, resume, command, accelerator)

    dataset = make_dataset(recipe.data, seed=recipe.run.seed)
    diffusion = make_diffusion("", recipe.diffusion.num_timesteps)
    set_seed(recipe.run.seed)
    model = build_model(m_cfg)
    if model_setup is not None:
        model = model_setup(model)
    ema = copy.deepcopy(model)
    requires_grad(ema, False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t_cfg.lr, betas=tuple(t_cfg.betas), weight_decay=t_cfg.weight_decay)

    start_step = 0
    if ckpt_path is not None:
        state = load_checkpoint(ckpt_path)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        start_step = state["step"]
        print0(f"[bold]resuming[/] from {state['path']} at step {start_step}")
    model, optimizer = accelerator.prepare(model, optimizer)
    ema.to(accelerator.device).eval()
    objectives = objectives or [Objective()]

    metrics = MetricsWriter(out_dir / "metrics.jsonl")
    sums: dict[str, float] = defaultdict(float)
    meter, last_weights, last_ckpt = RateMeter(), None, ckpt_path
    seed = recipe.run.seed
    null_class = m_cfg.num_classes

    def save(step: int):
        nonlocal last_weights, last_ckpt
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            unwrapped = accelerator.unwrap_model(model)
            last_ckpt = save_checkpoint(
                out_dir, step, unwrapped.state_dict(), ema.state_dict(), optimizer.state_dict(),
                {"step": step, "images_seen": step * t_cfg.global_batch, "world_size": world,
                 "rng": "derived from (run.seed, step, rank, micro-step): nothing to restore"},
                t_cfg.keep_last,
            )
            last_weights = export_weights(out_dir, step, ema.state_dict(), recipe.to_toml(), t_cfg.keep_last)
            write_curves(out_dir, recipe.run.name)
        accelerator.wait_for_everyone()

    total = t_cfg.max_steps
    with progress_bar("train", extra="{task.fields[status]}") as progress:
        task = progress.add_task("train", total=total, completed=start_step, rate="", status="")
        for step in range(start_step, total):
            objective = next(o for o in objectives if o.until_step is None or step < o.until_step)
            lr = learning_rate(step, t_cfg.lr, t_cfg.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            budget = budget_for_step(step, t_cfg.multi_budget_start_step, t_cfg.multi_budget_fractions, seed)
            model.train()
            step_loss = 0.0
            for a in range(accum):
                torch.manual_seed(step_seed(seed, step, rank, a))  # noise, t, dropout, random router
                idx, flips = batch_indices(seed, step * accum + a, rank, micro, len(dataset))
                batch = dataset.batch(idx, flips)
                x, y = batch[0].to(accelerator.device), batch[1].to(accelerator.device)
                t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=x.device)
                drop = torch.rand(x.shape[0], device=x.device) < t_cfg.label_dropout
                y = torch.where(drop, torch.full_like(y, null_class), y)
                seen = {}

                def model_fn(x_t, t_):
                    out, stats = model(x_t, t_, y, budget=budget)
                    seen["stats"], seen["x_t"] = stats, x_t
                    return out

                with accelerator.autocast():
                    terms = diffusion.training_losses(model_fn, x, t)
                    loss = objective.diffusion_weight * terms["loss"].mean()
                    stats = seen["stats"]
                    if stats is not None and t_cfg.ratio_loss_weight > 0:
                        r_loss = ratio_loss(stats.mask, stats.p, m_cfg.target_ratio)
                        loss = loss + t_cfg.ratio_loss_weight * r_loss
                        sums["ratio_loss"] += r_loss.item() / accum
                    if objective.extra_loss is not None:
                        extra, logs = objective.extra_loss(accelerator.unwrap_model(model), seen["x_t"], t, y, stats)
                        loss = loss + extra
                        for k, v in logs.items():
                            sums[k] += float(v) / accum
                sync = a == accum - 1
                ctx = accelerator.no_sync(model) if not sync and world > 1 else contextlib.nullcontext()
                with ctx:
                    accelerator.backward(loss / accum)
                sums["loss"] += loss.item() / accum
                step_loss += loss.item() / accum
                sums["mse"] += terms["mse"].mean().item() / accum
                sums["vb"] += terms["vb"].mean().item() / accum
                if stats is not None:
                    sums["compression"] += stats.compression.mean().item() / accum
                    sums["kept_tokens"] += stats.num_kept.float().mean().item() / accum
            # Stop before a non-finite loss can reach the weights (checked on every rank alike).
            global_loss = accelerator.reduce(torch.tensor([step_loss], device=accelerator.device), reduction="sum").item()
            if not math.isfinite(global_loss):
                raise DcditError(
                    f"training diverged at step {step + 1}: the loss is {global_loss}; last good checkpoint: "
                    f"{last_ckpt or 'none (no checkpoint written yet)'}. Lower train.lr or use "
                    f"train.mixed_precision='no', then rerun the same command to resume from it"
                )
            if t_cfg.grad_clip > 0:
                sums["grad_norm"] += float(accelerator.clip_grad_norm_(params, t_cfg.grad_clip))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            update_ema(ema, accelerator.unwrap_model(model), t_cfg.ema_decay)
            done = step + 1
            rate = meter.update(t_cfg.global_batch)

            if done % t_cfg.log_every_steps == 0 or done == total:
                n = t_cfg.log_every_steps if done % t_cfg.log_every_steps == 0 else done % t_cfg.log_every_steps
                local = torch.tensor([sums[k] / n for k in sorted(sums)], device=accelerator.device)
                mean = accelerator.reduce(local, reduction="mean")
                record = dict(zip(sorted(sums), mean.tolist()))
                record.update(step=done, lr=lr, images_per_s=float(rate.split('/')[0]), phase=objective.name, budget=budget)
                metrics.write(record)
                status = f"loss {record['loss']:.4f}"
                if "compression" in record:
                    status += f"  CR {record['compression']:.2f}  kept {record['kept_tokens']:.1f}"
                progress.update(task, status=status)
                plain_log(f"step {done}/{total}  {status}  {record['images_per_s']:.1f} img/s  lr {lr:.2e}")
                sums.clear()
            progress.update(task, advance=1, rate=f"{rate.split('/')[0]} img/s")
            if done % t_cfg.ckpt_every_steps == 0 or done == total:
                save(done)

    print(f"rank {rank}/{world}: finished at step {total}", flush=True)
    accelerator.end_training()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return last_weights


