"""Built-in backbone plugin: HunyuanVideo (text-to-video, 13B) from a local diffusers folder.

Registration and options only; the implementation (torch, diffusers) lives in
:mod:`t2vu.backbones.hunyuanvideo_model` and is imported when a run builds it.
"""

from __future__ import annotations

from typing import ClassVar, Optional

from pydantic import Field, field_validator

from t2vu.core.hookspecs import hookimpl
from t2vu.core.protocols import VideoDefaults
from t2vu.core.spec import BackboneOptions


class HunyuanVideoOptions(BackboneOptions):
    """A HunyuanVideo model folder in diffusers format (``HunyuanVideoPipeline.save_pretrained``, e.g.
    ``hunyuanvideo-community/HunyuanVideo``)."""

    #: the pipeline's documented example clip (61 frames there; 33 keeps training affordable), 30 steps,
    #: embedded guidance 6, 15 fps
    defaults: ClassVar[VideoDefaults] = VideoDefaults(num_frames=33, height=320, width=512, steps=30,
                                                      guidance=6.0, fps=15)
    site_presets: ClassVar[dict[str, list[str]]] = {
        "single": ["single_transformer_blocks.*.attn"],
        "double": ["transformer_blocks.*.attn"],
        "all": ["transformer_blocks.*.attn", "single_transformer_blocks.*.attn"],
    }
    #: where the upstream T2VUnlearning release puts HunyuanVideo's erasers
    default_sites: ClassVar[Optional[str]] = "single"
    example_path: ClassVar[str] = "./HunyuanVideo"

    guidance: float = Field(
        6.0, gt=0, description="Embedded guidance scale of every training forward of a guidance-distilled model "
        "(HunyuanVideo is one: the scale is an input of the transformer, not a second pass). The pipeline's "
        "default; change it only to train the eraser at the scale you will generate with. Ignored by a "
        "transformer without guidance embeddings.")
    max_sequence_length: int = Field(
        256, gt=0, description="Llama tokens per prompt after the template is cropped off (the pipeline's "
        "max_sequence_length). Longer prompts are truncated; lower it to save memory with short prompts.")
    prompt_template: Optional[str] = Field(
        None, description="Text the prompt is formatted into before the Llama encoder, with '{}' where the "
        "prompt goes (default: the pipeline's DEFAULT_PROMPT_TEMPLATE). Change it only for a model trained "
        "with another template.")
    crop_start: Optional[int] = Field(
        None, ge=0, description="Llama tokens of the template before the prompt, cut off the embeddings "
        "(default: 95 for the default template; for a custom template, counted with the tokenizer exactly "
        "as the pipeline does). Set it with a custom template whose count the pipeline would get wrong.")

    @field_validator("prompt_template")
    @classmethod
    def _has_placeholder(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and "{}" not in value:
            raise ValueError("prompt_template must contain '{}' where the prompt goes")
        return value


@hookimpl
def register_backbones(register):
    register(
        "hunyuanvideo",
        "t2vu.backbones.hunyuanvideo_model:HunyuanVideoBackbone",
        options=HunyuanVideoOptions,
        summary="HunyuanVideo transformer (flow matching, embedded guidance, Llama + CLIP text, video tokens first)",
    )
