"""`t2vu run` end to end on a tiny CogVideoX folder: outputs, determinism, learning, refusals."""

import contextlib
import json

import pytest
import torch
from typer.testing import CliRunner

from t2vu.core import plugins
from t2vu.core.cli import app
from t2vu.core.spec import load_spec

torch.set_num_threads(1)
runner = CliRunner()

SPEC = """\
backbone: {{name: cogvideox, model_path: {model}, dtype: float32, device: cpu}}
eraser: {{name: adapter, rank: 4}}
concept:
  target: nudity
  prompts: [a nude person on a beach, a nude woman walking]
  condition: {condition}
preserved: {{source: list, concepts: [a dog in a park, clothing, a red car]}}
losses:
  - {{name: negative_guidance, weight: 1.0, eta: 3.0}}
  - {{name: preservation, weight: 1.0}}
  - {{name: localization, weight: 0.5, threshold: 0.2}}
training: {{steps: {steps}, batch_size: 2, learning_rate: {lr}, lr_scheduler: constant, num_frames: 9,
            height: 32, width: 32, seed: 0, states: {states}, sample_steps: 4, refresh_every: 50,
            checkpoint_every: {ckpt}}}
output: {{dir: {out}}}
"""


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from tiny import build_tiny_cogvideox

    return build_tiny_cogvideox(tmp_path_factory.mktemp("cog") / "CogVideoX-tiny")


def write(tmp_path, tiny_folder, out="run", steps=6, lr=1e-3, states="noise", condition="concept", ckpt=0):
    path = tmp_path / f"{out}.yaml"
    path.write_text(SPEC.format(model=tiny_folder, out=out, steps=steps, lr=lr, states=states,
                                condition=condition, ckpt=ckpt))
    return path


def test_anchor_prompts_are_recorded_and_checked(tmp_path, tiny_folder):
    spec = write(tmp_path, tiny_folder, steps=2, condition="concept")
    r = runner.invoke(app, ["run", str(spec), "--set", "concept.anchor=clothing"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "run" / "prompts.json").read_text())["anchors"]["nudity"] == "clothing"
    # the target prompts do not contain the word "nudity": an anchor cannot be formed from them
    bad = write(tmp_path, tiny_folder, out="bad", steps=2, condition="mix")
    r = runner.invoke(app, ["run", str(bad), "--set", "concept.anchor=clothing"])
    assert r.exit_code != 0 and "does not contain it" in r.output and not (tmp_path / "bad").exists()
    plain = write(tmp_path, tiny_folder, out="plain", steps=2, condition="mix")
    assert runner.invoke(app, ["run", str(plain)]).exit_code == 0
    assert set(json.loads((tmp_path / "plain" / "prompts.json").read_text())["anchors"].values()) == {""}


def test_anchor_from_a_concept_source_follows_the_target(tmp_path, tiny_folder):
    """concept.anchor as a concept-source block: its first concept other than the target is the anchor; a
    source with nothing else to give stops the run before anything is written; a bad block is a spec error."""
    spec = write(tmp_path, tiny_folder, steps=2, condition="concept")
    source = "concept.anchor={source: list, concepts: [Nudity, clothing, skin]}"
    r = runner.invoke(app, ["run", str(spec), "--dry-run", "--set", source])
    assert r.exit_code == 0 and "concept.anchor" in r.output  # the plan lists the anchor's source
    r = runner.invoke(app, ["run", str(spec), "--set", source])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "run" / "prompts.json").read_text())["anchors"]["nudity"] == "clothing"
    bad = write(tmp_path, tiny_folder, out="bad", steps=2, condition="concept")
    r = runner.invoke(app, ["run", str(bad), "--set", "concept.anchor={source: list, concepts: [nudity]}"])
    assert r.exit_code != 0 and "gave no concept other than 'nudity'" in r.output and not (tmp_path / "bad").exists()
    r = runner.invoke(app, ["run", str(bad), "--set", "concept.anchor={source: lists}"])
    assert r.exit_code != 0 and "concept.anchor.source" in r.output and "unknown concept source" in r.output


def test_text_stream_erasers_train_and_localization_needs_video(tmp_path, tiny_folder):
    """eraser.streams [video, text]: trains with all three terms (text sites are not in the localization
    term) and saves both kinds of site; [text] with the localization term stops before writing anything."""
    spec = write(tmp_path, tiny_folder, steps=2)
    r = runner.invoke(app, ["run", str(spec), "--set", "eraser.streams=[video, text]"])
    assert r.exit_code == 0, r.output
    from t2vu.core.eraser_file import read_eraser

    sites = read_eraser(tmp_path / "run" / "eraser.safetensors").sites
    assert "transformer_blocks.0.attn1" in sites and "transformer_blocks.0.attn1.text" in sites
    bad = write(tmp_path, tiny_folder, out="text-only", steps=2)
    r = runner.invoke(app, ["run", str(bad), "--set", "eraser.streams=[text]"])
    assert r.exit_code != 0 and "no eraser edits the video" in r.output
    assert not (tmp_path / "text-only").exists()


def test_stream_start_holds_a_stream_off_until_its_step(tmp_path, tiny_folder):
    """training.stream_start {text: 2}: the text adapters change nothing and get no gradient in steps 0-1 (their
    zero-initialised up-projections stay zero while the video ones train), then train; a stream the eraser lacks,
    or one that would start after the last step, stops the run before anything is written."""
    from t2vu.core.eraser_file import read_eraser

    spec = write(tmp_path, tiny_folder, steps=4, ckpt=1)
    r = runner.invoke(app, ["run", str(spec), "--set", "eraser.streams=[video, text]",
                            "--set", "training.stream_start={text: 2}", "--set", "training.keep_checkpoints=3"])
    assert r.exit_code == 0, r.output

    def ups(path):
        tensors = read_eraser(path).tensors
        text = [v for k, v in tensors.items() if k.endswith(".text.up.weight")]
        video = [v for k, v in tensors.items() if k.endswith(".up.weight") and ".text." not in k]
        assert text and video
        return max(float(t.abs().max()) for t in text), max(float(t.abs().max()) for t in video)

    out = tmp_path / "run"
    for step in (1, 2):  # after steps 0 and 0-1
        text, video = ups(out / f"checkpoints/step-{step:06d}/eraser.safetensors")
        assert text == 0.0 and video > 0.0
    text, video = ups(out / "eraser.safetensors")
    assert text > 0.0 and video > 0.0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr_text"] for r in rows] == [0.0, 1e-3, 1e-3, 1e-3]  # each row: the rate of the next step
    assert [r["lr_video"] for r in rows] == [r["lr"] for r in rows] == [1e-3] * 4
    for out_name, sets, message in [
        ("no-text", ["training.stream_start={text: 1}"], "the eraser has no 'text' adapters"),
        ("too-late", ["eraser.streams=[video, text]", "training.stream_start={text: 4}"], "would never train"),
    ]:
        bad = write(tmp_path, tiny_folder, out=out_name, steps=4)
        r = runner.invoke(app, ["run", str(bad), *[a for s in sets for a in ("--set", s)]])
        assert r.exit_code != 0 and message in r.output, r.output
        assert not (tmp_path / out_name).exists()
    r = runner.invoke(app, ["run", str(spec), "--dry-run", "--set", "training.stream_start={audio: 1}"])
    assert r.exit_code != 0 and "stream_start" in r.output
    # video adapters held off: the localization term (it reads their outputs) has nothing to penalise
    late = write(tmp_path, tiny_folder, out="video-late", steps=3)
    r = runner.invoke(app, ["run", str(late), "--set", "eraser.streams=[video, text]",
                            "--set", "training.stream_start={video: 1}"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in (tmp_path / "video-late" / "metrics.jsonl").read_text().splitlines()]
    assert rows[2]["localization"] > 0.0  # on from step 1 (whose adapters still start at zero)


def test_a_late_stream_runs_the_whole_lr_schedule_over_its_own_steps():
    """A stream starting at step 4 of 10 warms up and decays over steps 4-9 as a 6-step run would; the others
    and a run without stream_start keep the plain schedule."""
    from types import SimpleNamespace

    from diffusers.optimization import get_scheduler

    from t2vu.core.engine import _lr_schedule

    def rates(starts, make_schedule, steps):
        optimizer = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "start": s} for s in starts],
                                    lr=0.1)
        schedule, out = make_schedule(optimizer), []
        for _ in range(steps):
            out.append([g["lr"] for g in optimizer.param_groups])
            optimizer.step()
            schedule.step()
        return out

    tr = SimpleNamespace(lr_scheduler="cosine", warmup_steps=2, steps=10)

    def cosine(steps):
        return lambda o: get_scheduler("cosine", o, num_warmup_steps=2, num_training_steps=steps)

    plain, short = [r[0] for r in rates([0], cosine(10), 10)], [r[0] for r in rates([0], cosine(6), 6)]
    got = rates([0, 4], lambda o: _lr_schedule(tr, o), 10)
    assert [r[0] for r in got] == plain
    assert [r[1] for r in got] == [0.0] * 4 + short
    assert short[:3] == [0.0, 0.05, 0.1] and short[-1] < 0.1  # its own warmup, then its own decay
    assert rates([0], lambda o: _lr_schedule(tr, o), 10) == [[x] for x in plain]


def test_run_writes_a_loadable_eraser_and_refuses_to_overwrite(tmp_path, tiny_folder):
    spec = write(tmp_path, tiny_folder, steps=4, ckpt=2)
    r = runner.invoke(app, ["run", str(spec)])
    assert r.exit_code == 0, r.output
    out = tmp_path / "run"
    assert {p.name for p in out.iterdir()} == {"eraser.safetensors", "metrics.jsonl", "spec.yaml",
                                               "prompts.json", "checkpoints"}
    assert (out / "checkpoints/step-000002/eraser.safetensors").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert {"loss", "negative_guidance", "preservation", "localization", "lr", "grad_norm"} <= set(rows[0])
    prompts = json.loads((out / "prompts.json").read_text())
    assert prompts["unlearn"] == ["nudity"] and len(prompts["preserved"]) == 3

    from t2vu.core.eraser_file import read_eraser

    meta = read_eraser(out / "eraser.safetensors").metadata
    assert meta["backbone"] == "cogvideox" and meta["target"] == "nudity" and meta["eraser_type"] == "adapter"
    assert meta["spec"]["losses"][0] == {"name": "negative_guidance", "weight": 1.0, "eta": 3.0, "push_limit": None}

    import t2vu
    from diffusers import CogVideoXPipeline

    pipe = CogVideoXPipeline.from_pretrained(tiny_folder)
    handle = t2vu.load_eraser(pipe, out / "eraser.safetensors")
    assert len(handle.erasers.site_names) == 2
    handle.remove()

    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    r = runner.invoke(app, ["run", str(spec)])
    assert r.exit_code == 1 and "already holds a finished run" in r.output
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def _train(tmp_path, tiny_folder, **kw):
    from t2vu.core.engine import train

    plugins.reset()
    return train(load_spec(write(tmp_path, tiny_folder, **kw), plugins.get_registry()))


def test_training_is_deterministic_on_cpu(tmp_path, tiny_folder):
    from safetensors.torch import load_file

    a = _train(tmp_path, tiny_folder, out="a", steps=3)
    b = _train(tmp_path, tiny_folder, out="b", steps=3)
    ta, tb = load_file(a.eraser), load_file(b.eraser)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert [r["loss"] for r in a.metrics] == [r["loss"] for r in b.metrics]


def _eval_losses(tiny_folder, eraser_path):
    """Fixed evaluation states: distance to the negatively guided target, preserved drift."""
    from t2vu.core.context import PRESERVED, TARGET, UNCOND, StepContext
    from t2vu.core.eraser_load import load_eraser

    reg = plugins.get_registry()
    backbone = reg.get("backbone", "cogvideox").build({"model_path": str(tiny_folder), "dtype": "float32"})
    backbone.load("cpu")
    emb = backbone.encode_prompts(["", "nudity", "a dog in a park", "clothing", "a red car"])
    handle = load_eraser(backbone.transformer, eraser_path) if eraser_path else None
    erasers = handle.erasers if handle else _NoErasers()
    g = torch.Generator().manual_seed(123)
    shape = backbone.latent_shape(9, 32, 32)
    n = 8
    x0, noise = torch.randn((n, *shape), generator=g), torch.randn((n, *shape), generator=g)
    t = torch.linspace(50, 950, n).long()
    x_t = backbone.add_noise(x0, noise, t)
    res = {}
    for preserved in ("a dog in a park", "clothing", "a red car"):
        ctx = StepContext(backbone, erasers, x_t, t, {UNCOND: [""] * n, TARGET: ["nudity"] * n,
                                                     PRESERVED: [preserved] * n},
                          lambda ps: torch.stack([emb[p] for p in ps]))
        with torch.no_grad():
            u, c = ctx.frozen(UNCOND), ctx.frozen(TARGET)
            guided = u - 3.0 * (c - u)
            res["target"] = float(((ctx.erased(TARGET) - guided) ** 2).mean())
            drift = ((ctx.erased(PRESERVED) - ctx.frozen(PRESERVED)) ** 2).mean()
            res[preserved] = float(drift / (ctx.frozen(PRESERVED) ** 2).mean())
    return res


class _NoErasers:
    """Stands in for an EraserSet when there is no eraser: disabled() changes nothing."""

    def disabled(self):
        return contextlib.nullcontext()


def test_training_moves_target_to_guided_velocity_and_keeps_preserved(tmp_path, tiny_folder):
    result = _train(tmp_path, tiny_folder, out="learn", steps=60, lr=3e-3)
    losses = [r["negative_guidance"] for r in result.metrics]
    assert sum(losses[-10:]) / 10 < 0.7 * sum(losses[:10]) / 10  # the unlearning loss goes down
    totals = [r["loss"] for r in result.metrics]
    assert sum(totals[-10:]) < sum(totals[:10])
    before = _eval_losses(tiny_folder, None)
    after = _eval_losses(tiny_folder, result.eraser)
    assert after["target"] < 0.6 * before["target"], (before, after)
    for preserved in ("a dog in a park", "clothing", "a red car"):
        assert before[preserved] == 0.0
        assert after[preserved] < 0.05, (preserved, after)  # relative squared drift under 5%


@pytest.mark.parametrize("states,condition", [("trajectory", "prompts"), ("erased_trajectory", "mix")])
def test_trajectory_states(tmp_path, tiny_folder, states, condition):
    result = _train(tmp_path, tiny_folder, out=states, steps=3, states=states, condition=condition)
    assert len(result.metrics) == 3 and all(r["loss"] > 0 for r in result.metrics)


def test_frozen_trajectory_teacher_values_are_reused(tmp_path, tiny_folder, monkeypatch):
    """With states: trajectory the sampler's CFG pass is the teacher: the frozen pass only runs c_p."""
    from t2vu.backbones.cogvideox_model import CogVideoXBackbone

    calls = []
    real = CogVideoXBackbone.predict

    def counting(self, x_t, t, embeds):
        calls.append((x_t.size(0), torch.is_grad_enabled()))
        return real(self, x_t, t, embeds)

    monkeypatch.setattr(CogVideoXBackbone, "predict", counting)
    spec = write(tmp_path, tiny_folder, out="reuse", steps=3, states="trajectory", condition="prompts")
    spec.write_text(spec.read_text().replace("  - {name: localization, weight: 0.5, threshold: 0.2}\n", ""))
    from t2vu.core.engine import train

    train(load_spec(spec, plugins.get_registry()))
    sampler = [c for c in calls if c == (4, False)]  # CFG: uncond + cond for a batch of 2
    assert len(sampler) in range(1, 5)  # one trajectory (refresh_every 50), stopped at a random depth <= 4 steps
    assert calls.count((2, False)) == 3  # each step's frozen pass: the preserved rows only
    assert calls.count((4, True)) == 3  # each step's erased pass: target + preserved
    assert len(calls) == len(sampler) + 6
