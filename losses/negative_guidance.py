"""Built-in loss: negatively guided velocity (the unlearning term)."""

from __future__ import annotations

from typing import Optional

from pydantic import Field

from t2vu.core.hookspecs import hookimpl
from t2vu.core.spec import LossOptions


class NegativeGuidanceOptions(LossOptions):
    """||v'(x_t, c) - [v*(x_t, a) - eta (v*(x_t, c) - v*(x_t, a))]||^2, a the empty prompt or the anchor."""

    eta: float = Field(7.0, ge=0, description="Strength of the negative guidance.")
    push_limit: Optional[float] = Field(
        None, gt=0, description="Cap each sample's guidance step eta (v*(c) - v*(a)) at push_limit x ||v*(a)|| "
        "(None: no cap); the direction is kept. Set it when one eta must serve several concepts and the strong "
        "eta some need makes others' targets overshoot (washed-out or blank samples).")


@hookimpl
def register_losses(register):
    register(
        "negative_guidance",
        "t2vu.losses.terms:NegativeGuidanceLoss",
        options=NegativeGuidanceOptions,
        summary="Steer target prompts to the negatively guided velocity of the frozen model",
    )
