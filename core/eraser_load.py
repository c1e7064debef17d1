"""Attaching an eraser file to a stock diffusers pipeline or transformer (``t2vu.load_eraser``).

The file's ``backbone`` names the backbone plugin whose ``transformer_sites`` says where the erasers
attach, so any installed backbone's erasers load the same way.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from t2vu.core.eraser_file import (UNKNOWN, EraserFile, PathLike, _few, _init_defaults, _public_config,
                                   config_hash, read_eraser)
from t2vu.core.errors import T2VUError

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from t2vu.plugins.adapter_model import EraserSet, Site


class EraserHandle:
    """Erasers attached to a transformer by :func:`load_eraser`.

    ``handle.scale = 0.5`` weakens them, ``handle.remove()`` (or leaving a ``with``
    block) detaches them and the transformer computes stock outputs again.
    The erasers follow the transformer's inputs to their device on each call
    (so ``pipe.enable_model_cpu_offload()`` works) and stay fp32.
    """

    def __init__(self, transformer: "nn.Module", erasers: "EraserSet", metadata: dict, path: Path):
        self.transformer = transformer
        self.erasers = erasers
        self.metadata = metadata
        self.path = path
        self._device = _device_of(erasers)
        # a backbone whose pipeline runs several transformers (Wan 2.2's experts) gives a module with ``experts``
        self._pre_hooks = [m.register_forward_pre_hook(self._follow_device, with_kwargs=True)
                           for m in getattr(transformer, "experts", None) or [transformer]]

    @property
    def scale(self) -> float:
        return self.erasers.scale

    @scale.setter
    def scale(self, value: float) -> None:
        self.erasers.scale = float(value)

    @property
    def attached(self) -> bool:
        return bool(self._pre_hooks)

    def disabled(self):
        """Context manager: erasers off (stock outputs) inside the block."""
        return self.erasers.disabled()

    def remove(self) -> None:
        """Detach the erasers; the transformer computes exactly its stock outputs again."""
        self.erasers.detach()
        for hook in self._pre_hooks:
            hook.remove()
        self._pre_hooks = []

    def __enter__(self) -> "EraserHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def _follow_device(self, _module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        device = getattr(hidden, "device", None)
        if device is not None and device != self._device:
            self.erasers.to(device=device)
            self._device = device
        return None

    def __repr__(self) -> str:
        state = "attached" if self.attached else "removed"
        return (f"<EraserHandle {self.path.name}: {len(self.erasers.site_names)} sites, "
                f"target={self.metadata.get('target')!r}, scale={self.scale}, {state}>")


def _device_of(module: "nn.Module"):
    for p in module.parameters():
        return p.device
    return None


def _transformer_of(pipe_or_transformer: Any) -> "nn.Module":
    """The pipeline's ``.transformer``, or the argument itself when it is a torch module."""
    from torch import nn

    transformer = getattr(pipe_or_transformer, "transformer", None)
    if isinstance(transformer, nn.Module):
        return transformer
    if isinstance(pipe_or_transformer, nn.Module):
        return pipe_or_transformer
    raise T2VUError(
        f"load_eraser needs a diffusers pipeline with a .transformer (e.g. CogVideoXPipeline) or the "
        f"transformer itself (e.g. CogVideoXTransformer3DModel); got {type(pipe_or_transformer).__name__}")


def backbone_implementation(backbone: str) -> Any:
    """The implementation class of the installed backbone plugin ``backbone`` (what eraser files name)."""
    from t2vu.core import plugins
    from t2vu.core.registry import ComponentUnavailable

    registry = plugins.get_registry()
    if backbone not in registry.components["backbone"]:
        raise T2VUError(f"this eraser is for backbone {backbone!r}, which is not installed "
                        f"(installed: {', '.join(registry.names('backbone')) or 'none'})")
    try:
        return registry.get("backbone", backbone).load()
    except ComponentUnavailable as exc:
        raise T2VUError(f"this eraser is for backbone {backbone!r}: {exc}") from None


def _sites_function(backbone: str) -> Callable[["nn.Module"], list["Site"]]:
    """The backbone class's ``transformer_sites`` (the contract: a staticmethod on the class)."""
    fn = getattr(backbone_implementation(backbone), "transformer_sites", None)
    if fn is None:
        raise T2VUError(f"backbone plugin {backbone!r} does not say where erasers attach "
                        f"(its class has no transformer_sites); load_eraser cannot use it")
    return fn


def _config_differences(stored: Mapping, current: Mapping, defaults: Mapping) -> list[str]:
    """``key: eraser X, model Y`` for each differing key.

    A key present on one side only is a difference unless the other side's value is
    the class default (configs saved by another diffusers version lack newer keys).
    """
    a, b = _public_config(stored), _public_config(current)
    diffs = []
    for key in sorted(set(a) | set(b)):
        missing = object()
        va, vb = a.get(key, missing), b.get(key, missing)
        if va is missing or vb is missing:
            present = vb if va is missing else va
            if key in defaults and defaults[key] == present:
                continue
        if va != vb:
            fmt = lambda v: "(absent)" if v is missing else json.dumps(v)  # noqa: E731
            diffs.append(f"{key}: eraser {fmt(va)}, model {fmt(vb)}")
    return diffs


def _check_config(meta: dict, transformer: "nn.Module", path: Path) -> None:
    stored_hash = meta.get("backbone_config_hash") or UNKNOWN
    if stored_hash == UNKNOWN:
        warnings.warn(
            f"{path.name} does not record the transformer config it was trained for (imported "
            f"without --model); only its sites and widths are checked", UserWarning, stacklevel=3)
        return
    current = dict(getattr(transformer, "config", {}) or {})
    current_hash = config_hash(current)
    if current_hash == stored_hash:
        return
    stored = meta.get("backbone_config")
    if not isinstance(stored, dict):
        diffs = ["(the file keeps only the hash, not the config)"]
    else:
        diffs = _config_differences(stored, current, _init_defaults(type(transformer)))
        if not diffs:
            return
    raise T2VUError(
        f"{path}: this eraser was trained for a different {meta.get('backbone', '')} transformer "
        f"(config hash {stored_hash}, this model {current_hash}). Differences: {'; '.join(diffs)}. "
        f"Load the model it was trained for; if you know the architectures match, pass "
        f"check_config=False")


def _check_sites(erasers_file: EraserFile, sites: list["Site"], path: Path) -> None:
    by_name = {s.name: s for s in sites}
    missing = [n for n in erasers_file.sites if n not in by_name]
    if missing:
        have = f"{sites[0].name} ... {sites[-1].name}" if sites else "none"
        raise T2VUError(f"{path}: {len(missing)} eraser site(s) are not in this transformer: {_few(missing)} "
                        f"(the model has {len(sites)} sites: {have})")
    wrong = []
    for name in erasers_file.sites:
        width = int(erasers_file.tensors[f"{name}.down.weight"].shape[1])
        if width != by_name[name].dim:
            wrong.append(f"{name} (eraser {width}, model {by_name[name].dim})")
    if wrong:
        raise T2VUError(f"{path}: width mismatch at {len(wrong)} site(s): {_few(wrong)}")


def load_eraser(pipe_or_transformer: Any, path: PathLike, scale: float = 1.0, *,
                check_config: bool = True) -> EraserHandle:
    """Attach the eraser in ``path`` to a stock diffusers pipeline or transformer.

    >>> pipe = CogVideoXPipeline.from_pretrained("./CogVideoX-5b", torch_dtype=torch.bfloat16)
    >>> handle = t2vu.load_eraser(pipe, "runs/nudity/eraser.safetensors")

    Refuses (:class:`T2VUError`) a file trained for another transformer config (naming
    the differing keys; ``check_config=False`` skips only that check), missing sites and
    mismatched widths. Eraser parameters stay fp32 on the transformer's device.
    """
    import torch

    from t2vu.plugins.adapter_model import AdapterEraserFactory

    path = Path(path)
    _transformer_of(pipe_or_transformer)  # a clear error for what is neither a pipeline nor a module, first
    erasers_file = read_eraser(path)
    meta = erasers_file.metadata
    if meta.get("eraser_type") != "adapter":
        raise T2VUError(f"{path}: eraser type {meta.get('eraser_type')!r} cannot be loaded by this t2vu "
                        f"(it loads 'adapter' erasers)")
    backbone = meta.get("backbone", "")
    # the backbone says which module of the pipeline erasers attach to (default: its transformer)
    transformer = getattr(backbone_implementation(backbone), "transformer_of", _transformer_of)(pipe_or_transformer)
    sites = _sites_function(backbone)(transformer)
    if check_config:
        _check_config(meta, transformer, path)
    _check_sites(erasers_file, sites, path)
    erasers = AdapterEraserFactory.from_state(erasers_file.tensors, erasers_file.sites,
                                              meta.get("eraser_options") or {})
    device = _device_of(transformer) or torch.device("cpu")
    erasers.to(device=device, dtype=torch.float32)
    erasers.requires_grad_(False)
    erasers.eval()
    erasers.scale = float(scale)
    erasers.attach(sites)
    return EraserHandle(transformer, erasers, meta, path)
