"""Nothing lost: checkpoints, resume after SIGKILL and SIGTERM, divergence, overwrite safety.

The kills are real: `t2vu run` runs in a subprocess and is killed while it trains.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

torch.set_num_threads(1)

SPEC = """\
backbone: {{name: cogvideox, model_path: {model}, dtype: float32, device: cpu}}
eraser: {{name: adapter, rank: 4}}
concept:
  target: nudity
  prompts: [a nude person on a beach, a nude woman walking]
  condition: mix
preserved: {{source: list, concepts: [a dog in a park, clothing]}}
losses:
  - {{name: negative_guidance, weight: 1.0, eta: 3.0}}
  - {{name: preservation, weight: 1.0}}
  - {{name: localization, weight: 0.5, threshold: 0.2}}
training: {{steps: {steps}, batch_size: 2, learning_rate: {lr}, num_frames: 9, height: 32, width: 32, seed: 3,
            states: {states}, sample_steps: 4, refresh_every: 5, checkpoint_every: {ckpt}, keep_checkpoints: 2}}
output: {{dir: {out}}}
"""


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from tiny import build_tiny_cogvideox

    return build_tiny_cogvideox(tmp_path_factory.mktemp("cog") / "CogVideoX-tiny")


def write(tmp_path: Path, model, name="run", *, steps=12, lr=1e-3, states="trajectory", ckpt=2) -> Path:
    spec = tmp_path / f"{name}.yaml"
    spec.write_text(SPEC.format(model=model, out=tmp_path / name, steps=steps, lr=lr, states=states, ckpt=ckpt))
    return spec


def t2vu(*args, **kw) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.Popen([sys.executable, "-m", "t2vu.core.cli", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def cli(*args) -> tuple[int, str]:
    """The CLI in this process (no kill needed: cheaper than a subprocess)."""
    from typer.testing import CliRunner

    from t2vu.core import plugins
    from t2vu.core.cli import app

    plugins.reset()
    r = CliRunner().invoke(app, [str(a) for a in args])
    return r.exit_code, r.output


def finish(proc: subprocess.Popen, timeout=300) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def wait_for(path: Path, proc: subprocess.Popen, timeout=300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {path} appeared: {proc.communicate()[0]}"
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.01)


def same_tensors(a: Path, b: Path) -> bool:
    ta, tb = load_file(a), load_file(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.fixture(scope="module")
def reference(tiny_folder, tmp_path_factory):
    """An uninterrupted run: its eraser and metrics are what every resumed run must reproduce."""
    tmp = tmp_path_factory.mktemp("reference")
    code, out = finish(t2vu("run", write(tmp, tiny_folder)))
    assert code == 0, out
    return tmp / "run"


def test_sigkill_then_resume_ends_with_the_uninterrupted_eraser(tmp_path, tiny_folder, reference):
    spec = write(tmp_path, tiny_folder)
    proc = t2vu("run", spec)
    wait_for(tmp_path / "run/checkpoints/step-000006", proc)
    proc.kill()  # SIGKILL: no handler runs
    proc.wait()
    run = tmp_path / "run"
    assert not (run / "eraser.safetensors").exists()
    # an unfinished run is never silently restarted or overwritten
    code, out = finish(t2vu("run", spec))
    assert code == 1 and "--resume" in out and "unfinished run" in out
    # resume continues the run the checkpoint belongs to: a changed training setting is refused ...
    code, out = finish(t2vu("run", spec, "--resume", "--set", "training.learning_rate=0.01"))
    assert code == 1 and "training.learning_rate" in out and "Traceback" not in out
    # ... a changed output or safety setting is not
    code, out = finish(t2vu("run", spec, "--resume", "--set", "training.divergence_factor=1e5"))
    assert code == 0, out
    assert same_tensors(run / "eraser.safetensors", reference / "eraser.safetensors")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))  # no step lost, none twice
    assert [r["loss"] for r in rows] == [r["loss"] for r in expected]
    # keep_checkpoints: 2 (step 12 is the final eraser, not a checkpoint)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000008", "step-000010"]
    # resuming a finished run changes nothing
    before = (run / "eraser.safetensors").stat().st_mtime_ns
    code, out = finish(t2vu("run", spec, "--resume"))
    assert code == 0 and "already finished" in out
    assert (run / "eraser.safetensors").stat().st_mtime_ns == before


def test_sigterm_finishes_the_step_writes_a_checkpoint_and_says_how_to_resume(tmp_path, tiny_folder, reference):
    spec = write(tmp_path, tiny_folder, ckpt=0)  # no periodic checkpoints: the signal still writes one
    proc = t2vu("run", spec)
    wait_for(tmp_path / "run/metrics.jsonl", proc)
    while proc.poll() is None and len((tmp_path / "run/metrics.jsonl").read_text().splitlines()) < 3:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    code, out = finish(proc)
    assert code == 128 + signal.SIGTERM, out
    assert "SIGTERM" in out and "--resume" in out and "Traceback" not in out
    checkpoints = list((tmp_path / "run/checkpoints").iterdir())
    assert len(checkpoints) == 1 and not (tmp_path / "run/eraser.safetensors").exists()
    code, out = finish(t2vu("run", spec, "--resume"))
    assert code == 0, out
    assert same_tensors(tmp_path / "run/eraser.safetensors", reference / "eraser.safetensors")


def test_a_diverging_run_stops_names_the_cause_and_writes_no_eraser(tmp_path, tiny_folder):
    spec = write(tmp_path, tiny_folder, steps=6, lr=1e6, states="noise", ckpt=1)
    code, out = cli("run", spec)
    assert code == 1, out
    assert "step 2" in out and "training.learning_rate" in out and "Traceback" not in out
    assert not (tmp_path / "run/eraser.safetensors").exists()
    # step 1's update made the weights that exploded at step 2: its checkpoint is set aside, never resumed
    assert [p.name for p in (tmp_path / "run/checkpoints").iterdir()] == ["step-000001.diverged"]
    code, out = cli("run", spec, "--resume")
    assert code == 1 and "nothing to resume" in out


def test_the_guard_keeps_the_last_good_checkpoint(tmp_path):
    from types import SimpleNamespace

    from t2vu.core import checkpoint
    from t2vu.core.engine import Diverged, _Guard

    for step in (2, 4):
        checkpoint.save(tmp_path, step, state={"x": torch.zeros(1)}, keep=5, write_eraser=lambda p: p.touch())
    guard = _Guard(SimpleNamespace(divergence_factor=100.0, learning_rate=0.5, max_grad_norm=1.0), ["ng"])
    guard.check(1, {"ng": 1.0, "loss": 1.0}, 1.0, erasers=None, folder=tmp_path)
    guard.check(2, {"ng": 1e-3, "loss": 1e-3}, 1.0, erasers=None, folder=tmp_path)  # an unusually small one ...
    guard.check(4, {"ng": 50.0, "loss": 50.0}, 1.0, erasers=None, folder=tmp_path)  # ... does not make this explode
    with pytest.raises(Diverged, match=r"step 6: the loss exploded .*'ng'.*last good checkpoint \(step 4\)"):
        guard.check(6, {"ng": 1e4, "loss": 1e4}, 1.0, erasers=None, folder=tmp_path)  # 100x the median (1.0)
    with pytest.raises(Diverged, match=r"non-finite.*last good checkpoint \(step 2\).*step-000004.diverged"):
        guard.check(5, {"ng": float("nan"), "loss": float("nan")}, 1.0, erasers=None, folder=tmp_path)


def test_generate_refuses_an_eraser_with_non_finite_weights(tmp_path, reference):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from t2vu.core.eraser_file import read_eraser
    from t2vu.core.errors import T2VUError

    path = tmp_path / "eraser.safetensors"
    with safe_open(str(reference / "eraser.safetensors"), "pt") as fh:
        meta, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    read_eraser(reference / "eraser.safetensors")  # the intact file reads
    key = sorted(tensors)[0]
    tensors[key][0] = float("nan")
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(T2VUError, match="non-finite"):
        read_eraser(path)


def test_overwrite_keeps_the_earlier_run_until_the_new_one_has_its_eraser(tmp_path, tiny_folder):
    spec = write(tmp_path, tiny_folder, steps=2, states="noise", ckpt=0)
    assert cli("run", spec)[0] == 0
    run = tmp_path / "run"
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    # a new run that fails (it diverges) leaves the earlier one exactly as it was
    code, out = cli("run", spec, "--set", "output.overwrite=true", "--set", "training.learning_rate=1e6",
                            "--set", "training.steps=4")
    assert code == 1, out
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    # one that succeeds replaces it, and no staging folder stays behind
    code, out = cli("run", spec, "--set", "output.overwrite=true", "--set", "training.seed=9")
    assert code == 0, out
    assert (run / "eraser.safetensors").read_bytes() != before["eraser.safetensors"]
    assert sorted(p.name for p in run.iterdir()) == ["eraser.safetensors", "metrics.jsonl", "prompts.json",
                                                     "spec.yaml"]


def test_checkpoint_state_round_trips_without_pickle(tmp_path):
    from t2vu.core import checkpoint

    state = {"optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}},
                           "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "params": [0], "foreach": None}]},
             "rng": checkpoint.rng_state(__import__("random").Random(1), torch.Generator().manual_seed(2))}
    path = checkpoint.save(tmp_path, 7, state=state, keep=1, write_eraser=lambda p: p.write_bytes(b"x"))
    step, back = checkpoint.load(path)
    assert step == 7 and checkpoint.latest(tmp_path) == (7, path)
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    # a folder still being written is not a checkpoint
    (tmp_path / "checkpoints/.step-000009.incomplete").mkdir()
    (tmp_path / "checkpoints/step-000011").mkdir()  # no state files: incomplete
    assert checkpoint.latest(tmp_path) == (7, path)


def test_two_processes_train_like_one_with_the_global_batch_and_resume(tmp_path, tiny_folder):
    """torchrun, 2 processes (gloo), batch 1 each == 1 process, batch 2; SIGTERM reaches both, which agree on
    the step to stop after; the resumed 2-process run still matches."""
    one = write(tmp_path, tiny_folder, "one", steps=30, states="noise", ckpt=0)
    two = write(tmp_path, tiny_folder, "two", steps=30, states="noise", ckpt=0)
    two.write_text(two.read_text().replace("batch_size: 2", "batch_size: 1"))
    assert finish(t2vu("run", one))[0] == 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "t2vu.core.cli", "run", str(two)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(torchrun, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "two/metrics.jsonl"
    wait_for(metrics, proc)
    while proc.poll() is None and len(metrics.read_text().splitlines()) < 3:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    code, out = finish(proc)
    assert code != 0 and "--resume" in out, out
    [ckpt] = (tmp_path / "two/checkpoints").iterdir()
    assert not (tmp_path / "two/eraser.safetensors").exists()
    code, out = finish(subprocess.Popen(torchrun + ["--resume"], env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True))
    assert code == 0, out
    a, b = load_file(tmp_path / "one/eraser.safetensors"), load_file(tmp_path / "two/eraser.safetensors")
    assert a.keys() == b.keys()
    # the same maths, summed in another order across processes: equal up to float rounding
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    assert max(float(a[k].abs().max()) for k in a) > 1e-2  # the erasers did train
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 31))
