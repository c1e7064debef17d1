"""The upstream T2VUnlearning eraser folder: import into and export from t2vu eraser files.

Upstream writes a folder with ``eraser_weights.pt`` (a pickled dict
``{site}.adapter -> {down.weight, down.bias, up.weight, up.bias}``) and
``eraser_config.json`` (``eraser_type``, ``eraser_rank``). The folder format is
the same for every model; which sites it names is each backbone's
:class:`UpstreamLayout` (its ``upstream`` class attribute), next to the backbone.
:func:`import_upstream` reads the ``.pt`` with ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import inspect
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

from t2vu.core.eraser_file import (_ADAPTER_PARAMS, _KEPT_PRIVATE_KEYS, UPSTREAM_CONFIG, UPSTREAM_WEIGHTS, PathLike,
                                   _atomic_write, _few, _init_defaults, _validate_adapter_state, read_eraser,
                                   save_eraser)
from t2vu.core.errors import T2VUError


@dataclass(frozen=True)
class UpstreamLayout:
    """Which sites a backbone's upstream erasers sit on.

    ``site``: a regular expression over site names whose one group is the block index
    (each backbone module defines its own); ``layers_key``: the transformer config key that counts those blocks;
    ``example``: the sites as a user reads them, for messages.
    """

    site: str
    layers_key: str
    example: str

    def matches(self, site: str) -> bool:
        return re.fullmatch(self.site, site) is not None

    def check(self, sites: list[str], dim: int, config: Optional[dict], where: str, backbone: str) -> None:
        """Every site in the layout, inside the model's block count, and the model's width."""
        odd = [s for s in sites if not self.matches(s)]
        if odd:
            raise T2VUError(f"{where}: sites {_few(odd)} are not {backbone} upstream sites ({self.example}); "
                            f"pass --backbone if it is an eraser for another model")
        if config is None:
            return
        layers = config.get(self.layers_key)
        width = (config.get("num_attention_heads") or 0) * (config.get("attention_head_dim") or 0)
        beyond = [s for s in sites if layers is not None and int(re.fullmatch(self.site, s)[1]) >= layers]
        if beyond:
            raise T2VUError(f"{where}: sites {_few(beyond)} do not exist in this model ({self.layers_key} "
                            f"{layers}, --model)")
        if width and width != dim:
            raise T2VUError(f"{where}: the eraser width is {dim} but the --model transformer's is {width}")


def upstream_layout(backbone: str) -> UpstreamLayout:
    """The installed backbone plugin's upstream layout; an error when it has none."""
    from t2vu.core.eraser_load import backbone_implementation

    layout = getattr(backbone_implementation(backbone), "upstream", None)
    if layout is None:
        raise T2VUError(f"backbone {backbone!r} has no upstream T2VUnlearning format (its class sets no "
                        "'upstream' layout)")
    return layout


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
        import re

        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        what = f" (it calls {found.group(1)})" if found else ""
        raise T2VUError(f"{weights}: refused to unpickle it: the file contains pickled code{what}, not only "
                        "tensors, and t2vu will not run code from a weights file. Ask its author for a safetensors "
                        "file, or, only if you trust where it came from, convert it to safetensors in a separate "
                        "environment (load its tensors there and save them with safetensors.torch.save_file)") from None
    except Exception as exc:  # corrupt zip, not a torch file, ...
        first = (str(exc).strip().splitlines() or [""])[0]
        detail = f" ({type(exc).__name__}: {first})" if first and "weights_only" not in first else ""
        raise T2VUError(f"{weights}: cannot read it as a torch weights file{detail}; it is damaged or not a "
                        "torch file: get the eraser again") from None
    if not isinstance(raw, Mapping):
        raise T2VUError(f"{weights}: expected a dict of eraser weights, got {type(raw).__name__}")
    by_site: dict[str, dict] = {}
    for key, value in raw.items():
        key = str(key)
        if isinstance(value, Mapping):
            if not key.endswith(".adapter"):
                raise T2VUError(f"{weights}: unexpected key {key!r} (expected '<site>.adapter', with the "
                                f"backbone's site names)")
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


def import_upstream(folder: PathLike, out_file: PathLike, *, backbone: Optional[str] = None,
                    model_path: Optional[PathLike] = None, target: Optional[str] = None,
                    overwrite: bool = False, strength: Optional[float] = None) -> Path:
    """Convert an upstream T2VUnlearning eraser folder into a t2vu eraser file.

    ``backbone`` names the backbone plugin whose :class:`UpstreamLayout` the folder follows (default: the one a
    t2vu export recorded in the folder's config).
    ``model_path`` (a diffusers model folder; only ``transformer/config.json`` is read)
    records the transformer config so ``load_eraser`` can check it; without it the
    config is marked unknown (with a warning). ``strength`` is the factor upstream multiplies
    each adapter's output by when it injects the eraser (HunyuanVideo's ``eraser_weight``; default:
    the folder config's ``eraser_weight``, else 1); it is folded into the up-projection, so the
    t2vu file at scale 1 computes exactly what upstream computes.
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
    backbone = backbone or embedded.get("backbone")
    if not backbone:
        from t2vu.core import plugins

        raise T2VUError(f"{folder}: say which model the eraser is for with --backbone (backbone=...); installed "
                        f"backbones: {', '.join(plugins.get_registry().names('backbone'))}")
    config: Optional[dict] = None
    if model_path is not None:
        config = _model_config(Path(model_path))
    elif isinstance(embedded.get("backbone_config"), dict) and embedded.get("backbone") == backbone:
        config = embedded["backbone_config"]  # exported by t2vu: the config travels with it
    else:
        warnings.warn(f"no --model given: {out_file.name} will not record the transformer config, so "
                      f"load_eraser can check only sites and widths", UserWarning, stacklevel=2)
    layout = upstream_layout(backbone)
    layout.check(list(by_site), dims.pop(), config, str(folder), backbone)
    if strength is None:
        strength = upstream_config.get("eraser_weight", 1.0)
    if not isinstance(strength, (int, float)) or isinstance(strength, bool) or not strength > 0:
        raise T2VUError(f"{folder}: the eraser strength must be a positive number, got {strength!r}")
    if strength != 1.0:
        for s in sites:
            for p in ("up.weight", "up.bias"):
                tensors[f"{s}.{p}"] = tensors[f"{s}.{p}"] * float(strength)

    erasers = AdapterEraserFactory.from_state(tensors, sites, {"rank": found_rank})
    extra = {
        "source": "upstream T2VUnlearning",
        "imported_from": folder.name,
        "upstream_config": upstream_config,
        "upstream_dtypes": dtypes,
        "upstream_strength": float(strength),
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
    layout = upstream_layout(meta.get("backbone", ""))
    other = [s for s in erasers_file.sites if not layout.matches(s)]
    if other:
        raise T2VUError(f"{eraser_file}: {len(other)} site(s) are not in the upstream layout ({_few(other)}; upstream "
                        f"T2VUnlearning has adapters only on {layout.example} video outputs, e.g. this eraser's "
                        "eraser.streams includes 'text' or eraser.sites chose other blocks), so it has no upstream "
                        "format")
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

