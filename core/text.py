"""Where a concept occurs in a prompt: one rule for the anchor prompt and every backbone's concept token mask.

A concept occurs where its words stand as whole words (not inside a longer word: ``red`` is not in ``hundred``
nor ``reddish``), in any case, with any run of whitespace between the words of a multi-word concept
(``van gogh`` matches ``Van  Gogh``). Pure Python (no torch): the spec, engine and backbones all import it.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence


def concept_pattern(concept: str) -> Optional[re.Pattern]:
    """The compiled whole-word, case-insensitive pattern of ``concept``; ``None`` for an empty (or blank) one."""
    words = concept.split()
    if not words:
        return None
    return re.compile(r"(?<!\w)" + r"\s+".join(map(re.escape, words)) + r"(?!\w)", re.IGNORECASE)


def concept_spans(text: str, concept: str) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of the whole-word, case-insensitive occurrences of ``concept`` in
    ``text`` (see the module docstring), in order, non-overlapping; ``[]`` for an empty concept."""
    pattern = concept_pattern(concept)
    return [] if pattern is None else [m.span() for m in pattern.finditer(text)]


def replace_concept(text: str, concept: str, replacement: str) -> str:
    """``text`` with every occurrence of ``concept`` (:func:`concept_spans`) replaced by ``replacement``."""
    pattern = concept_pattern(concept)
    return text if pattern is None else pattern.sub(lambda _: replacement, text)


def overlapping(offsets: Sequence[Sequence[int]], spans: Sequence[tuple[int, int]]) -> list[bool]:
    """For each token's character offsets ``(a, b)``: does it overlap one of ``spans``? A token with empty
    offsets (``b <= a``: padding, EOS, a tokenizer's added tokens) never does."""
    return [b > a and any(a < e and b > s for s, e in spans) for a, b in offsets]
