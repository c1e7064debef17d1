"""Built-in loss: attention-mask localization."""

from __future__ import annotations

from typing import Literal, Optional

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
    normalize: Literal["all_tokens", "outside_tokens"] = Field(
        "all_tokens", description="What each site's squared outputs outside the mask are averaged over. "
        "'all_tokens': every video token and channel of the batch, so the term's effective weight grows with the "
        "share of tokens outside the concept's region and differs between concepts, prompts and timesteps. "
        "'outside_tokens': the tokens outside the region only (the batch's outside tokens times channels; 0 when "
        "no token is outside), as Receler normalises: the mean squared output per outside token, whatever the "
        "region's size, so one weight means the same for every concept.")


@hookimpl
def register_losses(register):
    register(
        "localization",
        "t2vu.losses.terms:LocalizationLoss",
        options=LocalizationOptions,
        summary="Keep eraser outputs inside the video region that attends to the concept",
    )
