"""HunyuanVideo through the engine: `t2vu run`, passes per step, load_eraser on the stock pipeline, `t2vu generate`
against the stock pipeline, upstream round trips, `spec init`."""

import json

import pytest
import torch
from typer.testing import CliRunner

from t2vu.core.cli import app

torch.set_num_threads(1)
runner = CliRunner()

#: a short template for the tiny tokenizer (the default one's crop_start, 95, counts Llama-3 tokens)
TEMPLATE = "<|start_header_id|>user<|end_header_id|>\\n\\n{}<|eot_id|>"
SPEC = """\
backbone: {{name: hunyuanvideo, model_path: {model}, dtype: float32, device: cpu, max_sequence_length: 16,
           prompt_template: "{template}"}}
eraser: {{name: adapter, rank: 4, sites: {sites}}}
concept:
  target: nudity
  prompts: [a nude person on a beach, a nude woman walking]
preserved: {{source: list, concepts: [a dog in a park, clothing]}}
losses:
  - {{name: negative_guidance, weight: 1.0, eta: 3.0}}
  - {{name: preservation, weight: 1.0}}
  - {{name: localization, weight: 0.5, threshold: 0.2}}
training: {{steps: {steps}, batch_size: 2, learning_rate: 1.0e-2, lr_scheduler: constant, num_frames: 9, height: 32,
            width: 32, seed: 0, states: {states}, sample_steps: 3}}
output: {{dir: {out}}}
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from tiny_hunyuan import build_tiny_hunyuanvideo

    return build_tiny_hunyuanvideo(tmp_path_factory.mktemp("hy") / "HunyuanVideo-tiny")


def write(tmp_path, folder, out="run", steps=3, states="noise", sites="[single]"):
    path = tmp_path / f"{out}.yaml"
    path.write_text(SPEC.format(model=folder, out=out, steps=steps, states=states, sites=sites,
                                template=TEMPLATE))
    return path


@pytest.mark.parametrize("states,sites", [("noise", "[single]"), ("trajectory", "[double]"),
                                          ("erased_trajectory", "[all]")])
def test_run_trains_erasers_on_the_chosen_blocks(tmp_path, folder, states, sites):
    """All three losses, every kind of training state, each site preset: the eraser file holds exactly the
    preset's sites, the adapters moved, every logged term is finite and the localization term is live."""
    from t2vu.core.eraser_file import read_eraser

    r = runner.invoke(app, ["run", str(write(tmp_path, folder, states=states, sites=sites))])
    assert r.exit_code == 0, r.output
    f = read_eraser(tmp_path / "run" / "eraser.safetensors")
    expected = {"[single]": [f"single_transformer_blocks.{i}.attn" for i in range(2)],
                "[double]": ["transformer_blocks.0.attn"],
                "[all]": ["transformer_blocks.0.attn"] + [f"single_transformer_blocks.{i}.attn" for i in range(2)]}
    assert f.sites == expected[sites] and f.metadata["backbone"] == "hunyuanvideo"
    assert all(float(f.tensors[f"{s}.up.weight"].abs().max()) > 0 for s in f.sites)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert rows[-1]["localization"] > 0
    training = f.metadata["spec"]["training"]  # the backbone's default filled in and recorded
    assert training["guidance_scale"] == 6.0 and training["num_frames"] == 9


def test_one_frozen_and_one_erased_pass_per_step(tmp_path, folder, monkeypatch):
    """Noise states: every step is one no-grad frozen forward (uncond/anchor, target, preserved stacked) and one
    erased forward with grad (target, preserved), as for CogVideoX: 2 transformer passes a step."""
    from t2vu.backbones.hunyuanvideo_model import HunyuanVideoBackbone
    from t2vu.core import engine, plugins
    from t2vu.core.spec import load_spec

    built = []
    original = HunyuanVideoBackbone.load

    def load(self, device=None):
        built.append(self)
        return original(self, device)

    monkeypatch.setattr(HunyuanVideoBackbone, "load", load)
    resolved = load_spec(write(tmp_path, folder, steps=4), plugins.get_registry())
    result = engine.train(resolved)
    assert len(result.metrics) == 4 and len(built) == 1 and built[0].forward_calls == 2 * 4


def test_load_eraser_and_generate_reproduce_the_stock_pipeline(tmp_path, folder):
    """On a stock HunyuanVideoPipeline: load_eraser changes its latents, handle.disabled() and remove() give the
    stock latents exactly, and `t2vu generate --compare` draws the stock pipeline's videos (same noise) without and
    with the eraser."""
    from diffusers import HunyuanVideoPipeline

    import t2vu
    from t2vu.core.sampling import initial_noise

    spec = write(tmp_path, folder, steps=2)
    assert runner.invoke(app, ["run", str(spec)]).exit_code == 0
    eraser = tmp_path / "run" / "eraser.safetensors"
    pipe = HunyuanVideoPipeline.from_pretrained(folder)
    noise = initial_noise((4, 3, 4, 4), 5)[None]
    kwargs = dict(num_frames=9, height=32, width=32, num_inference_steps=3, guidance_scale=6.0,
                  max_sequence_length=16, prompt_template={"template": TEMPLATE.replace("\\n", "\n")})

    def run(output_type="latent"):
        return pipe("a nude person on a beach", latents=noise.clone(), output_type=output_type, **kwargs).frames

    stock = run()
    handle = t2vu.load_eraser(pipe, eraser)
    erased = run()
    assert not torch.allclose(erased, stock)
    with handle.disabled():
        assert torch.equal(run(), stock)
    erased_video = run("pt")
    handle.remove()
    assert torch.equal(run(), stock)
    stock_video = run("pt")

    r = runner.invoke(app, ["generate", str(spec), "--prompt", "a nude person on a beach", "--seed", "5",
                            "--steps", "3", "--compare", "--out", str(tmp_path / "samples")])
    assert r.exit_code == 0, r.output
    from t2vu.core import plugins
    from t2vu.core.evaluate import load_for_generation
    from t2vu.core.sampling import generate
    from t2vu.core.spec import load_spec

    resolved = load_spec(spec, plugins.get_registry())
    backbone, (handle,), conds = load_for_generation(resolved, [(eraser, 1.0)], ["a nude person on a beach"])
    common = dict(num_frames=9, height=32, width=32, steps=3, guidance=6.0)
    ours_erased = generate(backbone, conds, ["a nude person on a beach"], [5], **common)
    ours_stock = generate(backbone, conds, ["a nude person on a beach"], [5], disabled_erasers=handle.erasers, **common)
    handle.remove()
    assert torch.allclose(ours_stock, stock_video, atol=1e-5) and torch.allclose(ours_erased, erased_video, atol=1e-5)
    assert (tmp_path / "samples" / "a-nude-person-on-a-beach-seed5" / "compare.gif").is_file()


def test_upstream_round_trip_and_strength(tmp_path, folder):
    """Export a single-block eraser to the upstream folder and import it back (lossless); an upstream folder whose
    config carries eraser_weight w imports with the up-projection scaled by w, so the t2vu file computes upstream's
    h + w * adapter(h); double-block erasers have no upstream format."""
    from t2vu.core.eraser_file import read_eraser
    from t2vu.core.errors import T2VUError
    from t2vu.core.upstream import export_upstream, import_upstream

    assert runner.invoke(app, ["run", str(write(tmp_path, folder, steps=2))]).exit_code == 0
    trained = tmp_path / "run" / "eraser.safetensors"
    up = export_upstream(trained, tmp_path / "up")
    weights = torch.load(up / "eraser_weights.pt", weights_only=True)
    assert sorted(weights) == ["single_transformer_blocks.0.attn.adapter", "single_transformer_blocks.1.attn.adapter"]
    back = import_upstream(up, tmp_path / "back.safetensors")  # the backbone travels in the exported config
    a, b = read_eraser(trained), read_eraser(back)
    assert a.sites == b.sites and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)

    config = json.loads((up / "eraser_config.json").read_text())
    config["eraser_weight"] = 0.5
    (up / "eraser_config.json").write_text(json.dumps(config))
    half = read_eraser(import_upstream(up, tmp_path / "half.safetensors", backbone="hunyuanvideo", model_path=folder))
    for k, v in a.tensors.items():
        scale = 0.5 if ".up." in k else 1.0
        assert torch.equal(half.tensors[k], v * scale)
    assert half.metadata["upstream_strength"] == 0.5
    with pytest.raises(T2VUError, match="already exists"):
        import_upstream(up, tmp_path / "half.safetensors", backbone="hunyuanvideo")

    assert runner.invoke(app, ["run", str(write(tmp_path, folder, out="double", steps=1, sites="[double]"))]
                         ).exit_code == 0
    with pytest.raises(T2VUError, match=r"not in the upstream layout .*single_transformer_blocks.<i>.attn"):
        export_upstream(tmp_path / "double" / "eraser.safetensors", tmp_path / "up2")
    weights["transformer_blocks.0.attn.adapter"] = weights["single_transformer_blocks.0.attn.adapter"]
    (tmp_path / "odd").mkdir()
    torch.save(weights, tmp_path / "odd" / "eraser_weights.pt")
    (tmp_path / "odd" / "eraser_config.json").write_text(json.dumps({"eraser_type": "adapter", "eraser_rank": 4}))
    with pytest.raises(T2VUError, match="are not hunyuanvideo upstream sites"):
        import_upstream(tmp_path / "odd", tmp_path / "odd.safetensors", backbone="hunyuanvideo")


def test_spec_init_and_bad_sites(tmp_path, folder):
    """`t2vu spec init --backbone hunyuanvideo` is a valid spec once paths exist; an unknown preset or a pattern
    matching no block stops the run with the model's presets before anything is written."""
    r = runner.invoke(app, ["spec", "init", "--backbone", "hunyuanvideo"])
    assert r.exit_code == 0 and "name: hunyuanvideo" in r.output and "sites: [single]" in r.output
    assert "num_frames: 33" in r.output and "height: 320" in r.output
    text = r.output.replace("./HunyuanVideo", str(folder)).replace("prompts.txt", "[a nude person]")
    (tmp_path / "init.yaml").write_text(text)
    r = runner.invoke(app, ["spec", "validate", str(tmp_path / "init.yaml")])
    assert r.exit_code == 0, r.output
    for sites, message in [("[triple]", "'triple' matches no attention module"),
                           ("[single_transformer_blocks.9.attn]", "presets: ['all', 'double', 'single']")]:
        r = runner.invoke(app, ["run", str(write(tmp_path, folder, out="bad", steps=1, sites=sites))])
        assert r.exit_code != 0 and message in r.output, r.output
        assert not (tmp_path / "bad").exists()


def test_the_unconditional_prediction_is_the_empty_prompt_at_the_training_guidance(folder):
    """The documented choice for a guidance-distilled model: v*(x_t, empty) is the stock transformer on the empty
    prompt's condition with the same embedded guidance (backbone.guidance x 1000) as every other training forward,
    not a second, unguided pass; changing backbone.guidance changes it."""
    from t2vu.core import plugins

    def build(guidance):
        bb = plugins.get_registry().get("backbone", "hunyuanvideo").build(
            {"model_path": str(folder), "dtype": "float32", "max_sequence_length": 16, "prompt_template": TEMPLATE,
             "guidance": guidance})
        bb.load("cpu")
        return bb

    bb = build(6.0)
    empty = bb.collate([bb.encode_prompts([""])[""]])
    x, t = torch.randn(1, *bb.latent_shape(9, 32, 32), generator=torch.Generator().manual_seed(0)), torch.tensor([700.])
    with torch.no_grad():
        ours = bb.predict(x, t, empty)
        stock = bb.transformer(hidden_states=x, timestep=t, encoder_hidden_states=empty.embeds,
                               encoder_attention_mask=empty.mask, pooled_projections=empty.pooled,
                               guidance=torch.tensor([6000.0]), return_dict=False)[0]
        assert torch.equal(ours, stock.float())
        other = build(1.0).predict(x, t, empty)
    assert not torch.allclose(ours, other)
