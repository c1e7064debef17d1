"""Wan 2.2 A14B: two experts (``transformer`` for high noise, ``transformer_2`` for low noise, switched at
``boundary_ratio``), on a tiny two-expert folder built in-process: erasers for both in one file, each trained on
the timesteps its expert serves; the sampler equals the stock WanPipeline; load_eraser attaches both parts."""

import pytest
import torch
from typer.testing import CliRunner

from t2vu.core.errors import T2VUError

torch.set_num_threads(1)
runner = CliRunner()

PROMPT = "a nude person on a beach"
TEXT_LEN = 16
BOUNDARY = 0.875  # as Wan 2.2 A14B: transformer for t >= 875, transformer_2 below
BT = BOUNDARY * 1000
SPEC = """\
backbone: {{name: wan, model_path: {model}, dtype: float32, device: cpu, max_text_length: 16{extra}}}
eraser: {{name: adapter, rank: 4, sites: [cross]}}
concept:
  target: nudity
  prompts: [a nude person on a beach, a nude woman walking]
preserved: {{source: list, concepts: [a dog in a park]}}
losses:
  - {{name: negative_guidance, weight: 1.0, eta: 3.0}}
  - {{name: preservation, weight: 1.0}}
  - {{name: localization, weight: 0.5, threshold: 0.2}}
training: {{steps: {steps}, batch_size: 2, learning_rate: 1.0e-2, lr_scheduler: constant, num_frames: 9, height: 32,
            width: 32, seed: 0, states: {states}, sample_steps: 4}}
output: {{dir: {out}}}
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from tiny_wan import build_tiny_wan

    return build_tiny_wan(tmp_path_factory.mktemp("wan22") / "Wan22-tiny", boundary_ratio=BOUNDARY)


def make(folder, **kw):
    from t2vu.core import plugins

    return plugins.get_registry().get("backbone", "wan").build(
        {"model_path": str(folder), "dtype": "float32", "max_text_length": TEXT_LEN, **kw})


def noise(b=1, seed=0):
    return torch.randn((b, 4, 3, 4, 4), generator=torch.Generator().manual_seed(seed))


def write(tmp_path, folder, out="run", steps=3, states="noise", extra=""):
    path = tmp_path / f"{out}.yaml"
    path.write_text(SPEC.format(model=folder, out=tmp_path / out, steps=steps, states=states, extra=extra))
    return path


def test_preflight_names_both_experts_sites_and_config(folder):
    from t2vu.backbones.wan import WanOptions

    facts = WanOptions(model_path=str(folder)).preflight([])
    assert not facts.problems
    names = [s.name for s in facts.sites]
    assert names[:2] == ["transformer.blocks.0.attn1", "transformer.blocks.0.attn2"]
    assert "transformer_2.blocks.1.attn2" in names and len(names) == 8
    assert {s.attention for s in facts.sites} == {"blocks.0.attn1", "blocks.0.attn2", "blocks.1.attn1", "blocks.1.attn2"}
    assert set(facts.config) == {"transformer", "transformer_2", "boundary_ratio"}
    bb = make(folder)
    assert bb.config == facts.config and bb.expert_count == 2  # the same config before and after loading
    bb.load("cpu")
    assert bb.config == facts.config


def test_each_timestep_runs_its_expert_and_erasers_follow(folder):
    from diffusers import WanTransformer3DModel

    from t2vu.plugins.adapter_model import Adapter, EraserSet

    bb = make(folder)
    bb.load("cpu")
    conds = bb.encode_prompts([PROMPT])
    cond = bb.collate([conds[PROMPT]])
    high, low = WanTransformer3DModel.from_pretrained(folder, subfolder="transformer").eval(), \
        WanTransformer3DModel.from_pretrained(folder, subfolder="transformer_2").eval()
    x = noise()
    with torch.no_grad():
        for t, stock in ((900.0, high), (874.0, low), (875.0, high)):
            ref = stock(hidden_states=x, timestep=torch.tensor([t]), encoder_hidden_states=cond.embeds,
                        return_dict=False)[0]
            assert torch.equal(bb.predict(x, torch.tensor([t]), cond), ref), t
    # an eraser on the low-noise expert's sites acts on low-noise timesteps only
    sites = [s for s in bb.sites() if s.name.startswith("transformer_2.")]
    erasers = EraserSet({s.name: Adapter(s.dim, 4) for s in sites})
    for p in erasers.parameters():
        torch.nn.init.normal_(p, std=0.3)
    erasers.attach(sites)
    try:
        with torch.no_grad():
            assert torch.equal(bb.predict(x, torch.tensor([900.0]), cond),
                               high(hidden_states=x, timestep=torch.tensor([900.0]), encoder_hidden_states=cond.embeds,
                                    return_dict=False)[0])
            low_ref = low(hidden_states=x, timestep=torch.tensor([300.0]), encoder_hidden_states=cond.embeds,
                          return_dict=False)[0]
            assert not torch.allclose(bb.predict(x, torch.tensor([300.0]), cond), low_ref, atol=1e-3)
        with pytest.raises(T2VUError, match="mixes timesteps of both Wan 2.2 experts"):
            bb.predict(torch.cat([x, x]), torch.tensor([900.0, 300.0]), bb.collate([conds[PROMPT]] * 2))
    finally:
        erasers.detach()


def test_training_timesteps_keep_one_expert_per_step_and_the_shifted_distribution(folder):
    bb = make(folder)
    g = torch.Generator().manual_seed(0)
    draws = [bb.sample_timesteps(4, g) for _ in range(4000)]
    assert all(bool((d >= BT).all()) or bool((d < BT).all()) for d in draws)
    t = torch.cat(draws)
    # the marginal distribution is the scheduler's shifted uniform: sigma = s u / (1 + (s - 1) u), s = 3
    s, sigma = bb.shift, t / 1000
    u = sigma / (s - (s - 1) * sigma)
    hist = torch.histc(u, bins=10, min=0, max=1) / len(u)
    assert torch.allclose(hist, torch.full((10,), 0.1), atol=0.015), hist


@pytest.mark.parametrize("guidance_2", [None, 2.0])
def test_sampler_equals_the_two_expert_pipeline(folder, guidance_2):
    from diffusers import WanPipeline

    bb = make(folder, **({"guidance_2": guidance_2} if guidance_2 else {}))
    bb.load("cpu")
    conds = bb.encode_prompts(["", PROMPT])
    cond, uncond = bb.collate([conds[PROMPT]]), bb.collate([conds[""]])
    steps, scale, x0 = 4, 5.0, noise(1, 6)
    pipe = WanPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(PROMPT, latents=x0, num_inference_steps=steps, guidance_scale=scale, guidance_scale_2=guidance_2,
               output_type="latent", max_sequence_length=TEXT_LEN, height=32, width=32, num_frames=9).frames
    s, x = bb.sampler(steps), x0
    seen = []
    with torch.no_grad():
        for t in s.timesteps:
            seen.append(float(t) >= BT)
            out = bb.guided(x, t.repeat(1), cond, uncond, s.guidance_scale(scale, t))
            x = s.step(out.prediction, t, x)
    assert any(seen) and not all(seen)  # the trajectory crosses the boundary: both experts ran
    assert torch.allclose(x, ref, atol=1e-5)


def test_run_trains_both_experts_and_load_eraser_on_the_stock_pipeline(tmp_path, folder):
    from diffusers import WanPipeline

    import t2vu
    from t2vu.core.cli import app
    from t2vu.core.eraser_file import read_eraser

    r = runner.invoke(app, ["run", str(write(tmp_path, folder, steps=8))])
    assert r.exit_code == 0, r.output
    f = read_eraser(tmp_path / "run" / "eraser.safetensors")
    assert f.sites == ["transformer.blocks.0.attn2", "transformer.blocks.1.attn2", "transformer_2.blocks.0.attn2",
                       "transformer_2.blocks.1.attn2"]
    # both experts' erasers learned (8 steps with batch 2: both experts drawn; a step trains one expert)
    for prefix in ("transformer.", "transformer_2."):
        assert any(v.abs().sum() > 0 for k, v in f.tensors.items() if k.startswith(prefix) and ".up." in k), prefix
    pipe = WanPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt=PROMPT, num_inference_steps=4, guidance_scale=5.0, output_type="latent",
                max_sequence_length=TEXT_LEN, height=32, width=32, num_frames=9)
    stock = pipe(latents=noise(1, 3), **call).frames
    with t2vu.load_eraser(pipe, tmp_path / "run" / "eraser.safetensors") as handle:
        assert len(handle.erasers.site_names) == 4
        erased = pipe(latents=noise(1, 3), **call).frames
    assert not torch.allclose(erased, stock, atol=1e-4)
    assert torch.equal(pipe(latents=noise(1, 3), **call).frames, stock)  # removed: stock again
    # the two-expert eraser refuses a Wan 2.1 transformer (one expert): another config
    with pytest.raises(T2VUError, match="different wan transformer"):
        t2vu.load_eraser(pipe.transformer, tmp_path / "run" / "eraser.safetensors")


def test_trajectory_states_on_two_experts_are_refused_before_loading(tmp_path, folder):
    from t2vu.core.cli import app

    spec = write(tmp_path, folder, out="traj", steps=2, states="trajectory")
    for command in (["spec", "validate", str(spec)], ["run", str(spec)], ["run", str(spec), "--dry-run"]):
        r = runner.invoke(app, command)
        # a trajectory's states straddle the boundary: one step would need both experts
        assert r.exit_code == 2, (command, r.output)
        assert "training.states" in r.output and "use training.states: noise" in r.output
    assert not (tmp_path / "traj").exists()


def test_generate_and_eval_run_both_experts(tmp_path, folder):
    """t2vu generate on the two-expert model equals the stock pipeline with the eraser loaded (same generator)."""
    from diffusers import WanPipeline

    import t2vu
    from t2vu.core.cli import app

    spec = write(tmp_path, folder, out="gen", steps=2)
    assert runner.invoke(app, ["run", str(spec)]).exit_code == 0
    from t2vu.core import plugins
    from t2vu.core.evaluate import load_for_generation
    from t2vu.core.sampling import generate
    from t2vu.core.spec import load_spec

    resolved = load_spec(spec, plugins.get_registry())
    eraser = tmp_path / "gen" / "eraser.safetensors"
    backbone, (handle,), conds = load_for_generation(resolved, [(eraser, 1.0)], [PROMPT])
    ours = generate(backbone, conds, [PROMPT], [5], num_frames=9, height=32, width=32, steps=4, guidance=5.0)
    handle.remove()
    pipe = WanPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    t2vu.load_eraser(pipe, eraser)
    ref = pipe(PROMPT, num_inference_steps=4, guidance_scale=5.0, output_type="pt", max_sequence_length=TEXT_LEN,
               height=32, width=32, num_frames=9, generator=torch.Generator().manual_seed(5)).frames
    assert torch.allclose(ours, ref, atol=1e-4)
