"""Built-in loss: attention-mask localization."""

from __future__ import annotations

from typing import Optional

from pydantic import Field

from t2vu.core.hookspecs import hookimpl
from t2vu.core.spec import LossOptions


class LocalizationOptions(LossOptions):
    """mean_l ||o_l * (1 - M)||^2, M from the frozen video->concept attention."""

    threshold: float = Field(0.1, ge=0, le=1, description="Mask threshold on the min-max normalised attention.")
    sites: Optional[list[str]] = Field(
        None, min_length=1, description="Attention modules whose video->concept attention builds the mask, as "
        "patterns over their names ('transformer_blocks.1?.attn1', 'single_transformer_blocks.*.attn'). "
        "Default: the modules the video erasers sit on.")


@hookimpl
def register_losses(register):
    register(
        "localization",
        "t2vu.losses.terms:LocalizationLoss",
        options=LocalizationOptions,
        summary="Keep eraser outputs inside the video region that attends to the concept",
    )
