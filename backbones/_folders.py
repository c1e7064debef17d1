"""Helpers the built-in backbones share for reading a diffusers pipeline folder and running its components."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Mapping, Optional

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


def enable_checkpointing(transformer, every: int = 1) -> None:
    """Gradient checkpointing of ``transformer``'s blocks through diffusers' own switch: every block, or with
    ``every=k`` the blocks whose call number in each forward is a multiple of ``k`` (counted from 0 in the order the
    forward runs them; the others keep their activations). Non-reentrant, as diffusers' default, so erasers on
    frozen blocks get gradients."""
    if every <= 1:
        transformer.enable_gradient_checkpointing()
        return
    import torch.utils.checkpoint

    calls = [0]

    def restart(_module, _args):
        calls[0] = 0

    def every_kth(block, *args):
        i = calls[0]
        calls[0] += 1
        if i % every:
            return block(*args)
        return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False)

    if not getattr(transformer, "_t2vu_checkpoint_restart", None):
        transformer._t2vu_checkpoint_restart = transformer.register_forward_pre_hook(restart)
    transformer.enable_gradient_checkpointing(gradient_checkpointing_func=every_kth)


#: module-name patterns layerwise fp8 storage leaves in the compute dtype, besides diffusers' defaults (norms,
#: patch and position embeddings, proj_in / proj_out) and each model's own list: every embedding
KEEP_FROM_FP8 = ("embed",)


def load_frozen_transformer(cls, path: Path, dtype, device, subfolder: str = "transformer",
                            storage: Optional[str] = None):
    """``cls.from_pretrained(path/subfolder)`` in ``dtype`` on ``device``, frozen (no gradients, eval mode); with
    ``storage`` (``"float8_e4m3fn"``/``"float8_e5m2"``) its weights stored in that fp8 type and cast up to ``dtype``
    layer by layer as it runs (diffusers' layerwise casting)."""
    transformer = cls.from_pretrained(path, subfolder=subfolder, torch_dtype=dtype)
    transformer.requires_grad_(False).eval()
    if storage is not None:
        import torch
        from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

        transformer.enable_layerwise_casting(storage_dtype=getattr(torch, storage), compute_dtype=dtype,
                                             skip_modules_pattern=tuple(DEFAULT_SKIP_MODULES_PATTERN) + KEEP_FROM_FP8)
    return transformer.to(device)
