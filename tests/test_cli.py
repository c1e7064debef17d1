"""The CLI: exit codes, messages, JSON output, and light commands staying light."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

from conftest import GOOD_SPEC
from helpers import make_dist

from t2vu.core.cli import app

runner = CliRunner()

TOY_SPEC = GOOD_SPEC.replace("backbone: {name: cogvideox, model_path: ./model, dtype: float32}",
                             "backbone: {name: toy}").replace("height: 16, width: 16", "height: 32, width: 32")


def invoke(*args):
    return runner.invoke(app, list(args))


def test_version_and_help():
    r = invoke("--version")
    assert r.exit_code == 0 and r.output.startswith("t2vu ")
    for args in (["--help"], ["run", "--help"], ["plugins", "list", "--help"], ["spec", "init", "--help"]):
        r = invoke(*args)
        assert r.exit_code == 0 and "Example" in r.output, args


def test_plugins_list_json_and_kind():
    r = invoke("plugins", "list", "--json")
    assert r.exit_code == 0
    rows = json.loads(r.output)
    keys = {"kind", "name", "plugin", "distribution", "version", "summary", "status"}
    assert all(keys <= set(row) for row in rows)
    assert {"kind": "loss", "name": "example_l1"}.items() <= next(x for x in rows if x["name"] == "example_l1").items()
    r = invoke("plugins", "list", "--json", "--kind", "loss")
    assert {row["kind"] for row in json.loads(r.output)} == {"loss"}
    r = invoke("plugins", "list", "--kind", "losss")
    assert r.exit_code == 2 and "did you mean 'loss'" in r.output
    r = invoke("plugins", "list")
    assert r.exit_code == 0 and "negative_guidance" in r.output


def test_spec_validate_ok_and_error(write_spec, tmp_path):
    r = invoke("spec", "validate", str(write_spec(TOY_SPEC, name="toy.yaml")))
    assert r.exit_code == 0 and "valid" in r.output and "model folder" in r.output
    spec = write_spec()  # ./model does not exist: only --spec-only passes
    r = invoke("spec", "validate", str(spec), "--spec-only")
    assert r.exit_code == 0 and "valid" in r.output and "spec only" in r.output
    r = invoke("spec", "validate", str(spec))
    assert r.exit_code == 2 and "backbone.model_path (line 1):" in r.output and "does not exist" in r.output
    bad = write_spec(spec.read_text().replace("negative_guidance", "negative_guidence"), name="bad.yaml")
    r = invoke("spec", "validate", str(bad))
    assert r.exit_code == 2
    assert "losses[0].name (line 10): unknown loss 'negative_guidence'; did you mean 'negative_guidance'?" in r.output


def test_run_invalid_writes_nothing(write_spec, tmp_path):
    spec = write_spec(textwrap.dedent("""\
        backbone: {name: cogvideox, model_path: ./m}
        concept: {target: x}
        losses: [{name: negative_guidance, eta: -1}]
        output: {dir: out}
        """))
    r = invoke("run", str(spec))
    assert r.exit_code == 2 and "losses[0].eta (line 3)" in r.output
    assert not (tmp_path / "out").exists()


def test_run_dry_run_and_set(write_spec, tmp_path):
    spec = write_spec(TOY_SPEC)
    r = invoke("run", str(spec), "--dry-run", "--set", "training.steps=10", "--set", "eraser.rank=64")
    assert r.exit_code == 0, r.output
    assert "10 steps" in r.output and "rank=64" in r.output and "dry run" in r.output
    assert not (tmp_path / "runs").exists()
    r = invoke("run", str(spec), "--dry-run", "--set", "training.steps=zero")
    assert r.exit_code == 2 and "training.steps (from --set)" in r.output


def test_spec_schema_and_init(tmp_path):
    r = invoke("spec", "schema")
    assert r.exit_code == 0 and "negative_guidance" in json.loads(r.output)["$defs"].__repr__()
    r = invoke("spec", "init", "--backbone", "cogvideox")
    assert r.exit_code == 0 and "name: cogvideox" in r.output
    (tmp_path / "prompts.txt").write_text("a prompt\n")
    (tmp_path / "spec.yaml").write_text(r.output)
    assert invoke("spec", "validate", str(tmp_path / "spec.yaml"), "--spec-only").exit_code == 0  # the starter is valid
    r = invoke("spec", "validate", str(tmp_path / "spec.yaml"))  # ... once its model is downloaded
    assert r.exit_code == 2 and "backbone.model_path" in r.output and "hf download" in r.output
    r = invoke("spec", "init", "--backbone", "cogvidex")
    assert r.exit_code == 2 and "did you mean 'cogvideox'" in r.output
    for backbone in ("hunyuanvideo", "wan", "toy"):  # every installed backbone gets a valid starter (a Path default too)
        r = invoke("spec", "init", "--backbone", backbone)
        assert r.exit_code == 0 and f"name: {backbone}" in r.output, r.output
        (tmp_path / f"{backbone}.yaml").write_text(r.output)
        assert invoke("spec", "validate", str(tmp_path / f"{backbone}.yaml"), "--spec-only").exit_code == 0


LIGHT_CHECK = """
import sys
from t2vu.core.cli import main
try:
    main({args!r})
except SystemExit as e:
    code = e.code
heavy = sorted(m for m in ("torch", "diffusers", "transformers", "accelerate") if m in sys.modules)
print("HEAVY=" + ",".join(heavy))
print("CODE=" + str(code))
"""


@pytest.mark.parametrize("args", [
    ["--help"], ["plugins", "list"], ["plugins", "list", "--json"], ["spec", "schema"],
    ["spec", "init"], ["spec", "validate", "SPEC"], ["run", "SPEC", "--dry-run"],
])
def test_light_commands_do_not_import_torch(args, write_spec):
    spec = write_spec(TOY_SPEC)  # a real model folder: the pre-load checks read its configs and headers
    args = [str(spec) if a == "SPEC" else a for a in args]
    out = subprocess.run([sys.executable, "-c", LIGHT_CHECK.format(args=args)],
                         capture_output=True, text=True, timeout=60)
    assert "HEAVY=\n" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
    assert "CODE=0" in out.stdout or "CODE=None" in out.stdout or args == ["spec", "init"], out.stdout + out.stderr


def test_console_script_broken_plugin_isolated(tmp_path):
    make_dist(tmp_path, "t2vu-broken", "t2vu_broken", "raise RuntimeError('boom: missing CUDA')\n", ep_name="broken")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "t2vu.core.cli", "plugins", "list", "--json"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    broken = [r for r in rows if r["plugin"] == "broken"]
    assert broken and broken[0]["status"] == "failed" and "boom: missing CUDA" in broken[0]["error"]
    assert any(r["name"] == "cogvideox" for r in rows)
    env["T2VU_DISABLE_PLUGINS"] = "broken"
    out = subprocess.run([sys.executable, "-m", "t2vu.core.cli", "plugins", "list", "--json"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert not [r for r in json.loads(out.stdout) if r["plugin"] == "broken"]
