"""Built-in backbone plugin: CogVideoX (2B, 5B, 1.5-5B) from a local diffusers folder.

Registration and options only; the implementation (torch, diffusers) lives in
:mod:`t2vu.backbones.cogvideox_model` and is imported when a run builds it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal, Optional, Sequence

from pydantic import Field

from t2vu.core.hookspecs import hookimpl
from t2vu.core.protocols import EvalProtocol, VideoDefaults
from t2vu.core.spec import BackboneOptions

if TYPE_CHECKING:  # pragma: no cover
    from t2vu.core.preflight import Clip, ModelFacts, SiteName

DOWNLOAD_HINT = "`hf download THUDM/CogVideoX-5b --local-dir {path}` (`huggingface-cli download` before huggingface_hub 1.0)"
#: what a CogVideoX folder must hold for training (``vae/`` too for generate and eval)
REQUIRED = ("model_index.json", "transformer/config.json", "scheduler/scheduler_config.json",
            "text_encoder/config.json", "tokenizer")


def site_names(config: dict) -> list[SiteName]:
    """The eraser sites of a CogVideoX transformer with this config (what ``transformer_sites`` finds once it
    is loaded): each block's ``attn1`` video output and the text tokens it reads."""
    from t2vu.core.preflight import SiteName

    sites = []
    for i in range(int(config.get("num_layers", 0) or 0)):
        name = f"transformer_blocks.{i}.attn1"
        sites += [SiteName(name, name, "video"), SiteName(f"{name}.text", name, "text")]
    return sites


def check_folder(path: Path, facts: ModelFacts, decode: bool, *, vae: bool = True,
                 hint: str = DOWNLOAD_HINT) -> Optional[dict]:
    """Check a CogVideoX-architecture folder from its configs and weights headers; return the transformer
    config (``None`` after a problem that stops further checks). ``vae``: the architecture decodes with a VAE
    (needed when ``decode``)."""
    from t2vu.core.preflight import check_weights, read_diffusers_folder

    setting = "backbone.model_path"
    hint = hint.format(path=path)
    required = REQUIRED + (("vae/config.json",) if decode and vae else ())
    found = read_diffusers_folder(path, facts, required, "CogVideoX", hint)
    if found is None:
        return None
    index, cfg, sched = found
    if not str(index.get("_class_name", "")).startswith("CogVideoX"):
        facts.problem(setting, f"{path} holds a {index.get('_class_name')!r}, not a CogVideoX pipeline; use "
                               "the backbone for that model or a CogVideoX folder")
        return None
    if cfg.get("_class_name") != "CogVideoXTransformer3DModel":
        facts.problem(setting, f"{path}/transformer is a {cfg.get('_class_name')!r}, not a "
                               "CogVideoXTransformer3DModel")
        return None
    if sched.get("prediction_type", "v_prediction") != "v_prediction":
        facts.problem(setting, f"{path}/scheduler predicts {sched.get('prediction_type')!r}; the CogVideoX "
                               "backbone needs a v_prediction scheduler")
    for sub in ("transformer", "text_encoder") + (("vae",) if decode and vae else ()):
        check_weights(path / sub, setting, facts)
    return cfg


class CogVideoXOptions(BackboneOptions):
    """A CogVideoX model folder in diffusers format (``CogVideoXPipeline.save_pretrained``)."""

    #: CogVideoX-5b's native clip and the pipeline's sampler settings (50 steps, CFG 6, 8 fps)
    defaults: ClassVar[VideoDefaults] = VideoDefaults(num_frames=49, height=480, width=720, steps=50,
                                                      guidance=6.0, fps=8)
    site_presets: ClassVar[dict[str, list[str]]] = {"all": ["transformer_blocks.*.attn1"]}
    default_sites: ClassVar[Optional[str]] = "all"
    example_path: ClassVar[str] = "./CogVideoX-5b"
    #: ``eval.protocol`` presets: T2VUnlearning's evaluation samples CogVideoX as the CogVideoX demo does
    protocols: ClassVar[dict[str, EvalProtocol]] = {
        "t2vunlearning": EvalProtocol(
            "T2VUnlearning's evaluation: 49 frames at 480x720, 50 steps, guidance 6, the DPM solver with dynamic CFG",
            steps=50, guidance=6.0, num_frames=49, height=480, width=720,
            backbone={"scheduler": "dpm", "dynamic_cfg": True}),
    }

    max_text_length: Optional[int] = Field(
        None, gt=0, description="Tokens per prompt; default: the transformer's max_text_seq_length.")
    scheduler: Literal["folder", "ddim", "dpm"] = Field(
        "folder", description="The sampler of generate, eval and trajectory states, built from the folder's "
        "scheduler config: 'folder' (the folder's scheduler class, as CogVideoXPipeline samples), 'ddim' "
        "(CogVideoXDDIMScheduler, deterministic) or 'dpm' (CogVideoXDPMScheduler, the stochastic solver the "
        "CogVideoX demo uses; its step noise comes from each video's seed).")
    dynamic_cfg: bool = Field(
        False, description="Vary the guidance scale over the steps as CogVideoXPipeline(use_dynamic_cfg=True) "
        "does (the CogVideoX demo's setting with the DPM solver).")

    def preflight(self, clips: Sequence[Clip], decode: bool = False) -> ModelFacts:
        """The folder (configs, weights headers, ``vae/`` when ``decode``), and each clip: ``4k+1`` frames
        (the VAE's temporal compression) and sizes that are multiples of VAE scale x patch size; a model with
        learned positional embeddings only takes its own sample size. Reads configs only."""
        from t2vu.core.preflight import ModelFacts, frames_rule, size_rule, vae_config

        facts = ModelFacts()
        path = Path(self.model_path)
        cfg = check_folder(path, facts, decode)
        if cfg is None:
            return facts
        vae = vae_config(path, facts)
        temporal = int(vae.get("temporal_compression_ratio", cfg.get("temporal_compression_ratio", 4)) or 1)
        spatial = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
        patch = int(cfg.get("patch_size", 2) or 1)
        for clip in clips:
            frames_rule(clip, temporal, "CogVideoX", f"its VAE compresses {temporal} frames into one after the "
                        "first", facts)
            size_rule(clip, spatial * patch, "CogVideoX", f"VAE {spatial}x, patch {patch}", facts)
            if cfg.get("use_learned_positional_embeddings"):
                h, w = cfg.get("sample_height", 0) * spatial, cfg.get("sample_width", 0) * spatial
                if (clip.height, clip.width) != (h, w):
                    facts.problem(clip.setting("height"), f"{clip.height}x{clip.width}: this CogVideoX has learned "
                                  f"positional embeddings and takes only {h}x{w}; set height {h} and width {w}")
        facts.sites, facts.config = site_names(cfg), cfg
        return facts

    def memory_facts(self, clip: Clip):
        """What ``t2vu estimate`` needs of this architecture for ``clip`` (configs only; ``preflight`` has
        checked them): a joint sequence of text (first) and video tokens through every block, feed-forward 4x.

        Units of the hidden width per sequence token (bf16 anchors on one H200, docs/estimate.md): a block saves
        ``8 + r`` for its backward (LayerNorm inputs, pre-norm q/k, SDPA's q/k/v/out, the feed-forward's GELU
        input; ``r`` the feed-forward ratio), its backward adds ``1 + 2r`` transients; the no-grad forward's
        working set is ``5.5 + 2r`` (the feed-forward's hidden and GELU output with the block's streams).
        The capture (``_CaptureProcessor``) recomputes q/k of the joint sequence (model dtype), upcasts the video
        queries and the keys (fp32) and scores 1024 queries at a time (two fp32 copies)."""
        from t2vu.core.estimate import Component, MemoryFacts, TextEncoding, Units, library_class, no_vae
        from t2vu.core.preflight import ModelFacts, read_json, vae_config

        path, scratch = Path(self.model_path), ModelFacts()
        cfg = read_json(path / "transformer/config.json", "backbone.model_path", scratch) or {}
        index = read_json(path / "model_index.json", "backbone.model_path", scratch) or {}
        vae = vae_config(path, scratch)
        pixels = no_vae(index)  # the toy world: latents are the clips themselves
        temporal = 1 if pixels else int(vae.get("temporal_compression_ratio",
                                                cfg.get("temporal_compression_ratio", 4)) or 1)
        spatial = 1 if pixels else 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
        patch, patch_t = int(cfg.get("patch_size", 2) or 1), int(cfg.get("patch_size_t") or 1)
        frames = (clip.num_frames - 1) // temporal + 1
        frames = -(-frames // patch_t)  # CogVideoX 1.5 pads to a multiple of patch_size_t
        video = frames * (clip.height // spatial // patch) * (clip.width // spatial // patch)
        text = int(self.max_text_length or cfg.get("max_text_seq_length", 226))
        heads = int(cfg.get("num_attention_heads", 30))
        width, blocks, r = heads * int(cfg.get("attention_head_dim", 64)), int(cfg.get("num_layers", 30)), 4.0
        n = video + text
        return MemoryFacts(
            transformers=(Component("transformer", "diffusers",
                                    cfg.get("_class_name", "CogVideoXTransformer3DModel")),),
            text_encoders=(TextEncoding(Component("text_encoder", "transformers",
                                                  library_class(index, "text_encoder", "T5EncoderModel")), text),),
            width=width, blocks=blocks, video_tokens=video, text_tokens=text, sequence_tokens=n,
            attention_pairs=blocks * n * n, site_widths={s.name: width for s in site_names(cfg)},
            forward=Units(5.5 + 2 * r), saved=Units(8 + r), backward=Units(1 + 2 * r),
            heads=heads, capture=Units(model=2, fp32=2), capture_keys=n, capture_chunk=1024,
            capture_budget=1 << 25,
            guided_rows=2)


@hookimpl
def register_backbones(register):
    register(
        "cogvideox",
        "t2vu.backbones.cogvideox_model:CogVideoXBackbone",
        options=CogVideoXOptions,
        summary="CogVideoX-2b / 5b / 1.5-5B transformer (v-prediction, text tokens first)",
    )
