"""Helpers the built-in backbones share for reading a diffusers pipeline folder."""

from __future__ import annotations

from typing import Any, Mapping


def component_class(index: Mapping[str, Any], key: str, default: str):
    """The transformers class ``model_index.json`` names for the component ``key`` (what the stock pipeline
    loads), or ``default`` when the index does not name one that transformers has."""
    import transformers

    entry = index.get(key)
    name = entry[1] if isinstance(entry, (list, tuple)) and len(entry) == 2 else default
    return getattr(transformers, name, None) or getattr(transformers, default)
