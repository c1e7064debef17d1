"""Built-in eraser plugin: the Receler / T2VUnlearning adapter.

``Linear(dim -> rank) -> GELU -> Linear(rank -> dim)``, up-projection
zero-initialised, added to the video-token output of each self-attention
(``streams: [video]``, the default) and/or to the text tokens each
self-attention reads (``text``).
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from t2vu.core.hookspecs import hookimpl
from t2vu.core.registry import Options


class AdapterOptions(Options):
    """Low-rank MLP adapter added to each attention's video output."""

    rank: int = Field(128, gt=0, description="Hidden width of each adapter.")
    sites: Optional[list[str]] = Field(
        None, min_length=1, description="Which attention modules get an eraser: names of the backbone's site "
        "presets (HunyuanVideo: 'single', 'double', 'all') and/or patterns over module names "
        "('transformer_blocks.*.attn1', 'single_transformer_blocks.3?.attn'). Default: the backbone's own "
        "choice (where the method puts erasers on that model).")
    streams: list[Literal["video", "text"]] = Field(
        ["video"], min_length=1,
        description="What each block's adapter edits: 'video' (the attention's video output, as in "
                    "T2VUnlearning) and/or 'text' (the text tokens the attention reads the prompt from).")


@hookimpl
def register_erasers(register):
    register(
        "adapter",
        "t2vu.plugins.adapter_model:AdapterEraserFactory",
        options=AdapterOptions,
        summary="Linear -> GELU -> Linear adapter on self-attention video output (Receler, T2VUnlearning)",
    )
