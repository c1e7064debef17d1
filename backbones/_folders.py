"""Helpers the built-in backbones share for reading a diffusers pipeline folder and running its components."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Mapping

from t2vu.core.errors import T2VUError


def component_class(index: Mapping[str, Any], key: str, default: str):
    """The transformers class ``model_index.json`` names for the component ``key`` (what the stock pipeline
    loads), or ``default`` when the index does not name one that transformers has."""
    import transformers

    entry = index.get(key)
    name = entry[1] if isinstance(entry, (list, tuple)) and len(entry) == 2 else default
    return getattr(transformers, name, None) or getattr(transformers, default)


def read_json(path: Path, where: str) -> dict:
    """A JSON config of the model folder; :class:`T2VUError` naming ``where`` when it cannot be read."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise T2VUError(f"backbone.model_path: cannot read {where} ({exc})") from None


@contextlib.contextmanager
def decoding(vae, transformers, device, options):
    """The VAE on ``device`` for one decode: tiled and sliced with ``options.vae_tiling``; with
    ``options.offload_for_decode`` the ``transformers`` wait in CPU memory meanwhile and the VAE goes back to it
    after (both move back and forth whole, as diffusers' model CPU offload moves components)."""
    import torch

    if getattr(options, "vae_tiling", False):
        for name in ("enable_tiling", "enable_slicing"):
            if hasattr(vae, name):
                getattr(vae, name)()
    offload = bool(getattr(options, "offload_for_decode", False)) and torch.device(device).type != "cpu"
    if offload:
        for t in transformers:
            t.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    vae.to(device)
    try:
        yield vae
    finally:
        if offload:
            vae.to("cpu")
            for t in transformers:
                t.to(device)


def load_frozen_transformer(cls, path: Path, dtype, device, subfolder: str = "transformer"):
    """``cls.from_pretrained(path/subfolder)`` in ``dtype`` on ``device``, frozen (no gradients, eval mode)."""
    transformer = cls.from_pretrained(path, subfolder=subfolder, torch_dtype=dtype)
    return transformer.requires_grad_(False).eval().to(device)
