"""Training checkpoints that a run resumes from exactly (``t2vu run SPEC --resume``).

A checkpoint is a folder ``checkpoints/step-NNNNNN/`` holding

- ``eraser.safetensors``: the erasers at that step, a complete eraser file (``t2vu generate`` loads it);
- ``training_state.safetensors``: every tensor of the optimiser state, the torch RNG streams (the run's
  generator, the global CPU and CUDA streams) and the training-state pool, when the states keep one;
- ``training_state.json``: the rest (step, optimiser scalars and parameter groups, the learning-rate
  schedule, Python's and NumPy's RNG states, the divergence reference, the pool's prompts).

Nothing is pickled. The folder is written under a temporary name and renamed when complete, so a crash
while writing never leaves a folder that looks like a checkpoint; :func:`latest` only sees complete ones.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

from t2vu.core.errors import T2VUError

STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "training_state.json"
CHECKPOINTS = "checkpoints"
_NAME = re.compile(r"^step-(\d{6,})$")


def folder(out: Path, step: int) -> Path:
    return Path(out) / CHECKPOINTS / f"step-{step:06d}"


def complete(out: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every complete checkpoint in ``out``, oldest first."""
    root = Path(out) / CHECKPOINTS
    found = []
    for path in root.iterdir() if root.is_dir() else []:
        m = _NAME.match(path.name)
        if m and (path / STATE_JSON).is_file() and (path / STATE_TENSORS).is_file():
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest(out: Path) -> Optional[tuple[int, Path]]:
    """The newest complete checkpoint in ``out``, or None."""
    found = complete(out)
    return found[-1] if found else None


# -- flattening state into tensors + JSON ----------------------------------------------------------------
def _split(value: Any, prefix: str, tensors: dict) -> Any:
    """``value`` with every tensor moved into ``tensors`` under a dotted key and replaced by a reference."""
    import torch

    if isinstance(value, torch.Tensor):
        tensors[prefix] = value.detach().to("cpu").contiguous()
        return {"__tensor__": prefix}
    if isinstance(value, dict):
        return {"__dict__": [[_key_json(k), _split(v, f"{prefix}.{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        items = [_split(v, f"{prefix}.{i}", tensors) for i, v in enumerate(value)]
        return {"__tuple__": items} if isinstance(value, tuple) else items
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} at {prefix} in a checkpoint")


def _key_json(key: Any) -> Any:
    if isinstance(key, (int, str)) and not isinstance(key, bool):
        return key
    raise TypeError(f"cannot store a {type(key).__name__} dictionary key in a checkpoint")


def _join(value: Any, tensors: dict) -> Any:
    """The inverse of :func:`_split`."""
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__tuple__" in value:
            return tuple(_join(v, tensors) for v in value["__tuple__"])
        return {k: _join(v, tensors) for k, v in value["__dict__"]}
    if isinstance(value, list):
        return [_join(v, tensors) for v in value]
    return value


# -- writing and reading -------------------------------------------------------------------------------------
def save(out: Path, step: int, *, write_eraser, state: dict[str, Any], keep: int) -> Path:
    """Write the checkpoint of ``step`` (``write_eraser(path)`` writes its eraser file; ``state`` is any
    nesting of dicts, lists, tuples, tensors and JSON scalars), then delete all but the ``keep`` newest."""
    from safetensors.torch import save_file

    final = folder(out, step)
    tmp = final.with_name(f".{final.name}.incomplete")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        write_eraser(tmp / "eraser.safetensors")
        tensors: dict = {}
        meta = _split(state, "state", tensors)
        save_file(tensors, str(tmp / STATE_TENSORS))
        (tmp / STATE_JSON).write_text(json.dumps({"step": step, "state": meta}) + "\n")
        for name in (STATE_TENSORS, STATE_JSON, "eraser.safetensors"):
            with open(tmp / name, "rb+") as fh:
                os.fsync(fh.fileno())
        if final.exists():  # a checkpoint of the same step from an earlier attempt
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
        raise
    for _, old in complete(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load(path: Path) -> tuple[int, dict[str, Any]]:
    """``(step, state)`` of a checkpoint folder written by :func:`save`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        doc = json.loads((path / STATE_JSON).read_text(encoding="utf-8"))
        tensors = load_file(str(path / STATE_TENSORS), device="cpu")
        return int(doc["step"]), _join(doc["state"], tensors)
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        raise T2VUError(f"{path}: the checkpoint cannot be read ({exc}); delete that folder to resume from the "
                        "one before it") from None


# -- the RNG streams a run draws from -------------------------------------------------------------------------
def rng_state(rng, generator) -> dict[str, Any]:
    """Every random stream a training step may draw from."""
    import numpy as np
    import torch

    version, internal, gauss = rng.getstate()
    np_state = np.random.get_state()
    state = {"python": [version, list(internal), gauss], "generator": generator.get_state(),
             "torch": torch.get_rng_state(), "python_global": _python_global(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype("int64")), int(np_state[2]),
                       int(np_state[3]), float(np_state[4])]}
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def _python_global() -> list:
    import random

    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def set_rng_state(state: dict[str, Any], rng, generator) -> None:
    import random

    import numpy as np
    import torch

    version, internal, gauss = state["python"]
    rng.setstate((version, tuple(internal), gauss))
    version, internal, gauss = state["python_global"]
    random.setstate((version, tuple(internal), gauss))
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
