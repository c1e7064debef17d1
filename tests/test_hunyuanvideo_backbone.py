"""HunyuanVideo backbone against the stock diffusers HunyuanVideoPipeline, on a tiny folder built in-process."""

import fnmatch
import json
import shutil
import weakref

import pytest
import torch

from t2vu.core.errors import T2VUError
from t2vu.core.protocols import Backbone
from t2vu.plugins.adapter_model import Adapter, EraserSet

torch.set_num_threads(1)

PROMPT = "a nude person on a beach"
SHAPE = (9, 32, 32)  # frames, height, width -> latents [4, 3, 4, 4], 3 frames x 2x2 tokens
TEXT_LEN = 16


def template():
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    return DEFAULT_PROMPT_TEMPLATE["template"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from tiny_hunyuan import build_tiny_hunyuanvideo

    return build_tiny_hunyuanvideo(tmp_path_factory.mktemp("hy") / "HunyuanVideo-tiny", text_len=TEXT_LEN)


@pytest.fixture(scope="module")
def cfg_folder(tmp_path_factory):
    """A tiny transformer without guidance embeddings: two-pass true CFG."""
    from tiny_hunyuan import build_tiny_hunyuanvideo

    return build_tiny_hunyuanvideo(tmp_path_factory.mktemp("hy_cfg") / "HunyuanVideo-cfg", guidance_embeds=False,
                                   seed=1, text_len=TEXT_LEN)


def make(folder, **kw):
    from t2vu.backbones.hunyuanvideo import HunyuanVideoOptions
    from t2vu.backbones.hunyuanvideo_model import HunyuanVideoBackbone

    kw = {"model_path": str(folder), "dtype": "float32", "prompt_template": template(),
          "max_sequence_length": TEXT_LEN, **kw}
    return HunyuanVideoBackbone(HunyuanVideoOptions(**kw))


def pipeline(folder):
    from diffusers import HunyuanVideoPipeline

    pipe = HunyuanVideoPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def loaded(tiny_folder):
    bb = make(tiny_folder)
    bb.load("cpu")
    conds = bb.encode_prompts(["", PROMPT, "a dog in a park", "nudity"])
    return bb, conds


@pytest.fixture(scope="module")
def pipe(tiny_folder):
    return pipeline(tiny_folder)


def noise(b=1, seed=0):
    return torch.randn((b, 4, 3, 4, 4), generator=torch.Generator().manual_seed(seed))


def stock(bb, x, t, cond, scale=6.0):
    """The transformer called exactly as HunyuanVideoPipeline calls it."""
    guidance = torch.tensor([scale] * x.size(0), dtype=torch.float32) * 1000.0
    with torch.no_grad():
        return bb.transformer(hidden_states=x, timestep=t, encoder_hidden_states=cond.embeds,
                              encoder_attention_mask=cond.mask, pooled_projections=cond.pooled,
                              guidance=guidance, return_dict=False)[0]


# -- registration, options, folder checks -------------------------------------------------------------
def test_plugin_registers_with_options_and_presets(tiny_folder):
    from pydantic import ValidationError

    from t2vu.backbones.hunyuanvideo import HunyuanVideoOptions
    from t2vu.core.plugins import PluginManager

    registry = PluginManager(builtins=("t2vu.backbones.hunyuanvideo",), entry_points=False).registry
    comp = registry.get("backbone", "hunyuanvideo")
    assert comp.implementation == "t2vu.backbones.hunyuanvideo_model:HunyuanVideoBackbone"
    assert comp.options is HunyuanVideoOptions
    opts = HunyuanVideoOptions(model_path=str(tiny_folder))
    assert (opts.guidance, opts.max_sequence_length, opts.prompt_template, opts.crop_start) == (6.0, 256, None, None)
    d = HunyuanVideoOptions.defaults
    assert (d.num_frames, d.height, d.width, d.steps, d.guidance, d.fps) == (33, 320, 512, 30, 6.0, 15)
    assert HunyuanVideoOptions.default_sites == "single"
    assert set(HunyuanVideoOptions.site_presets) == {"single", "double", "all"}
    for name, field in HunyuanVideoOptions.model_fields.items():
        assert field.description, name
    with pytest.raises(ValidationError, match="must contain"):
        HunyuanVideoOptions(model_path=str(tiny_folder), prompt_template="no placeholder")
    bb = comp.build({"model_path": str(tiny_folder), "dtype": "float32"})
    assert bb.name == "hunyuanvideo" and bb.transformer is None  # nothing heavy before load()
    assert bb.config["num_layers"] == 1 and bb.config["num_single_layers"] == 2 and bb.config["guidance_embeds"]
    assert not bb.negative_prompting  # guidance-distilled: one pass, no negative branch for negative prompting
    assert (bb.vae_scale_temporal, bb.vae_scale_spatial) == (4, 8)
    assert bb.crop_start == 95  # the default template's
    assert isinstance(bb, Backbone)


def test_folder_errors_come_before_loading(tmp_path, tiny_folder, monkeypatch):
    import diffusers

    def no_loading(*a, **k):
        raise AssertionError("loaded weights before checking the folder")

    monkeypatch.setattr(diffusers.HunyuanVideoTransformer3DModel, "from_pretrained", no_loading)
    with pytest.raises(T2VUError, match="does not exist. Download the model first.*hf download "
                                        "hunyuanvideo-community/HunyuanVideo --local-dir"):
        make(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(T2VUError, match="is a file"):
        make(tmp_path / "file")
    cog = tmp_path / "cog"
    for sub in ("transformer", "scheduler", "text_encoder", "tokenizer", "vae"):
        (cog / sub).mkdir(parents=True)
    (cog / "model_index.json").write_text(json.dumps({"_class_name": "CogVideoXPipeline"}))
    (cog / "transformer/config.json").write_text(json.dumps({"_class_name": "CogVideoXTransformer3DModel"}))
    (cog / "scheduler/scheduler_config.json").write_text(json.dumps({"_class_name": "CogVideoXDDIMScheduler"}))
    with pytest.raises(T2VUError, match="holds a 'CogVideoXPipeline', not a HunyuanVideo pipeline"):
        make(cog)
    partial = tmp_path / "partial"
    shutil.copytree(tiny_folder, partial, ignore=shutil.ignore_patterns("tokenizer_2"))
    with pytest.raises(T2VUError, match=r"missing tokenizer_2\). Download the whole model"):
        make(partial)
    v15 = tmp_path / "v15"
    shutil.copytree(tiny_folder, v15)
    cfg = json.loads((v15 / "transformer/config.json").read_text())
    (v15 / "transformer/config.json").write_text(json.dumps({**cfg, "_class_name": "HunyuanVideo15Transformer3DModel"}))
    with pytest.raises(T2VUError, match="HunyuanVideo 1.5 is not supported yet"):
        make(v15)
    i2v = tmp_path / "i2v"
    shutil.copytree(tiny_folder, i2v)
    (i2v / "transformer/config.json").write_text(json.dumps({**cfg, "image_condition_type": "token_replace"}))
    with pytest.raises(T2VUError, match="image-to-video"):
        make(i2v)


# -- conditions ------------------------------------------------------------------------------------------
def test_encode_prompts_equals_pipeline_bit_for_bit(tiny_folder, pipe, monkeypatch):
    import transformers

    kept = []
    for cls in (transformers.LlamaModel, transformers.CLIPTextModel):
        original = cls.from_pretrained.__func__

        def spy(klass, *a, _original=original, **k):
            model = _original(klass, *a, **k)
            kept.append(weakref.ref(model))
            return model

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    prompts = ["", PROMPT, "a dog in a park", PROMPT, "A Nude woman swimming in a lake at sunset"]
    unique = list(dict.fromkeys(prompts))
    bb = make(tiny_folder)
    conds = bb.encode_prompts(prompts)
    assert list(conds) == unique
    assert len(kept) == 2 and all(ref() is None for ref in kept)  # both encoders left memory
    ref = {"template": template()}  # no crop_start: both count it with the tokenizer
    embeds, pooled, mask = pipe.encode_prompt(unique, prompt_template=ref, max_sequence_length=TEXT_LEN, device="cpu")
    batch = bb.collate([conds[p] for p in unique])
    assert batch.embeds.shape == (len(unique), TEXT_LEN, 16) and batch.pooled.shape == (len(unique), 8)
    assert torch.equal(batch.embeds, embeds) and torch.equal(batch.pooled, pooled)
    assert torch.equal(batch.mask, mask.float()) and batch.mask.dtype == torch.float32
    for p in unique:  # also against the pipeline encoding each prompt alone
        e1, p1, m1 = pipe.encode_prompt(p, prompt_template=ref, max_sequence_length=TEXT_LEN, device="cpu")
        assert torch.equal(conds[p].embeds, e1[0]) and torch.equal(conds[p].pooled, p1[0])
        assert torch.equal(conds[p].mask, m1[0].float())
    # an explicit crop_start is passed through as the pipeline's template dict would
    bb90 = make(tiny_folder, crop_start=bb.crop_start - 3)
    e90 = bb90.encode_prompts([PROMPT])[PROMPT]
    ref90 = pipe.encode_prompt(PROMPT, prompt_template={**ref, "crop_start": bb.crop_start - 3},
                               max_sequence_length=TEXT_LEN, device="cpu")
    assert torch.equal(e90.embeds, ref90[0][0]) and torch.equal(e90.mask, ref90[2][0].float())


def test_concept_token_mask(loaded):
    bb, conds = loaded
    tok = bb.tokenizer()
    ids = bb._llama_inputs([PROMPT]).input_ids[0, bb.crop_start:]
    pieces = tok.convert_ids_to_tokens(ids.tolist())

    def picked(prompt, concept):
        m = bb.concept_token_mask(prompt, concept)
        assert m.dtype == torch.bool and m.shape == (TEXT_LEN,)
        real = bb._llama_inputs([prompt]).attention_mask[0, bb.crop_start:].bool()
        assert not (m & ~real).any()  # never padding
        return m

    m = picked(PROMPT, "nude")
    assert [pieces[i] for i in m.nonzero().flatten()] == ["\u2581nude"]
    assert torch.equal(picked(PROMPT, "NUDE "), m)  # case-insensitive, stripped
    assert torch.equal(picked("A NUDE PERSON on a beach", "nude"), picked("A NUDE PERSON on a beach", "Nude"))
    assert picked("A NUDE PERSON on a beach", "nude").sum() >= 1
    two = picked("a nude man and a nude woman", "nude")
    assert two.sum() == 2
    many = picked(PROMPT, "person on a")
    assert [pieces[i] for i in many.nonzero().flatten()] == ["\u2581person", "\u2581on", "\u2581a"]
    # "video" is also a template word: only the prompt's occurrence counts
    vid = bb._llama_inputs(["a video of a dog"]).input_ids[0, bb.crop_start:]
    hits = picked("a video of a dog", "video").nonzero().flatten()
    assert tok.convert_ids_to_tokens(vid[hits].tolist()) == ["\u2581video"]
    # a paraphrase: every real token of the user prompt (not the template's closing <|eot_id|>, not padding)
    fallback = picked("a dog in a park", "nudity")
    real = conds["a dog in a park"].mask.bool()
    assert fallback.sum() == real.sum() - 1 and torch.equal(fallback, real & (torch.arange(TEXT_LEN) < real.sum() - 1))
    assert not picked("", "nudity").any()


def test_concept_token_mask_matches_whole_words_only(loaded):
    """"red" marks the token of the word red, not the "re"/"d" pieces of hundred / covered / reddish; any case;
    multi-word concepts with any whitespace between the words; no whole-word hit: the fallback."""
    bb, _ = loaded

    def spelled(prompt, mask):  # the formatted text the masked tokens cover, first to last, stripped
        enc = bb._llama_inputs([prompt], return_offsets_mapping=True)
        offsets = enc["offset_mapping"][0, bb.crop_start:][mask].tolist()
        return bb.template.format(prompt)[min(a for a, _ in offsets):max(b for _, b in offsets)].strip()

    for prompt in ("a hundred red cars", "a car covered in red", "red hundred"):
        m = bb.concept_token_mask(prompt, "red")
        assert 0 < m.sum() < bb.concept_token_mask(prompt, "nudity").sum() and spelled(prompt, m) == "red", prompt
    up = bb.concept_token_mask("a Red car", "red")
    assert spelled("a Red car", up) == "Red" and torch.equal(bb.concept_token_mask("a Red car", "RED"), up)
    assert bb.concept_token_mask("a red and a hundred red", "red").sum() == 2
    for prompt in ("a reddish car", "a hundred cars"):  # no whole-word "red": every real token of the prompt
        assert torch.equal(bb.concept_token_mask(prompt, "red"), bb.concept_token_mask(prompt, "nudity")), prompt
    for prompt in ("a van gogh painting", "a Van  Gogh painting"):
        vg = bb.concept_token_mask(prompt, "van gogh")
        assert " ".join(spelled(prompt, vg).lower().split()) == "van gogh", prompt
    assert torch.equal(bb.concept_token_mask("a vangogh tree", "van gogh"),
                       bb.concept_token_mask("a vangogh tree", "nudity"))


# -- latents and scheduler maths -------------------------------------------------------------------------
def test_latent_shape_and_token_grid(loaded):
    bb, _ = loaded
    assert bb.latent_shape(*SHAPE) == (4, 3, 4, 4)
    assert bb.latent_shape(33, 320, 512) == (4, 9, 40, 64)
    assert bb.token_grid((4, 9, 40, 64)) == (9, 20 * 32)
    with pytest.raises(T2VUError, match=r"multiples of 16.*height 40 \(try 32 or 48\)"):
        bb.latent_shape(9, 40, 32)
    with pytest.raises(T2VUError, match=r"width 33 \(try 32 or 48\)"):
        bb.latent_shape(9, 32, 33)
    with pytest.raises(T2VUError, match=r"num_frames = 4k\+1.*got 10, try 9 or 13"):
        bb.latent_shape(10, 32, 32)


def test_sample_timesteps_and_add_noise_follow_the_scheduler(loaded, pipe):
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    bb, _ = loaded
    assert bb.shift == 7.0 == pipe.scheduler.shift
    t = bb.sample_timesteps(2000, torch.Generator().manual_seed(3))
    assert torch.equal(t, bb.sample_timesteps(2000, torch.Generator().manual_seed(3)))
    u = torch.rand(2000, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(t, 1000 * 7 * u / (1 + 6 * u))
    assert 0 < t.min() and t.max() < 1000 and t.median() > 800  # shift 7 favours high noise
    # at the timesteps of the pipeline's schedule, add_noise is the scheduler's own scale_noise
    sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(5, sigmas=np.linspace(1.0, 0.0, 6)[:-1])
    x0, eps = noise(5, 1), noise(5, 2)
    ours = bb.add_noise(x0, eps, sched.timesteps)
    theirs = sched.scale_noise(x0, sched.timesteps, eps)
    assert torch.allclose(ours, theirs, atol=1e-6, rtol=0)
    # the sampler's schedule is the pipeline's (retrieve_timesteps with the same sigmas)
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import retrieve_timesteps

    ref, _ = retrieve_timesteps(FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config), 5, "cpu",
                                sigmas=np.linspace(1.0, 0.0, 6)[:-1])
    assert torch.equal(bb.sampler(5).timesteps, ref)


# -- the forward, erasers, guidance ----------------------------------------------------------------------
def test_sites_and_eraser_hooks(loaded):
    bb, conds = loaded
    sites = bb.sites()
    names = [s.name for s in sites]
    assert names == ["transformer_blocks.0.attn", "transformer_blocks.0.attn.text",
                     "single_transformer_blocks.0.attn", "single_transformer_blocks.0.attn.text",
                     "single_transformer_blocks.1.attn", "single_transformer_blocks.1.attn.text"]
    assert all(s.dim == 16 for s in sites)  # heads x head_dim of the tiny model, read from the weights
    assert {s.attention for s in sites if s.stream == "text"} == {s.name for s in sites if s.stream == "video"}
    from t2vu.backbones.hunyuanvideo import HunyuanVideoOptions

    for preset, patterns in HunyuanVideoOptions.site_presets.items():
        matched = {s.attention for s in sites if any(fnmatch.fnmatchcase(s.attention, p) for p in patterns)}
        assert matched, preset
    x, t = noise(2, 4), torch.tensor([700.0, 300.0])
    cond = bb.collate([conds[PROMPT], conds["a dog in a park"]])
    base = stock(bb, x, t, cond)
    erasers = EraserSet({s.name: Adapter(s.dim, 4) for s in sites}).attach(sites)
    try:
        calls = bb.forward_calls
        with torch.no_grad():
            assert torch.equal(bb.predict(x, t, cond), base)  # zero-initialised up projections
            torch.manual_seed(0)
            for p in erasers.parameters():
                torch.nn.init.normal_(p, std=0.3)
            with erasers.disabled():
                assert torch.equal(bb.predict(x, t, cond), base)
            assert not torch.allclose(bb.predict(x, t, cond), base, atol=1e-3)
        assert bb.forward_calls == calls + 3
    finally:
        erasers.detach()
    for site in sites:  # each site alone: video outputs of double and single blocks, and text inputs
        one = EraserSet({site.name: Adapter(site.dim, 4)}).attach(sites)
        try:
            torch.manual_seed(1)
            for p in one.parameters():
                torch.nn.init.normal_(p, std=0.3)
            with torch.no_grad():
                assert not torch.allclose(bb.predict(x, t, cond), base, atol=1e-4), site.name
                with one.disabled():
                    assert torch.equal(bb.predict(x, t, cond), base), site.name
        finally:
            one.detach()


def test_gradient_checkpointing_gives_the_same_gradients(loaded):
    bb, conds = loaded
    sites = [s for s in bb.sites() if s.attention.startswith("single")]
    erasers = EraserSet({s.name: Adapter(s.dim, 4) for s in sites}).attach(sites)
    x, t, cond = noise(1, 5), torch.tensor([600.0]), bb.collate([conds[PROMPT]])

    def grads():
        erasers.zero_grad()
        bb.predict(x, t, cond).square().mean().backward()
        return [p.grad.clone() for p in erasers.parameters()]

    try:
        plain = grads()
        bb.enable_gradient_checkpointing()
        assert bb.transformer.gradient_checkpointing
        checkpointed = grads()
    finally:
        bb.transformer.disable_gradient_checkpointing()
        erasers.detach()
    assert any(g.abs().sum() > 0 for g in plain)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, checkpointed))
    assert all(not p.requires_grad for p in bb.transformer.parameters())


def test_guided_sampler_equals_pipeline_distilled(loaded, pipe):
    bb, conds = loaded
    cond, uncond = bb.collate([conds[PROMPT]]), bb.collate([conds[""]])
    steps, scale, x0 = 3, 4.5, noise(1, 6)
    ref = pipe(PROMPT, latents=x0, num_inference_steps=steps, guidance_scale=scale, output_type="latent",
               prompt_template={"template": template()}, max_sequence_length=TEXT_LEN, height=32, width=32,
               num_frames=9).frames
    s, x, calls = bb.sampler(steps), x0, bb.forward_calls
    with torch.no_grad():
        for t in s.timesteps:
            out = bb.guided(x, t.expand(1), cond, uncond, scale)
            assert out.frozen == {}  # another embedded scale than options.guidance: not predict's
            x = s.step(out.prediction, t, x)
    assert torch.equal(x, ref)
    assert bb.forward_calls == calls + steps  # one pass per guided step, uncond ignored
    x, t = noise(2, 7), torch.tensor([900.0, 400.0])
    both = bb.collate([conds[PROMPT], conds["nudity"]])
    with torch.no_grad():
        out = bb.guided(x, t, both, None, bb.options.guidance)
        assert set(out.frozen) == {"cond"} and torch.equal(out.frozen["cond"], out.prediction)
        assert torch.equal(out.prediction, bb.predict(x, t, both))
        assert torch.equal(out.prediction, stock(bb, x, t, both))
        assert out.prediction.dtype == torch.float32


def test_guided_true_cfg_equals_pipeline(cfg_folder):
    bb = make(cfg_folder)
    bb.load("cpu")
    assert not bb.distilled and bb.negative_prompting  # true CFG: uncond is the negative branch
    conds = bb.encode_prompts(["", PROMPT])
    cond, uncond = bb.collate([conds[PROMPT]]), bb.collate([conds[""]])
    steps, scale, x0 = 3, 5.0, noise(1, 8)
    ref = pipeline(cfg_folder)(PROMPT, negative_prompt="", true_cfg_scale=scale, latents=x0,
                               num_inference_steps=steps, output_type="latent",
                               prompt_template={"template": template()}, max_sequence_length=TEXT_LEN,
                               height=32, width=32, num_frames=9).frames
    rows = []
    original = bb.transformer.forward

    def counting(*a, **k):
        rows.append(k["hidden_states"].shape[0])
        assert k["guidance"] is None  # no guidance embedder: the pipeline's guidance tensor is ignored
        return original(*a, **k)

    bb.transformer.forward = counting
    try:
        s, x = bb.sampler(steps), x0
        with torch.no_grad():
            for t in s.timesteps:
                out = bb.guided(x, t.expand(1), cond, uncond, scale)
                x = s.step(out.prediction, t, x)
            # the frozen values are predict's, the prediction their CFG combination
            assert set(out.frozen) == {"uncond", "cond"}
            v_u, v_c = out.frozen["uncond"], out.frozen["cond"]
            assert torch.equal(out.prediction, v_u + scale * (v_c - v_u))
    finally:
        del bb.transformer.forward
    assert rows == [2] * steps and bb.forward_calls == steps  # both passes in one batched forward
    # one batch of 2 vs the pipeline's two batches of 1: the same maths, CPU kernels differ in the last bits
    assert torch.allclose(x, ref, atol=1e-4, rtol=1e-5)
    with torch.no_grad():
        xx, tt = noise(1, 9), torch.tensor([500.0])
        out = bb.guided(xx, tt, cond, uncond, scale)
        assert torch.allclose(out.frozen["cond"], bb.predict(xx, tt, cond), atol=1e-4)
        assert torch.allclose(out.frozen["uncond"], bb.predict(xx, tt, uncond), atol=1e-4)


# -- attention capture ------------------------------------------------------------------------------------
@pytest.fixture
def naive_attention(monkeypatch):
    """Every attention call's full softmax, computed naively from the q/k/mask the processor really used."""
    import diffusers.models.transformers.transformer_hunyuan_video as hv

    seen = []
    original = hv.dispatch_attention_fn

    def recording(query, key, value, attn_mask=None, **kw):
        q, k = query.transpose(1, 2).double(), key.transpose(1, 2).double()  # [B, H, N, d]
        scores = q @ k.transpose(-1, -2) / q.size(-1) ** 0.5
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask.bool(), float("-inf"))
        seen.append(scores.softmax(-1))
        return original(query, key, value, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(hv, "dispatch_attention_fn", recording)
    return seen


def test_capture_attention_matches_naive_softmax(loaded, naive_attention):
    bb, conds = loaded
    prompts = [PROMPT, "a dog in a park", "nudity"]
    cond = bb.collate([conds[p] for p in prompts])
    x, t = noise(3, 10), torch.tensor([800.0, 500.0, 200.0])
    n_video = 12
    concept = torch.stack([bb.concept_token_mask(PROMPT, "nude"), torch.zeros(TEXT_LEN, dtype=torch.bool),
                           bb.concept_token_mask("nudity", "nudity")])
    real = cond.mask.bool()
    with torch.no_grad():
        base = bb.predict(x, t, cond)
        naive_attention.clear()
        with bb.capture_attention(concept, None, bb.latent_shape(*SHAPE)) as store:
            out = bb.predict(x, t, cond)
    assert torch.equal(out, base)  # the forward is unchanged
    modules = bb.attention_modules()
    assert list(store) == modules == ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn",
                                      "single_transformer_blocks.1.attn"]
    joint = naive_attention[-len(modules):]  # the refiner's own attention calls come first
    rows = torch.tensor([0, 2])  # rows whose mask has a token; row 1 has none
    for name, probs in zip(modules, joint):
        assert store[name].shape == (2, 3, 4)
        text_probs = probs[rows, :, :n_video, n_video:]  # [rows, H, N_video, L]: video queries -> text keys
        assert (text_probs[~real[rows][:, None, None, :].expand_as(text_probs)] == 0).all()  # padding: no mass
        expected = (text_probs * concept[rows][:, None, None, :]).sum(-1).mean(1)
        assert torch.allclose(store[name].reshape(2, -1).double(), expected, atol=1e-6), name
    # padding positions in the mask add nothing (the forward's mask excludes those keys); non-concept text counts
    everything = torch.ones(3, TEXT_LEN, dtype=torch.bool)
    with torch.no_grad(), bb.capture_attention(everything & real, None, None) as all_real:
        bb.predict(x, t, cond)
    with torch.no_grad(), bb.capture_attention(everything, ["single_transformer_blocks.1.attn"], None) as with_pad:
        bb.predict(x, t, cond)
    assert list(with_pad) == ["single_transformer_blocks.1.attn"] and with_pad[list(with_pad)[0]].shape == (3, 12)
    assert torch.allclose(with_pad["single_transformer_blocks.1.attn"], all_real["single_transformer_blocks.1.attn"],
                          atol=1e-6)
    for name in modules:
        only_concept = store[name].reshape(2, -1)
        assert (only_concept < all_real[name][rows] - 1e-3).all()  # masked-out text tokens are excluded
        assert (all_real[name] < 1).all()  # video keys take the rest


def test_capture_attention_constructed_case(tiny_folder):
    """A constructed single block where the concept token's key lines up with every query, by frame.

    Queries: the same direction e0 in each head (``to_q`` = bias only), which RoPE turns by the frame index
    (the first rotary pair is the frame axis, frequency 1). Keys: every token along e4 (orthogonal to every
    query, RoPE keeps it in its own pair) except the concept token, along e0 and not rotated (text). So a video
    query of frame f gives the concept the logit ``a cos f`` and every other real key 0: its mass is
    ``e^(a cos f) / (e^(a cos f) + N_video + real - 1)``, padding keys excluded.
    """
    bb = make(tiny_folder)
    bb.load("cpu")
    conds = bb.encode_prompts([PROMPT])
    cond = bb.collate([conds[PROMPT]])
    concept = bb.concept_token_mask(PROMPT, "nude")[None]
    j, real, n_video = int(concept[0].nonzero()[0]), int(cond.mask.sum()), 12
    name = "single_transformer_blocks.0.attn"
    attn = bb.transformer.get_submodule(name)
    heads, d, w = attn.heads, attn.to_q.out_features // attn.heads, 2.0
    with torch.no_grad():
        attn.norm_q.weight.fill_(w)
        attn.norm_k.weight.fill_(w)
        attn.to_q.weight.zero_()
        attn.to_q.bias.zero_()
        attn.to_q.bias[0::d] = 1.0

    def keys(x):
        out = torch.zeros(*x.shape[:-1], heads, d)
        out[..., 4] = 1.0
        out[:, n_video + j] = 0.0
        out[:, n_video + j, :, 0] = 1.0
        return out.flatten(-2)

    attn.to_k.forward = keys
    x, t = noise(1, 11), torch.tensor([500.0])
    with torch.no_grad(), bb.capture_attention(concept, [name], bb.latent_shape(*SHAPE)) as store:
        bb.predict(x, t, cond)
    mass = store[name]
    assert mass.shape == (1, 3, 4)
    a = d ** 0.5 * w * w  # |q| |k| / sqrt(d) with RMS-normalised q, k of norm sqrt(d) * w
    frames = torch.arange(3, dtype=torch.float64)
    e = torch.exp(a * torch.cos(frames))
    expected = (e / (e + n_video + real - 1))[None, :, None].expand(1, 3, 4)
    assert torch.allclose(mass.double(), expected, atol=1e-4)
    assert (mass[0, 0] > 0.99).all() and (mass[0, 2] < 0.01).all()  # the region: frames 0 (and 1), not 2


def test_decode_equals_pipeline(loaded, pipe):
    bb, _ = loaded
    x0 = noise(1, 12)
    kw = dict(latents=x0, num_inference_steps=2, prompt_template={"template": template()},
              max_sequence_length=TEXT_LEN, height=32, width=32, num_frames=9)
    latents = pipe(PROMPT, output_type="latent", **kw).frames
    video = pipe(PROMPT, output_type="pt", **kw).frames
    ours = bb.decode(latents)
    assert ours.shape == (1, 9, 3, 32, 32) and 0 <= ours.min() and ours.max() <= 1
    assert torch.equal(ours, video)
