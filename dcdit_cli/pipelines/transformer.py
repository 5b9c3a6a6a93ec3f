"""dcdit's network as a diffusers model: ``DCDiTTransformer2DModel``, and DiT baselines in diffusers' own class.

``DCDiTTransformer2DModel`` is a thin diffusers shell (``ModelMixin`` + ``ConfigMixin``) around the
very module ``dcdit train`` builds: its config is the run's recipe, whose ``[model]`` section goes
through ``build_model`` as in training, so there is one implementation of the network. diffusers'
``save_pretrained`` / ``from_pretrained`` then give its layout, ``config.json`` +
``diffusion_pytorch_model.safetensors``, with the tensors under ``model.`` + dcdit's own names.

A DiT baseline (``model.kind = "dit"``) also maps onto diffusers' ``DiTTransformer2DModel``
(:func:`to_diffusers_dit`) tensor for tensor, with one difference diffusers builds in: its timestep
features use frequencies exp(−ln(10⁴)·i/(128 − 1)) (``downscale_freq_shift=1``) where DiT uses
exp(−ln(10⁴)·i/128), so the same weights give slightly different outputs there
(docs/diffusers.md#dit-baselines-in-diffusers-class measures it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import ConfigMixin, DiTTransformer2DModel, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput

from dcdit_cli.config.recipe import Recipe, recipe_from_dict
from dcdit_cli.models import build_model
from dcdit_cli.models.dcdit import RouterStats
from dcdit_cli.models.dit import DiT, ForwardStats


@dataclass
class DCDiTTransformerOutput(BaseOutput):
    """``sample``: the [ε | v] prediction (B, 2C, H, W); ``stats``: what the forward decided besides
    (a DC-DiT's ``RouterStats``: the router's boundaries, kept tokens; a DiT's ``ForwardStats``)."""

    sample: torch.Tensor
    stats: RouterStats | ForwardStats | None = None


class DCDiTTransformer2DModel(ModelMixin, ConfigMixin):
    """A DC-DiT (or dcdit's DiT baseline) as a diffusers model.

    ``recipe``: a dcdit recipe as a dict (``Recipe.to_dict()``; sections left out take their
    defaults). Its ``[model]`` section builds the network; the other sections record how the
    weights were trained and are meant to be sampled. ``step``: the training step of the weights.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, recipe: dict | None = None, step: int = 0):
        super().__init__()
        self.model = build_model(recipe_from_dict(recipe or {}, source="DCDiTTransformer2DModel config (recipe)",
                                                  drop_removed=True).model)

    @property
    def recipe(self) -> Recipe:
        return recipe_from_dict(self.config.recipe or {}, source="DCDiTTransformer2DModel config", drop_removed=True)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' loader, safetensors only: a folder with pickled weights is refused, never unpickled."""
        kwargs["use_safetensors"] = True
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_dcdit(cls, state: dict[str, torch.Tensor], recipe: Recipe, step: int = 0) -> "DCDiTTransformer2DModel":
        """The model holding dcdit weights (a state dict of ``build_model(recipe.model)``)."""
        model = cls(recipe=recipe.to_dict(), step=step)
        model.model.load_state_dict(state)
        return model.eval()

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor,
                budget=None, return_dict: bool = True):
        """x (B, C, H, W), t (B,), y (B,) → [ε | v] (B, 2C, H, W) and the forward's stats.
        ``budget``: the tail-dropping fraction, a scalar or one per sample (ignored by a DiT)."""
        sample, stats = self.model(hidden_states, timestep, class_labels, budget=budget)
        return DCDiTTransformerOutput(sample=sample, stats=stats) if return_dict else (sample, stats)


def diffusers_dit_state(dit: DiT) -> dict[str, torch.Tensor]:
    """dcdit's DiT weights under diffusers' ``DiTTransformer2DModel`` names. DiT shares one
    timestep and one label embedder; diffusers gives each block its own copy of them (the final
    layer reads block 0's), and splits the fused qkv projection into q, k, v."""
    s = dit.state_dict()
    out = {"pos_embed.proj.weight": s["x_embedder.proj.weight"], "pos_embed.proj.bias": s["x_embedder.proj.bias"],
           "proj_out_1.weight": s["final_layer.adaLN_modulation.1.weight"],
           "proj_out_1.bias": s["final_layer.adaLN_modulation.1.bias"],
           "proj_out_2.weight": s["final_layer.linear.weight"], "proj_out_2.bias": s["final_layer.linear.bias"]}
    per_block = {"norm1.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
                 "norm1.emb.timestep_embedder.linear_2": "t_embedder.mlp.2"}
    for i in range(len(dit.blocks)):
        b, d = f"blocks.{i}.", f"transformer_blocks.{i}."
        names = {**per_block, "norm1.linear": b + "adaLN_modulation.1", "attn1.to_out.0": b + "attn.proj",
                 "ff.net.0.proj": b + "mlp.fc1", "ff.net.2": b + "mlp.fc2"}
        for theirs, ours in names.items():
            for kind in ("weight", "bias"):
                out[f"{d}{theirs}.{kind}"] = s[f"{ours}.{kind}"]
        out[d + "norm1.emb.class_embedder.embedding_table.weight"] = s["y_embedder.embedding_table.weight"]
        for kind in ("weight", "bias"):
            q, k, v = s[f"{b}attn.qkv.{kind}"].chunk(3, dim=0)
            out.update({f"{d}attn1.to_q.{kind}": q, f"{d}attn1.to_k.{kind}": k, f"{d}attn1.to_v.{kind}": v})
    return {k: v.clone() for k, v in out.items()}


def to_diffusers_dit(dit: DiT) -> DiTTransformer2DModel:
    """dcdit's DiT baseline as diffusers' ``DiTTransformer2DModel`` (same weights; see the module
    docstring for the one place its outputs differ)."""
    c = dit.config
    if c.mlp_ratio != 4.0:
        raise ValueError(f"diffusers' DiT blocks have a 4x MLP; this DiT has mlp_ratio {c.mlp_ratio}")
    model = DiTTransformer2DModel(
        num_attention_heads=c.num_heads, attention_head_dim=c.hidden_size // c.num_heads, in_channels=c.in_channels,
        out_channels=dit.out_channels, num_layers=c.depth, sample_size=c.input_size, patch_size=c.patch_size,
        num_embeds_ada_norm=c.num_classes, norm_eps=1e-6,  # DiT's LayerNorm ε
    )
    model.load_state_dict(diffusers_dit_state(dit))
    return model.eval()
