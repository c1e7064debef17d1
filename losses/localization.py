"""Built-in loss: attention-mask localization."""

from __future__ import annotations

from typing import Optional

from pydantic import Field

from t2vu.core.hookspecs import hookimpl
from t2vu.core.spec import LossOptions


class LocalizationOptions(LossOptions):
    """mean_l ||o_l * (1 - M)||^2, M from the frozen video->concept attention."""

    threshold: float = Field(0.1, ge=0, le=1, description="Mask threshold on the min-max normalised attention.")
    layers: Optional[list[int]] = Field(
        None, description="Block indices whose attention builds the mask (default: all eraser sites).")


@hookimpl
def register_losses(register):
    register(
        "localization",
        "t2vu.losses.terms:LocalizationLoss",
        options=LocalizationOptions,
        summary="Keep eraser outputs inside the video region that attends to the concept",
    )
