"""Wan 2.1 backbone against the stock diffusers WanPipeline, on a tiny folder built in-process; and through the
engine (`t2vu run`, passes per step, load_eraser on the stock pipeline, `spec init`)."""

import json

import pytest
import torch
from typer.testing import CliRunner

from t2vu.core.errors import T2VUError
from t2vu.core.protocols import Backbone
from t2vu.plugins.adapter_model import Adapter, EraserSet

torch.set_num_threads(1)
runner = CliRunner()

PROMPT = "a nude person on a beach"
SHAPE = (9, 32, 32)  # frames, height, width -> latents [4, 3, 4, 4], 3 frames x 2x2 tokens
TEXT_LEN = 16
SPEC = """\
backbone: {{name: wan, model_path: {model}, dtype: float32, device: cpu, max_text_length: 16}}
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
            width: 32, seed: 0, states: {states}, sample_steps: 2}}
output: {{dir: {out}}}
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from tiny_wan import build_tiny_wan

    return build_tiny_wan(tmp_path_factory.mktemp("wan") / "Wan-tiny")


def make(folder, **kw):
    from t2vu.core import plugins

    return plugins.get_registry().get("backbone", "wan").build(
        {"model_path": str(folder), "dtype": "float32", "max_text_length": TEXT_LEN, **kw})


@pytest.fixture(scope="module")
def loaded(folder):
    bb = make(folder)
    bb.load("cpu")
    return bb, bb.encode_prompts(["", PROMPT, "a dog in a park", "nudity"])


@pytest.fixture(scope="module")
def pipe(folder):
    from diffusers import WanPipeline

    p = WanPipeline.from_pretrained(folder)
    p.set_progress_bar_config(disable=True)
    return p


def noise(b=1, seed=0):
    return torch.randn((b, 4, 3, 4, 4), generator=torch.Generator().manual_seed(seed))


def write(tmp_path, folder, out="run", steps=2, states="noise", sites="[cross]"):
    path = tmp_path / f"{out}.yaml"
    path.write_text(SPEC.format(model=folder, out=out, steps=steps, states=states, sites=sites))
    return path


def test_registration_options_and_folder_checks(tmp_path, folder):
    from t2vu.backbones.wan import WanOptions
    from t2vu.core.plugins import PluginManager
    from t2vu.core.preflight import Clip

    comp = PluginManager(builtins=("t2vu.backbones.wan",), entry_points=False).registry.get("backbone", "wan")
    assert comp.implementation == "t2vu.backbones.wan_model:WanBackbone" and comp.options is WanOptions
    d = WanOptions.defaults
    assert (d.num_frames, d.height, d.width, d.steps, d.guidance, d.fps) == (81, 480, 832, 50, 5.0, 16)
    assert WanOptions.default_sites == "cross" and set(WanOptions.site_presets) == {"cross", "self", "all"}
    opts = WanOptions(model_path=str(folder))
    assert (opts.max_text_length, opts.negative_prompt) == (512, "")
    assert all(f.description for f in WanOptions.model_fields.values())
    bb = make(folder)
    assert bb.name == "wan" and bb.transformer is None and isinstance(bb, Backbone) and bb.upstream is None
    assert (bb.vae_scale_temporal, bb.vae_scale_spatial, bb.shift) == (4, 8, 3.0)
    facts = WanOptions(model_path=str(folder)).preflight([Clip(9, 32, 32), Clip(10, 40, 32)], decode=True)
    assert [s.name for s in facts.sites] == ["blocks.0.attn1", "blocks.0.attn2", "blocks.1.attn1", "blocks.1.attn2"]
    assert len(facts.problems) == 2 and facts.config["num_layers"] == 2
    with pytest.raises(T2VUError, match="does not exist. Download the model first.*Wan-AI/Wan2.1-T2V"):
        make(tmp_path / "nope")
    import shutil

    two = tmp_path / "two"
    shutil.copytree(folder, two)
    index = json.loads((two / "model_index.json").read_text())
    (two / "model_index.json").write_text(json.dumps({**index, "boundary_ratio": 0.875}))
    # a boundary without a second expert (or the reverse) is not a pipeline WanPipeline writes
    with pytest.raises(T2VUError, match="boundary_ratio but no transformer_2"):
        make(two)
    assert "no transformer_2" in str(WanOptions(model_path=str(two)).preflight([]).problems)
    (two / "model_index.json").write_text(json.dumps({**index, "transformer_2": ["diffusers", "WanTransformer3DModel"],
                                                      "boundary_ratio": 0.875}))
    with pytest.raises(T2VUError, match="no transformer_2/config.json"):
        make(two)
    (two / "model_index.json").write_text(json.dumps({**index, "_class_name": "WanImageToVideoPipeline"}))
    with pytest.raises(T2VUError, match="not text-to-video"):
        make(two)


def test_encode_prompts_equals_pipeline(folder, pipe, monkeypatch):
    import weakref

    import transformers

    kept = []
    original = transformers.UMT5EncoderModel.from_pretrained.__func__

    def spy(klass, *a, **k):
        model = original(klass, *a, **k)
        kept.append(weakref.ref(model))
        return model

    monkeypatch.setattr(transformers.UMT5EncoderModel, "from_pretrained", classmethod(spy))
    prompts = ["", PROMPT, "a  dog in a park ", PROMPT, "A Nude woman &amp; a man swimming in a lake at sunset"]
    unique = list(dict.fromkeys(prompts))
    bb = make(folder)
    conds = bb.encode_prompts(prompts)
    assert list(conds) == unique and len(kept) == 1 and kept[0]() is None  # the encoder left memory
    with torch.no_grad():
        ref = pipe.encode_prompt(unique, do_classifier_free_guidance=False, max_sequence_length=TEXT_LEN,
                                 device="cpu")[0]
    batch = bb.collate([conds[p] for p in unique])
    assert batch.embeds.shape == (len(unique), TEXT_LEN, 16) and torch.equal(batch.embeds, ref)
    for i, p in enumerate(unique):  # zero beyond each prompt's real tokens, as the pipeline pads
        n = int(conds[p].length)
        assert n >= 1 and (ref[i, n:] == 0).all() and (ref[i, n - 1] != 0).any()


def test_concept_token_mask(loaded):
    bb, conds = loaded
    tok = bb.tokenizer()

    def picked(prompt, concept):
        m = bb.concept_token_mask(prompt, concept)
        assert m.dtype == torch.bool and m.shape == (TEXT_LEN,)
        enc = bb._tokenize([prompt], return_offsets_mapping=True)
        assert not (m & ~enc.attention_mask[0].bool()).any()  # never padding
        return m, enc

    m, enc = picked(PROMPT, "nude")
    pieces = tok.convert_ids_to_tokens(enc.input_ids[0][m].tolist())
    assert "".join(pieces).replace("\u2581", "") == "nude"
    text = bb.clean(PROMPT)
    spans = [enc.offset_mapping[0][j].tolist() for j in m.nonzero().flatten()]
    assert text[spans[0][0]:spans[-1][1]].strip("\u2581 ") == "nude"
    assert torch.equal(picked(PROMPT, "NUDE ")[0], m)  # case-insensitive, stripped
    assert picked("a nude man and a nude woman", "nude")[0].sum() == 2 * m.sum()
    # a paraphrase: every real token of the prompt except EOS
    fallback, enc = picked("a dog in a park", "nudity")
    n = int(conds["a dog in a park"].length)
    assert torch.equal(fallback, torch.arange(TEXT_LEN) < n - 1)
    assert tok.convert_ids_to_tokens([int(enc.input_ids[0][n - 1])]) == [tok.eos_token]
    assert not picked("", "nudity")[0].any()


def test_concept_token_mask_matches_whole_words_only(loaded):
    """"red" marks the tokens of the word red, not the "re"/"d" pieces of hundred / covered / reddish (the tiny
    vocabulary splits those words so); any case; multi-word concepts; no whole-word hit: the fallback."""
    bb, _ = loaded

    def spelled(prompt, mask):  # the cleaned text the masked tokens cover, first to last, stripped
        offsets = bb._tokenize([prompt], return_offsets_mapping=True)["offset_mapping"][0][mask].tolist()
        return bb.clean(prompt)[min(a for a, _ in offsets):max(b for _, b in offsets)].strip()

    for prompt in ("a hundred red cars", "covered in red", "red hundred"):
        m = bb.concept_token_mask(prompt, "red")
        assert 0 < m.sum() < bb.concept_token_mask(prompt, "nudity").sum() and spelled(prompt, m) == "red", prompt
    up = bb.concept_token_mask("a Red car", "red")
    assert spelled("a Red car", up) == "Red" and torch.equal(bb.concept_token_mask("a Red car", "RED"), up)
    assert bb.concept_token_mask("red hundred red", "red").sum() == 2 * bb.concept_token_mask("a red", "red").sum()
    for prompt in ("a reddish car", "a hundred cars"):  # no whole-word "red": every real token of the prompt
        assert torch.equal(bb.concept_token_mask(prompt, "red"), bb.concept_token_mask(prompt, "nudity")), prompt
    for prompt in ("a van gogh tree", "a Van  Gogh tree"):
        vg = bb.concept_token_mask(prompt, "van gogh")
        assert " ".join(spelled(prompt, vg).lower().split()) == "van gogh", prompt
    assert torch.equal(bb.concept_token_mask("a vangogh tree", "van gogh"),
                       bb.concept_token_mask("a vangogh tree", "nudity"))


def test_latents_timesteps_and_noise(loaded, pipe):
    bb, _ = loaded
    assert bb.latent_shape(*SHAPE) == (4, 3, 4, 4) and bb.token_grid((4, 3, 4, 4)) == (3, 4)
    assert bb.latent_shape(81, 480, 832) == (4, 21, 60, 104)
    with pytest.raises(T2VUError, match=r"multiples of 16.*height 40 \(try 32 or 48\)"):
        bb.latent_shape(9, 40, 32)
    with pytest.raises(T2VUError, match=r"num_frames = 4k\+1.*got 10, try 9 or 13"):
        bb.latent_shape(10, 32, 32)
    t = bb.sample_timesteps(2000, torch.Generator().manual_seed(3))
    u = torch.rand(2000, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(t, 1000 * 3 * u / (1 + 2 * u)) and 0 < t.min() and t.max() < 1000
    s = bb.sampler(4)
    ref = type(pipe.scheduler).from_config(pipe.scheduler.config)
    ref.set_timesteps(4)
    assert torch.equal(s.timesteps, ref.timesteps)
    # add_noise is the scheduler's own at its sigmas (UniPC rounds its timesteps to integers: t = 1000 sigma
    # is the unrounded one)
    x0, eps = noise(4, 1), noise(4, 2)
    assert torch.allclose(bb.add_noise(x0, eps, 1000 * ref.sigmas[:4].float()),
                          ref.add_noise(x0, eps, ref.timesteps), atol=1e-5)


def test_sites_and_erasers_off_equal_stock(loaded):
    bb, conds = loaded
    sites = bb.sites()
    assert [s.name for s in sites] == ["blocks.0.attn1", "blocks.0.attn2", "blocks.1.attn1", "blocks.1.attn2"]
    assert all(s.dim == 16 and s.stream == "video" and s.attention == s.name for s in sites)
    x, t = noise(2, 4), torch.tensor([700.0, 300.0])
    cond = bb.collate([conds[PROMPT], conds["a dog in a park"]])
    with torch.no_grad():
        base = bb.transformer(hidden_states=x, timestep=t, encoder_hidden_states=cond.embeds, return_dict=False)[0]
    erasers = EraserSet({s.name: Adapter(s.dim, 4) for s in sites}).attach(sites)
    try:
        calls = bb.forward_calls
        with torch.no_grad():
            assert torch.equal(bb.predict(x, t, cond), base)
            torch.manual_seed(0)
            for p in erasers.parameters():
                torch.nn.init.normal_(p, std=0.3)
            with erasers.disabled():
                assert torch.equal(bb.predict(x, t, cond), base)
            assert not torch.allclose(bb.predict(x, t, cond), base, atol=1e-3)
        assert bb.forward_calls == calls + 3
        bb.enable_gradient_checkpointing()
        bb.predict(x, t, cond).square().mean().backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in erasers.parameters())
    finally:
        bb.transformer.disable_gradient_checkpointing()
        erasers.detach()


@pytest.mark.parametrize("negative", ["", "blurry, static"])
def test_sampler_equals_pipeline(folder, negative):
    from diffusers import WanPipeline

    bb = make(folder, negative_prompt=negative)
    bb.load("cpu")
    conds = bb.encode_prompts(["", PROMPT])
    cond, uncond = bb.collate([conds[PROMPT]]), bb.collate([conds[""]])
    steps, scale, x0 = 3, 5.0, noise(1, 6)
    pipe = WanPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(PROMPT, negative_prompt=negative or None, latents=x0, num_inference_steps=steps,
               guidance_scale=scale, output_type="latent", max_sequence_length=TEXT_LEN, height=32, width=32,
               num_frames=9).frames
    s, x = bb.sampler(steps), x0
    with torch.no_grad():
        for t in s.timesteps:
            out = bb.guided(x, t.repeat(1), cond, uncond, scale)
            x = s.step(out.prediction, t, x)
    assert bb.forward_calls == steps  # both CFG passes in one batched forward
    assert set(out.frozen) == ({"uncond", "cond"} if not negative else {"cond"})
    assert torch.allclose(x, ref, atol=1e-4, rtol=1e-5)
    if not negative:
        with torch.no_grad():
            xx, tt = noise(1, 9), torch.tensor([500.0])
            out = bb.guided(xx, tt, cond, uncond, scale)
            assert torch.allclose(out.frozen["uncond"], bb.predict(xx, tt, uncond), atol=1e-5)
            v_u, v_c = out.frozen["uncond"], out.frozen["cond"]
            assert torch.equal(out.prediction, v_u + scale * (v_c - v_u))
        video = pipe(PROMPT, latents=x0, num_inference_steps=steps, guidance_scale=scale, output_type="pt",
                     max_sequence_length=TEXT_LEN, height=32, width=32, num_frames=9).frames
        assert torch.allclose(bb.decode(ref), video, atol=1e-6) and bb.decode(ref).shape == (1, 9, 3, 32, 32)


def test_capture_attention_matches_naive_softmax(loaded, monkeypatch):
    import diffusers.models.transformers.transformer_wan as wan

    bb, conds = loaded
    seen = []
    original = wan.dispatch_attention_fn

    def recording(query, key, value, attn_mask=None, **kw):
        q, k = query.transpose(1, 2).double(), key.transpose(1, 2).double()
        seen.append((q @ k.transpose(-1, -2) / q.size(-1) ** 0.5).softmax(-1))
        return original(query, key, value, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(wan, "dispatch_attention_fn", recording)
    prompts = [PROMPT, "a dog in a park", "nudity"]
    cond = bb.collate([conds[p] for p in prompts])
    x, t = noise(3, 10), torch.tensor([800.0, 500.0, 200.0])
    concept = torch.stack([bb.concept_token_mask(PROMPT, "nude"), torch.zeros(TEXT_LEN, dtype=torch.bool),
                           bb.concept_token_mask("nudity", "nudity")])
    with torch.no_grad():
        base = bb.predict(x, t, cond)
        seen.clear()
        with bb.capture_attention(concept, None, bb.latent_shape(*SHAPE)) as store:
            out = bb.predict(x, t, cond)
        everything = torch.ones(3, TEXT_LEN, dtype=torch.bool)
        with bb.capture_attention(everything, ["blocks.1.attn1"], None) as padded:
            bb.predict(x, t, cond)
    assert torch.equal(out, base)
    assert list(store) == bb.attention_modules() == ["blocks.0.attn2", "blocks.1.attn2"]
    cross = seen[1::2][:2]  # attn1, attn2 per block: the video->text probabilities [B, H, N_video, L]
    assert all(p.shape == (3, 2, 12, TEXT_LEN) for p in cross)
    rows = torch.tensor([0, 2])
    for name, probs in zip(store, cross):
        assert store[name].shape == (2, 3, 4)
        expected = (probs[rows] * concept[rows][:, None, None, :]).sum(-1).mean(1)
        assert torch.allclose(store[name].reshape(2, -1).double(), expected, atol=1e-6), name
    # attn1 gets its block's cross-attention map; padding positions never count as concept tokens
    real = cond.real()
    expected = (cross[1] * real[:, None, None, :]).sum(-1).mean(1)
    assert list(padded) == ["blocks.1.attn1"] and torch.allclose(padded["blocks.1.attn1"].double(), expected,
                                                                  atol=1e-6)
    assert (padded["blocks.1.attn1"] < 1 - 1e-4).any()  # the zero-padded keys take some mass


def test_run_passes_per_step_and_load_eraser_on_stock_pipeline(tmp_path, folder, monkeypatch):
    from diffusers import WanPipeline

    import t2vu
    from t2vu.backbones.wan_model import WanBackbone
    from t2vu.core import engine, plugins
    from t2vu.core.cli import app
    from t2vu.core.eraser_file import read_eraser
    from t2vu.core.spec import load_spec

    r = runner.invoke(app, ["run", str(write(tmp_path, folder, states="trajectory", sites="[all]"))])
    assert r.exit_code == 0, r.output
    f = read_eraser(tmp_path / "run" / "eraser.safetensors")
    assert f.sites == ["blocks.0.attn1", "blocks.0.attn2", "blocks.1.attn1", "blocks.1.attn2"]
    assert f.metadata["backbone"] == "wan" and f.metadata["spec"]["training"]["guidance_scale"] == 5.0
    assert all(float(f.tensors[f"{s}.up.weight"].abs().max()) > 0 for s in f.sites)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert rows[-1]["localization"] > 0

    built = []
    original = WanBackbone.load

    def load(self, device=None):
        built.append(self)
        return original(self, device)

    monkeypatch.setattr(WanBackbone, "load", load)
    result = engine.train(load_spec(write(tmp_path, folder, out="count", steps=3), plugins.get_registry()))
    assert len(result.metrics) == 3 and built[0].forward_calls == 2 * 3  # one frozen + one erased pass a step

    pipe = WanPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_frames=9, height=32, width=32, num_inference_steps=2, guidance_scale=5.0,
                  max_sequence_length=TEXT_LEN, output_type="latent")

    def sample():
        return pipe(PROMPT, latents=noise(1, 5), **kwargs).frames

    stock = sample()
    handle = t2vu.load_eraser(pipe, tmp_path / "run" / "eraser.safetensors")
    assert not torch.allclose(sample(), stock)
    with handle.disabled():
        assert torch.equal(sample(), stock)
    handle.remove()
    assert torch.equal(sample(), stock)


def test_spec_init_and_example_validate(tmp_path, folder):
    from pathlib import Path

    from t2vu.core.cli import app

    r = runner.invoke(app, ["spec", "init", "--backbone", "wan"])
    assert r.exit_code == 0 and "name: wan" in r.output and "sites: [cross]" in r.output, r.output
    assert "num_frames: 81" in r.output and "height: 480" in r.output
    text = r.output.replace("./Wan2.1-T2V-1.3B-Diffusers", str(folder)).replace("prompts.txt", "[a nude person]")
    (tmp_path / "init.yaml").write_text(text)
    r = runner.invoke(app, ["spec", "validate", str(tmp_path / "init.yaml")])
    assert r.exit_code == 0, r.output
    example = Path(__file__).parent.parent / "examples" / "wan-nudity.yaml"
    text = example.read_text().replace("./Wan2.1-T2V-1.3B-Diffusers", str(folder))
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "nudity.txt").write_text("a nude person\n")
    (tmp_path / "example.yaml").write_text(text)
    r = runner.invoke(app, ["spec", "validate", str(tmp_path / "example.yaml")])
    assert r.exit_code == 0, r.output
