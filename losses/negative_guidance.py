"""Built-in loss: negatively guided velocity (the unlearning term)."""

from __future__ import annotations

from pydantic import Field

from t2vu.core.hookspecs import hookimpl
from t2vu.core.spec import LossOptions


class NegativeGuidanceOptions(LossOptions):
    """||v'(x_t, c) - [v*(x_t, empty) - eta (v*(x_t, c) - v*(x_t, empty))]||^2."""

    eta: float = Field(7.0, ge=0, description="Strength of the negative guidance.")


@hookimpl
def register_losses(register):
    register(
        "negative_guidance",
        "t2vu.losses.terms:NegativeGuidanceLoss",
        options=NegativeGuidanceOptions,
        summary="Steer target prompts to the negatively guided velocity of the frozen model",
    )
