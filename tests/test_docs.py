"""Every hook is documented in docs/plugins.md with its exact signature (as datasette does)."""

import inspect
import re
from pathlib import Path

import pytest

from t2vu.core import hookspecs

DOCS = Path(__file__).resolve().parent.parent / "docs" / "plugins.md"
HOOKS = [name for name, fn in vars(hookspecs).items()
         if inspect.isfunction(fn) and hasattr(fn, "t2vu_spec")]


def test_hooks_found():
    assert "register_backbones" in HOOKS and len(HOOKS) >= 7


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_documented_with_signature(hook):
    params = ", ".join(inspect.signature(getattr(hookspecs, hook)).parameters)
    headings = re.findall(r"^### (\S+\(.*\))$", DOCS.read_text(), flags=re.M)
    assert f"{hook}({params})" in headings


def test_no_documented_hook_is_missing_from_the_code():
    documented = re.findall(r"^### (\w+)\(", DOCS.read_text(), flags=re.M)
    assert set(documented) == set(HOOKS)
