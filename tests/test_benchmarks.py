"""The benchmark scripts run (on tiny configs): what CI can check of them."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_backbone_step_benchmark_runs_the_engine_on_every_builtin_backbone(tmp_path):
    """benchmarks/backbone_step.py --tiny: each backbone's real engine iteration (all three losses) is one frozen
    and one erased pass, timed next to the plain passes of the same shape; a table and JSON come out."""
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "backbone_step.py"), "--tiny", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                                                                        "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [row["case"] for row in rows] == ["cogvideox-tiny", "hunyuanvideo-tiny"]
    for row in rows:
        assert row["passes_per_iteration"] == 2 and row["frozen_rows"] == 3 and row["erased_rows"] == 2
        assert row["iteration_s"] > 0 and row["forward_nograd_s"] > 0 and row["forward_backward_s"] > 0
    assert "ratio" in r.stdout and "cogvideox-tiny" in r.stdout
