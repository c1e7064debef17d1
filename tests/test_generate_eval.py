"""`t2vu generate` and `t2vu eval` on a tiny CogVideoX folder."""

import json

import pytest
import torch
from typer.testing import CliRunner

from t2vu.core import plugins
from t2vu.core.cli import app

torch.set_num_threads(1)
runner = CliRunner()

SPEC = """\
backbone: {{name: cogvideox, model_path: {model}, dtype: float32, device: cpu}}
eraser: {{name: adapter, rank: 4}}
concept: {{target: nudity}}
losses: [{{name: negative_guidance, eta: 3.0}}]
training: {{steps: 3, batch_size: 1, learning_rate: 1.0e-2, num_frames: 9, height: 32, width: 32, seed: 0}}
output: {{dir: run}}
eval:
  prompts: prompts.csv
  judges: [{{name: example_judge, threshold: 0.5}}]
  seeds: [0, 1]
  steps: 3
  thumbnails: 2
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from tiny import build_tiny_cogvideox

    root = tmp_path_factory.mktemp("gen")
    folder = build_tiny_cogvideox(root / "CogVideoX-tiny")
    spec = root / "spec.yaml"
    spec.write_text(SPEC.format(model=folder))
    (root / "prompts.csv").write_text("prompt,seed,group,expect_brightness\n"
                                      "a nude person on a beach,,target,dark\n"
                                      "a dog in a park,7,other,bright\n")
    r = runner.invoke(app, ["run", str(spec)])
    assert r.exit_code == 0, r.output
    return root, folder, spec


def test_sampler_matches_the_stock_diffusers_pipeline(trained):
    """Our CFG sampler through the backbone API gives CogVideoXPipeline's video (same noise)."""
    from diffusers import CogVideoXPipeline

    from t2vu.core.sampling import generate, initial_noise

    root, folder, spec = trained
    backbone = plugins.get_registry().get("backbone", "cogvideox").build({"model_path": str(folder), "dtype": "float32"})
    backbone.load("cpu")
    emb = backbone.encode_prompts(["", "a red car"])
    ours = generate(backbone, emb, ["a red car"], [3], num_frames=9, height=32, width=32, steps=4, guidance=5.0)
    pipe = CogVideoXPipeline.from_pretrained(folder)
    ref = pipe("a red car", num_frames=9, height=32, width=32, num_inference_steps=4, guidance_scale=5.0,
               output_type="pt", max_sequence_length=16, latents=initial_noise((1, 3, 4, 4, 4), 3)[None][0]).frames
    assert ours.shape == ref.shape == (1, 9, 3, 32, 32)
    assert torch.allclose(ours, ref, atol=1e-4)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dpm_sampler_with_dynamic_cfg_matches_the_stock_pipeline(trained, dtype):
    """scheduler: dpm + dynamic_cfg (the T2VUnlearning protocol) gives CogVideoXPipeline's video for the same
    generator: the stochastic DPM steps draw their noise from each video's seed as the pipeline does, in the
    pipeline's latent dtype (bf16 too: noise drawn in it, latents cast back to it after each step)."""
    from diffusers import CogVideoXDPMScheduler, CogVideoXPipeline

    from t2vu.core.sampling import generate

    root, folder, spec = trained
    options = {"model_path": str(folder), "dtype": dtype, "scheduler": "dpm", "dynamic_cfg": True}
    backbone = plugins.get_registry().get("backbone", "cogvideox").build(options)
    backbone.load("cpu")
    emb = backbone.encode_prompts(["", "a red car", "a dog"])
    ours = generate(backbone, emb, ["a red car", "a dog"], [3, 4], num_frames=9, height=32, width=32, steps=5,
                    guidance=6.0)
    pipe = CogVideoXPipeline.from_pretrained(folder, torch_dtype=getattr(torch, dtype))
    pipe.scheduler = CogVideoXDPMScheduler.from_config(pipe.scheduler.config)
    ref = pipe(["a red car", "a dog"], num_frames=9, height=32, width=32, num_inference_steps=5, guidance_scale=6.0,
               use_dynamic_cfg=True, output_type="pt", max_sequence_length=16,
               generator=[torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)]).frames
    assert ours.shape == ref.shape == (2, 9, 3, 32, 32)
    assert torch.allclose(ours, ref.float(), atol=1e-4 if dtype == "float32" else 5e-3)
    if dtype != "float32":
        return
    # the stock DDIM sampler from the same seeds is another video: the settings matter
    plain = plugins.get_registry().get("backbone", "cogvideox").build({"model_path": str(folder), "dtype": "float32"})
    plain.load("cpu")
    ddim = generate(plain, emb, ["a red car", "a dog"], [3, 4], num_frames=9, height=32, width=32, steps=5,
                    guidance=6.0)
    assert (ddim - ours).abs().max() > 1e-2


def test_eval_protocol_fills_the_published_settings(trained, tmp_path):
    from t2vu.core.evaluate import generation_options
    from t2vu.core.spec import SpecError, load_spec

    root, folder, spec = trained
    registry = plugins.get_registry()
    resolved = load_spec(spec, registry, ["eval.protocol=t2vunlearning", "eval.steps=7"])
    ev = resolved.spec.eval
    # what the block sets wins (steps), the rest is the protocol's
    assert (ev.steps, ev.guidance, ev.num_frames, ev.height, ev.width) == (7, 6.0, 49, 480, 720)
    options = generation_options(resolved, ev.protocol)
    assert (options.scheduler, options.dynamic_cfg) == ("dpm", True)
    assert (resolved.backbone.options.scheduler, resolved.backbone.options.dynamic_cfg) == ("folder", False)
    with pytest.raises(SpecError) as err:
        load_spec(spec, registry, ["eval.protocol=paper"])
    assert "eval.protocol" in str(err.value) and "no evaluation protocol 'paper'" in str(err.value)
    assert "t2vunlearning" in str(err.value)


def test_generate_compare_writes_videos(trained):
    root, folder, spec = trained
    r = runner.invoke(app, ["generate", str(spec), "--prompt", "a nude person", "--compare", "--seed", "5",
                            "--steps", "3"])
    assert r.exit_code == 0, r.output
    out = root / "run/samples/a-nude-person-seed5"
    assert {p.name for p in out.iterdir()} == {"erased.mp4", "original.mp4", "compare.gif"}
    import imageio.v3 as iio

    frames = iio.imread(out / "compare.gif")
    assert frames.shape[0] == 9 and frames.shape[2] > frames.shape[1]  # side by side: wider than tall
    r = runner.invoke(app, ["generate", str(spec), "--prompt", "x", "--eraser", str(root / "missing.safetensors")])
    assert r.exit_code == 1 and "no eraser at" in r.output


def test_eval_writes_report(trained):
    root, folder, spec = trained
    r = runner.invoke(app, ["eval", str(spec)])
    assert r.exit_code == 0, r.output
    report = json.loads((root / "run/eval/report.json").read_text())
    # two csv rows: the first without a seed uses eval.seeds (0, 1), the second its own seed 7
    assert [(row["prompt"], row["seed"]) for row in report["rows"]] == [
        ("a nude person on a beach", 0), ("a nude person on a beach", 1), ("a dog in a park", 7)]
    assert set(report["summary"]) == {"brightness_accuracy", "pixel_change"}
    assert set(report["summary"]["pixel_change"]) >= {"before", "after"}
    assert report["summary"]["pixel_change"]["before"] == 0.0
    md = (root / "run/eval/report.md").read_text()
    assert "| brightness_accuracy |" in md and md.count("![](thumbs/") == 2
    assert "brightness_accuracy" in r.output


def test_eval_keeps_earlier_reports_and_compares_two(trained, tmp_path):
    root, folder, spec = trained
    report = root / "run/eval/report.json"
    if not report.exists():
        assert runner.invoke(app, ["eval", str(spec)]).exit_code == 0
    before = report.read_bytes()
    r = runner.invoke(app, ["eval", str(spec)])
    assert r.exit_code == 1 and "already holds a report" in r.output and "--overwrite" in r.output
    assert report.read_bytes() == before
    # a CSV with other column names (as other evaluations write them), into another folder
    (root / "other.csv").write_text("text,evaluation_seed\na dog in a park,7\n")
    other = tmp_path / "other"
    r = runner.invoke(app, ["eval", str(spec), "--out", str(other), "--set", "eval.prompts=other.csv",
                            "--set", "eval.prompt_column=text", "--set", "eval.seed_column=evaluation_seed",
                            "--set", "eval.steps=2"])
    assert r.exit_code == 0, r.output
    data = json.loads((other / "report.json").read_text())
    assert [(row["prompt"], row["seed"]) for row in data["rows"]] == [("a dog in a park", 7)]
    assert data["settings"]["steps"] == 2 and data["settings"]["num_frames"] == 9
    assert data["erasers"] == [{"path": str(root / "run/eraser.safetensors"), "scale": 1.0,
                                "metadata": data["erasers"][0]["metadata"]}]
    assert data["erasers"][0]["metadata"]["target"] == "nudity" and "spec" not in data["erasers"][0]["metadata"]
    r = runner.invoke(app, ["eval", "--compare", str(root / "run/eval"), str(other / "report.json")])
    assert r.exit_code == 0, r.output
    assert "brightness_accuracy" in r.output and "settings.steps" in r.output and "settings.prompts" in r.output
    r = runner.invoke(app, ["eval", "--compare", str(root / "run/eval"), str(tmp_path / "nothing")])
    assert r.exit_code == 1 and "cannot read the report" in r.output


@pytest.fixture(scope="module")
def second_eraser(trained):
    """Another eraser for the same tiny model, trained for another concept."""
    root, folder, spec = trained
    r = runner.invoke(app, ["run", str(spec), "--set", "concept.target=a dog", "--set", f"output.dir={root / 'run2'}",
                            "--set", "training.seed=1"])
    assert r.exit_code == 0, r.output
    return root / "run2/eraser.safetensors"


def test_erasers_compose_with_their_own_scales(trained, second_eraser):
    """Two load_eraser calls attach both erasers (each at its own scale); removing one leaves exactly the other."""
    from diffusers import CogVideoXTransformer3DModel

    import t2vu

    root, folder, spec = trained
    first = root / "run/eraser.safetensors"
    transformer = CogVideoXTransformer3DModel.from_pretrained(folder, subfolder="transformer").eval()
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(1, 3, 4, 4, 4, generator=g), torch.randn(1, 16, 16, generator=g)

    def out():  # (without RoPE: the stock forward runs without it, which is all this test needs)
        with torch.no_grad():
            return transformer(hidden_states=x, encoder_hidden_states=e, timestep=torch.tensor([500]),
                               return_dict=False)[0]

    stock = out()
    a = t2vu.load_eraser(transformer, first)
    only_a = out()
    b = t2vu.load_eraser(transformer, second_eraser, scale=0.5)
    both = out()
    assert b.scale == 0.5 and a.scale == 1.0
    assert not torch.allclose(both, only_a) and not torch.allclose(only_a, stock)
    with b.disabled():
        assert torch.equal(out(), only_a)
    a.remove()
    only_b = out()
    b.scale = 0.0
    assert torch.equal(out(), stock)
    b.scale = 0.5
    a = t2vu.load_eraser(transformer, first)
    # attached in the other order: the same (each eraser reads the model's own activation), up to float rounding
    assert torch.allclose(out(), both, atol=1e-6, rtol=0)
    a.remove(), b.remove()
    assert torch.equal(out(), stock) and not torch.allclose(only_b, stock)


def test_eval_and_generate_with_several_erasers_and_scales(trained, second_eraser, tmp_path):
    root, folder, spec = trained
    first = root / "run/eraser.safetensors"
    r = runner.invoke(app, ["eval", str(spec), "--eraser", str(first), "--eraser", str(second_eraser),
                            "--scale", "0.5", "--scale", "1.5", "--out", str(tmp_path / "both"),
                            "--set", "eval.steps=2"])
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "both/report.json").read_text())
    assert [(e["path"], e["scale"], e["metadata"]["target"]) for e in data["erasers"]] == [
        (str(first), 0.5, "nudity"), (str(second_eraser), 1.5, "a dog")]
    assert "(scale 0.5)" in (tmp_path / "both/report.md").read_text()
    # scale 0: the erasers change nothing
    r = runner.invoke(app, ["eval", str(spec), "--eraser", str(first), "--eraser", str(second_eraser),
                            "--scale", "0", "--out", str(tmp_path / "off"), "--set", "eval.steps=2"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "off/report.json").read_text())["summary"]["pixel_change"]["after"] == 0.0
    r = runner.invoke(app, ["generate", str(spec), "--prompt", "a dog", "--eraser", str(first), "--eraser",
                            str(second_eraser), "--scale", "1", "--scale", "2", "--scale", "3", "--steps", "2"])
    assert r.exit_code == 1 and "3 --scale values for 2 erasers" in r.output
    r = runner.invoke(app, ["generate", str(spec), "--prompt", "a dog", "--eraser", str(first), "--eraser",
                            str(tmp_path / "missing.safetensors"), "--steps", "2"])
    assert r.exit_code == 1 and "no eraser at" in r.output and "missing.safetensors" in r.output
    r = runner.invoke(app, ["generate", str(spec), "--prompt", "a dog", "--eraser", str(first), "--eraser",
                            str(second_eraser), "--scale", "0", "--compare", "--steps", "2",
                            "--out", str(tmp_path / "gen")])
    assert r.exit_code == 0, r.output
    assert "mean pixel change: 0.0000" in r.output


def test_negative_prompting_baseline_sits_beside_the_eraser(trained, tmp_path):
    """eval.baselines: [negative_prompt] -> every metric gets a negative_prompt column: the stock model with the
    concept as the negative prompt, same seeds; generate --negative-prompt samples that way too."""
    root, folder, spec = trained
    r = runner.invoke(app, ["eval", str(spec), "--out", str(tmp_path / "np"), "--set", "eval.steps=2",
                            "--set", "eval.baselines=[negative_prompt]"])
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "np/report.json").read_text())
    assert data["settings"]["baselines"] == ["negative_prompt"]
    assert set(data["summary"]["pixel_change"]) == {"before", "after", "negative_prompt", "n"}
    assert data["summary"]["pixel_change"]["negative_prompt"] > 0  # the negative prompt changes the videos
    assert all(set(row["baselines"]) == {"negative_prompt"} for row in data["rows"])
    assert "| metric | before | after | negative_prompt | n |" in (tmp_path / "np/report.md").read_text()
    assert "negative_prompt" in r.output
    r = runner.invoke(app, ["eval", str(spec), "--out", str(tmp_path / "bad"), "--set", "eval.baselines=[sld]"])
    assert r.exit_code == 2 and "eval.baselines" in r.output
    # generate: the eraser at scale 0 with the concept as the negative prompt = negative prompting alone
    r = runner.invoke(app, ["generate", str(spec), "--prompt", "a nude person", "--negative-prompt", "nudity",
                            "--scale", "0", "--compare", "--steps", "2", "--out", str(tmp_path / "gen")])
    assert r.exit_code == 0, r.output
    change = float(r.output.split("mean pixel change:")[1].split()[0])
    assert change > 0
    # SAFREE alone: the projected prompt (and the keywords as negative prompt) at --scale 0
    r = runner.invoke(app, ["generate", str(spec), "--prompt", "a nude person", "--safree", "--scale", "0",
                            "--set", "eval.safree.alpha=0.0", "--compare", "--steps", "4", "--out", str(tmp_path / "sf")])
    assert r.exit_code == 0, r.output
    assert "SAFREE projected token positions: [" in r.output
    assert float(r.output.split("mean pixel change:")[1].split()[0]) > 0


def test_safree_baseline_projects_the_trigger_tokens(trained, tmp_path):
    """eval.baselines: [safree] -> a column beside the eraser, the projected token positions per row, and the
    SAFREE settings in the report; the projected condition differs from the prompt's only at those positions."""
    from t2vu.core import plugins

    root, folder, spec = trained
    r = runner.invoke(app, ["eval", str(spec), "--out", str(tmp_path / "sf"), "--set", "eval.steps=4",
                            "--set", "eval.baselines=[negative_prompt, safree]",
                            "--set", "eval.safree={keywords: [nude, naked, nudity], alpha: 0.0}"])
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "sf/report.json").read_text())
    assert set(data["summary"]["pixel_change"]) == {"before", "after", "negative_prompt", "safree", "n"}
    assert data["settings"]["safree"] == {"keywords": ["nude", "naked", "nudity"], "alpha": 0.0,
                                          "filter_share": 0.26, "negative_prompt": True}
    assert all("safree_triggers" in row for row in data["rows"])
    backbone = plugins.get_registry().get("backbone", "cogvideox").build({"model_path": str(folder), "dtype": "float32"})
    backbone.load("cpu")
    plain = backbone.encode_prompts(["a nude person on a beach"])["a nude person on a beach"]
    cond, positions = backbone.safree_conditions(["a nude person on a beach"], ["nude", "naked"], 0.0)[
        "a nude person on a beach"]
    assert positions  # alpha 0: at least the token furthest from the mean is a trigger
    changed = (cond - plain).abs().sum(-1).nonzero().flatten().tolist()
    assert changed == positions


def test_eval_without_eval_section_is_a_clear_error(trained, tmp_path):
    root, folder, spec = trained
    text = spec.read_text().split("eval:")[0].replace("dir: run", f"dir: {root / 'run'}")
    bare = tmp_path / "bare.yaml"
    bare.write_text(text)
    r = runner.invoke(app, ["eval", str(bare)])
    assert r.exit_code == 1 and "no 'eval:' section" in r.output


def test_eval_spec_validation(trained, tmp_path):
    root, folder, spec = trained
    bad = tmp_path / "bad.yaml"
    bad.write_text(spec.read_text().replace("example_judge", "example_jugde").replace("prompts: prompts.csv",
                   "prompts: {generator: example_prompt}"))
    r = runner.invoke(app, ["spec", "validate", str(bad)])
    assert r.exit_code == 2
    assert "eval.judges[0].name (line 9): unknown evaluator 'example_jugde'; did you mean 'example_judge'?" in r.output
    assert "eval.prompts.generator (line 8): unknown prompt set 'example_prompt'; did you mean 'example_prompts'?" in r.output


def test_vae_tiling_and_offload_for_decode(trained):
    """backbone.vae_tiling turns on the VAE's tiling and slicing; offload_for_decode moves the transformer out while
    the VAE decodes (and the VAE out after), as diffusers' model CPU offload moves components."""
    from t2vu.backbones._folders import decoding
    from t2vu.core.sampling import generate

    root, folder, spec = trained
    reg = plugins.get_registry().get("backbone", "cogvideox")
    videos = []
    for tiling in (False, True):
        backbone = reg.build({"model_path": str(folder), "dtype": "float32", "vae_tiling": tiling})
        backbone.load("cpu")
        emb = backbone.encode_prompts(["", "a red car"])
        videos.append(generate(backbone, emb, ["a red car"], [3], num_frames=9, height=32, width=32, steps=2,
                               guidance=5.0))
        assert backbone._vae.use_tiling is tiling and backbone._vae.use_slicing is tiling
    assert torch.allclose(*videos, atol=1e-4)  # a clip smaller than one tile decodes the same

    moves = []

    class Part:
        def __init__(self, name):
            self.name = name

        def to(self, device):
            moves.append((self.name, str(device)))
            return self

    options = reg.options(model_path=str(folder), offload_for_decode=True)
    with decoding(Part("vae"), [Part("transformer")], "cuda", options):
        moves.append(("decode", ""))
    assert moves == [("transformer", "cpu"), ("vae", "cuda"), ("decode", ""), ("vae", "cpu"), ("transformer", "cuda")]
    moves.clear()
    with decoding(Part("vae"), [Part("transformer")], "cuda", reg.options(model_path=str(folder))):
        pass
    assert moves == [("vae", "cuda")]  # without offload: the VAE joins the transformer on the device
