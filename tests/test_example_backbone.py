"""The third-party example backbone (tests/plugins/t2vu-example, installed, found by entry point) implements the
whole backbone contract: `t2vu run` trains with every loss term and every kind of training state, the engine
runs one frozen and one erased pass per step, and `t2vu.load_eraser` attaches the result to a stock transformer."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from t2vu.core import plugins
from t2vu.core.cli import app
from t2vu.core.spec import load_spec

torch.set_num_threads(1)
runner = CliRunner()

SPEC = """\
backbone: {{name: example_backbone, model_path: {model}}}
eraser: {{name: adapter, rank: 4, streams: [video, text]}}
concept:
  target: red
  prompts: [a red circle moving left, a red square]
  condition: mix
preserved: {{source: list, concepts: [a blue circle, a green square]}}
losses:
  - {{name: negative_guidance, weight: 1.0, eta: 3.0}}
  - {{name: preservation, weight: 1.0}}
  - {{name: localization, weight: 1.0, threshold: 0.2}}
training: {{steps: {steps}, batch_size: 2, learning_rate: 1.0e-2, lr_scheduler: constant, seed: 0,
            states: {states}, refresh_every: 2}}
output: {{dir: {out}}}
"""
TERMS = ("negative_guidance", "preservation", "localization")


@pytest.fixture(autouse=True)
def only_the_example_plugin(monkeypatch):
    """Third-party plugins load from entry points: select the example distribution explicitly."""
    monkeypatch.setenv("T2VU_LOAD_PLUGINS", "t2vu-example")
    plugins.reset()
    yield
    plugins.reset()


def component():
    """The backbone, as core finds it: through the installed distribution's entry point."""
    comp = plugins.get_registry().get("backbone", "example_backbone")
    assert comp.distribution == "t2vu-example"
    return comp


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    import t2vu_example.heavy

    assert "site-packages" in t2vu_example.heavy.__file__ or "t2vu-example" in t2vu_example.heavy.__file__
    return t2vu_example.heavy.save_example_model(tmp_path_factory.mktemp("example") / "model", seed=0)


def write(folder, model, states="noise", steps=4, out="run"):
    spec = folder / f"{out}.yaml"
    spec.write_text(SPEC.format(model=model, states=states, steps=steps, out=out))
    return spec


@pytest.fixture(scope="module")
def noise_run(tmp_path_factory, model):
    """One `t2vu run` with noise states, shared by the tests that read its outputs."""
    plugins.reset()
    folder = tmp_path_factory.mktemp("noise-run")
    r = runner.invoke(app, ["run", str(write(folder, model))])
    assert r.exit_code == 0, r.output
    return folder / "run"


def check_run(out, steps=4):
    from t2vu.core.eraser_file import read_eraser

    assert (out / "eraser.safetensors").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for row in rows:
        assert all(math.isfinite(row[t]) for t in TERMS + ("loss", "grad_norm")), row
    assert rows[0]["localization"] == 0.0  # step 1: the zero-initialised erasers output nothing
    assert all(r["localization"] > 0.0 for r in rows[1:])
    assert all(r["negative_guidance"] > 0.0 for r in rows)
    eraser = read_eraser(out / "eraser.safetensors")
    assert eraser.metadata["backbone"] == "example_backbone" and eraser.metadata["target"] == "red"
    assert eraser.sites == ["blocks.0.attn", "blocks.0.attn.text", "blocks.1.attn", "blocks.1.attn.text"]
    for site in eraser.sites:  # every up-projection (video and text) trained away from zero
        assert float(eraser.tensors[f"{site}.up.weight"].abs().max()) > 0.0, site


def test_run_noise_states_trains_every_term(noise_run):
    check_run(noise_run)


@pytest.mark.parametrize("states", ["trajectory", "erased_trajectory"])
def test_run_trajectory_states_trains_every_term(tmp_path, model, states):
    r = runner.invoke(app, ["run", str(write(tmp_path, model, states=states))])
    assert r.exit_code == 0, r.output
    check_run(tmp_path / "run")


def test_one_frozen_and_one_erased_pass_per_step(tmp_path, model, monkeypatch):
    """Noise states: each step is exactly one no-grad frozen forward (anchor = uncond, target, preserved: 3 x batch
    rows) and one erased forward with grad (target, preserved: 2 x batch rows), counted by ``forward_calls``."""
    from t2vu.core.engine import train

    cls = component().load()
    built, calls = [], []
    real_load, real_predict = cls.load, cls.predict

    def load(self, device=None):
        built.append(self)
        return real_load(self, device)

    def predict(self, x_t, t, cond):
        calls.append((x_t.size(0), torch.is_grad_enabled()))
        return real_predict(self, x_t, t, cond)

    monkeypatch.setattr(cls, "load", load)
    monkeypatch.setattr(cls, "predict", predict)
    steps = 3
    train(load_spec(write(tmp_path, model, steps=steps), plugins.get_registry()))
    assert len(built) == 1 and built[0].forward_calls == 2 * steps
    assert calls == [(6, False), (4, True)] * steps


def test_load_eraser_on_a_fresh_transformer_changes_and_restores_its_output(noise_run, model):
    import t2vu
    from t2vu_example.heavy import ExampleTransformer

    transformer = ExampleTransformer.from_pretrained(model).requires_grad_(False).eval()
    backbone = component().build({"model_path": str(model)})
    backbone.config = dict(transformer.config)
    cond = backbone.collate(list(backbone.encode_prompts(["a red circle", "a blue square"]).values()))
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2, *backbone.latent_shape(4, 8, 8)), generator=g)
    t = torch.tensor([700, 300])

    def forward():
        with torch.no_grad():
            return transformer(hidden_states=x, encoder_hidden_states=cond.embeds, timestep=t, text_mask=cond.mask)

    stock = forward()
    handle = t2vu.load_eraser(transformer, noise_run / "eraser.safetensors")
    assert len(handle.erasers.site_names) == 4
    erased = forward()
    assert not torch.allclose(erased, stock)
    with handle.disabled():
        assert torch.equal(forward(), stock)
    handle.remove()
    assert torch.equal(forward(), stock)


def test_capture_attention_leaves_outputs_and_records_video_to_concept_mass(model):
    """The contract's capture: outputs unchanged; ``{module: [rows, frames, tokens_per_frame]}`` for the rows whose
    mask has a token only; mass in [0, 1]; a mask of every real token holds at least a one-token mask's mass."""
    backbone = component().build({"model_path": str(model)})
    backbone.load("cpu")
    prompts = ["a red circle", "a blue square", "a red circle"]
    conds = backbone.encode_prompts(prompts)
    cond = backbone.collate([conds[p] for p in prompts])
    shape = backbone.latent_shape(4, 8, 8)
    x = torch.randn((3, *shape), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500, 500, 500])
    masks = torch.stack([backbone.concept_token_mask("a red circle", "red"),
                         torch.zeros(backbone.config["text_length"], dtype=torch.bool),
                         backbone.concept_token_mask("a red circle", "a red circle")])
    assert masks[0].tolist()[:3] == [False, True, False] and masks[2].sum() == 3
    stock = backbone.predict(x, t, cond)
    with backbone.capture_attention(masks, None, shape) as store:
        out = backbone.predict(x, t, cond)
    assert torch.equal(out, stock)
    assert sorted(store) == ["blocks.0.attn", "blocks.1.attn"]
    for maps in store.values():
        assert maps.shape == (2, 4, 16) and maps.min() >= 0 and maps.max() <= 1
        assert (maps[1] >= maps[0] - 1e-6).all()
    with pytest.raises(Exception, match="no attention module"):
        with backbone.capture_attention(masks, ["blocks.9.attn"], shape):
            pass


def test_missing_model_folder_is_a_t2vu_error(tmp_path):
    from t2vu.core.errors import T2VUError

    with pytest.raises(T2VUError, match="save_example_model"):
        component().build({"model_path": str(tmp_path / "nope")})
    (tmp_path / "half").mkdir()
    with pytest.raises(T2VUError, match="missing config.json"):
        component().build({"model_path": str(tmp_path / "half")})
