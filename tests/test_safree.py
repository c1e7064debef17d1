"""SAFREE's linear algebra (t2vu.core.safree) on constructed embeddings."""

import torch

from t2vu.core.safree import projected_tokens, projection, trigger_tokens


def test_projection_is_onto_the_span():
    e = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    p = projection(e)
    assert torch.allclose(p @ torch.tensor([3.0, -2.0, 5.0]), torch.tensor([3.0, -2.0, 0.0]), atol=1e-5)
    assert torch.allclose(p @ p, p, atol=1e-5)
    assert torch.allclose(projection(torch.cat([e, e])), p, atol=1e-5)  # rank-deficient sets are fine


def test_the_token_whose_masking_leaves_the_concept_is_the_trigger():
    # concept direction: axis 0. Masking token 1 removes the concept from the prompt: its masked embedding is far
    # from the concept subspace; masking the others leaves the concept in (close to the subspace).
    concept = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    masked = torch.tensor([[1.0, 0.1, 0.0, 0.0], [0.1, 1.0, 1.0, 0.0], [1.0, 0.0, 0.1, 0.0]])
    assert trigger_tokens(masked, concept, 0.01).tolist() == [False, True, False]
    assert trigger_tokens(masked[:1], concept, 0.01).tolist() == [False]  # one token: nothing to compare with
    tokens = torch.tensor([[0.0, 0.0, 0.0, 1.0], [2.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0], [0.5, 0.5, 0.5, 0.5]])
    out, chosen = projected_tokens(tokens, [1, 2, 3], masked, concept, 0.01)
    assert chosen == [2]  # the second real token sits at position 2 of the condition
    assert torch.equal(out[[0, 1, 3]], tokens[[0, 1, 3]])
    assert abs(float(out[2, 0])) < 1e-5  # nothing left along the concept
    # and it stays in the span of the prompt's own (masked) embeddings
    assert torch.allclose(projection(masked) @ out[2], out[2], atol=1e-5)
