import os
import sys
import textwrap
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from t2vu.core import plugins  # noqa: E402

GOOD_SPEC = """\
backbone: {name: cogvideox, model_path: ./model, dtype: float32}
eraser: {name: adapter, rank: 8}
concept:
  target: nudity
  prompts: [a nude person on a beach, a naked man]
preserved:
  source: list
  concepts: [clothing, a dog in a park]
losses:
  - {name: negative_guidance, weight: 1.0, eta: 7.0}
  - {name: preservation, weight: 0.5}
  - {name: localization, weight: 1.0, threshold: 0.1}
training: {steps: 3, batch_size: 1, learning_rate: 1.0e-3, num_frames: 4, height: 16, width: 16, seed: 0}
output: {dir: runs/out}
"""


@pytest.fixture(autouse=True)
def fresh_plugins(monkeypatch):
    """Each test sees the plugins its environment asks for."""
    monkeypatch.delenv("T2VU_LOAD_PLUGINS", raising=False)
    monkeypatch.delenv("T2VU_DISABLE_PLUGINS", raising=False)
    plugins.reset()
    yield
    plugins.reset()


@pytest.fixture
def write_spec(tmp_path):
    def write(text: str = GOOD_SPEC, name: str = "spec.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return path

    return write


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    yield
