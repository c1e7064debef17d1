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


def test_cogvideox15_layout_patch_size_t(tmp_path):
    """CogVideoX1.5 (patch_size_t=2, slice RoPE grid): frames padded, stock output reproduced."""
    from tiny import build_tiny_cogvideox

    folder = build_tiny_cogvideox(tmp_path / "cog15", patch_size_t=2, layers=1)
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
