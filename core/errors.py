"""Errors a user can act on, and how the CLI words every other failure a user can cause.

The CLI prints one message and exits non-zero; ``t2vu --debug`` adds the traceback.
"""

from __future__ import annotations

import errno
from typing import Optional


class T2VUError(Exception):
    """A problem the user can fix (bad path, mismatched eraser, ...): exit code 1."""

    exit_code = 1


def _where(exc: OSError) -> str:
    name = exc.filename if exc.filename is not None else None
    return f" ({name})" if name else ""


def describe_os_error(exc: OSError) -> str:
    """One line saying what went wrong on the file system and what to do about it."""
    where = _where(exc)
    code = exc.errno
    if code == errno.ENOSPC:
        return (f"no space left on the device{where}: free space on that disk or write elsewhere "
                "(--set output.dir=...); files written before this run were not replaced")
    if code == getattr(errno, "EDQUOT", -1):
        return f"disk quota exceeded{where}: free space or write elsewhere (--set output.dir=...)"
    if code in (errno.EACCES, errno.EPERM):
        return f"permission denied{where}: choose a location you can write to (--set output.dir=...) or fix its permissions"
    if code == errno.EROFS:
        return f"read-only file system{where}: choose a writable location (--set output.dir=...)"
    if code == errno.ENOENT:
        return f"file or folder not found{where}"
    if code == errno.EISDIR:
        return f"a folder where a file was expected{where}"
    if code == errno.ENOTDIR:
        return f"a file where a folder was expected{where}"
    return f"{exc.strerror or exc}{where}"


def describe(exc: BaseException) -> Optional[tuple[str, int]]:
    """``(message, exit code)`` for a failure the user caused or can fix; ``None`` for a bug.

    Knows :class:`T2VUError`, file-system errors (disk full, permission denied, ...), text that is not
    UTF-8, pydantic validation errors, unreadable safetensors files and running out of memory, without
    importing the libraries they come from.
    """
    if isinstance(exc, T2VUError):
        return str(exc), int(getattr(exc, "exit_code", 1))
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (Ctrl-C); nothing more was written", 130
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or (
            isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()):
        return ("out of memory: lower training.batch_size (or eval.batch_size), num_frames, height or width, "
                "keep training.gradient_checkpointing on, or use a lower backbone.dtype"), 1
    if isinstance(exc, UnicodeDecodeError):
        return (f"a file is not UTF-8 text ({exc.reason} at byte {exc.start}); save the spec, prompt and "
                "concept files as UTF-8"), 1
    if isinstance(exc, OSError):
        return describe_os_error(exc), 1
    names = {f"{c.__module__}.{c.__name__}" for c in type(exc).__mro__}
    if "pydantic_core._pydantic_core.ValidationError" in names:
        lines = [f"invalid value: {'.'.join(map(str, e.get('loc', ()))) or '<input>'}: {e.get('msg')}"
                 for e in exc.errors(include_url=False)]  # type: ignore[attr-defined]
        return "\n".join(lines) or str(exc), 2
    if any(n.startswith("safetensors") and n.endswith("SafetensorError") for n in names):
        return (f"cannot read a safetensors file ({exc}); it is damaged or truncated: download or write it again"), 1
    return None
