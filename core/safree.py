"""SAFREE's training-free core, as a baseline beside erasers (``eval.baselines: [safree]``).

SAFREE (Yoon et al., 2024) edits the prompt, not the model. The concept is a subspace of the text encoder's
output space, spanned by the pooled embeddings of a few concept keywords. For each prompt:

1. **Trigger tokens.** The prompt is encoded once per real token with that token masked. If masking token ``i``
   moves the pooled embedding clearly further from the concept subspace than masking any other token does on
   average (``d_i >= (1 + alpha) * mean_{j != i} d_j``, where ``d`` is the distance to the subspace), token ``i``
   is what pulls the prompt towards the concept.
2. **Projection.** Each trigger token's embedding ``e`` becomes ``(I - P_C) P_I e``: projected onto the span of
   the prompt's own (masked) embeddings ``I``, then away from the concept subspace ``C``. Other tokens are kept.
3. **Filtering steps.** The sampler uses the projected condition for the first steps only (a share of them), then
   the original, so that late steps keep the prompt's detail.

This module holds the linear algebra on plain tensors; a backbone that offers the baseline (its
``safree_conditions``) encodes the masked prompts and keywords with its own text encoder and puts the projected
token embeddings back into its own condition.
"""

from __future__ import annotations

import torch


def projection(vectors: torch.Tensor) -> torch.Tensor:
    """``[D, D]`` projection onto the span of the rows of ``vectors`` ``[K, D]`` (fp32, pseudo-inverse: rank-deficient
    sets are fine)."""
    e = vectors.float().T  # [D, K]
    return e @ torch.linalg.pinv(e.T @ e) @ e.T


def trigger_tokens(masked: torch.Tensor, concept: torch.Tensor, alpha: float) -> torch.Tensor:
    """Bool ``[n]``: which of the prompt's ``n`` real tokens are triggers. ``masked`` ``[n, D]``: the pooled embedding
    of the prompt with token ``i`` masked; ``concept`` ``[K, D]``: the keywords' pooled embeddings."""
    n = masked.size(0)
    if n < 2:
        return torch.zeros(n, dtype=torch.bool)
    away = torch.eye(masked.size(1), device=masked.device) - projection(concept.to(masked.device))
    dist = (masked.float() @ away.T).norm(dim=1).cpu()  # distance of each masked prompt from the concept subspace
    others = (dist.sum() - dist) / (n - 1)  # the mean over the other tokens
    return dist >= (1.0 + alpha) * others


def projected_tokens(tokens: torch.Tensor, positions: list[int], masked: torch.Tensor, concept: torch.Tensor,
                     alpha: float) -> tuple[torch.Tensor, list[int]]:
    """The condition's token embeddings ``tokens`` ``[L, D]`` with each trigger token (of the real tokens at
    ``positions``, in the order of ``masked``'s rows) replaced by ``(I - P_C) P_I e``; and the trigger positions.
    Same dtype as ``tokens``."""
    device = tokens.device
    masked, concept = masked.to(device), concept.to(device)
    triggers = trigger_tokens(masked, concept, alpha)
    chosen = [p for p, hit in zip(positions, triggers.tolist()) if hit]
    if not chosen:
        return tokens, []
    away = torch.eye(tokens.size(-1), device=device) - projection(concept)
    onto_input = projection(masked)
    out = tokens.clone()
    rows = out[chosen].float()
    out[chosen] = (rows @ onto_input.T @ away.T).to(tokens.dtype)
    return out, chosen
