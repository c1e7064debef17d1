"""The t2vu eraser file: write, read and validate (no pipeline, no backbone).

Our format is one ``.safetensors`` file (never a pickle). Tensors are keyed
``{site}.{param}``, e.g. ``<site>.down.weight`` with the backbone's site name; the
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

Loading into a pipeline is :mod:`t2vu.core.eraser_load`; the upstream
T2VUnlearning folder format is :mod:`t2vu.core.upstream`. This module imports
torch inside the functions that need it, so reading metadata
(``t2vu eraser info``) stays light.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Union

from t2vu.core.errors import T2VUError

if TYPE_CHECKING:  # pragma: no cover
    from t2vu.plugins.adapter_model import EraserSet

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
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(v.isfinite().all())]
    if bad:
        raise T2VUError(f"{path}: the eraser holds non-finite weights ({_few(bad)}), so every video it touches "
                        "would be broken; the run that wrote it diverged: train it again with a lower "
                        "training.learning_rate")
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


def _init_defaults(cls: type) -> dict:
    try:
        params = inspect.signature(cls.__init__).parameters.values()
    except (TypeError, ValueError):
        return {}
    return json.loads(json.dumps({p.name: p.default for p in params
                                  if p.default is not inspect.Parameter.empty and p.name != "self"},
                                 default=str))
