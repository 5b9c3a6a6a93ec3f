"""Model core: DiT baseline and DC-DiT, built from a recipe's ``[model]`` section."""

from __future__ import annotations

import functools

import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from dcdit_cli.config.recipe import ModelConfig
from dcdit_cli.models.dcdit import DCDiT, RouterStats
from dcdit_cli.models.dit import DiT, ForwardStats
from dcdit_cli.models.dydit import add_gates


def build_model(config: ModelConfig) -> nn.Module:
    """A DiT or DC-DiT from the recipe's ``[model]`` section, with DyDiT's gates in every block when
    ``dynamic = "dydit"`` (paper §4.5). The gates are added after the plain model is built, so a seed
    gives the same plain weights with and without them (models/dydit.py ``add_gates``)."""
    model = DiT(config) if config.kind == "dit" else DCDiT(config)
    return add_gates(model) if config.dynamic == "dydit" else model


def compile_blocks(model) -> None:
    """``torch.compile`` every transformer block in place, with dynamic shapes.

    The DC-DiT's blocks see a new packed length N = Σ M every step; compiled with dynamic shapes
    they do not recompile as it changes (docs/performance.md). Compiling the blocks, not the whole
    model, keeps the scaffold's one host synchronisation outside the graphs, and the state-dict
    names unchanged (``nn.Module.compile`` wraps the call, not the module).
    """
    for block in model.blocks:
        block.compile(dynamic=True)


def checkpoint_blocks(model) -> None:
    """Gradient checkpointing (``train.grad_checkpointing``): every transformer block and, in a
    DC-DiT, every scaffold res-block keeps only its inputs for the backward pass and runs its
    forward again there (``torch.utils.checkpoint``, non-reentrant). Activation memory then holds one
    block's intermediates at a time instead of all of them, for about one more forward of compute;
    values, gradients and state-dict names are unchanged (the call is wrapped, not the module)."""
    blocks = [*model.blocks]
    if isinstance(model, DCDiT):
        blocks += [*model.encoder.blocks, *model.decoder.blocks]
    for block in blocks:
        block.forward = functools.partial(checkpoint, type(block).forward, block, use_reentrant=False)


__all__ = ["DCDiT", "DiT", "ForwardStats", "RouterStats", "build_model", "checkpoint_blocks", "compile_blocks"]
