"""dcdit models as diffusers models and pipelines (docs/diffusers.md)."""

from dcdit_cli.pipelines.pipeline import DCDiTPipeline, DCDiTPipelineOutput
from dcdit_cli.pipelines.transformer import DCDiTTransformer2DModel, DCDiTTransformerOutput, to_diffusers_dit

__all__ = ["DCDiTPipeline", "DCDiTPipelineOutput", "DCDiTTransformer2DModel", "DCDiTTransformerOutput", "to_diffusers_dit"]
