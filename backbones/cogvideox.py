"""Built-in backbone plugin: CogVideoX (2B, 5B, 1.5-5B) from a local diffusers folder.

Registration and options only; the implementation (torch, diffusers) lives in
:mod:`t2vu.backbones.cogvideox_model` and is imported when a run builds it.
"""

from __future__ import annotations

from typing import ClassVar, Optional

from pydantic import Field

from t2vu.core.hookspecs import hookimpl
from t2vu.core.protocols import VideoDefaults
from t2vu.core.spec import BackboneOptions


class CogVideoXOptions(BackboneOptions):
    """A CogVideoX model folder in diffusers format (``CogVideoXPipeline.save_pretrained``)."""

    #: CogVideoX-5b's native clip and the pipeline's sampler settings (50 steps, CFG 6, 8 fps)
    defaults: ClassVar[VideoDefaults] = VideoDefaults(num_frames=49, height=480, width=720, steps=50,
                                                      guidance=6.0, fps=8)
    site_presets: ClassVar[dict[str, list[str]]] = {"all": ["transformer_blocks.*.attn1"]}
    default_sites: ClassVar[Optional[str]] = "all"
    example_path: ClassVar[str] = "./CogVideoX-5b"

    max_text_length: Optional[int] = Field(
        None, gt=0, description="Tokens per prompt; default: the transformer's max_text_seq_length.")


@hookimpl
def register_backbones(register):
    register(
        "cogvideox",
        "t2vu.backbones.cogvideox_model:CogVideoXBackbone",
        options=CogVideoXOptions,
        summary="CogVideoX-2b / 5b / 1.5-5B transformer (v-prediction, text tokens first)",
    )
