"""CogVideoX backbone, erasers on/off, batched step context, attention capture, losses."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from t2vu.core import plugins
from t2vu.core.context import ANCHOR, PRESERVED, TARGET, UNCOND, Need, StepContext
from t2vu.core.errors import T2VUError
from t2vu.losses.terms import LocalizationLoss, NegativeGuidanceLoss, PreservationLoss, concept_mask

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from tiny import build_tiny_cogvideox

    return build_tiny_cogvideox(tmp_path_factory.mktemp("cog") / "CogVideoX-tiny")


@pytest.fixture(scope="module")
def loaded(tiny_folder):
    plugins.reset()
    reg = plugins.get_registry()
    backbone = reg.get("backbone", "cogvideox").build({"model_path": str(tiny_folder), "dtype": "float32"})
    backbone.load("cpu")
    prompts = ["", "nudity", "a nude person on a beach", "a dog in a park", "clothing"]
    emb = backbone.encode_prompts(prompts)
    erasers = reg.get("eraser", "adapter").build({"rank": 4}).build(backbone.sites())
    erasers.attach(backbone.sites())
    torch.manual_seed(1)
    for p in erasers.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return backbone, erasers, emb


@contextlib.contextmanager
def counted_forwards(backbone):
    """Record ``(rows, grad enabled)`` of every transformer forward inside the block."""
    calls = []
    original = backbone.transformer.forward

    def counting(*args, **kwargs):
        calls.append((kwargs["hidden_states"].shape[0], torch.is_grad_enabled()))
        return original(*args, **kwargs)

    backbone.transformer.forward = counting
    try:
        yield calls
    finally:
        del backbone.transformer.forward


def options(name, **kw):
    return plugins.get_registry().get("loss", name).options(**kw)


def make_ctx(backbone, erasers, emb, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = backbone.latent_shape(9, 32, 32)
    x = torch.randn((b, *shape), generator=g)
    t = torch.tensor([700, 300, 500, 100][:b])
    conds = {UNCOND: [""] * b, TARGET: ["nudity"] * b, PRESERVED: ["a dog in a park"] * b}
    masks = {TARGET: torch.stack([backbone.concept_token_mask("nudity", "nudity")] * b)}
    return StepContext(backbone, erasers, x, t, conds, lambda ps: torch.stack([emb[p] for p in ps]), masks)


def test_missing_or_wrong_folder_is_a_clear_error(tmp_path):
    comp = plugins.get_registry().get("backbone", "cogvideox")
    with pytest.raises(T2VUError, match="does not exist. Download the model first"):
        comp.build({"model_path": str(tmp_path / "nope")})
    (tmp_path / "empty").mkdir()
    with pytest.raises(T2VUError, match="not a diffusers CogVideoX folder"):
        comp.build({"model_path": str(tmp_path / "empty")})


def test_config_read_from_folder(loaded):
    backbone, erasers, emb = loaded
    assert backbone.text_length == 16  # max_text_seq_length of the tiny config
    # heads * head_dim of the tiny config, per block: the video output and the text tokens of attn1
    assert [(s.name, s.stream, s.dim) for s in backbone.sites()] == [
        ("transformer_blocks.0.attn1", "video", 32), ("transformer_blocks.0.attn1.text", "text", 32),
        ("transformer_blocks.1.attn1", "video", 32), ("transformer_blocks.1.attn1.text", "text", 32)]
    assert emb["nudity"].shape == (16, 16)
    assert backbone.latent_shape(9, 32, 32) == (3, 4, 4, 4)
    assert backbone.token_grid((3, 4, 4, 4)) == (3, 4)
    from t2vu.core.errors import T2VUError

    with pytest.raises(T2VUError, match=r"num_frames = 4k\+1 .* got 10, try 9 or 13"):
        backbone.latent_shape(10, 32, 32)  # was silently rounded down to 9


def test_erasers_off_equals_stock_transformer(loaded, tiny_folder):
    from diffusers import CogVideoXTransformer3DModel

    backbone, erasers, emb = loaded
    stock = CogVideoXTransformer3DModel.from_pretrained(tiny_folder, subfolder="transformer").eval()
    x = torch.randn(1, *backbone.latent_shape(9, 32, 32))
    t = torch.tensor([400])
    e = emb["a nude person on a beach"][None]
    with torch.no_grad():
        ref = stock(hidden_states=x, encoder_hidden_states=e, timestep=t,
                    image_rotary_emb=backbone._rotary(x.shape[1:]), return_dict=False)[0]
        with erasers.disabled():
            off = backbone.predict(x, t, e)
        on = backbone.predict(x, t, e)
    assert torch.equal(off, ref)
    assert not torch.allclose(on, ref)


def test_one_iteration_costs_one_frozen_and_one_erased_forward(loaded):
    backbone, erasers, emb = loaded
    losses = [NegativeGuidanceLoss(options("negative_guidance", eta=3.0)),
              PreservationLoss(options("preservation")), LocalizationLoss(options("localization"))]
    ctx = make_ctx(backbone, erasers, emb)
    with counted_forwards(backbone) as calls:
        ctx.prefetch([n for loss in losses for n in loss.needs()])
        values = [loss(ctx) for loss in losses]
        sum(values).backward()
    # frozen: uncond + target + preserved stacked (3 x 2 rows, no grad); erased: target + preserved (2 x 2, grad)
    assert calls == [(6, False), (4, True)]
    assert all(torch.isfinite(v) for v in values)
    erasers.zero_grad()


def test_memoised_predictions_are_not_recomputed(loaded):
    backbone, erasers, emb = loaded
    ctx = make_ctx(backbone, erasers, emb)
    before = backbone.forward_calls
    a = ctx.frozen(UNCOND)
    b = ctx.frozen(UNCOND)
    assert a is b and backbone.forward_calls == before + 1
    ctx.seed_frozen(TARGET, torch.zeros_like(a))
    ctx.prefetch([Need("frozen", TARGET)])
    assert backbone.forward_calls == before + 1


def test_negative_guidance_target_formula(loaded):
    backbone, erasers, emb = loaded
    ctx = make_ctx(backbone, erasers, emb)
    loss = NegativeGuidanceLoss(options("negative_guidance", eta=2.0))
    u, c = ctx.frozen(UNCOND), ctx.frozen(TARGET)
    assert torch.allclose(loss.target(ctx), u - 2.0 * (c - u))


def test_negative_guidance_push_limit_caps_each_sample_step(loaded):
    """push_limit: a sample whose step eta (c - a) is longer than limit x ||a|| is scaled down to exactly that
    length (same direction); a sample under the cap keeps the plain target."""
    backbone, erasers, emb = loaded
    ctx = make_ctx(backbone, erasers, emb)
    u, c = ctx.frozen(UNCOND), ctx.frozen(TARGET)
    step = 2.0 * (c - u)
    ratio = step.flatten(1).norm(dim=1) / u.flatten(1).norm(dim=1)
    assert ratio.numel() == 2 and ratio[0] != ratio[1]
    limit = float(ratio.mean())  # between the two samples' ratios: one is capped, the other is not
    capped = NegativeGuidanceLoss(options("negative_guidance", eta=2.0, push_limit=limit)).target(ctx)
    plain = NegativeGuidanceLoss(options("negative_guidance", eta=2.0)).target(ctx)
    big, small = (0, 1) if ratio[0] > ratio[1] else (1, 0)
    assert torch.allclose(capped[small], plain[small])
    got = u[big] - capped[big]
    assert torch.allclose(got.norm(), limit * u[big].norm(), rtol=1e-4)
    assert torch.allclose(got / got.norm(), step[big] / step[big].norm(), atol=1e-5)
    with pytest.raises(Exception, match="push_limit"):
        options("negative_guidance", push_limit=0)


def test_negative_guidance_with_an_anchor_prompt(loaded):
    """concept.anchor: guide away from c relative to the anchor prompt, not the empty prompt; a condition
    whose prompts equal another's (the default anchor is the empty prompt) costs no extra rows."""
    backbone, erasers, emb = loaded
    emb = {**emb, **backbone.encode_prompts(["a person on a beach"])}
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2, *backbone.latent_shape(9, 32, 32)), generator=g)
    t = torch.tensor([700, 300])
    embed = lambda ps: torch.stack([emb[p] for p in ps])  # noqa: E731
    loss = NegativeGuidanceLoss(options("negative_guidance", eta=2.0))
    anchored = StepContext(backbone, erasers, x, t, {UNCOND: [""] * 2, TARGET: ["nudity"] * 2,
                                                     ANCHOR: ["a person on a beach"] * 2}, embed)
    a, c = anchored.frozen(ANCHOR), anchored.frozen(TARGET)
    assert not torch.allclose(a, anchored.frozen(UNCOND))
    assert torch.allclose(loss.target(anchored), a - 2.0 * (c - a))
    with counted_forwards(backbone) as calls:
        default = StepContext(backbone, erasers, x, t, {UNCOND: [""] * 2, TARGET: ["nudity"] * 2,
                                                        ANCHOR: [""] * 2}, embed)
        default.prefetch([*loss.needs(), Need("frozen", UNCOND)])
    assert [rows for rows, _ in calls] == [4, 2]  # frozen: uncond (= anchor) + target, once each; erased: target
    assert default.frozen(ANCHOR) is default.frozen(UNCOND)


def test_preservation_can_hold_the_unconditional_prediction(loaded):
    """preservation.unconditional: the empty prompt joins the erased pass and the loss (its frozen rows are
    shared with the negative-guidance term); without it the erased pass has no uncond rows."""
    backbone, erasers, emb = loaded
    plain = PreservationLoss(options("preservation"))
    held = PreservationLoss(options("preservation", unconditional=True))
    ctx = make_ctx(backbone, erasers, emb)
    with counted_forwards(backbone) as calls:
        ctx.prefetch([*NegativeGuidanceLoss(options("negative_guidance")).needs(), *held.needs()])
    assert calls == [(6, False), (6, True)]  # frozen: uncond, target, preserved; erased: the same three
    by_hand = sum(F.mse_loss(ctx.erased(c), ctx.frozen(c)) for c in (PRESERVED, UNCOND))
    assert torch.allclose(held(ctx), by_hand) and held(ctx) > plain(ctx) > 0
    assert Need("erased", UNCOND) not in plain.needs()


def test_anchor_prompt_replaces_the_concept_word():
    from t2vu.core.engine import anchor_prompt

    assert anchor_prompt("a red square moving left", "square", "shape") == "a red shape moving left"
    assert anchor_prompt("a red square moving left", "red", "") == "a square moving left"
    assert anchor_prompt("Squares and a Square", "square", "shape") == "Squares and a shape"  # whole words
    assert anchor_prompt("a nude person", "nude", None) == ""  # no anchor: the empty prompt
    assert anchor_prompt("square", "square", "shape") == "shape"


def _spelled(backbone, prompt, mask):
    """The prompt's text the masked tokens cover (their offsets, first to last), stripped."""
    offsets = backbone._tokenize([prompt], return_offsets_mapping=True)["offset_mapping"][0][mask].tolist()
    return prompt[min(a for a, _ in offsets):max(b for _, b in offsets)].strip()


def test_concept_token_mask_matches_whole_words_only(loaded):
    """"red" marks the tokens of the word red, not the "red" pieces of hundred / covered / reddish (the tiny
    vocabulary splits those into pieces that include "re" + "d"); any case; multi-word concepts."""
    backbone, _, _ = loaded

    def fallback(prompt):  # every real token but EOS
        enc = backbone._tokenize([prompt])
        real = enc.attention_mask[0].bool()
        return real & (enc.input_ids[0] != backbone.tokenizer().eos_token_id)

    for prompt in ("a hundred red cars", "covered in red", "red hundred"):
        m = backbone.concept_token_mask(prompt, "red")
        assert 0 < m.sum() < fallback(prompt).sum() and _spelled(backbone, prompt, m) == "red", prompt
    # case-insensitive both ways (the tiny vocabulary has no "R": that piece is <unk>, still a token of the word)
    up = backbone.concept_token_mask("a Red car", "red")
    assert _spelled(backbone, "a Red car", up) == "Red" and torch.equal(
        backbone.concept_token_mask("a Red car", "RED"), up)
    two = backbone.concept_token_mask("red hundred red", "red")  # 16 tokens: short prompts
    assert two.sum() == 2 * backbone.concept_token_mask("a red car", "red").sum()
    # no whole-word occurrence: the fallback (all real tokens)
    for prompt in ("a reddish car", "a hundred cars"):
        assert torch.equal(backbone.concept_token_mask(prompt, "red"), fallback(prompt)), prompt
    # multi-word, any whitespace run and case
    for prompt in ("a van gogh tree", "a Van  Gogh tree"):
        vg = backbone.concept_token_mask(prompt, "van gogh")
        assert " ".join(_spelled(backbone, prompt, vg).lower().split()) == "van gogh", prompt
    assert torch.equal(backbone.concept_token_mask("a vangogh tree", "van gogh"), fallback("a vangogh tree"))


def _explicit_concept_attention(backbone, x, t, e, token_mask):
    """Reference: the model's own SDPA call replaced by an explicit softmax that keeps the probabilities."""
    import diffusers.models.attention_processor as ap

    probs = []
    real_sdpa = ap.F.scaled_dot_product_attention

    def explicit(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        p = torch.softmax((q @ k.transpose(-1, -2)) / q.size(-1) ** 0.5, dim=-1)
        probs.append(p)
        return p @ v

    ap.F.scaled_dot_product_attention = explicit
    try:
        with torch.no_grad():
            backbone.predict(x, t, e)
    finally:
        ap.F.scaled_dot_product_attention = real_sdpa
    n_text = e.size(1)
    return [p[:, :, n_text:, :n_text][..., token_mask].sum(-1).mean(1) for p in probs]


def test_attention_capture_matches_the_models_real_attention(loaded):
    backbone, erasers, emb = loaded
    x = torch.randn(1, *backbone.latent_shape(9, 32, 32))
    t = torch.tensor([600])
    prompt = "a nude person on a beach"
    mask = backbone.concept_token_mask(prompt, "nude")
    assert 0 < int(mask.sum()) < int((backbone._tokenize([prompt]).attention_mask[0]).sum())
    e = emb[prompt][None]
    with erasers.disabled():
        ref = _explicit_concept_attention(backbone, x, t, e, mask)
        with torch.no_grad(), backbone.capture_attention(mask[None], None, latent_shape=x.shape[1:]) as store:
            backbone.predict(x, t, e)
    names = ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
    assert sorted(store) == names  # keyed by attention-module name
    for name, expected in zip(names, ref):
        assert store[name].shape == (1, 3, 4)
        assert torch.allclose(store[name].flatten(1), expected, atol=1e-5)
    with torch.no_grad(), erasers.disabled(), backbone.capture_attention(
            mask[None], ["transformer_blocks.1.attn1"], latent_shape=x.shape[1:]) as only:
        backbone.predict(x, t, e)
    assert list(only) == ["transformer_blocks.1.attn1"] and torch.equal(only[names[1]], store[names[1]])


def test_attention_capture_scores_are_fp32_in_a_bf16_model(tiny_folder, loaded):
    """A bfloat16 transformer: the captured map is the float64 softmax of the model's own (bf16) q and k up to
    fp32 rounding; scores from a bf16 matmul (what the capture did before) are off by far more."""
    import diffusers.models.attention_processor as ap

    _, _, emb = loaded
    backbone = plugins.get_registry().get("backbone", "cogvideox").build(
        {"model_path": str(tiny_folder), "dtype": "bfloat16"})
    backbone.load("cpu")
    x = torch.randn(1, *backbone.latent_shape(9, 32, 32), generator=torch.Generator().manual_seed(0)) * 3
    t, prompt = torch.tensor([600]), "a nude person on a beach"
    mask, e = backbone.concept_token_mask(prompt, "nude"), emb[prompt][None]
    n_text = e.size(1)
    qk, real_sdpa = [], ap.F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):  # the model's own q, k (bf16, after QK-norm and RoPE)
        qk.append((q, k))
        return real_sdpa(q, k, v, *args, **kwargs)

    ap.F.scaled_dot_product_attention = spy
    try:
        with torch.no_grad(), backbone.capture_attention(mask[None], None, latent_shape=x.shape[1:]) as store:
            backbone.predict(x, t, e)
    finally:
        ap.F.scaled_dot_product_attention = real_sdpa

    def concept_mass(q, k, dtype):
        scores = (q.to(dtype) @ k.to(dtype).transpose(-1, -2)).double() / q.size(-1) ** 0.5
        return scores.softmax(-1)[:, :, n_text:, :n_text][..., mask].sum(-1).mean(1)

    assert len(qk) == 2 and qk[0][0].dtype == torch.bfloat16
    for name, (q, k) in zip(["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"], qk):
        got, exact = store[name].flatten(1).double(), concept_mass(q, k, torch.float64)
        bf16_scores = concept_mass(q, k, torch.bfloat16)
        assert (got - exact).abs().max() < 1e-6  # measured: ~2e-8
        assert (bf16_scores - exact).abs().max() > 2e-5  # measured: ~2e-4 (the test tells the two apart)


def test_concept_mask_per_frame_and_localization_loss():
    # frame 0: token 1 attends to the concept; frame 1: tokens 2 and 3; frame 2: flat
    att = torch.tensor([[[0.1, 0.9, 0.1, 0.1], [0.0, 0.0, 0.5, 0.6], [0.2, 0.2, 0.2, 0.2]]])
    m = concept_mask(att, 0.5)
    assert m.tolist() == [[[0, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0]]]

    class Ctx:
        def __init__(self, outputs):
            self.outputs = outputs

        def attention(self, cond, modules=None):
            return att

        def eraser_outputs(self, cond):
            return self.outputs

    loss = LocalizationLoss(options("localization", threshold=0.5))
    inside = torch.zeros(1, 12, 3)
    inside[0, 1] = inside[0, 6] = inside[0, 7] = 5.0  # only where the mask is 1
    assert loss(Ctx({"a": inside})) == 0
    outside = inside.clone()
    outside[0, 0] = 1.0
    assert loss(Ctx({"a": outside})) > 0


def test_localization_mask_lands_on_the_region_that_attends_to_the_concept():
    """Hand-set attention weights: only frame 1, token 2 looks at the concept token."""
    from diffusers.models.attention_processor import Attention

    from t2vu.backbones.cogvideox_model import _CaptureProcessor

    attn = Attention(query_dim=4, heads=1, dim_head=4, bias=True)
    with torch.no_grad():
        for lin in (attn.to_q, attn.to_k):
            lin.weight.copy_(torch.eye(4))
            lin.bias.zero_()
    e1, e2 = torch.eye(4)[0] * 6, torch.eye(4)[1] * 6
    text = torch.stack([e1, e2, e2])[None]  # token 0 is the concept
    video = torch.stack([e2] * 8)[None]  # 2 frames x 4 tokens
    video[0, 4 + 2] = e1
    store = {}
    proc = _CaptureProcessor(lambda *a, **k: None, store, "a", torch.tensor([[True, False, False]]), chunk=3)
    proc(attn, video, text)
    mask = concept_mask(store["a"].reshape(1, 2, 4), threshold=0.5)
    assert mask.tolist() == [[[0, 0, 0, 0], [0, 0, 1, 0]]]


@pytest.fixture(scope="module")
def cog15_folder(tmp_path_factory):
    """A tiny CogVideoX1.5 folder (patch_size_t=2, one block)."""
    from tiny import build_tiny_cogvideox

    return build_tiny_cogvideox(tmp_path_factory.mktemp("cog15") / "cog15", patch_size_t=2, layers=1)


def test_cogvideox15_layout_patch_size_t(cog15_folder):
    """CogVideoX1.5 (patch_size_t=2, slice RoPE grid): frames padded, stock output reproduced."""
    folder = cog15_folder
    backbone = plugins.get_registry().get("backbone", "cogvideox").build({"model_path": str(folder), "dtype": "float32"})
    backbone.load("cpu")
    shape = backbone.latent_shape(9, 32, 32)
    assert shape == (4, 4, 4, 4)  # 3 latent frames padded to a multiple of patch_size_t
    assert backbone.token_grid(shape) == (2, 4)
    from diffusers import CogVideoXPipeline

    pipe = CogVideoXPipeline.from_pretrained(folder)
    for ours, theirs in zip(backbone._rotary(shape), pipe._prepare_rotary_positional_embeddings(32, 32, 4, "cpu")):
        assert torch.equal(ours, theirs)  # the pipeline's own RoPE for these latents
    stock = pipe.transformer.eval()
    x, t = torch.randn(1, *shape), torch.tensor([250])
    e = backbone.encode_prompts(["a red car"])["a red car"][None]
    with torch.no_grad():
        ref = stock(hidden_states=x, encoder_hidden_states=e, timestep=t,
                    image_rotary_emb=backbone._rotary(shape), return_dict=False)[0]
        assert torch.equal(backbone.predict(x, t, e), ref)
        with backbone.capture_attention(torch.ones(1, 16, dtype=torch.bool), None, latent_shape=shape) as store:
            backbone.predict(x, t, e)
    assert store["transformer_blocks.0.attn1"].shape == (1, 2, 4)


def test_cogvideox15_decode_drops_the_padding_frames_as_the_pipeline_does(cog15_folder):
    """9 frames on CogVideoX1.5: 3 latent frames padded to 4 for patch_size_t=2; the pipeline drops the FIRST
    latent frame before decoding, so its video has 9 frames (decoding all 4 gives 16, one of them junk)."""
    from diffusers import CogVideoXPipeline

    from t2vu.core.sampling import generate, initial_noise

    backbone = plugins.get_registry().get("backbone", "cogvideox").build(
        {"model_path": str(cog15_folder), "dtype": "float32"})
    backbone.load("cpu")
    pipe = CogVideoXPipeline.from_pretrained(cog15_folder)
    pipe.set_progress_bar_config(disable=True)
    emb = backbone.encode_prompts(["", "a red car"])
    ours = generate(backbone, emb, ["a red car"], [3], num_frames=9, height=32, width=32, steps=2, guidance=5.0)
    ref = pipe("a red car", num_frames=9, height=32, width=32, num_inference_steps=2, guidance_scale=5.0,
               output_type="pt", max_sequence_length=16, latents=initial_noise((1, 4, 4, 4, 4), 3)).frames
    assert ours.shape == ref.shape == (1, 9, 3, 32, 32)
    assert torch.allclose(ours, ref, atol=1e-4)
    # decode alone: the pipeline's own decode of latents[:, 1:]; num_frames= says the same explicitly
    z = torch.randn(1, *backbone.latent_shape(9, 32, 32), generator=torch.Generator().manual_seed(1))
    video = backbone.decode(z)
    with torch.no_grad():
        stock = pipe.video_processor.postprocess_video(pipe.decode_latents(z[:, 1:]), output_type="pt")
    assert video.shape == stock.shape == (1, 9, 3, 32, 32) and torch.allclose(video, stock, atol=1e-5)
    assert torch.equal(backbone.decode(z, num_frames=9), video)
    assert backbone.decode(z, num_frames=13).shape[1] == pipe.decode_latents(z).shape[2]  # 4 real latent frames
    with pytest.raises(T2VUError, match="cannot make 17 frames"):
        backbone.decode(z, num_frames=17)
