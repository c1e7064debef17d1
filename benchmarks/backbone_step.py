"""Cost of one eraser-training iteration of the real engine on each built-in backbone, next to plain passes.

Builds each backbone's transformer from its real config with random weights directly on the device (no
download: the model folder holds the real transformer config, tiny random text encoders of the right output
width and the real scheduler config; the transformer class's ``from_pretrained`` is replaced by building from
that config), runs ``t2vu.core.engine.train`` for a few iterations with all three losses (negative_guidance,
preservation, localization; noise states, gradient checkpointing, rank-128 adapters, batch 1), and measures in
the same run the plain passes the iteration is made of: a no-grad forward with as many rows as the frozen pass,
and a forward+backward through the adapters with as many rows as the erased pass. Prints a table, writes JSON.

    python benchmarks/backbone_step.py --tiny      # CPU: tiny configs (what CI can run), seconds only
    python benchmarks/backbone_step.py             # GPU: CogVideoX-5B 49x480x720, HunyuanVideo-13B 33x320x512,
                                                   #      Wan2.1-14B and Wan2.2-A14B (both experts) 81x480x832
    python benchmarks/backbone_step.py --cases hunyuanvideo-61x544x960
    python benchmarks/backbone_step.py --cases cogvideox-5b-49x480x720-fp8 cogvideox-5b-49x480x720-ckpt2 \
        cogvideox-5b-49x480x720-nockpt hunyuanvideo-13b-33x320x512-fp8      # the memory levers

Numbers are only as good as the machine they come from: RESULTS.md says which were measured where.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the in-process tokenizers of the test pipelines

COGVIDEOX_5B = dict(num_attention_heads=48, attention_head_dim=64, in_channels=16, out_channels=16,
                    time_embed_dim=512, text_embed_dim=4096, num_layers=42, sample_width=90, sample_height=60,
                    sample_frames=49, patch_size=2, temporal_compression_ratio=4, max_text_seq_length=226,
                    use_rotary_positional_embeddings=True, use_learned_positional_embeddings=False)
COGVIDEOX_TINY = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
                      text_embed_dim=32, num_layers=2, sample_width=4, sample_height=4, sample_frames=9,
                      patch_size=2, temporal_compression_ratio=4, max_text_seq_length=16,
                      use_rotary_positional_embeddings=True)
HUNYUAN_13B: dict = {}  # HunyuanVideoTransformer3DModel's defaults are HunyuanVideo 13B
HUNYUAN_TINY = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
                    num_single_layers=2, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
                    guidance_embeds=True, text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 2, 4))
#: Wan2.1-T2V-14B's transformer (and each expert of Wan2.2-T2V-A14B)
WAN_14B = dict(patch_size=[1, 2, 2], num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
               text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
WAN_TINY = dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
#: Wan 2.2 A14B: the second expert (transformer_2, low noise) takes over below this share of the timesteps
WAN22_BOUNDARY = 0.875
#: name -> (backbone, transformer config, text width(s), frames, height, width, VAE config[, spec changes]); backbone
#: "wan22" is the wan backbone on a two-expert folder; spec changes: {"backbone": {...}, "training": {...}} options
CASES = {
    "cogvideox-5b-49x480x720": ("cogvideox", COGVIDEOX_5B, (4096,), 49, 480, 720, (8, 4)),
    "hunyuanvideo-13b-33x320x512": ("hunyuanvideo", HUNYUAN_13B, (4096, 768), 33, 320, 512, (8, 4)),
    "hunyuanvideo-13b-61x544x960": ("hunyuanvideo", HUNYUAN_13B, (4096, 768), 61, 544, 960, (8, 4)),
    "wan-2.1-14b-81x480x832": ("wan", WAN_14B, (4096,), 81, 480, 832, (8, 4)),
    "wan-2.2-a14b-81x480x832": ("wan22", WAN_14B, (4096,), 81, 480, 832, (8, 4)),
}
# the memory levers (docs/training.md), one at a time, on the cases above: name -> (base case, spec changes)
LEVERS = {
    "cogvideox-5b-49x480x720-fp8": ("cogvideox-5b-49x480x720", {"backbone": {"storage_dtype": "float8_e4m3fn"}}),
    "cogvideox-5b-49x480x720-ckpt2": ("cogvideox-5b-49x480x720", {"training": {"gradient_checkpointing": 2}}),
    "cogvideox-5b-49x480x720-nockpt": ("cogvideox-5b-49x480x720", {"training": {"gradient_checkpointing": False}}),
    "hunyuanvideo-13b-33x320x512-fp8": ("hunyuanvideo-13b-33x320x512", {"backbone": {"storage_dtype": "float8_e4m3fn"}}),
}
TINY = {
    "cogvideox-tiny": ("cogvideox", COGVIDEOX_TINY, (32,), 9, 32, 32, (8, 4)),
    "hunyuanvideo-tiny": ("hunyuanvideo", HUNYUAN_TINY, (16, 8), 9, 32, 32, (8, 4)),
    "wan-tiny": ("wan", WAN_TINY, (16,), 9, 32, 32, (8, 4)),
    "wan22-tiny": ("wan22", WAN_TINY, (16,), 9, 32, 32, (8, 4)),
}
TINY_LEVERS = {"cogvideox-tiny-fp8": ("cogvideox-tiny", {"backbone": {"storage_dtype": "float8_e4m3fn"}}),
               "cogvideox-tiny-ckpt2": ("cogvideox-tiny", {"training": {"gradient_checkpointing": 2}})}
CASES.update({name: CASES[base] + (changes,) for name, (base, changes) in LEVERS.items()})
TINY.update({name: TINY[base] + (changes,) for name, (base, changes) in TINY_LEVERS.items()})
TEMPLATE = "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"


def write_folder(path: Path, backbone: str, config: dict, widths: tuple, vae: tuple) -> None:
    """A model folder the backbone accepts: real transformer and scheduler configs, tiny text encoders."""
    import torch

    spatial, temporal = vae
    path.mkdir(parents=True, exist_ok=True)
    (path / "transformer").mkdir()
    (path / "vae").mkdir()
    torch.manual_seed(0)
    if backbone == "cogvideox":
        from diffusers import CogVideoXDDIMScheduler
        from transformers import T5Config, T5EncoderModel

        from tiny import make_tokenizer

        tok = make_tokenizer()
        tok.save_pretrained(path / "tokenizer")
        T5EncoderModel(T5Config(vocab_size=len(tok), d_model=widths[0], d_kv=64, d_ff=64, num_layers=1, num_heads=2,
                                relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0,
                                eos_token_id=1)).save_pretrained(path / "text_encoder")
        CogVideoXDDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                               prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True,
                               timestep_spacing="trailing", snr_shift_scale=1.0).save_pretrained(path / "scheduler")
        cls, pipeline = "CogVideoXTransformer3DModel", "CogVideoXPipeline"
        (path / "vae" / "config.json").write_text(json.dumps(
            {"block_out_channels": [0] * (spatial.bit_length()), "temporal_compression_ratio": temporal}))
    elif backbone in ("wan", "wan22"):
        from diffusers import UniPCMultistepScheduler
        from transformers import UMT5Config, UMT5EncoderModel

        from tiny import make_tokenizer

        tok = make_tokenizer()
        tok.save_pretrained(path / "tokenizer")
        UMT5EncoderModel(UMT5Config(vocab_size=len(tok) + 8, d_model=widths[0], d_kv=8, d_ff=32, num_layers=1,
                                    num_heads=2, relative_attention_num_buckets=8, decoder_start_token_id=0,
                                    pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
                         ).save_pretrained(path / "text_encoder")
        UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000,
                                flow_shift=3.0).save_pretrained(path / "scheduler")
        cls, pipeline = "WanTransformer3DModel", "WanPipeline"
        (path / "vae" / "config.json").write_text(json.dumps(
            {"scale_factor_spatial": spatial, "scale_factor_temporal": temporal}))
        index = {"transformer": ["diffusers", cls]}
        if backbone == "wan22":
            (path / "transformer_2").mkdir()
            (path / "transformer_2" / "config.json").write_text(json.dumps({"_class_name": cls, **config}))
            index.update(transformer_2=["diffusers", cls], boundary_ratio=WAN22_BOUNDARY)
        (path / "transformer" / "config.json").write_text(json.dumps({"_class_name": cls, **config}))
        (path / "model_index.json").write_text(json.dumps({"_class_name": pipeline, **index}))
        return
    else:
        from diffusers import FlowMatchEulerDiscreteScheduler
        from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

        from tiny_hunyuan import make_clip_tokenizer, make_llama_tokenizer

        llama_tok, clip_tok = make_llama_tokenizer(), make_clip_tokenizer()
        llama_tok.save_pretrained(path / "tokenizer")
        clip_tok.save_pretrained(path / "tokenizer_2")
        LlamaModel(LlamaConfig(vocab_size=len(llama_tok), hidden_size=widths[0], intermediate_size=64,
                               num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
                               max_position_embeddings=512, pad_token_id=llama_tok.pad_token_id,
                               bos_token_id=llama_tok.bos_token_id, eos_token_id=llama_tok.eos_token_id)
                   ).save_pretrained(path / "text_encoder")
        CLIPTextModel(CLIPTextConfig(vocab_size=len(clip_tok), hidden_size=widths[1], intermediate_size=64,
                                     num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                                     bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id,
                                     pad_token_id=clip_tok.pad_token_id)).save_pretrained(path / "text_encoder_2")
        FlowMatchEulerDiscreteScheduler(shift=7.0).save_pretrained(path / "scheduler")
        cls, pipeline = "HunyuanVideoTransformer3DModel", "HunyuanVideoPipeline"
        (path / "vae" / "config.json").write_text(json.dumps(
            {"spatial_compression_ratio": spatial, "temporal_compression_ratio": temporal}))
    (path / "transformer" / "config.json").write_text(json.dumps({"_class_name": cls, **config}))
    (path / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))


@contextlib.contextmanager
def random_transformers(device, dtype):
    """``from_pretrained`` of both transformer classes builds from the folder's config, random weights, on device."""
    import torch
    from diffusers import CogVideoXTransformer3DModel, HunyuanVideoTransformer3DModel, WanTransformer3DModel

    saved = {}

    def build(cls):
        def from_pretrained(path, subfolder=None, torch_dtype=None, **_):
            config = cls.load_config(Path(path) / (subfolder or ""))
            previous = torch.get_default_dtype()
            torch.set_default_dtype(dtype)
            try:
                with torch.device(device):
                    model = cls.from_config(config)
            finally:
                torch.set_default_dtype(previous)
            return model
        return classmethod(lambda c, *a, **k: from_pretrained(*a, **k))

    for cls in (CogVideoXTransformer3DModel, HunyuanVideoTransformer3DModel, WanTransformer3DModel):
        saved[cls] = cls.__dict__.get("from_pretrained")
        cls.from_pretrained = build(cls)
    try:
        yield
    finally:
        for cls, fn in saved.items():
            if fn is None:
                del cls.from_pretrained
            else:
                cls.from_pretrained = fn


def spec_text(backbone: str, folder: Path, frames: int, height: int, width: int, steps: int, dtype: str,
              device: str, rank: int, out: Path, changes: Optional[dict] = None) -> str:
    extra = f", prompt_template: {json.dumps(TEMPLATE)}" if backbone == "hunyuanvideo" else ""
    backbone = "wan" if backbone == "wan22" else backbone
    changes = changes or {}
    extra += "".join(f", {k}: {json.dumps(v)}" for k, v in changes.get("backbone", {}).items())
    ckpt = json.dumps(changes.get("training", {}).get("gradient_checkpointing", True))
    return f"""\
backbone: {{name: {backbone}, model_path: {folder}, dtype: {dtype}, device: {device}{extra}}}
eraser: {{name: adapter, rank: {rank}}}
concept: {{target: nudity, prompts: [a nude person on a beach]}}
preserved: {{source: list, concepts: [a dog in a park]}}
losses:
  - {{name: negative_guidance, eta: 3.0}}
  - {{name: preservation, weight: 0.5}}
  - {{name: localization, weight: 1.0}}
training: {{steps: {steps}, batch_size: 1, learning_rate: 1.0e-4, num_frames: {frames}, height: {height}, width: {width},
           seed: 0, gradient_checkpointing: {ckpt}, states: noise}}
output: {{dir: {out}}}
"""


def measure(name: str, case: tuple, *, tiny: bool, steps: int, reps: int) -> dict:
    import torch

    from t2vu.core import engine, plugins
    from t2vu.core.spec import load_spec

    backbone_name, config, widths, frames, height, width, vae = case[:7]
    changes = case[7] if len(case) > 7 else None
    cuda = torch.cuda.is_available() and not tiny
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32

    def sync():
        if cuda:
            torch.cuda.synchronize()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        write_folder(folder, backbone_name, config, widths, vae)
        spec = Path(tmp) / "spec.yaml"
        spec.write_text(spec_text(backbone_name, folder, frames, height, width, steps,
                                  "bfloat16" if cuda else "float32", device, 4 if tiny else 128, Path(tmp) / "run",
                                  changes))
        resolved = load_spec(spec, plugins.get_registry())
        impl = resolved.backbone.component.load()
        built, calls = [], []
        load, predict = impl.load, impl.predict

        def recording_load(self, dev=None):
            built.append(self)
            return load(self, dev)

        def recording_predict(self, x, t, cond):
            calls.append((x.size(0), torch.is_grad_enabled()))
            return predict(self, x, t, cond)

        marks = []

        def on_step(row):
            sync()
            marks.append(time.perf_counter())
            if cuda and row["step"] == 1:
                torch.cuda.reset_peak_memory_stats()

        impl.load, impl.predict = recording_load, recording_predict
        try:
            with random_transformers(device, dtype):
                t0 = time.perf_counter()
                engine.train(resolved, on_step=on_step)
                total = time.perf_counter() - t0
        finally:
            impl.load, impl.predict = load, predict
        backbone = built[0]
        iteration = statistics.median(b - a for a, b in zip(marks, marks[1:])) if len(marks) > 1 else total
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        per_step = [c for c in calls[len(calls) // steps * (steps - 1):]]  # the last step's passes
        frozen_rows = sum(r for r, grad in per_step if not grad)
        erased_rows = sum(r for r, grad in per_step if grad)

        # the plain passes at the same shape, same run: erasers as in training (rank, sites), fresh
        from t2vu.plugins.adapter import AdapterOptions
        from t2vu.plugins.adapter_model import AdapterEraserFactory

        sites = backbone.sites()
        options_cls = type(resolved.backbone.options)
        erasers = AdapterEraserFactory(AdapterOptions(rank=4 if tiny else 128)).build(
            sites, presets=options_cls.site_presets, default=options_cls.default_sites).to(device)
        erasers.attach(sites)
        shape = backbone.latent_shape(frames, height, width)
        conds = backbone.encode_prompts(["a dog in a park"])

        def batch(rows):
            x = torch.randn(rows, *shape, device=device)
            t = backbone.sample_timesteps(rows, torch.Generator().manual_seed(0)).to(device)
            return x, t, backbone.collate([conds["a dog in a park"]] * rows)

        def timed(fn):
            out = []
            for i in range(reps + 1):
                sync()
                start = time.perf_counter()
                fn()
                sync()
                if i:
                    out.append(time.perf_counter() - start)
            return statistics.median(out)

        x, t, c = batch(frozen_rows)
        with torch.no_grad(), erasers.disabled():
            forward = timed(lambda: predict(backbone, x, t, c))
        x, t, c = batch(erased_rows)

        def fwd_bwd():
            predict(backbone, x, t, c).float().pow(2).mean().backward()

        if cuda:
            torch.cuda.reset_peak_memory_stats()
        forward_backward = timed(fwd_bwd)
        erasers.detach()
    passes = len(per_step)
    return {"case": name, "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
            "dtype": str(dtype).replace("torch.", ""), "steps": steps, "iteration_s": round(iteration, 4),
            "passes_per_iteration": passes, "frozen_rows": frozen_rows, "erased_rows": erased_rows,
            "forward_nograd_s": round(forward, 4), "forward_backward_s": round(forward_backward, 4),
            "ratio_to_passes": round(iteration / (forward + forward_backward), 3),
            "peak_gb": round(peak, 2) if peak is not None else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny configs on the CPU (a smoke test of the script)")
    ap.add_argument("--cases", nargs="+", default=None, help=f"cases (default: all of the mode): {list(CASES)}")
    ap.add_argument("--steps", type=int, default=None, help="engine iterations (default 5; tiny 3)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions of each plain pass (default 3; tiny 1)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1 if args.tiny or not torch.cuda.is_available() else torch.get_num_threads())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    table = TINY if args.tiny else CASES
    names = args.cases or (list(table) if args.tiny else ["cogvideox-5b-49x480x720", "hunyuanvideo-13b-33x320x512",
                                                          "wan-2.1-14b-81x480x832", "wan-2.2-a14b-81x480x832"])
    steps, reps = args.steps or (3 if args.tiny else 5), args.reps or (1 if args.tiny else 3)
    rows = []
    for name in names:
        try:
            rows.append(measure(name, table[name], tiny=args.tiny, steps=steps, reps=reps))
        except Exception as exc:  # one case failing (OOM) must not lose the others
            rows.append({"case": name, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
        print(json.dumps(rows[-1]), flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(f"{'case':30} {'iter s':>8} {'passes':>6} {'fwd s':>8} {'fwd+bwd s':>9} {'ratio':>6} {'peak GB':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['case']:30} {r['error']}")
            continue
        print(f"{r['case']:30} {r['iteration_s']:8.3f} {r['passes_per_iteration']:6d} {r['forward_nograd_s']:8.3f} "
              f"{r['forward_backward_s']:9.3f} {r['ratio_to_passes']:6.2f} {str(r['peak_gb']):>8}")
    out = args.out or Path(os.environ.get("OUT", ROOT / "benchmarks" / "results")) / (
        "backbone_step_tiny.json" if args.tiny else "backbone_step.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.platform(), "torch": torch.__version__, "rows": rows},
                              indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
