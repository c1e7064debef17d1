"""`t2vu estimate`: the memory model against the H200 reference measurements (shared/anchors) and against
measured peak RSS of tiny training runs on the CPU; the command's JSON, levers and bad input."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from t2vu.core import estimate as E
from t2vu.core import plugins
from t2vu.core.cli import app
from t2vu.core.spec import load_spec

runner = CliRunner()

# -- config-only model folders of the real sizes ------------------------------------------------------------
COGVIDEOX_5B = dict(_class_name="CogVideoXTransformer3DModel", num_attention_heads=48, attention_head_dim=64,
                    in_channels=16, out_channels=16, time_embed_dim=512, text_embed_dim=4096, num_layers=42,
                    sample_width=90, sample_height=60, sample_frames=49, patch_size=2, temporal_compression_ratio=4,
                    max_text_seq_length=226, use_rotary_positional_embeddings=True,
                    use_learned_positional_embeddings=False)
T5_XXL = dict(model_type="t5", d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
              feed_forward_proj="gated-gelu", is_encoder_decoder=False)
HUNYUAN_13B = dict(_class_name="HunyuanVideoTransformer3DModel", in_channels=16, out_channels=16,
                   num_attention_heads=24, attention_head_dim=128, num_layers=20, num_single_layers=40,
                   num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm",
                   guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768, rope_theta=256.0,
                   rope_axes_dim=[16, 56, 56])
LLAMA_8B = dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, vocab_size=128320, max_position_embeddings=8192)
CLIP_L = dict(model_type="clip_text_model", hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, vocab_size=49408, max_position_embeddings=77, projection_dim=768)
WAN_1_3B = dict(_class_name="WanTransformer3DModel", patch_size=[1, 2, 2], num_attention_heads=12,
                attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960,
                num_layers=30, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
UMT5_XXL = dict(model_type="umt5", d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=256384,
                feed_forward_proj="gated-gelu", is_encoder_decoder=False)


def write_folder(path: Path, files: dict) -> Path:
    """Only JSON configs (and empty tokenizer folders): no weights."""
    for rel, data in files.items():
        target = path / rel
        if data is None:
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(data))
    return path


def cogvideox_folder(path: Path) -> Path:
    return write_folder(path, {
        "model_index.json": {"_class_name": "CogVideoXPipeline", "text_encoder": ["transformers", "T5EncoderModel"],
                             "vae": ["diffusers", "AutoencoderKLCogVideoX"]},
        "transformer/config.json": COGVIDEOX_5B, "text_encoder/config.json": T5_XXL, "tokenizer": None,
        "scheduler/scheduler_config.json": {"_class_name": "CogVideoXDDIMScheduler", "prediction_type": "v_prediction"},
        "vae/config.json": {"block_out_channels": [128, 256, 256, 512], "temporal_compression_ratio": 4}})


def hunyuan_folder(path: Path) -> Path:
    return write_folder(path, {
        "model_index.json": {"_class_name": "HunyuanVideoPipeline", "text_encoder": ["transformers", "LlamaModel"],
                             "text_encoder_2": ["transformers", "CLIPTextModel"]},
        "transformer/config.json": HUNYUAN_13B, "text_encoder/config.json": LLAMA_8B,
        "text_encoder_2/config.json": CLIP_L, "tokenizer": None, "tokenizer_2": None,
        "scheduler/scheduler_config.json": {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 7.0},
        "vae/config.json": {"spatial_compression_ratio": 8, "temporal_compression_ratio": 4}})


def wan_folder(path: Path) -> Path:
    return write_folder(path, {
        "model_index.json": {"_class_name": "WanPipeline", "text_encoder": ["transformers", "UMT5EncoderModel"]},
        "transformer/config.json": WAN_1_3B, "text_encoder/config.json": UMT5_XXL, "tokenizer": None,
        "scheduler/scheduler_config.json": {"_class_name": "UniPCMultistepScheduler", "use_flow_sigmas": True,
                                            "prediction_type": "flow_prediction", "flow_shift": 3.0},
        "vae/config.json": {"scale_factor_temporal": 4, "scale_factor_spatial": 8}})


SPEC = """\
backbone: {{name: {backbone}, model_path: {model}, dtype: {dtype}{extra}}}
eraser: {{name: adapter, rank: {rank}{sites}}}
concept: {{target: nudity, prompts: [a nude person on a beach]}}
preserved: {{source: list, concepts: [a dog in a park]}}
losses: [{{name: negative_guidance}}, {{name: preservation}}, {{name: localization}}]
training: {{steps: {steps}, batch_size: {batch}, num_frames: {frames}, height: {height}, width: {width},
           gradient_checkpointing: {gc}, seed: 0}}
output: {{dir: {out}, overwrite: true}}
"""


def write_spec(path: Path, backbone: str, model: Path, frames: int, height: int, width: int, *, dtype="bfloat16",
               extra="", rank=128, sites="", steps=500, batch=1, gc=True) -> Path:
    path.write_text(SPEC.format(backbone=backbone, model=model, dtype=dtype, extra=extra, rank=rank, sites=sites,
                                steps=steps, batch=batch, frames=frames, height=height, width=width,
                                gc=str(gc).lower(), out=path.parent / f"out-{path.stem}"))
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("configs")
    return {"cogvideox": cogvideox_folder(root / "CogVideoX-5b"), "hunyuanvideo": hunyuan_folder(root / "HunyuanVideo"),
            "wan": wan_folder(root / "Wan2.1-T2V-1.3B")}


# -- the reference measurements (shared/anchors/*.json, one H200, bf16, one row, rank-128 adapters) -------------
#: (backbone, clip, eraser.sites, pass, measured peak GB, measured seconds); pass: forward (no grad),
#: checkpointed / full (forward + backward through the adapters with / without gradient checkpointing),
#: fp8 / fp8-checkpointed (diffusers' layerwise casting, fp8 storage)
ANCHORS = [
    ("cogvideox", (49, 480, 720), "", "forward", 11.81, 0.8908),
    ("cogvideox", (49, 480, 720), "", "checkpointed", 17.02, 3.2636),
    ("cogvideox", (49, 480, 720), "", "full", 67.36, 2.3667),
    ("cogvideox", (25, 480, 720), "", "forward", 11.23, 0.3913),
    ("cogvideox", (25, 480, 720), "", "checkpointed", 14.08, 1.3654),
    ("cogvideox", (25, 480, 720), "", "full", 41.48, 0.9675),
    ("hunyuanvideo", (33, 320, 512), ", sites: [all]", "forward", 24.66, 0.3187),
    ("hunyuanvideo", (33, 320, 512), ", sites: [all]", "checkpointed", 27.19, 1.0857),
    ("hunyuanvideo", (61, 544, 960), ", sites: [all]", "forward", 27.45, 3.1806),
    ("hunyuanvideo", (61, 544, 960), ", sites: [all]", "checkpointed", 40.75, 13.195),
    ("cogvideox", (49, 480, 720), "", "fp8-forward", 7.37, 0.8835),
    ("cogvideox", (49, 480, 720), "", "fp8-checkpointed", 12.72, 3.2138),
    ("cogvideox", (25, 480, 720), "", "fp8-forward", 6.80, 0.4007),
    ("cogvideox", (25, 480, 720), "", "fp8-checkpointed", 9.80, 1.3622),
    ("hunyuanvideo", (33, 320, 512), ", sites: [all]", "fp8-checkpointed", 23.37, 1.1345),
]
#: anchors the model is known to miss by more than 15 % (docs/estimate.md says why)
KNOWN_MISSES = {("hunyuanvideo", (33, 320, 512), "fp8-checkpointed")}


def anchor_prediction(folders, tmp_path, backbone, clip, sites, mode):
    spec = write_spec(tmp_path / "anchor.yaml", backbone, folders[backbone], *clip, sites=sites)
    resolved = load_spec(spec, plugins.get_registry())
    ctx = E.context(resolved)
    settings = replace(E.settings_of(resolved), gradient_checkpointing=not mode.endswith("full"),
                       fp8_weights=mode.startswith("fp8"))
    return E.reference_pass(ctx, settings, "forward" if mode.endswith("forward") else "backward")


@pytest.mark.parametrize("backbone, clip, sites, mode, measured, seconds", ANCHORS,
                         ids=[f"{a[0]}-{'x'.join(map(str, a[1]))}-{a[3]}" for a in ANCHORS])
def test_reference_passes_within_15_percent_of_the_h200_measurements(folders, tmp_path, backbone, clip, sites, mode,
                                                                     measured, seconds):
    peak, predicted_seconds = anchor_prediction(folders, tmp_path, backbone, clip, sites, mode)
    error = peak / E.GB / measured - 1
    print(f"{backbone} {clip} {mode}: predicted {peak / E.GB:.2f} GB, measured {measured} GB ({error:+.1%}); "
          f"{predicted_seconds:.2f} s vs {seconds} s")
    if (backbone, clip, mode) in KNOWN_MISSES:
        assert abs(error) > 0.15  # still missed: update docs/estimate.md and this list when it is not
    else:
        assert abs(error) < 0.15


def test_fp8_weight_bytes_match_the_measured_layerwise_casting(folders, tmp_path):
    for backbone, sites, measured in (("cogvideox", "", 5.94), ("hunyuanvideo", ", sites: [all]", 15.41)):
        spec = write_spec(tmp_path / "fp8.yaml", backbone, folders[backbone], 33, 320, 512, sites=sites)
        resolved = load_spec(spec, plugins.get_registry())
        ctx = E.context(resolved)
        s = replace(E.settings_of(resolved), fp8_weights=True)
        assert abs(E._weights(ctx, ctx.facts(s), s) / E.GB - measured) < 0.02


# -- the command -------------------------------------------------------------------------------------------
def invoke(*args):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_json_from_a_folder_holding_only_configs(folders, tmp_path):
    assert not list(folders["cogvideox"].rglob("*.safetensors"))
    spec = write_spec(tmp_path / "s.yaml", "cogvideox", folders["cogvideox"], 49, 480, 720)
    r = invoke("estimate", str(spec), "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert set(E.LINES) == set(out["breakdown"]) and set(out["phases"]) == {"encoding", "frozen", "erased"}
    assert out["peak_gb"] == max(p["total_gb"] for p in out["phases"].values())
    assert out["peak_phase"] == "erased"
    b = out["breakdown"]
    assert abs(b["weights"] - 5570283072 * 2 / E.GB) < 1e-3  # CogVideoX-5B's parameters in bf16
    assert abs(b["erasers"] - 33164544 * 16 / E.GB) < 1e-3  # 42 rank-128 adapters, fp32 + grads + AdamW
    assert b["text_encoders"] > 8.8  # T5-XXL in bf16, while the transformer is loaded
    assert b["eraser_outputs"] > b["activations"] > 0 and b["attention_capture"] > 0
    it = out["iteration"]
    assert (it["frozen_rows"], it["erased_rows"], it["captured_rows"]) == (3, 2, 1)
    assert it["seconds"] > 0 and it["assumed_tflops"] == E.TFLOPS
    assert out["tokens"] == {"video": 13 * 30 * 45, "text": 226, "sequence": 13 * 30 * 45 + 226, "width": 3072,
                             "blocks": 42}


def test_rows_follow_the_loss_terms_and_the_anchor(folders, tmp_path):
    spec = write_spec(tmp_path / "s.yaml", "cogvideox", folders["cogvideox"], 25, 480, 720)
    text = spec.read_text().replace("losses: [{name: negative_guidance}, {name: preservation}, {name: localization}]",
                                    "losses: [{name: negative_guidance}]")
    spec.write_text(text.replace("concept: {target: nudity,", "concept: {target: nudity, anchor: clothed,"))
    r = invoke("estimate", str(spec), "--json", "--set", "training.batch_size=2")
    out = json.loads(r.output)
    # frozen: target and anchor prompt (the empty prompt is needed by no term); erased: target only; no capture
    it = out["iteration"]
    assert (it["frozen_rows"], it["erased_rows"], it["captured_rows"]) == (4, 2, 0)
    assert out["breakdown"]["eraser_outputs"] == 0 and out["breakdown"]["attention_capture"] == 0


def test_levers_in_order_until_it_fits(folders, tmp_path):
    spec = write_spec(tmp_path / "s.yaml", "cogvideox", folders["cogvideox"], 49, 480, 720, dtype="float32",
                      batch=2, gc=False)
    out = json.loads(invoke("estimate", str(spec), "--json", "--gpu-memory", "24").output)
    assert out["fits"] is False
    steps = out["recommendation"]["steps"]
    keys = [list(s["set"]) for s in steps]
    assert keys[:5] == [["training.gradient_checkpointing"], ["backbone.storage_dtype"], ["backbone.dtype"],
                        ["training.batch_size"], ["eraser.rank"]]
    peaks = [s["peak_gb"] for s in steps if s["kept"]]
    assert peaks == sorted(peaks, reverse=True) and peaks[0] < out["peak_gb"]
    assert steps[-1]["fits"] and not any(s["fits"] for s in steps[:-1])
    chosen = out["recommendation"]["recommended"]
    assert chosen["training.gradient_checkpointing"] is True and chosen["backbone.dtype"] == "bfloat16"
    assert chosen["backbone.storage_dtype"] == "float8_e4m3fn"
    assert "eraser.rank" not in chosen  # halving the rank saves under 1 % here: listed, not kept
    assert {s["lever"] for s in out["recommendation"]["not_available_yet"]} >= {"offload of frozen blocks"}
    # the recommended settings do fit, per the estimate itself
    sets = [a for k, v in chosen.items() for a in ("--set", f"{k}={str(v).lower() if isinstance(v, bool) else v}")]
    again = json.loads(invoke("estimate", str(spec), "--json", "--gpu-memory", "24", *sets).output)
    assert again["fits"] is True and again["recommendation"]["recommended"] == {}
    r = invoke("estimate", str(spec), "--gpu-memory", "24")  # the rich rendering
    assert r.exit_code == 0 and "recommended:" in r.output and "not available yet" in r.output


def test_every_builtin_backbone_and_the_toy(folders, tmp_path):
    for backbone, clip, extra in (("hunyuanvideo", (33, 320, 512), ""), ("wan", (81, 480, 832), "")):
        spec = write_spec(tmp_path / f"{backbone}.yaml", backbone, folders[backbone], *clip, extra=extra)
        out = json.loads(invoke("estimate", str(spec), "--json").output)
        assert out["peak_gb"] > out["breakdown"]["weights"] > 0
    out = json.loads(invoke("estimate", str(spec), "--json").output)
    assert out["breakdown"]["weights"] == pytest.approx(1418996800 * 2 / E.GB, rel=0.01)  # Wan 2.1 1.3B
    toy = Path(__file__).resolve().parents[1] / "examples" / "toy-erase-red.yaml"
    r = invoke("estimate", str(toy), "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["tokens"]["video"] == 4 * 8 * 8  # pixel-space: 4 frames of 32x32, patch 4


def test_bad_input_exits_2_like_preflight(folders, tmp_path):
    spec = write_spec(tmp_path / "s.yaml", "cogvideox", tmp_path / "missing", 49, 480, 720)
    r = invoke("estimate", str(spec))
    assert r.exit_code == 2 and "backbone.model_path" in r.output and "Traceback" not in r.output
    spec = write_spec(tmp_path / "s.yaml", "cogvideox", folders["cogvideox"], 50, 480, 720)
    r = invoke("estimate", str(spec))
    assert r.exit_code == 2 and "training.num_frames" in r.output and "4k+1" in r.output
    broken = cogvideox_folder(tmp_path / "broken")
    (broken / "transformer" / "config.json").unlink()
    spec = write_spec(tmp_path / "s.yaml", "cogvideox", broken, 49, 480, 720)
    r = invoke("estimate", str(spec))
    assert r.exit_code == 2 and "transformer/config.json" in r.output and "Traceback" not in r.output
    (broken / "transformer" / "config.json").write_text(json.dumps({**COGVIDEOX_5B, "num_layers": "many"}))
    r = invoke("estimate", str(spec))
    assert r.exit_code != 0 and "Traceback" not in r.output
    spec = write_spec(tmp_path / "s.yaml", "cogvideox", folders["cogvideox"], 49, 480, 720, sites=", sites: [nope]")
    r = invoke("estimate", str(spec))
    assert r.exit_code == 2 and "eraser.sites" in r.output


LIGHT = """
import sys
from t2vu.core.cli import main
try:
    main(["estimate", "--help"])
except SystemExit:
    pass
print("HEAVY=" + ",".join(sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules)))
"""


def test_help_stays_light():
    out = subprocess.run([sys.executable, "-c", LIGHT], capture_output=True, text=True, timeout=60)
    assert "HEAVY=\n" in out.stdout and "--gpu-memory" in out.stdout, out.stdout + out.stderr


# -- exact counts on a loaded tiny model ------------------------------------------------------------------------
def test_weights_and_eraser_counts_equal_the_loaded_model(tmp_path):
    import torch

    from tiny import build_tiny_cogvideox
    from t2vu.backbones.cogvideox_model import CogVideoXBackbone

    folder = build_tiny_cogvideox(tmp_path / "cog")
    spec = write_spec(tmp_path / "s.yaml", "cogvideox", folder, 9, 32, 32, dtype="float32", rank=8,
                      sites=", streams: [video, text]")
    resolved = load_spec(spec, plugins.get_registry())
    result = E.estimate(resolved)
    backbone = CogVideoXBackbone(resolved.backbone.options)
    backbone.load("cpu")
    loaded = sum(p.numel() * p.element_size() for p in backbone.transformer.parameters())
    assert result.prediction.parts["erased"]["weights"] == loaded
    erasers = resolved.eraser.build().build(backbone.sites(), presets=type(resolved.backbone.options).site_presets,
                                            default=type(resolved.backbone.options).default_sites)
    assert result.prediction.eraser_params == sum(p.numel() for p in erasers.parameters()) > 0
    assert torch.is_tensor(next(erasers.parameters()))


# -- measured peak RSS of tiny training runs on the CPU ----------------------------------------------------------
#: the relative error allowed on the peak's growth between two clip sizes (fixed costs cancel). Measured when this
#: was written (2 steps, rank 8, gradient checkpointing, 9x128x128 -> 9x256x320, width 512): CogVideoX +0 %,
#: HunyuanVideo +5 %, Wan -8 % (docs/estimate.md)
RSS_TOLERANCE = 0.20

RUNNER = """
import json, os, sys, threading, time
import torch
torch.set_num_threads(1)
from t2vu.core import engine, plugins
from t2vu.core.spec import load_spec
page = os.sysconf("SC_PAGE_SIZE")
state = {"peak": 0, "stop": False}


def anonymous():  # resident minus file-backed pages: the process's own memory, whatever the page cache does
    with open("/proc/self/statm") as f:
        fields = f.read().split()
    return (int(fields[1]) - int(fields[2])) * page


def sample():
    while not state["stop"]:
        state["peak"] = max(state["peak"], anonymous())
        time.sleep(0.0002)


threading.Thread(target=sample, daemon=True).start()
peaks = []
for path in sys.argv[1:]:
    resolved = load_spec(path, plugins.get_registry())
    state["peak"] = anonymous()
    engine.train(resolved)
    peaks.append(state["peak"])
state["stop"] = True
print("PEAKS=" + json.dumps(peaks))
"""
TEMPLATE = "<|start_header_id|>user<|end_header_id|>\\n\\n{}<|eot_id|>"


def tiny_model(name: str, path: Path) -> tuple[Path, str]:
    if name == "cogvideox":
        from tiny import build_tiny_cogvideox

        return build_tiny_cogvideox(path, layers=2, heads=8, head_dim=64, text_len=16), ", device: cpu"
    if name == "hunyuanvideo":
        from tiny_hunyuan import build_tiny_hunyuanvideo

        return (build_tiny_hunyuanvideo(path, layers=1, single_layers=2, heads=8, head_dim=64),
                f', device: cpu, max_sequence_length: 16, prompt_template: "{TEMPLATE}"')
    from tiny_wan import build_tiny_wan

    return build_tiny_wan(path, layers=2, heads=8, head_dim=64), ", device: cpu, max_text_length: 16"


@pytest.mark.parametrize("backbone", ["cogvideox", "hunyuanvideo", "wan"])
def test_peak_growth_matches_measured_rss_on_the_cpu(tmp_path, backbone):
    """Two training runs in one process, a small clip then a larger one: the peak of the process's resident
    anonymous memory (sampled every 0.2 ms; file-backed pages, which the page cache may evict, left out) grows by
    what the larger clip needs more, and the estimate predicts that growth. The imports, libraries and weights
    are the same in both runs and cancel."""
    folder, extra = tiny_model(backbone, tmp_path / "model")
    clips = [(9, 128, 128), (9, 256, 320)]
    specs = [write_spec(tmp_path / f"clip{i}.yaml", backbone, folder, *clip, dtype="float32", extra=extra, rank=8,
                        steps=2) for i, clip in enumerate(clips)]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               # big tensors in their own mappings, returned when freed: RSS follows the allocations
               MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", RUNNER, *map(str, specs)], capture_output=True, text=True, env=env,
                         timeout=600)
    line = [x for x in out.stdout.splitlines() if x.startswith("PEAKS=")]
    assert line, out.stdout[-2000:] + out.stderr[-3000:]
    small, large = json.loads(line[0][len("PEAKS="):])
    predicted = [E.estimate(load_spec(s, plugins.get_registry())).prediction.peak for s in specs]
    measured_growth, predicted_growth = large - small, predicted[1] - predicted[0]
    print(f"{backbone}: peaks {small / 2**20:.1f} -> {large / 2**20:.1f} MB: measured growth "
          f"{measured_growth / 2**20:.1f} MB, predicted {predicted_growth / 2**20:.1f} MB")
    assert measured_growth > 30 * 2**20  # big enough to measure
    assert abs(predicted_growth / measured_growth - 1) < RSS_TOLERANCE


def test_checkpointing_every_k_and_fp8_storage_in_the_spec(folders, tmp_path):
    """training.gradient_checkpointing: 2 lies between every block and none; backbone.storage_dtype lowers the
    weights to the layerwise-cast bytes; both are read from the spec."""
    peaks = {}
    for gc in ("true", "2", "false"):
        spec = write_spec(tmp_path / f"gc{gc}.yaml", "cogvideox", folders["cogvideox"], 49, 480, 720)
        spec.write_text(spec.read_text().replace("gradient_checkpointing: true", f"gradient_checkpointing: {gc}"))
        out = json.loads(invoke("estimate", str(spec), "--json").output)
        peaks[gc] = (out["phases"]["erased"]["total_gb"], out["iteration"]["seconds"])
    assert peaks["true"][0] < peaks["2"][0] < peaks["false"][0]
    assert peaks["false"][1] < peaks["2"][1] < peaks["true"][1]  # fewer blocks recomputed: less time
    spec = write_spec(tmp_path / "fp8.yaml", "cogvideox", folders["cogvideox"], 49, 480, 720,
                      extra=", storage_dtype: float8_e4m3fn")
    fp8 = json.loads(invoke("estimate", str(spec), "--json").output)["breakdown"]["weights"]
    assert abs(fp8 - 5.94) / 5.94 < 0.03  # the measured layerwise-cast weights of CogVideoX-5B
