"""Built-in backbone plugin: CogVideoX (2B, 5B, 1.5-5B) from a local diffusers folder.

Registration and options only; the implementation (torch, diffusers) lives in
:mod:`t2vu.backbones.cogvideox_model` and is imported when a run builds it.
"""

from __future__ import annotations

from typing import Optional

from pydantic import Field

from t2vu.core.hookspecs import hookimpl
from t2vu.core.spec import BackboneOptions


class CogVideoXOptions(BackboneOptions):
    """A CogVideoX model folder in diffusers format (``CogVideoXPipeline.save_pretrained``)."""

    max_text_length: Optional[int] = Field(
        None, gt=0, description="Tokens per prompt; default: the transformer's max_text_seq_length.")
    device: Optional[str] = Field(None, description="Device for training (default: accelerate's choice).")


@hookimpl
def register_backbones(register):
    register(
        "cogvideox",
        "t2vu.backbones.cogvideox_model:CogVideoXBackbone",
        options=CogVideoXOptions,
        summary="CogVideoX-2b / 5b / 1.5-5B transformer (v-prediction, text tokens first)",
    )
