"""Helpers shared by the tests."""

import textwrap
from pathlib import Path


def make_dist(root: Path, dist: str, module: str, source: str, ep_name: str = None) -> Path:
    """A real (unpacked) distribution on a sys.path folder: dist-info + module."""
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(f"[t2vu]\n{ep_name or dist} = {module}\n")
    return root
