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
import platform
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import accelerate
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from dcdit_cli.common.atomic import check_output, remove_stale_temps, write_json, write_png, write_text
from dcdit_cli.common import preemption
from dcdit_cli.common.console import DcditError, MetricsWriter, Preempted, RateMeter, is_main_process, plain_log, print0, progress_bar
from dcdit_cli.common.host_memory import host_allocator
from dcdit_cli.common.plots import training_curves
from dcdit_cli.common.processes import watch_ranks
from dcdit_cli.config.recipe import Recipe, read_stored_recipe, recipe_diff
from dcdit_cli.data.datasets import batch_indices, check_fits_model, make_dataset
from dcdit_cli.diffusion.gaussian import make_diffusion, to_device
from dcdit_cli.models import build_model, checkpoint_blocks, compile_model
from dcdit_cli.models.attention import select_backend
from dcdit_cli.training.checkpoint import export_weights, find_latest, load_checkpoint, load_into, resolve_weights, save_checkpoint
from dcdit_cli.training.checkpoint import init_from as load_init
from dcdit_cli.training.losses import loss_for_recipe
from dcdit_cli.training.tracking import Trackers, accelerator_options, check_trackers

# Keys that may change when a run is resumed; any other change is refused with the diff.
RESUME_ALLOWED = {"train.max_steps", "train.log_every_steps", "train.ckpt_every_steps", "train.keep_last", "data.path",
                  "train.log_with", "train.image_every_steps"}
DYDIT_ONLY = {"train.flops_target", "train.flops_loss_weight", "train.flops_target_warmup_steps"}
"""Read only by DyDiT's FLOPs loss: a run without gates resumes whatever they say."""


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
    """Multi-budget training (docs/reference.md#multi-budget-training): from ``start`` on, one fraction per optimizer
    step, drawn by a generator seeded with the step, the same on every rank; 0 before."""
    if start < 0 or step < start or not fractions:
        return 0.0
    g = torch.Generator().manual_seed(step_seed(seed, step, 0, stream="budget"))
    return float(fractions[int(torch.randint(len(fractions), (1,), generator=g))])


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema ← decay · ema + (1 − decay) · model, every parameter in one foreach kernel."""
    ema_params = dict(ema.named_parameters())
    names = [name for name, _ in model.named_parameters()]
    torch._foreach_lerp_([ema_params[n] for n in names], [p.detach() for p in model.parameters()], 1 - decay)


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
    metrics = out_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size:
        write_png(out_dir / "curves.png", training_curves(metrics, f"{name}: training curves ({metrics})"))


def match_grad_strides(model: torch.nn.Module) -> None:
    """Gives every gradient its parameter's strides, as DDP's bucket views expect.

    A depthwise conv's backward returns its (D, 1, 3, 3) weight gradient with a stride of 1
    on the size-1 axis, where the parameter has 9: DDP then warns "grad strides do not match
    bucket view strides" at the first step. The copy costs one small tensor per such parameter.
    """
    for p in model.parameters():
        if p.requires_grad:
            p.register_hook(lambda g, p=p: g if g.stride() == p.stride() else torch.empty_strided(
                p.shape, p.stride(), dtype=g.dtype, device=g.device).copy_(g))


def check_finite(accelerator, first_bad: torch.Tensor, last_ckpt) -> None:
    """Stops the run if any rank saw a non-finite loss since the start (one gather, at logs and checkpoints)."""
    bad = [int(s) for s in accelerator.gather(first_bad[None]).tolist() if s >= 0]
    if bad:
        raise DcditError(
            f"training diverged at step {min(bad)}: the loss is not finite; last good checkpoint: "
            f"{last_ckpt or 'none (no checkpoint written yet)'}. Lower train.lr or use "
            f"train.mixed_precision='no', then rerun the same command to resume from it"
        )


def environment(accelerator, compiled: bool = False) -> dict:
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
        "attention_backend": select_backend(accelerator.device),
        "compile": "model" if compiled else "none",
        "host_allocator": host_allocator(),
    }


#################################################################################
#                                 The loop                                      #
#################################################################################


@dataclass
class Objective:
    """A phase of training: its loss object and the step that ends it.

    ``loss(model, x, y, t=…, budget=…) -> (loss, logs, stats)`` (``dcdit_cli/training/losses.py``); None is
    the recipe's diffusion + λ·ratio loss. ``until_step`` ends the phase (the distill warm-up);
    None runs to train.max_steps.
    """

    name: str = "diffusion"
    loss: Callable | None = None
    until_step: int | None = None


def _run_dir_setup(recipe: Recipe, out_dir: Path, resume: Path | None, accelerator):
    """Prepares runs/<name>; returns the checkpoint to resume from (or None): the newest intact one."""
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        for folder in (out_dir, out_dir / "checkpoints", out_dir / "weights"):
            remove_stale_temps(folder)  # what a killed write left behind
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
        old = read_stored_recipe(stored)
        allowed = RESUME_ALLOWED | (DYDIT_ONLY if old.model.dynamic == recipe.model.dynamic == "none" else set())
        changed = [d for d in recipe_diff(old, recipe) if d.split(":")[0] not in allowed]
        if changed:
            raise DcditError(
                f"{out_dir} was trained with a different recipe ({'; '.join(changed)}): resume with the same recipe, "
                f"or pass --out to start a new run"
            )
    return ckpt


def _record_run(recipe: Recipe, out_dir: Path, command: str, accelerator, compiled: bool) -> None:
    """recipe.toml, command.txt and env.json: written once the checkpoint to resume from has loaded,
    so a refused or broken --resume leaves the run directory as it was."""
    if accelerator.is_main_process:
        write_text(out_dir / "recipe.toml", recipe.to_toml())
        with open(out_dir / "command.txt", "a", encoding="utf-8") as f:
            f.write(command + "\n")
        write_json(out_dir / "env.json", environment(accelerator, compiled), indent=2)


def train(
    recipe: Recipe,
    out_dir: Path,
    *,
    resume: Path | None = None,
    command: str = "",
    model_setup: Callable | None = None,
    objectives: list[Objective] | None = None,
    init_from: Path | None = None,
    torch_compile: bool = False,
) -> Path | None:
    """Trains ``recipe`` into ``out_dir``; returns the last exported EMA weights.

    model_setup(model) → model: used by upcycling to load and freeze pretrained weights
    before the optimizer is built. objectives: consecutive phases (distillation warm-up,
    then diffusion); by default one diffusion phase. init_from: weights to start from (a run
    dir, dcdit weights or the authors' .pt; fine-tuning, e.g. DyDiT gates on a trained DC-DiT), loaded before the optimizer is
    built; when the run resumes, its own checkpoint wins. A run that fails before its first
    checkpoint leaves no run directory behind (when this call created it). torch_compile:
    ``torch.compile`` the whole model, two graphs for a DC-DiT (:func:`dcdit_cli.models.compile_model`).
    """
    out_dir = Path(out_dir)
    check_output(out_dir, "--out", directory=True)
    if init_from is not None:
        resolve_weights(init_from)  # a missing file is reported before the run directory is touched
    check_trackers(recipe.train.log_with)  # so is a tracker that is not installed
    created = out_dir  # the outermost folder this call creates (runs/ itself on a first run)
    while not created.parent.exists() and created.parent != created:
        created = created.parent
    new_run = not out_dir.exists()
    try:
        return _train_loop(recipe, out_dir, resume, command, model_setup, objectives, init_from, torch_compile)
    except BaseException:
        if new_run and is_main_process() and not any((out_dir / "checkpoints").glob("step-*")):
            shutil.rmtree(created, ignore_errors=True)
        raise


def _train_loop(recipe, out_dir, resume, command, model_setup, objectives, init_from, compiled) -> Path | None:
    t_cfg, m_cfg = recipe.train, recipe.model
    dataset = check_fits_model(make_dataset(recipe.data, seed=recipe.run.seed), m_cfg)  # before anything is written
    accelerator = Accelerator(mixed_precision=t_cfg.mixed_precision, cpu=not torch.cuda.is_available(),
                              **accelerator_options(recipe, out_dir))
    world, rank = accelerator.num_processes, accelerator.process_index
    micro, accum = batch_plan(t_cfg.global_batch, t_cfg.micro_batch, world)
    watch_ranks(accelerator, command)
    ckpt_path = _run_dir_setup(recipe, out_dir, resume, accelerator)

    diffusion = make_diffusion(num_timesteps=recipe.diffusion.num_timesteps)
    set_seed(recipe.run.seed)
    model = build_model(m_cfg)
    if model_setup is not None:
        model = model_setup(model)
    if init_from is not None and ckpt_path is None:
        fresh = load_init(model, init_from)
        print0(f"[bold]initialised[/] from {init_from}" + (f"; newly initialised: {', '.join(fresh)}" if fresh else ""))
    ema = copy.deepcopy(model)
    requires_grad(ema, False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t_cfg.lr, betas=tuple(t_cfg.betas), weight_decay=t_cfg.weight_decay)

    start_step = 0
    if ckpt_path is not None:
        state = load_checkpoint(ckpt_path)
        for module, key in ((model, "model"), (ema, "ema"), (optimizer, "optimizer")):
            load_into(module, state[key], state["path"], key)
        start_step = state["step"]
        print0(f"[bold]resuming[/] from {state['path']} at step {start_step}")
    _record_run(recipe, out_dir, command, accelerator, compiled)
    trackers = Trackers(accelerator, recipe, out_dir, dataset)
    if world > 1:
        match_grad_strides(model)
    if t_cfg.grad_checkpointing:
        checkpoint_blocks(model)  # after the EMA copy: the EMA model only samples
    if compiled:
        compile_model(model)  # after the EMA copy: the EMA model samples in eager mode
    model, optimizer = accelerator.prepare(model, optimizer)
    ema.to(accelerator.device).eval()
    objectives = objectives or [Objective()]
    default_loss = loss_for_recipe(recipe)  # diffusion + λ·ratio (+ DyDiT's FLOPs loss)

    metrics = MetricsWriter(out_dir / "metrics.jsonl")
    sums: dict[str, torch.Tensor] = {}  # metric sums since the last log, on the device
    first_bad = torch.full((), -1, dtype=torch.long, device=accelerator.device)  # first step with a non-finite loss
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
    last_log = start_step  # metric sums cover the steps since then
    with progress_bar("train", extra="{task.fields[status]}") as progress, preemption.listen() as stop_request:
        task = progress.add_task("train", total=total, completed=start_step, rate="", status="")
        for step in range(start_step, total):
            objective = next(o for o in objectives if o.until_step is None or step < o.until_step)
            lr = learning_rate(step, t_cfg.lr, t_cfg.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            budget = budget_for_step(step, t_cfg.multi_budget_start_step, t_cfg.multi_budget_fractions, seed)
            model.train()
            loss_fn = objective.loss or default_loss
            for a in range(accum):
                torch.manual_seed(step_seed(seed, step, rank, a))  # noise, t, dropout, random router
                idx, flips = batch_indices(seed, step * accum + a, rank, micro, len(dataset))
                x, y, _ = dataset.batch(idx, flips)  # the mask is for the router studies
                x, y = to_device(x, accelerator.device), to_device(y, accelerator.device)
                t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=x.device)
                drop = torch.rand(x.shape[0], device=x.device) < t_cfg.label_dropout
                y = torch.where(drop, torch.full_like(y, null_class), y)
                with accelerator.autocast():
                    loss, logs, _ = loss_fn(model, x, y, t=t, budget=budget, step=step)
                sync = a == accum - 1
                ctx = accelerator.no_sync(model) if not sync and world > 1 else contextlib.nullcontext()
                with ctx:
                    accelerator.backward(loss / accum)
                for k, v in logs.items():  # accumulated on the device: no host synchronisation
                    sums[k] = sums.get(k, 0) + v.float() / accum
                # A non-finite loss is noted on the device and acted on at the next log or checkpoint,
                # before any weights are written.
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(logs["loss"]), step + 1, first_bad)
            if t_cfg.grad_clip > 0:
                sums["grad_norm"] = sums.get("grad_norm", 0) + accelerator.clip_grad_norm_(params, t_cfg.grad_clip).float()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            update_ema(ema, accelerator.unwrap_model(model), t_cfg.ema_decay)
            done = step + 1
            rate = meter.update(t_cfg.global_batch)

            log_now = done % t_cfg.log_every_steps == 0 or done == total
            # A stop signal ends the run after this step (common/preemption.py): on its own every few
            # steps, at log steps inside the metrics all-reduce.
            stop = not log_now and stop_request.due(done, world) and stop_request.agreed(accelerator)
            log_now = log_now or stop
            ckpt_now = done % t_cfg.ckpt_every_steps == 0 or done == total
            if log_now or ckpt_now:
                check_finite(accelerator, first_bad, last_ckpt)
            if log_now:
                keys = sorted(sums)
                local = torch.stack([sums[k] / (done - last_log) for k in keys] + [stop_request.flag(accelerator.device)])
                *values, stop_flag = accelerator.reduce(local, reduction="mean").tolist()
                stop = stop or stop_flag > 0
                record = dict(zip(keys, values))
                record.update(step=done, lr=lr, images_per_s=rate, phase=objective.name, budget=budget)
                metrics.write(record)
                trackers.log(record, done)
                status = f"loss {record['loss']:.4f}"
                if "compression" in record:
                    status += f"  CR {record['compression']:.2f}  kept {record['kept_tokens']:.1f}"
                progress.update(task, status=status)
                plain_log(f"step {done}/{total}  {status}  {record['images_per_s']:.1f} img/s  lr {lr:.2e}")
                sums.clear()
                last_log = done
            trackers.probe(done, ema)  # rank 0, every train.image_every_steps
            progress.update(task, advance=1, rate=f"{rate:.2f} img/s")
            if ckpt_now or stop:
                save(done)
            if stop and done < total:
                _end(accelerator)
                who = stop_request.signal_name or "a stop signal on another rank"
                raise Preempted(f"{who}: finished step {done}/{total} and wrote {last_ckpt}; rerun the same command "
                                f"to resume (exit code {Preempted.exit_code})")

    print(f"rank {rank}/{world}: finished at step {total}", flush=True)
    _end(accelerator)
    return last_weights


def _end(accelerator) -> None:
    """Closes the trackers and the process group: a clean exit of multi-process runs."""
    accelerator.end_training()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
