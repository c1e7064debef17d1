"""Where a training run writes, so that nothing a user already has is lost.

- A fresh ``output.dir``: the run writes there directly.
- ``output.dir`` holds a finished run (``eraser.safetensors``) or an unfinished one (metrics or checkpoints,
  no eraser): refused, with the way forward (``--resume`` for an unfinished run, ``output.overwrite``).
- ``output.overwrite`` over an earlier run: the new run writes into ``output.dir/.t2vu-staging/`` and only
  once its eraser is written replaces the earlier run's files (:meth:`RunFolder.promote`); until then the
  earlier run is untouched, and a failed or interrupted new run leaves it in place.
- ``--resume``: continues from the newest complete checkpoint, in the staging folder first (an interrupted
  overwriting run), else in ``output.dir``; a finished run is reported as finished.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from t2vu.core import checkpoint
from t2vu.core.errors import T2VUError

ERASER_FILE = "eraser.safetensors"
#: the files and folders a run writes into output.dir
OUTPUTS = ("metrics.jsonl", "spec.yaml", "prompts.json", checkpoint.CHECKPOINTS, ERASER_FILE)
STAGING = ".t2vu-staging"
_REPLACED = ".t2vu-replaced"


@dataclass
class RunFolder:
    out: Path  # output.dir: where the results end up
    work: Path  # where this run writes while it trains (out, or its staging folder)
    resume_from: Optional[tuple[int, Path]] = None  # (step, checkpoint folder)
    finished: Optional[Path] = None  # --resume on a finished run: its eraser, nothing to train

    @property
    def staged(self) -> bool:
        return self.work != self.out

    def promote(self) -> Path:
        """Move a staged run's files over the earlier run's (the eraser last) and return the eraser's path."""
        if not self.staged:
            return self.out / ERASER_FILE
        replaced = self.out / _REPLACED
        if replaced.exists():
            shutil.rmtree(replaced)
        replaced.mkdir()
        for name in OUTPUTS:
            if (self.out / name).exists():
                os.replace(self.out / name, replaced / name)
        for name in OUTPUTS:
            if (self.work / name).exists():
                os.replace(self.work / name, self.out / name)
        shutil.rmtree(replaced, ignore_errors=True)
        shutil.rmtree(self.work, ignore_errors=True)
        return self.out / ERASER_FILE


def _held(folder: Path) -> list[str]:
    return [name for name in OUTPUTS if (folder / name).exists()]


def plan(out: Path, *, overwrite: bool, resume: bool, spec_hint: str = "SPEC", dry: bool = False) -> RunFolder:
    """Decide where a run writes (see the module docstring); raise :class:`T2VUError` when it may not.
    ``dry``: only decide (``t2vu run --dry-run``); nothing on disk changes."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise T2VUError(f"output.dir {out} is a file; choose a folder for the run's outputs")
    staging = out / STAGING
    held = _held(out) if out.is_dir() else []
    staged_held = _held(staging) if staging.is_dir() else []
    finished = (out / ERASER_FILE).exists()
    if resume:
        for folder in (staging, out):
            found = checkpoint.latest(folder)
            if found and not (folder == out and finished):
                return RunFolder(out, folder, resume_from=found)
        if finished:
            return RunFolder(out, out, finished=out / ERASER_FILE)
        if not held and not staged_held:
            return RunFolder(out, out)  # nothing to resume: a fresh start
        raise T2VUError(f"output.dir {out} holds an unfinished run without a complete checkpoint, so there is "
                        "nothing to resume from; start it over with --set output.overwrite=true (set "
                        "training.checkpoint_every to make future runs resumable)")
    if overwrite:
        if staging.exists() and not dry:
            shutil.rmtree(staging)  # an earlier overwriting run that never finished: replaced by this one
        if held:
            return RunFolder(out, staging)
        return RunFolder(out, out)
    if held or staged_held:
        if finished and not staged_held:
            raise T2VUError(f"output.dir {out} already holds a finished run ({', '.join(held)}); choose another "
                            "output.dir, or set output.overwrite: true (--set output.overwrite=true) to replace "
                            "it once the new run has written its eraser")
        found = checkpoint.latest(staging) or checkpoint.latest(out)
        where = f" (newest checkpoint: step {found[0]})" if found else " (no complete checkpoint)"
        way = f"continue it with `t2vu run {spec_hint} --resume`, or " if found else ""
        raise T2VUError(f"output.dir {out} holds an unfinished run{where}; {way}start over with "
                        "--set output.overwrite=true")
    return RunFolder(out, out)
