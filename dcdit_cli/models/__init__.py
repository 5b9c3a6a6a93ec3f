"""Model core: DiT baseline and DC-DiT, built from a recipe's ``[model]`` section."""

from __future__ import annotations

import functools

import torch
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


def compile_model(model, backend: str = "inductor") -> None:
    """``torch.compile`` the whole model in place, with dynamic shapes, in at most two graphs.

    A DC-DiT's forward has one host synchronisation (the kept count fixes the shapes after it), so it
    compiles as two graphs: :meth:`DCDiT.route` before it and :meth:`DCDiT.process_kept` after it,
    with N, M_max, the groups' lengths and the bucketed plug-back radius as dynamic sizes, so no
    kept count or radius recompiles them (tests/test_compile.py). A DiT compiles as one graph.
    The compiled callables are set on the instance, so the state-dict names do not change.
    """
    # Inductor's exact output strides: its default sorts the symbolic strides of views it returns,
    # and sympy cannot order 33·M against 33 without knowing M ≥ 1 (InductorError in get_stride_order).
    options = {"strict_output_strides": True} if backend == "inductor" else None
    if isinstance(model, DCDiT):
        model.route = torch.compile(model.route, dynamic=True, backend=backend, options=options)
        model.process_kept = sizes_at_least_two(
            torch.compile(model.process_kept, dynamic=True, backend=backend, options=options))
    else:
        model.compile(dynamic=True, backend=backend, options=options)


def sizes_at_least_two(process_kept):
    """``process_kept`` called with M_max and the groups' longest lengths raised to at least 2.

    Dynamo specialises a size of 0 or 1 whatever ``dynamic`` says, and a freshly initialised router
    keeps no token, so :func:`keep_at_least_one` keeps one per sample: M_max = 1 at the first step, 2
    or more after, and the compiled graph would be traced a second time at step 2. The extra slot
    is padding that ``valid`` marks invalid, so the outputs are those of the exact sizes; eager
    mode keeps the exact sizes, so FLOP counts do not see it (tests/test_compile.py)."""

    @functools.wraps(process_kept)
    def call(h, c, t_emb, p, kept, side, sizes, *rest):
        total, m_max, radius, *group_len = sizes
        return process_kept(h, c, t_emb, p, kept, side, [total, max(m_max, 2), radius, *(max(n, 2) for n in group_len)],
                            *rest)

    return call


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


__all__ = ["DCDiT", "DiT", "ForwardStats", "RouterStats", "build_model", "checkpoint_blocks", "compile_blocks", "compile_model"]
