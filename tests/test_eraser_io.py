"""Eraser files: our safetensors format, loading into a stock pipeline, upstream import/export, CLI.

The reference for "the eraser does what upstream T2VUnlearning does" is written
here by hand (``h + up(gelu(down(h)))`` on attn1's video output, as forward
hooks over the raw upstream tensors), independent of ``Adapter``/``EraserSet``.
"""

import contextlib
import functools
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from tiny import build_tiny_cogvideox

import t2vu
from t2vu.backbones.cogvideox_model import transformer_sites
from t2vu.core.cli import app
from t2vu.core.eraser_file import config_hash, read_eraser, save_eraser
from t2vu.core.eraser_load import load_eraser
from t2vu.core.upstream import export_upstream, import_upstream
from t2vu.core.errors import T2VUError
from t2vu.plugins.adapter import AdapterOptions
from t2vu.plugins.adapter_model import AdapterEraserFactory, EraserSet

torch.set_num_threads(1)
runner = CliRunner()
DIM, RANK, LAYERS = 32, 4, 2  # tiny pipeline: 2 heads x 16 = 32 wide, 2 blocks


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return build_tiny_cogvideox(tmp_path_factory.mktemp("tiny") / "CogVideoX-tiny")


@pytest.fixture(scope="module")
def pipe(tiny_folder):
    from diffusers import CogVideoXPipeline

    return CogVideoXPipeline.from_pretrained(tiny_folder)


@pytest.fixture
def transformer(pipe):
    """The shared stock transformer; every test must leave it without hooks."""
    yield pipe.transformer
    t = pipe.transformer
    assert not t._forward_pre_hooks and not t._forward_hooks
    assert all(not s.module._forward_hooks for s in transformer_sites(t))


def model_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, 3, 4, 4, 4, generator=g),      # [B, F, C, H, W] latents
                encoder_hidden_states=torch.randn(1, 16, 16, generator=g),  # [B, text tokens, text dim]
                timestep=torch.tensor([500]))


def forward(transformer):
    with torch.no_grad():
        return transformer(**model_inputs(), return_dict=False)[0]


def generate(pipe):
    """Two denoising steps of the real pipeline (RoPE, CFG), latents out."""
    return pipe("a nude person on a beach", num_inference_steps=2, height=32, width=32, num_frames=9,
                guidance_scale=6.0, output_type="latent", generator=torch.Generator().manual_seed(0)).frames


def upstream_weights(seed=1, layers=LAYERS, dim=DIM, rank=RANK, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    return {f"transformer_blocks.{i}.attn1.adapter": {
        "down.weight": torch.randn(rank, dim, generator=g) * scale,
        "down.bias": torch.randn(rank, generator=g) * scale,
        "up.weight": torch.randn(dim, rank, generator=g) * scale,
        "up.bias": torch.randn(dim, generator=g) * scale,
    } for i in range(layers)}


def write_upstream(folder, weights, rank=RANK, flat=False, config=True):
    folder.mkdir(parents=True, exist_ok=True)
    payload = weights
    if flat:
        payload = {f"{site}.{p}": t for site, params in weights.items() for p, t in params.items()}
    torch.save(payload, folder / "eraser_weights.pt")
    if config:
        (folder / "eraser_config.json").write_text(json.dumps({"eraser_type": "adapter", "eraser_rank": rank}))
    return folder


@contextlib.contextmanager
def reference_hooks(transformer, weights):
    """Upstream's CogVideoXWithEraser by hand: attn1 video output h -> h + up(gelu(down(h)))."""
    handles = []
    for i, block in enumerate(transformer.transformer_blocks):
        p = weights[f"transformer_blocks.{i}.attn1.adapter"]

        def hook(_module, _inputs, output, p=p):
            h, encoder = output
            delta = F.linear(F.gelu(F.linear(h, p["down.weight"], p["down.bias"])), p["up.weight"], p["up.bias"])
            return h + delta, encoder

        handles.append(block.attn1.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def fresh_erasers(transformer, rank=RANK, randomise=False, **options):
    erasers = AdapterEraserFactory(AdapterOptions(rank=rank, **options)).build(transformer_sites(transformer))
    if randomise:
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for p in erasers.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return erasers


# -- format ------------------------------------------------------------------------------
def test_config_hash_is_stable_and_ignores_private_keys():
    a = {"num_layers": 2, "patch_size": 2, "sample_size": (4, 4), "_name_or_path": "/home/x/model"}
    b = {"sample_size": [4, 4], "patch_size": 2, "num_layers": 2, "_diffusers_version": "0.1"}
    assert config_hash(a) == config_hash(b)
    assert len(config_hash(a)) == 16 and int(config_hash(a), 16) >= 0
    assert config_hash({**a, "num_layers": 3}) != config_hash(a)


def test_save_read_round_trip(transformer, tmp_path):
    erasers = fresh_erasers(transformer, randomise=True)
    spec = {"concept": {"target": "nudity"}, "training": {"steps": 3}}
    path = save_eraser(tmp_path / "out" / "eraser.safetensors", erasers, backbone="cogvideox",
                       backbone_config=dict(transformer.config), target="nudity", spec=spec,
                       extra={"steps_done": 3, "losses": {"total": 0.5}})
    assert path.exists() and [p.name for p in path.parent.iterdir()] == ["eraser.safetensors"]

    with safe_open(str(path), framework="pt") as fh:  # on disk: plain strings only
        raw = fh.metadata()
    assert all(isinstance(v, str) for v in raw.values())
    assert raw["format"] == "t2vu-eraser" and raw["format_version"] == "1" and raw["rank"] == "4"

    read = read_eraser(path)
    expected = erasers.state_dict_by_site()
    assert set(read.tensors) == set(expected) and "transformer_blocks.0.attn1.down.weight" in read.tensors
    for key, tensor in expected.items():
        assert torch.equal(read.tensors[key], tensor) and read.tensors[key].dtype == torch.float32
    meta = read.metadata
    assert meta["backbone"] == "cogvideox" and meta["eraser_type"] == "adapter" and meta["rank"] == 4
    assert meta["backbone_config_hash"] == config_hash(transformer.config)
    assert meta["backbone_config"]["num_layers"] == LAYERS and "_name_or_path" not in meta["backbone_config"]
    assert meta["sites"] == ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
    assert meta["eraser_options"] == {"rank": 4, "sites": None, "streams": ["video"]}
    assert meta["target"] == "nudity" and meta["spec"] == spec
    assert meta["steps_done"] == 3 and meta["losses"] == {"total": 0.5}


def test_write_is_atomic(transformer, tmp_path, monkeypatch):
    path = save_eraser(tmp_path / "eraser.safetensors", fresh_erasers(transformer), backbone="cogvideox",
                       backbone_config=dict(transformer.config), target="nudity")
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"half an eraser")
        raise RuntimeError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        save_eraser(path, fresh_erasers(transformer, randomise=True), backbone="cogvideox",
                    backbone_config=dict(transformer.config), target="nudity")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["eraser.safetensors"]  # no temp file left behind


def test_bad_files_are_rejected_clearly(transformer, tmp_path):
    with pytest.raises(T2VUError, match="eraser file not found"):
        read_eraser(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 3 + b"this is not a safetensors file at all")
    with pytest.raises(T2VUError, match="not a safetensors file"):
        read_eraser(junk)
    other = tmp_path / "lora.safetensors"
    save_file({"lora.weight": torch.zeros(2, 2)}, str(other), metadata={"format": "pt"})
    with pytest.raises(T2VUError, match="safetensors file but not a t2vu eraser"):
        load_eraser(transformer, other)
    future = tmp_path / "future.safetensors"
    save_file({"x": torch.zeros(1)}, str(future), metadata={"format": "t2vu-eraser", "format_version": "2"})
    with pytest.raises(T2VUError, match="unsupported t2vu eraser format_version '2'"):
        read_eraser(future)
    truncated = tmp_path / "truncated.safetensors"
    good = save_eraser(tmp_path / "good.safetensors", fresh_erasers(transformer), backbone="cogvideox",
                       backbone_config=dict(transformer.config), target="x")
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(T2VUError, match="truncated"):
        read_eraser(truncated)
    upstream = write_upstream(tmp_path / "upstream", upstream_weights())
    with pytest.raises(T2VUError, match="t2vu eraser import"):
        load_eraser(transformer, upstream)
    with pytest.raises(T2VUError, match="CogVideoXPipeline"):
        load_eraser(object(), good)

    r = invoke("eraser", "info", other)
    assert r.exit_code == 1 and "not a t2vu eraser" in r.output and "Traceback" not in r.output


# -- loading into the stock pipeline --------------------------------------------------------
def test_fresh_eraser_leaves_outputs_unchanged(transformer, tmp_path):
    stock = forward(transformer)
    path = save_eraser(tmp_path / "e.safetensors", fresh_erasers(transformer), backbone="cogvideox",
                       backbone_config=dict(transformer.config), target="nudity")
    with load_eraser(transformer, path) as handle:
        assert isinstance(handle.erasers, EraserSet) and handle.attached
        assert torch.equal(forward(transformer), stock)
    assert not handle.attached


def test_text_stream_erasers_edit_the_text_tokens_attn1_reads(pipe, transformer, tmp_path):
    """eraser.streams [text]: each block's attn1 is called with text + adapter(text); saved, loaded into a
    stock pipeline, it gives exactly that; video-only sites are untouched; no upstream format exists."""
    erasers = fresh_erasers(transformer, randomise=True, streams=["video", "text"])
    assert erasers.site_names == ["transformer_blocks.0.attn1", "transformer_blocks.0.attn1.text",
                                  "transformer_blocks.1.attn1", "transformer_blocks.1.attn1.text"]
    text_only = fresh_erasers(transformer, randomise=True, streams=["text"])
    path = save_eraser(tmp_path / "text.safetensors", text_only, backbone="cogvideox",
                       backbone_config=dict(transformer.config), target="nudity")
    params = {s: dict(text_only.eraser(s).state_dict()) for s in text_only.site_names}

    def pre_hook(module, args, kwargs, p):
        e = kwargs["encoder_hidden_states"]
        d = F.linear(F.gelu(F.linear(e, p["down.weight"], p["down.bias"])), p["up.weight"], p["up.bias"])
        return args, {**kwargs, "encoder_hidden_states": e + d}

    stock = forward(transformer)
    handles = [block.attn1.register_forward_pre_hook(
        functools.partial(pre_hook, p=params[f"transformer_blocks.{i}.attn1.text"]), with_kwargs=True)
        for i, block in enumerate(transformer.transformer_blocks)]
    try:
        reference = forward(transformer)
    finally:
        for h in handles:
            h.remove()
    assert (reference - stock).abs().max() > 1e-2
    with t2vu.load_eraser(pipe, path) as handle:
        assert handle.erasers.site_names == ["transformer_blocks.0.attn1.text", "transformer_blocks.1.attn1.text"]
        torch.testing.assert_close(forward(transformer), reference, rtol=1e-5, atol=1e-6)
        with handle.disabled():
            assert torch.equal(forward(transformer), stock)
        with handle.erasers.recording() as outputs:
            forward(transformer)
        assert outputs == {}  # text sites have no place in the video: not recorded (localization)
    assert torch.equal(forward(transformer), stock)
    assert not any(b.attn1._forward_pre_hooks for b in transformer.transformer_blocks)
    both = save_eraser(tmp_path / "both.safetensors", erasers, backbone="cogvideox",
                       backbone_config=dict(transformer.config), target="nudity")
    with load_eraser(transformer, both) as handle:  # a site's name prefixes its text site's: keys stay apart
        for site in erasers.site_names:
            for k, v in erasers.eraser(site).state_dict().items():
                assert torch.equal(handle.erasers.eraser(site).state_dict()[k], v)
    with pytest.raises(T2VUError, match="no upstream format"):
        export_upstream(path, tmp_path / "up")
    assert not (tmp_path / "up").exists()


def test_adapter_options_choose_sites_and_streams(transformer):
    """eraser.sites: fnmatch patterns over attention-module names or the backbone's preset names; a pattern that
    matches nothing is refused with the model's names and presets; unset: the backbone's default preset."""
    import pydantic

    sites = transformer_sites(transformer)
    assert fresh_erasers(transformer, sites=["transformer_blocks.1.attn1"], streams=["text"]).site_names == [
        "transformer_blocks.1.attn1.text"]
    presets = {"all": ["transformer_blocks.*.attn1"], "first": ["transformer_blocks.0.*"]}
    build = lambda **o: AdapterEraserFactory(AdapterOptions(rank=4, **o)).build(sites, presets=presets,  # noqa: E731
                                                                                 default="first")
    assert build().site_names == ["transformer_blocks.0.attn1"]  # the default preset
    assert build(sites=["all"]).site_names == ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
    assert build(sites=["transformer_blocks.?.attn1"], streams=["video", "text"]).site_names == [
        s.name for s in sites]
    with pytest.raises(ValueError, match=r"'transformer_blocks.5.attn1' matches no attention module of this model "
                                         r"\(it has 2: transformer_blocks.0.attn1 ... transformer_blocks.1.attn1; "
                                         r"presets: \['all', 'first'\]\)"):
        build(sites=["transformer_blocks.5.attn1"])
    with pytest.raises(pydantic.ValidationError):
        AdapterOptions(rank=4, sites=[])
    with pytest.raises(ValueError, match=r"no \['text'\] sites"):
        AdapterEraserFactory(AdapterOptions(rank=4, streams=["text"])).build([s for s in sites if s.stream == "video"])
    for bad in ([], ["audio"]):
        with pytest.raises(pydantic.ValidationError):
            AdapterOptions(rank=4, streams=bad)


def test_upstream_import_gives_upstream_outputs(pipe, transformer, tiny_folder, tmp_path):
    weights = upstream_weights()
    folder = write_upstream(tmp_path / "t2vu-erasers" / "nudity", weights)
    out = tmp_path / "nudity.safetensors"
    r = invoke("eraser", "import", folder, "--backbone", "cogvideox", "--out", out, "--model", tiny_folder, "--target", "nudity")
    assert r.exit_code == 0, r.output
    assert "eraser written" in r.output and "warning" not in r.output

    stock, stock_video = forward(transformer), generate(pipe)
    with reference_hooks(transformer, weights):
        reference, reference_video = forward(transformer), generate(pipe)
    assert (reference - stock).abs().max() > 1e-2  # the eraser really changes the prediction

    handle = t2vu.load_eraser(pipe, out)
    try:
        assert handle.metadata["target"] == "nudity" and handle.scale == 1.0
        assert all(p.dtype == torch.float32 and not p.requires_grad for p in handle.erasers.parameters())
        torch.testing.assert_close(forward(transformer), reference, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(generate(pipe), reference_video, rtol=1e-5, atol=1e-6)
        handle.scale = 0.0
        assert torch.equal(forward(transformer), stock)
        handle.scale = 0.5
        half = forward(transformer)
        assert (half - stock).abs().max() > 1e-3 and (half - reference).abs().max() > 1e-3
        with handle.disabled():
            assert torch.equal(forward(transformer), stock)
    finally:
        handle.remove()
    assert torch.equal(forward(transformer), stock)
    assert torch.equal(generate(pipe), stock_video)
    handle.remove()  # idempotent

    with load_eraser(pipe, out, scale=0) as handle:
        assert torch.equal(forward(transformer), stock)


def test_flat_upstream_keys_without_model_warn_and_load(transformer, tmp_path):
    weights = upstream_weights(seed=3)
    folder = write_upstream(tmp_path / "flat", weights, flat=True)
    out = tmp_path / "flat.safetensors"
    with pytest.warns(UserWarning, match="--model"):
        import_upstream(folder, out, backbone="cogvideox")
    meta = read_eraser(out).metadata
    assert meta["backbone_config_hash"] == "unknown" and meta["target"] is None
    assert meta["source"] == "upstream T2VUnlearning" and meta["upstream_config"]["eraser_rank"] == RANK
    with reference_hooks(transformer, weights):
        reference = forward(transformer)
    with pytest.warns(UserWarning, match="only its sites and widths are checked"):
        handle = load_eraser(transformer, out)
    with handle:
        torch.testing.assert_close(forward(transformer), reference, rtol=1e-5, atol=1e-6)

    r = invoke("eraser", "import", folder, "--backbone", "cogvideox", "--out", tmp_path / "cli.safetensors")
    assert r.exit_code == 0 and "warning:" in r.output and "--model" in r.output


def test_half_precision_upstream_weights_become_fp32(transformer, tmp_path):
    weights = upstream_weights(seed=4)
    half = {site: {p: t.to(torch.bfloat16) for p, t in params.items()} for site, params in weights.items()}
    folder = write_upstream(tmp_path / "bf16", half)
    out = tmp_path / "bf16.safetensors"
    with pytest.warns(UserWarning):
        import_upstream(folder, out, backbone="cogvideox")
    read = read_eraser(out)
    assert read.metadata["upstream_dtypes"] == ["bfloat16"]
    for site, params in half.items():
        for p, t in params.items():
            stored = read.tensors[f"{site[:-len('.adapter')]}.{p}"]
            assert stored.dtype == torch.float32 and torch.equal(stored, t.float())


def test_erasers_follow_the_inputs_device(transformer, tmp_path):
    """With CPU offload the transformer's inputs arrive on the GPU: the erasers move there (fp32)."""
    path = save_eraser(tmp_path / "e.safetensors", fresh_erasers(transformer), backbone="cogvideox",
                       backbone_config=dict(transformer.config), target="x")
    with load_eraser(transformer, path) as handle:
        assert {p.device.type for p in handle.erasers.parameters()} == {"cpu"}
        handle._follow_device(transformer, (), {"hidden_states": torch.empty(1, device="meta")})
        assert {(p.device.type, p.dtype) for p in handle.erasers.parameters()} == {("meta", torch.float32)}


def test_mismatched_transformer_is_refused(transformer, tmp_path, tmp_path_factory):
    from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel

    path = save_eraser(tmp_path / "e.safetensors", fresh_erasers(transformer, randomise=True),
                       backbone="cogvideox", backbone_config=dict(transformer.config), target="nudity")
    three = CogVideoXPipeline.from_pretrained(build_tiny_cogvideox(tmp_path_factory.mktemp("three") / "p", layers=3))
    with pytest.raises(T2VUError, match=r"num_layers: eraser 2, model 3") as exc:
        load_eraser(three, path)
    assert "check_config=False" in str(exc.value)
    assert not any(s.module._forward_hooks or s.module._forward_pre_hooks for s in transformer_sites(three.transformer))

    base = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
    same_width = CogVideoXTransformer3DModel.from_config({**base, "num_attention_heads": 4, "attention_head_dim": 8})
    with pytest.raises(T2VUError) as exc:
        load_eraser(same_width, path)
    assert "num_attention_heads: eraser 2, model 4" in str(exc.value)
    assert "attention_head_dim: eraser 16, model 8" in str(exc.value)
    with load_eraser(same_width, path, check_config=False) as handle:  # widths agree: the user may insist
        assert len(handle.erasers.site_names) == LAYERS

    wider = CogVideoXTransformer3DModel.from_config({**base, "num_attention_heads": 4})
    with pytest.raises(T2VUError, match=r"width mismatch .*transformer_blocks.0.attn1 \(eraser 32, model 64\)"):
        load_eraser(wider, path, check_config=False)
    one_layer = CogVideoXTransformer3DModel.from_config({**base, "num_layers": 1})
    with pytest.raises(T2VUError, match=r"not in this transformer: transformer_blocks.1.attn1"):
        load_eraser(one_layer, path, check_config=False)


def test_config_keys_missing_at_their_default_are_not_a_mismatch(transformer, tmp_path):
    """An eraser written with another diffusers version lacks newer config keys: still loads."""
    config = dict(transformer.config)
    assert config["patch_bias"] is True  # the constructor default
    older = {k: v for k, v in config.items() if k != "patch_bias"}
    path = save_eraser(tmp_path / "old.safetensors", fresh_erasers(transformer), backbone="cogvideox",
                       backbone_config=older, target="x")
    assert read_eraser(path).metadata["backbone_config_hash"] != config_hash(config)
    load_eraser(transformer, path).remove()

    no_layers = {k: v for k, v in config.items() if k != "num_layers"}  # default 30, model has 2
    path = save_eraser(tmp_path / "bad.safetensors", fresh_erasers(transformer), backbone="cogvideox",
                       backbone_config=no_layers, target="x")
    with pytest.raises(T2VUError, match=r"num_layers: eraser \(absent\), model 2"):
        load_eraser(transformer, path)


# -- upstream import validation ----------------------------------------------------------
class Payload:
    """Unpickling this runs code (opens a file): weights_only=True must refuse it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_upstream_import_validates(transformer, tmp_path, tiny_folder):
    out = tmp_path / "out.safetensors"
    weights = upstream_weights()
    with pytest.raises(T2VUError, match="config says rank 8 but the tensors have rank 4"):
        import_upstream(write_upstream(tmp_path / "rank", weights, rank=8), out, model_path=tiny_folder, backbone="cogvideox")
    broken = {site: dict(params) for site, params in weights.items()}
    del broken["transformer_blocks.1.attn1.adapter"]["up.bias"]
    with pytest.raises(T2VUError, match="missing eraser tensors: transformer_blocks.1.attn1.up.bias"):
        import_upstream(write_upstream(tmp_path / "missing", broken), out, model_path=tiny_folder, backbone="cogvideox")
    bad_shape = {site: dict(params) for site, params in weights.items()}
    bad_shape["transformer_blocks.0.attn1.adapter"]["up.weight"] = torch.zeros(DIM, RANK + 1)
    with pytest.raises(T2VUError, match=r"up.weight has shape \[32, 5\], expected \[32, 4\]"):
        import_upstream(write_upstream(tmp_path / "shape", bad_shape), out, model_path=tiny_folder, backbone="cogvideox")
    with pytest.raises(T2VUError, match=r"do not exist in this model \(num_layers 2, --model\)"):
        import_upstream(write_upstream(tmp_path / "deep", upstream_weights(layers=3)), out, model_path=tiny_folder, backbone="cogvideox")
    with pytest.raises(T2VUError, match="eraser width is 64 but the --model transformer's is 32"):
        import_upstream(write_upstream(tmp_path / "wide", upstream_weights(dim=64)), out, model_path=tiny_folder, backbone="cogvideox")
    with pytest.raises(T2VUError, match="no eraser_weights.pt"):
        import_upstream(tmp_path, out)

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil"
    evil.mkdir()
    torch.save({"transformer_blocks.0.attn1.adapter": Payload(str(marker))}, evil / "eraser_weights.pt")
    (evil / "eraser_config.json").write_text(json.dumps({"eraser_type": "adapter", "eraser_rank": RANK}))
    with pytest.raises(T2VUError, match="refused to unpickle"):
        import_upstream(evil, out)
    assert not marker.exists() and not out.exists()


# -- export, CLI ------------------------------------------------------------------------------
def test_export_reimport_round_trip(transformer, tiny_folder, tmp_path):
    weights = upstream_weights(seed=5)
    first = import_upstream(write_upstream(tmp_path / "up", weights), tmp_path / "a.safetensors",
                            backbone="cogvideox", model_path=tiny_folder, target="nudity")
    r = invoke("eraser", "export", first, "--out", tmp_path / "exported")
    assert r.exit_code == 0, r.output

    exported = torch.load(tmp_path / "exported" / "eraser_weights.pt", weights_only=True)
    assert set(exported) == set(weights)
    for site, params in weights.items():
        assert set(exported[site]) == set(params)
        assert all(torch.equal(exported[site][p], t) for p, t in params.items())
    config = json.loads((tmp_path / "exported" / "eraser_config.json").read_text())
    assert config["eraser_type"] == "adapter" and config["eraser_rank"] == RANK

    second = import_upstream(tmp_path / "exported", tmp_path / "b.safetensors")  # config travels along: no warning
    a, b = read_eraser(first), read_eraser(second)
    assert set(a.tensors) == set(b.tensors) and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert b.metadata["backbone_config_hash"] == a.metadata["backbone_config_hash"] == config_hash(transformer.config)
    assert b.metadata["target"] == "nudity"

    r = invoke("eraser", "export", first, "--out", tmp_path / "exported")
    assert r.exit_code == 1 and "--force" in r.output
    with pytest.raises(T2VUError, match="already holds eraser_weights.pt"):
        export_upstream(second, tmp_path / "exported")
    assert invoke("eraser", "export", first, "--out", tmp_path / "exported", "--force").exit_code == 0


def test_cli_import_never_overwrites_without_force(tiny_folder, tmp_path):
    out = tmp_path / "e.safetensors"
    one = write_upstream(tmp_path / "one", upstream_weights(seed=1))
    two = write_upstream(tmp_path / "two", upstream_weights(seed=2))
    assert invoke("eraser", "import", one, "--backbone", "cogvideox", "--out", out, "--model", tiny_folder).exit_code == 0
    before = out.read_bytes()
    r = invoke("eraser", "import", two, "--backbone", "cogvideox", "--out", out, "--model", tiny_folder)
    assert r.exit_code == 1 and "already exists" in r.output and "--force" in r.output
    assert out.read_bytes() == before
    r = invoke("eraser", "import", two, "--backbone", "cogvideox", "--out", out, "--model", tiny_folder, "--force")
    assert r.exit_code == 0 and out.read_bytes() != before
    r = invoke("eraser", "import", tmp_path / "missing", "--out", tmp_path / "x.safetensors")
    assert r.exit_code == 1 and "not found" in r.output


def test_cli_info(transformer, tiny_folder, tmp_path):
    out = tmp_path / "e.safetensors"
    folder = write_upstream(tmp_path / "up", upstream_weights())
    assert invoke("eraser", "import", folder, "--backbone", "cogvideox", "--out", out, "--model", tiny_folder, "--target", "nudity").exit_code == 0
    r = invoke("eraser", "info", out)
    assert r.exit_code == 0, r.output
    for text in ("nudity", "cogvideox", "CogVideoXTransformer3DModel", config_hash(transformer.config),
                 "adapter", "transformer_blocks.0.attn1", "format version"):
        assert text in r.output, text
    r = invoke("eraser", "info", out, "--json")
    meta = json.loads(r.output)
    assert meta["format"] == "t2vu-eraser" and meta["format_version"] == "1"
    assert meta["rank"] == RANK and len(meta["sites"]) == LAYERS and meta["target"] == "nudity"
    assert meta["backbone_config_hash"] == config_hash(transformer.config)
    assert invoke("eraser", "info", tmp_path / "missing.safetensors").exit_code == 1


LIGHT = """
import sys
import t2vu
from t2vu.core.cli import main
for args in (["--help"], ["eraser", "--help"], ["eraser", "info", {file!r}]):
    try:
        main(args)
    except SystemExit as e:
        assert not e.code, (args, e.code)
print("HEAVY=" + ",".join(m for m in ("torch", "diffusers", "safetensors.torch") if m in sys.modules))
print("LOAD=" + t2vu.load_eraser.__module__ + "." + t2vu.load_eraser.__name__)
"""


def test_import_t2vu_and_eraser_info_stay_light(transformer, tmp_path):
    path = save_eraser(tmp_path / "e.safetensors", fresh_erasers(transformer), backbone="cogvideox",
                       backbone_config=dict(transformer.config), target="nudity")
    out = subprocess.run([sys.executable, "-c", LIGHT.format(file=str(path))],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "HEAVY=\n" in out.stdout, out.stdout[-2000:]
    assert "LOAD=t2vu.core.eraser_load.load_eraser" in out.stdout
