"""The benchmark scripts run (on tiny configs): what CI can check of them."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

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
    assert [row["case"] for row in rows] == ["cogvideox-tiny", "hunyuanvideo-tiny", "wan-tiny", "wan22-tiny",
                                             "cogvideox-tiny-fp8", "cogvideox-tiny-ckpt2"]
    for row in rows:
        assert row["passes_per_iteration"] == 2 and row["frozen_rows"] == 3 and row["erased_rows"] == 2
        assert row["iteration_s"] > 0 and row["forward_nograd_s"] > 0 and row["forward_backward_s"] > 0
    assert "ratio" in r.stdout and "cogvideox-tiny" in r.stdout


def test_toy_compose_scores_only_the_prompts_with_neither_concept():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from toy_compose import check, neither

    def row(prompt, color, shape, after_color, pixel, seed=0):
        expect = {"color": color, "shape": shape, "motion": "left"}
        return {"prompt": prompt, "seed": seed, "expect": expect, "before": dict(expect), "pixel_change": pixel,
                "after": {**expect, "color": after_color}}

    rows = [row("a red circle", "red", "circle", "blue", 0.5), row("a red square", "red", "square", "blue", 0.5),
            row("a blue circle", "blue", "circle", "blue", 0.5), row("a blue square", "blue", "square", "blue", 0.01),
            row("a green square", "green", "square", "blue", 0.03),
            row("a blue square", "blue", "square", "blue", 0.01)]  # the same (prompt, seed) from the other report
    rest = neither(rows, "red", "circle")
    assert rest["pixel_change"]["n"] == 2 and rest["pixel_change"]["after"] == pytest.approx(0.02)
    assert rest["color_accuracy"] == {"before": 1.0, "after": 0.5, "n": 2}
    assert rest["shape_accuracy"]["after"] == 1.0
    summary = {"target_rate": {"after": 0.0}, "synonym_rate": {"after": 0.2}}
    checks = check(summary, {"target_rate": {"after": 0.04}}, rest)
    assert not checks["rest_color_accuracy>=0.95x"] and checks["rest_shape_accuracy>=0.95x"]
    assert not checks["color_synonym_rate<=0.10"] and checks["shape_target_rate<=0.05"]
