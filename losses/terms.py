"""The three T2VUnlearning loss terms (torch; imported only to train).

Each term declares what it reads (``needs()``) so the engine can batch the
passes, then computes an unweighted scalar from the step context. The terms
compare predictions of one model, so they work for any parameterisation
(v-prediction, flow matching) without knowing the backbone.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from t2vu.core.context import ANCHOR, PRESERVED, TARGET, UNCOND, Need


class NegativeGuidanceLoss:
    """``||v'(x_t, c) - [v*(x_t, a) - eta (v*(x_t, c) - v*(x_t, a))]||^2``; the anchor ``a`` is the
    empty prompt ∅, or ``c`` with the concept replaced when the spec sets ``concept.anchor``. With
    ``push_limit`` the guidance step is capped per sample (:func:`guided_away`)."""

    def __init__(self, options):
        self.options = options

    def needs(self) -> list[Need]:
        return [Need("frozen", ANCHOR), Need("frozen", TARGET), Need("erased", TARGET)]

    def target(self, ctx) -> torch.Tensor:
        return guided_away(ctx.frozen(ANCHOR), ctx.frozen(TARGET), self.options.eta, self.options.push_limit)

    def __call__(self, ctx) -> torch.Tensor:
        return F.mse_loss(ctx.erased(TARGET), self.target(ctx).detach())


def guided_away(anchor: torch.Tensor, cond: torch.Tensor, eta: float, push_limit: Optional[float] = None):
    """The negative-guidance teacher ``anchor - step``, ``step = eta (cond - anchor)``; with ``push_limit``
    each sample's step (``[B, ...]``) is scaled by ``min(1, push_limit ||anchor|| / ||step||)``."""
    step = eta * (cond - anchor)
    if push_limit is not None:
        norm = step.float().flatten(1).norm(dim=1)
        cap = push_limit * anchor.float().flatten(1).norm(dim=1)
        scale = (cap / norm.clamp_min(torch.finfo(torch.float32).tiny)).clamp(max=1.0)
        step = step * scale.to(step.dtype).view(-1, *([1] * (step.dim() - 1)))
    return anchor - step


class PreservationLoss:
    """``||v'(x_t, c_p) - v*(x_t, c_p)||^2`` for the preserved concept sampled this step, plus the same
    for the empty prompt ∅ when ``unconditional`` is set."""

    def __init__(self, options):
        self.options = options

    def conds(self) -> list[str]:
        return [PRESERVED, UNCOND] if self.options.unconditional else [PRESERVED]

    def needs(self) -> list[Need]:
        return [Need(kind, cond) for cond in self.conds() for kind in ("frozen", "erased")]

    def __call__(self, ctx) -> torch.Tensor:
        return sum(F.mse_loss(ctx.erased(c), ctx.frozen(c).detach()) for c in self.conds())


def concept_mask(attention: torch.Tensor, threshold: float) -> torch.Tensor:
    """Min-max normalise ``[B, frames, tokens_per_frame]`` per frame; 1 where above ``threshold``."""
    lo = attention.amin(dim=-1, keepdim=True)
    hi = attention.amax(dim=-1, keepdim=True)
    norm = (attention - lo) / (hi - lo).clamp_min(1e-12)
    return (norm > threshold).to(attention.dtype)


class LocalizationLoss:
    """``mean_l ||o_l * (1 - M)||^2``: eraser outputs outside the concept's region are penalised.

    Per site ``l`` with output ``o_l`` ``[B, N, D]``: ``normalize: all_tokens`` divides the sum of squares outside
    the mask by ``B N D`` (all tokens), ``outside_tokens`` by ``D`` times the number of outside tokens in the
    batch (0 when there is none); the sites' values are then averaged.
    """

    def __init__(self, options):
        self.options = options

    def needs(self) -> list[Need]:
        sites = tuple(self.options.sites) if self.options.sites is not None else None
        return [Need("attention", TARGET, sites), Need("eraser_outputs", TARGET)]

    def mask(self, ctx) -> torch.Tensor:
        """``[B, N_video]`` binary mask of the concept's region."""
        attention = ctx.attention(TARGET, self.options.sites)
        return concept_mask(attention, self.options.threshold).flatten(1)

    def __call__(self, ctx) -> torch.Tensor:
        outputs = ctx.eraser_outputs(TARGET)
        if not outputs:  # no video eraser acted this step (training.stream_start holds them off): nothing to keep in
            return ctx.x_t.new_zeros(())
        outside = 1.0 - self.mask(ctx)
        terms = [self.site_term(o.float(), outside.to(o.device, torch.float32)) for o in outputs.values()]
        return torch.stack(terms).mean()

    def site_term(self, output: torch.Tensor, outside: torch.Tensor) -> torch.Tensor:
        """One site's term from its output ``[B, N, D]`` and the binary outside mask ``[B, N]``."""
        squares = (output * outside[..., None]).pow(2)
        if self.options.normalize == "all_tokens":
            return squares.mean()
        count = outside.sum() * output.size(-1)
        return squares.sum() / count.clamp_min(1.0)  # no outside token: the sum is 0 as well
