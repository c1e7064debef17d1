"""Built-in loss: concept preservation."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from t2vu.core.hookspecs import hookimpl
from t2vu.core.spec import LossOptions


class PreservationOptions(LossOptions):
    """||v'(x_t, c_p) - v*(x_t, c_p)||^2 over the preserved concepts."""

    requires_preserved: ClassVar[bool] = True
    unconditional: bool = Field(
        False, description="Also hold the empty prompt's prediction v'(x_t, '') = v*(x_t, ''). Sampling with "
        "CFG subtracts it, so an eraser that shifts it along with the concept cancels part of its own edit. Turn "
        "it on when the concept is what the model draws from an empty prompt.")


@hookimpl
def register_losses(register):
    register(
        "preservation",
        "t2vu.losses.terms:PreservationLoss",
        options=PreservationOptions,
        summary="Keep the erased model's predictions for preserved concepts equal to the frozen model's",
    )
