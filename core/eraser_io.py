"""Eraser files: save, read, load into a stock pipeline, convert from/to upstream.

Our format is one ``.safetensors`` file (never a pickle). Tensors are keyed
``{site}.{param}``, e.g. ``transformer_blocks.0.attn1.down.weight``; the
safetensors metadata (all strings) says what the eraser is for:

=====================  ========================================================
``format``             ``t2vu-eraser``
``format_version``     ``1``
``backbone``           backbone plugin name, e.g. ``cogvideox``
``backbone_config_hash``  :func:`config_hash` of the transformer config, or ``unknown``
``backbone_config``    the transformer config (JSON), or ``null``
``eraser_type``        ``adapter``
``rank``               hidden width of each adapter
``eraser_options``     the eraser plugin's options (JSON)
``sites``              JSON list of the sites, in order
``target``             the erased concept
``spec``               the resolved run spec (JSON), when trained by ``t2vu run``
anything else          ``extra`` values (JSON)
=====================  ========================================================

The upstream T2VUnlearning format is a folder with ``eraser_weights.pt`` (a
pickled dict ``{site}.adapter -> {down.weight, down.bias, up.weight, up.bias}``)
and ``eraser_config.json`` (``eraser_type``, ``eraser_rank``).
:func:`import_upstream` reads the ``.pt`` with ``torch.load(weights_only=True)``
only. This module imports torch inside the functions that need it, so reading
metadata (``t2vu eraser info``) stays light.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import re
import struct
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Union

from t2vu.core.errors import T2VUError

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from t2vu.plugins.adapter_model import EraserSet, Site

FORMAT = "t2vu-eraser"
FORMAT_VERSION = "1"
SUPPORTED_VERSIONS = ("1",)
UNKNOWN = "unknown"
UPSTREAM_WEIGHTS = "eraser_weights.pt"
UPSTREAM_CONFIG = "eraser_config.json"

#: metadata fields stored as plain strings; every other field is JSON.
_STRING_FIELDS = ("format", "format_version", "backbone", "backbone_config_hash", "eraser_type", "target")
_CORE_FIELDS = _STRING_FIELDS + ("backbone_config", "rank", "eraser_options", "sites", "spec")
_ADAPTER_PARAMS = ("down.weight", "down.bias", "up.weight", "up.bias")
#: underscore keys of a diffusers config worth keeping (``_name_or_path`` is a local path: dropped).
_KEPT_PRIVATE_KEYS = ("_class_name", "_diffusers_version")

PathLike = Union[str, "os.PathLike[str]"]


# -- config hash ----------------------------------------------------------------------
def _public_config(config: Mapping) -> dict:
    """The config without ``_``-keys, normalised through JSON (tuples -> lists)."""
    public = {str(k): v for k, v in dict(config).items() if not str(k).startswith("_")}
    return json.loads(json.dumps(public, default=str))


def config_hash(config: Mapping) -> str:
    """A stable 16-hex-digit hash of a transformer config, ignoring keys that start with ``_``.

    ``config_hash(dict(pipe.transformer.config))``: sha256 of the JSON with sorted keys.
    """
    text = json.dumps(_public_config(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _stored_config(config: Mapping) -> dict:
    kept = {k: config[k] for k in _KEPT_PRIVATE_KEYS if k in config}
    return json.loads(json.dumps({**kept, **_public_config(config)}, default=str))


# -- writing ---------------------------------------------------------------------------
def _atomic_write(path: Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp)`` for a temp file next to ``path``, then rename it over ``path``.

    A crash leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def save_eraser(path: PathLike, erasers: "EraserSet", *, backbone: str, backbone_config: Optional[Mapping],
                target: Optional[str], spec: Optional[Any] = None, extra: Optional[dict] = None) -> Path:
    """Write ``erasers`` to ``path`` (safetensors, atomically) and return the path.

    ``backbone_config`` is the transformer config (``dict(transformer.config)``);
    ``None`` records it as unknown (then :func:`load_eraser` checks only sites and widths).
    ``spec`` is the resolved run spec (a dict or a pydantic model); ``extra`` values are
    stored JSON-encoded under their own keys.
    """
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in erasers.state_dict_by_site().items()}
    ranks = {tuple(tensors[f"{s}.down.weight"].shape)[0] for s in erasers.site_names
             if f"{s}.down.weight" in tensors}
    options = dict(erasers.options)
    rank = ranks.pop() if len(ranks) == 1 else options.get("rank")
    if hasattr(spec, "model_dump"):
        spec = spec.model_dump(mode="json")
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "backbone": backbone,
        "backbone_config_hash": config_hash(backbone_config) if backbone_config is not None else UNKNOWN,
        "backbone_config": json.dumps(_stored_config(backbone_config) if backbone_config is not None else None,
                                      sort_keys=True),
        "eraser_type": erasers.eraser_type,
        "rank": str(rank),
        "eraser_options": json.dumps(options, sort_keys=True, default=str),
        "sites": json.dumps(list(erasers.site_names)),
        "target": target or "",
    }
    if spec is not None:
        metadata["spec"] = json.dumps(spec, default=str)
    for key, value in (extra or {}).items():
        if key in metadata or key in _CORE_FIELDS:
            raise ValueError(f"extra metadata key {key!r} collides with a field of the eraser format")
        metadata[str(key)] = json.dumps(value, default=str)
    return _atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


# -- reading ---------------------------------------------------------------------------
@dataclass
class EraserFile:
    """A read eraser: ``tensors`` (``{site}.{param}`` -> CPU tensor) and decoded ``metadata``."""

    path: Path
    tensors: dict
    metadata: dict = field(default_factory=dict)

    @property
    def sites(self) -> list[str]:
        return list(self.metadata.get("sites") or [])

    @property
    def rank(self) -> Optional[int]:
        return self.metadata.get("rank")

    @property
    def eraser_type(self) -> str:
        return self.metadata.get("eraser_type", "")


def _upstream_hint(path: Path) -> str:
    folder = path if path.is_dir() else path.parent
    if (folder / UPSTREAM_WEIGHTS).exists() or path.name == UPSTREAM_WEIGHTS:
        return (f"; it looks like an upstream T2VUnlearning eraser: convert it with "
                f"'t2vu eraser import {folder} --out eraser.safetensors'")
    return ""


def _read_header(path: Path) -> dict:
    """Parse the safetensors header (no torch): ``{name: {dtype, shape, ...}, '__metadata__': {...}}``."""
    if not path.exists():
        raise T2VUError(f"eraser file not found: {path}")
    if path.is_dir():
        raise T2VUError(f"{path} is a folder, not an eraser file (.safetensors){_upstream_hint(path)}")
    size = path.stat().st_size
    not_st = f"{path} is not a safetensors file, so not a t2vu eraser{_upstream_hint(path)}"
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise T2VUError(not_st)
        (length,) = struct.unpack("<Q", head)
        if length < 2 or length > size - 8 or length > 100_000_000:
            raise T2VUError(not_st)
        raw = fh.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise T2VUError(not_st) from None
    if not isinstance(header, dict):
        raise T2VUError(not_st)
    return header


def _decode_metadata(raw: Mapping[str, str]) -> dict:
    meta: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _STRING_FIELDS:
            meta[key] = value
        elif key == "rank":
            meta[key] = int(value) if str(value).isdigit() else value
        else:
            try:
                meta[key] = json.loads(value)
            except (TypeError, json.JSONDecodeError):
                meta[key] = value
    if meta.get("target") == "":
        meta["target"] = None
    return meta


def read_eraser_metadata(path: PathLike) -> dict:
    """The decoded metadata of an eraser file, read from its header alone (no torch import).

    Adds ``parameters`` (total number of tensor elements) for display.
    """
    path = Path(path)
    header = _read_header(path)
    raw = header.get("__metadata__") or {}
    if raw.get("format") != FORMAT:
        raise T2VUError(
            f"{path} is a safetensors file but not a t2vu eraser (its metadata has no "
            f"format={FORMAT!r}; found {raw.get('format', 'none')!r}). t2vu writes erasers with "
            f"'t2vu run' or 't2vu eraser import'{_upstream_hint(path)}")
    version = raw.get("format_version")
    if version not in SUPPORTED_VERSIONS:
        raise T2VUError(
            f"{path}: unsupported t2vu eraser format_version {version!r} (this t2vu reads "
            f"{', '.join(SUPPORTED_VERSIONS)}); upgrade t2vu to read it")
    meta = _decode_metadata(raw)
    meta["parameters"] = sum(_numel(v.get("shape", [])) for k, v in header.items()
                             if k != "__metadata__" and isinstance(v, dict))
    return meta


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def read_eraser(path: PathLike) -> EraserFile:
    """Read and validate an eraser file. Raises :class:`T2VUError` with what is wrong."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_eraser_metadata(path)
    meta.pop("parameters", None)
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise T2VUError(f"{path}: cannot read the eraser tensors ({exc}); the file may be truncated") from None
    if not isinstance(meta.get("sites"), list):
        raise T2VUError(f"{path}: the metadata field 'sites' is not a JSON list")
    if meta.get("eraser_type") == "adapter":
        _validate_adapter_state(tensors, meta["sites"], meta.get("rank"), str(path))
    return EraserFile(path=path, tensors=tensors, metadata=meta)


def _validate_adapter_state(tensors: Mapping, sites: list[str], rank: Optional[int], where: str) -> int:
    """Check ``{site}.{param}`` tensors of adapters; return the rank."""
    if not sites:
        raise T2VUError(f"{where}: the eraser has no sites")
    expected = {f"{s}.{p}" for s in sites for p in _ADAPTER_PARAMS}
    missing = sorted(expected - set(tensors))
    unexpected = sorted(set(tensors) - expected)
    if missing:
        raise T2VUError(f"{where}: missing eraser tensors: {_few(missing)}")
    if unexpected:
        raise T2VUError(f"{where}: tensors that belong to no listed site: {_few(unexpected)}")
    ranks = set()
    for s in sites:
        dw, db, uw, ub = (tensors[f"{s}.{p}"] for p in _ADAPTER_PARAMS)
        if dw.dim() != 2:
            raise T2VUError(f"{where}: {s}.down.weight must be 2-D [rank, dim], got {list(dw.shape)}")
        r, dim = dw.shape
        shapes = {"down.bias": (db, [r]), "up.weight": (uw, [dim, r]), "up.bias": (ub, [dim])}
        for name, (t, want) in shapes.items():
            if list(t.shape) != want:
                raise T2VUError(f"{where}: {s}.{name} has shape {list(t.shape)}, expected {want} "
                                f"(down.weight is {list(dw.shape)})")
        ranks.add(int(r))
    if len(ranks) != 1:
        raise T2VUError(f"{where}: sites have different ranks {sorted(ranks)}")
    found = ranks.pop()
    if rank is not None and int(rank) != found:
        raise T2VUError(f"{where}: the config says rank {rank} but the tensors have rank {found}")
    return found


def _few(items: list, n: int = 5) -> str:
    more = f" (and {len(items) - n} more)" if len(items) > n else ""
    return ", ".join(map(str, items[:n])) + more


# -- loading into a pipeline ----------------------------------------------------------
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
        self._pre_hook = transformer.register_forward_pre_hook(self._follow_device, with_kwargs=True)

    @property
    def scale(self) -> float:
        return self.erasers.scale

    @scale.setter
    def scale(self, value: float) -> None:
        self.erasers.scale = float(value)

    @property
    def attached(self) -> bool:
        return self._pre_hook is not None

    def disabled(self):
        """Context manager: erasers off (stock outputs) inside the block."""
        return self.erasers.disabled()

    def remove(self) -> None:
        """Detach the erasers; the transformer computes exactly its stock outputs again."""
        self.erasers.detach()
        if self._pre_hook is not None:
            self._pre_hook.remove()
            self._pre_hook = None

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
    transformer = getattr(pipe_or_transformer, "transformer", None)
    if transformer is not None and hasattr(transformer, "transformer_blocks"):
        return transformer
    if hasattr(pipe_or_transformer, "transformer_blocks"):
        return pipe_or_transformer
    raise T2VUError(
        f"load_eraser needs a diffusers pipeline with a .transformer (e.g. CogVideoXPipeline) or the "
        f"transformer itself (e.g. CogVideoXTransformer3DModel); got {type(pipe_or_transformer).__name__}")


def _sites_function(backbone: str) -> Callable[["nn.Module"], list["Site"]]:
    """``transformer_sites`` of a backbone: built-in, else the backbone plugin's module."""
    if backbone == "cogvideox":
        from t2vu.backbones.cogvideox_model import transformer_sites

        return transformer_sites
    import sys

    from t2vu.core import plugins
    from t2vu.core.registry import ComponentUnavailable

    try:
        impl = plugins.get_registry().get("backbone", backbone).load()
    except ComponentUnavailable as exc:
        raise T2VUError(f"this eraser is for backbone {backbone!r}: {exc}") from None
    fn = getattr(impl, "transformer_sites", None) or getattr(
        sys.modules.get(getattr(impl, "__module__", ""), None), "transformer_sites", None)
    if fn is None:
        raise T2VUError(f"backbone plugin {backbone!r} does not say where erasers attach "
                        f"(no transformer_sites function); load_eraser cannot use it")
    return fn


def _init_defaults(cls: type) -> dict:
    try:
        params = inspect.signature(cls.__init__).parameters.values()
    except (TypeError, ValueError):
        return {}
    return json.loads(json.dumps({p.name: p.default for p in params
                                  if p.default is not inspect.Parameter.empty and p.name != "self"},
                                 default=str))


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
    transformer = _transformer_of(pipe_or_transformer)
    erasers_file = read_eraser(path)
    meta = erasers_file.metadata
    if meta.get("eraser_type") != "adapter":
        raise T2VUError(f"{path}: eraser type {meta.get('eraser_type')!r} cannot be loaded by this t2vu "
                        f"(it loads 'adapter' erasers)")
    sites = _sites_function(meta.get("backbone", ""))(transformer)
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


# -- upstream T2VUnlearning format ----------------------------------------------------
_FLAT_KEY = re.compile(r"^(?P<site>.+)\.adapter\.(?P<param>(?:down|up)\.(?:weight|bias))$")


def _natural_key(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _upstream_folder(path: Path) -> Path:
    if path.is_file() and path.name == UPSTREAM_WEIGHTS:
        return path.parent
    if not path.exists():
        raise T2VUError(f"upstream eraser folder not found: {path}")
    if not path.is_dir():
        raise T2VUError(f"{path} is not an upstream T2VUnlearning folder (expected a folder with "
                        f"{UPSTREAM_WEIGHTS} and {UPSTREAM_CONFIG})")
    if not (path / UPSTREAM_WEIGHTS).is_file():
        raise T2VUError(f"{path} has no {UPSTREAM_WEIGHTS}: not an upstream T2VUnlearning eraser folder")
    return path


def _load_upstream_weights(weights: Path) -> dict:
    """``{site: {param: tensor}}`` from an upstream ``eraser_weights.pt`` (weights_only unpickling)."""
    import pickle

    import torch

    try:
        raw = torch.load(weights, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise T2VUError(f"{weights}: refused to unpickle it: it holds objects other than tensors and dicts "
                        f"(t2vu only loads .pt files with weights_only=True). {first}") from None
    except Exception as exc:  # corrupt zip, not a torch file, ...
        raise T2VUError(f"{weights}: cannot read it as a torch weights file ({type(exc).__name__}: {exc})") from None
    if not isinstance(raw, Mapping):
        raise T2VUError(f"{weights}: expected a dict of eraser weights, got {type(raw).__name__}")
    by_site: dict[str, dict] = {}
    for key, value in raw.items():
        key = str(key)
        if isinstance(value, Mapping):
            if not key.endswith(".adapter"):
                raise T2VUError(f"{weights}: unexpected key {key!r} (expected '<site>.adapter', e.g. "
                                f"'transformer_blocks.0.attn1.adapter')")
            site = key[: -len(".adapter")]
            for param, tensor in value.items():
                by_site.setdefault(site, {})[str(param)] = tensor
        elif isinstance(value, torch.Tensor):
            match = _FLAT_KEY.match(key)
            if not match:
                raise T2VUError(f"{weights}: unexpected key {key!r} (expected '<site>.adapter.down.weight' "
                                f"and the like)")
            by_site.setdefault(match["site"], {})[match["param"]] = value
        else:
            raise T2VUError(f"{weights}: {key!r} holds a {type(value).__name__}, not tensors")
    if not by_site:
        raise T2VUError(f"{weights}: no eraser weights in it")
    for site, params in by_site.items():
        extra = sorted(set(params) - set(_ADAPTER_PARAMS))
        if extra:
            raise T2VUError(f"{weights}: site {site} has unexpected parameters {extra} "
                            f"(an adapter has {', '.join(_ADAPTER_PARAMS)})")
        for param, tensor in params.items():
            if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
                raise T2VUError(f"{weights}: {site}.adapter.{param} is not a floating-point tensor")
    return by_site


def _model_config(model_path: Path) -> dict:
    """The transformer config of a diffusers model folder, as ``from_pretrained`` would see it."""
    candidates = [model_path / "transformer" / "config.json", model_path / "config.json"]
    config_file = next((c for c in candidates if c.is_file()), None)
    if config_file is None:
        raise T2VUError(f"--model {model_path}: no transformer/config.json (expected a diffusers model folder "
                        f"such as ./CogVideoX-5b)")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise T2VUError(f"{config_file}: cannot read it ({exc})") from None
    cls_name = config.get("_class_name")
    cls = None
    if cls_name:
        import diffusers

        cls = getattr(diffusers, cls_name, None)
    if cls is None:
        return config
    # Keep only constructor arguments and fill the missing ones with their defaults,
    # as ConfigMixin does: the hash then equals that of the loaded transformer.config.
    defaults = _init_defaults(cls)
    params = set(inspect.signature(cls.__init__).parameters) - {"self"}
    filled = {k: v for k, v in config.items() if k in params or k in _KEPT_PRIVATE_KEYS}
    for key, value in defaults.items():
        filled.setdefault(key, value)
    return filled


#: the sites the upstream format knows: each block's attn1 video output
_UPSTREAM_SITE = re.compile(r"^transformer_blocks\.(\d+)\.attn1$")


def _check_cogvideox_layout(by_site: dict, dim: int, config: Optional[dict], where: str) -> None:
    pattern = _UPSTREAM_SITE
    odd = [s for s in by_site if not pattern.match(s)]
    if odd:
        raise T2VUError(f"{where}: sites {_few(odd)} are not CogVideoX sites (transformer_blocks.<i>.attn1); "
                        f"pass --backbone if it is an eraser for another model")
    if config is None:
        return
    layers = config.get("num_layers")
    width = (config.get("num_attention_heads") or 0) * (config.get("attention_head_dim") or 0)
    beyond = [s for s in by_site if layers is not None and int(pattern.match(s)[1]) >= layers]
    if beyond:
        raise T2VUError(f"{where}: sites {_few(beyond)} do not exist in a {layers}-layer model (--model)")
    if width and width != dim:
        raise T2VUError(f"{where}: the eraser width is {dim} but the --model transformer's is {width}")


def import_upstream(folder: PathLike, out_file: PathLike, *, backbone: str = "cogvideox",
                    model_path: Optional[PathLike] = None, target: Optional[str] = None,
                    overwrite: bool = False) -> Path:
    """Convert an upstream T2VUnlearning eraser folder into a t2vu eraser file.

    ``model_path`` (a diffusers model folder; only ``transformer/config.json`` is read)
    records the transformer config so :func:`load_eraser` can check it; without it the
    config is marked unknown (with a warning).
    """
    import torch

    from t2vu.plugins.adapter_model import AdapterEraserFactory

    folder = _upstream_folder(Path(folder))
    out_file = Path(out_file)
    if out_file.is_dir():
        raise T2VUError(f"{out_file} is a folder; give the eraser file to write, e.g. {out_file / 'eraser.safetensors'}")
    if out_file.exists() and not overwrite:
        raise T2VUError(f"{out_file} already exists; pass --force (overwrite=True) to replace it")
    weights = folder / UPSTREAM_WEIGHTS
    config_path = folder / UPSTREAM_CONFIG
    upstream_config: dict = {}
    if config_path.is_file():
        try:
            upstream_config = json.loads(config_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise T2VUError(f"{config_path}: cannot read it ({exc})") from None
        if not isinstance(upstream_config, dict):
            raise T2VUError(f"{config_path}: expected a JSON object")
    else:
        warnings.warn(f"{folder} has no {UPSTREAM_CONFIG}; assuming an adapter eraser and taking the rank "
                      f"from the weights", UserWarning, stacklevel=2)
    eraser_type = upstream_config.get("eraser_type", "adapter")
    if eraser_type != "adapter":
        raise T2VUError(f"{config_path}: eraser_type {eraser_type!r} is not supported (only 'adapter')")
    rank = upstream_config.get("eraser_rank")
    if rank is not None and (not isinstance(rank, int) or rank <= 0):
        raise T2VUError(f"{config_path}: eraser_rank must be a positive integer, got {rank!r}")

    by_site = _load_upstream_weights(weights)
    sites = sorted(by_site, key=_natural_key)
    tensors = {f"{s}.{p}": t.detach().to(torch.float32).contiguous() for s in sites for p, t in by_site[s].items()}
    found_rank = _validate_adapter_state(tensors, sites, rank, str(folder))
    dims = {int(tensors[f"{s}.down.weight"].shape[1]) for s in sites}
    if len(dims) != 1:
        raise T2VUError(f"{folder}: sites have different widths {sorted(dims)}")
    dtypes = sorted({str(t.dtype).replace("torch.", "") for params in by_site.values() for t in params.values()})

    embedded = upstream_config.get("t2vu") if isinstance(upstream_config.get("t2vu"), dict) else {}
    config: Optional[dict] = None
    if model_path is not None:
        config = _model_config(Path(model_path))
    elif isinstance(embedded.get("backbone_config"), dict) and embedded.get("backbone") == backbone:
        config = embedded["backbone_config"]  # exported by t2vu: the config travels with it
    else:
        warnings.warn(f"no --model given: {out_file.name} will not record the transformer config, so "
                      f"load_eraser can check only sites and widths", UserWarning, stacklevel=2)
    if backbone == "cogvideox":
        _check_cogvideox_layout(by_site, dims.pop(), config, str(folder))

    erasers = AdapterEraserFactory.from_state(tensors, sites, {"rank": found_rank})
    extra = {
        "source": "upstream T2VUnlearning",
        "imported_from": folder.name,
        "upstream_config": upstream_config,
        "upstream_dtypes": dtypes,
    }
    return save_eraser(out_file, erasers, backbone=backbone, backbone_config=config,
                       target=target if target is not None else embedded.get("target"), extra=extra)


def export_upstream(eraser_file: PathLike, out_folder: PathLike, *, overwrite: bool = False) -> Path:
    """Write a t2vu eraser in the upstream T2VUnlearning folder format and return the folder.

    ``eraser_weights.pt`` maps ``{site}.adapter`` to ``{down.weight, down.bias, up.weight,
    up.bias}`` (plain fp32 tensors); ``eraser_config.json`` has ``eraser_type`` and
    ``eraser_rank`` (and a ``t2vu`` entry that upstream ignores and that
    :func:`import_upstream` reads back).
    """
    import torch

    erasers_file = read_eraser(eraser_file)
    meta = erasers_file.metadata
    if meta.get("eraser_type") != "adapter":
        raise T2VUError(f"{eraser_file}: only adapter erasers have an upstream format "
                        f"(this one is {meta.get('eraser_type')!r})")
    other = [s for s in erasers_file.sites if not _UPSTREAM_SITE.match(s)]
    if other:
        raise T2VUError(f"{eraser_file}: {len(other)} site(s) are not attn1 video outputs ({_few(other)}; e.g. "
                        "eraser.streams includes 'text'); upstream T2VUnlearning has only video-output "
                        "adapters, so this eraser has no upstream format")
    out_folder = Path(out_folder)
    if out_folder.exists() and not out_folder.is_dir():
        raise T2VUError(f"{out_folder} exists and is not a folder")
    existing = [n for n in (UPSTREAM_WEIGHTS, UPSTREAM_CONFIG) if (out_folder / n).exists()]
    if existing and not overwrite:
        raise T2VUError(f"{out_folder} already holds {', '.join(existing)}; pass --force (overwrite=True) "
                        f"to replace them")
    weights = {f"{site}.adapter": {p: erasers_file.tensors[f"{site}.{p}"].to(torch.float32).contiguous()
                                   for p in _ADAPTER_PARAMS}
               for site in erasers_file.sites}
    config = {
        "eraser_type": "adapter",
        "eraser_rank": int(meta["rank"]),
        "t2vu": {k: meta.get(k) for k in ("backbone", "backbone_config_hash", "backbone_config", "target")},
    }
    _atomic_write(out_folder / UPSTREAM_WEIGHTS, lambda tmp: torch.save(weights, tmp))
    _atomic_write(out_folder / UPSTREAM_CONFIG,
                  lambda tmp: Path(tmp).write_text(json.dumps(config, indent=4) + "\n"))
    return out_folder

