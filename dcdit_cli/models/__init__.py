"""Model core: DiT baseline and DC-DiT, built from a recipe's ``[model]`` section."""

from __future__ import annotations

import torch

from dcdit_cli.models.dcdit import DCDiT, RouterStats
from dcdit_cli.models.dit import DiT
from dcdit_cli.models.dydit import add_gates


def with_dynamic(model_cfg, model):
    """The model with DyDiT's gates in every block when ``model.dynamic = "dydit"`` (paper §4.5)."""
    return add_gates(model) if model_cfg.dynamic == "dydit" else model


def build_model(model_cfg):
    """A DiT or DCDiT from a :class:`~dcdit_cli.config.recipe.ModelConfig`."""
    common = dict(
        input_size=model_cfg.input_size,
        in_channels=model_cfg.in_channels,
        hidden_size=model_cfg.hidden_size,
        depth=model_cfg.depth,
        num_heads=model_cfg.num_heads,
        mlp_ratio=model_cfg.mlp_ratio,
        num_classes=model_cfg.num_classes,
        learn_sigma=model_cfg.learn_sigma,
    )
    if model_cfg.kind == "dit":
        return with_dynamic(model_cfg, DiT(patch_size=model_cfg.patch_size, **common))
    return with_dynamic(model_cfg, DCDiT(
        scaffold_width=model_cfg.scaffold_width,
        encoder_blocks=model_cfg.encoder_blocks,
        decoder_blocks=model_cfg.decoder_blocks,
        router=model_cfg.router,
        target_ratio=model_cfg.target_ratio,
        smoothing_sigma=model_cfg.smoothing_sigma,
        pos_grid_scale=model_cfg.pos_grid_scale,
        cond_adaptor=model_cfg.cond_adaptor,
        force_endpoints=model_cfg.force_endpoints,
        norm_eps=model_cfg.norm_eps,
        norm_groups=model_cfg.norm_groups,
        init=model_cfg.init,
        **common,
    ))


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
        model.process_kept = torch.compile(model.process_kept, dynamic=True, backend=backend, options=options)
    else:
        model.compile(dynamic=True, backend=backend, options=options)


__all__ = ["DCDiT", "DiT", "RouterStats", "build_model", "compile_blocks", "compile_model"]
