"""Errors a user can act on. The CLI prints their message without a traceback."""


class T2VUError(Exception):
    """A problem the user can fix (bad path, mismatched eraser, ...): exit code 1."""

    exit_code = 1
