"""Preserved concepts and augmented target prompts, as the trainer gets them.

``collect_preserved`` runs the spec's ``preserved:`` sources in order and
merges their answers; ``augment_prompts`` runs the ``augment:`` plugins over
the target prompts (the engine writes the result to the run's prompts.json).
``resolve_source`` builds a source from loose options (what ``t2vu concepts``
does).
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

from t2vu.core.errors import T2VUError
from t2vu.core.registry import ComponentUnavailable, Registry
from t2vu.core.spec import Problem, Resolved, ResolvedSpec, SpecDocument, SpecError, apply_overrides


def _key(text: str) -> str:
    return " ".join(text.split()).casefold()


def _merge(lists: Iterable[Iterable[str]], drop: Optional[str] = None) -> list[str]:
    """Concatenate, strip, de-duplicate (case- and space-insensitive, first spelling kept)."""
    seen = {_key(drop)} if drop is not None else set()
    out: list[str] = []
    for items in lists:
        for item in items:
            if not isinstance(item, str):
                continue
            text = " ".join(item.split())
            if text and _key(text) not in seen:
                seen.add(_key(text))
                out.append(text)
    return out


def _where(block: Resolved) -> str:
    return f"{block.path} ({block.name})"


def _run_source(block: Resolved, target: str) -> list[str]:
    """The concepts one source block gives for ``target``; its errors name the block."""
    try:
        return list(block.build().concepts(target))
    except (T2VUError, ComponentUnavailable) as exc:
        raise T2VUError(f"{_where(block)}: {exc}") from None


def collect_preserved(blocks: list[Resolved], target: str) -> list[str]:
    """Run each preserved-concept source on ``target``; concatenate in order, de-duplicate,
    drop the target itself. Raises :class:`T2VUError` naming the failing block."""
    merged = _merge([_run_source(block, target) for block in blocks], drop=target)
    if blocks and not merged:
        raise T2VUError(f"the preserved sources ({', '.join(_where(b) for b in blocks)}) yielded no "
                        f"concepts other than {target!r}")
    return merged


def anchor_text(resolved: ResolvedSpec) -> Optional[str]:
    """What replaces the target in the anchor prompts: ``concept.anchor`` as written, or, when it is a
    concept-source block, the first concept that source gives other than the target; ``None``: no anchor
    (the unlearning term is guided relative to the empty prompt)."""
    concept = resolved.spec.concept
    block = resolved.anchor_source
    if block is None:
        return concept.anchor
    target = concept.target.strip()
    found = _merge([_run_source(block, target)], drop=target)
    if not found:
        raise T2VUError(f"{_where(block)} gave no concept other than {target!r} to anchor the target on; "
                        "name the anchor text instead (concept.anchor: 'a person', 'shape', ...)")
    return found[0]


def augment_prompts(blocks: list[Resolved], target: str, prompts: list[str]) -> list[str]:
    """Apply the augmenters in order (each sees the prompts so far), originals first, de-duplicated."""
    current = _merge([prompts])
    for block in blocks:
        try:
            produced = block.build().augment(target, list(current))
        except T2VUError as exc:
            raise T2VUError(f"{_where(block)}: {exc}") from None
        current = _merge([current, produced])
    return current


def resolve_source(registry: Registry, name: str, sets: list[str], count: Optional[int] = None) -> Resolved:
    """A preserved-concept source from ``--set key=value`` options, validated like a spec block
    (relative paths resolve against the current folder).

    Raises :class:`SpecError` (unknown source or option, with "did you mean").
    """
    from t2vu.core.spec import _phase2_block

    bad = [item for item in sets if not item.partition("=")[0].strip() or "=" not in item]
    if bad:
        raise SpecError([Problem((), f"--set {item!r}: expected KEY=VALUE, e.g. count=10 or model=qwen")
                         for item in bad])
    doc = SpecDocument(data={}, lines={})
    apply_overrides(doc, sets)
    block: dict[str, Any] = {"source": name, **doc.data}
    if count is not None:
        block["count"] = count
    wrapper = SpecDocument(data=block, lines={}, overridden={(k,) for k in block if k != "source"})
    problems: list[Problem] = []
    resolved = _phase2_block(registry, "concept_source", "source", block, (), wrapper, problems)
    if problems or resolved is None:
        raise SpecError(problems)
    resolved.path = "preserved"
    return resolved
