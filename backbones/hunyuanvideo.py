"""Built-in backbone plugin: HunyuanVideo (text-to-video, 13B) from a local diffusers folder.

Registration and options only; the implementation (torch, diffusers) lives in
:mod:`t2vu.backbones.hunyuanvideo_model` and is imported when a run builds it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Optional, Sequence

from pydantic import Field, field_validator

from t2vu.core.hookspecs import hookimpl
from t2vu.core.protocols import EvalProtocol, VideoDefaults
from t2vu.core.spec import BackboneOptions

if TYPE_CHECKING:  # pragma: no cover
    from t2vu.core.preflight import Clip, ModelFacts, SiteName

DOWNLOAD_HINT = "`hf download hunyuanvideo-community/HunyuanVideo --local-dir {path}` (`huggingface-cli download` before huggingface_hub 1.0)"
#: what a HunyuanVideo folder must hold for training (``vae/`` too for generate and eval)
REQUIRED = ("model_index.json", "transformer/config.json", "scheduler/scheduler_config.json", "text_encoder",
            "tokenizer", "text_encoder_2", "tokenizer_2")


def site_names(config: dict) -> list[SiteName]:
    """The eraser sites of a HunyuanVideo transformer with this config (what ``transformer_sites`` finds once
    it is loaded): each double-stream block's and each single-stream block's attention, video and text."""
    from t2vu.core.preflight import SiteName

    sites = []
    for prefix, key in (("transformer_blocks", "num_layers"), ("single_transformer_blocks", "num_single_layers")):
        for i in range(int(config.get(key, 0) or 0)):
            name = f"{prefix}.{i}.attn"
            sites += [SiteName(name, name, "video"), SiteName(f"{name}.text", name, "text")]
    return sites


def check_folder(path: Path, facts: ModelFacts, decode: bool, *, vae: bool = True,
                 hint: str = DOWNLOAD_HINT) -> Optional[dict]:
    """Check a HunyuanVideo-architecture folder from its configs and weights headers; return the transformer
    config (``None`` after a problem that stops further checks). ``vae``: the architecture decodes with a VAE."""
    from t2vu.core.preflight import check_weights, read_diffusers_folder

    setting = "backbone.model_path"
    hint = hint.format(path=path)
    required = REQUIRED + (("vae/config.json",) if decode and vae else ())
    found = read_diffusers_folder(path, facts, required, "HunyuanVideo", hint)
    if found is None:
        return None
    index, cfg, sched = found
    kind = str(index.get("_class_name", ""))
    if kind != "HunyuanVideoPipeline":
        what = ("HunyuanVideo 1.5, which needs a backbone of its own (docs/backbones.md)"
                if kind.startswith("HunyuanVideo15") else "not the text-to-video HunyuanVideoPipeline")
        facts.problem(setting, f"{path} holds a {kind or 'pipeline without _class_name'!r}: {what}; use a "
                               f"HunyuanVideo folder, e.g. {hint}")
        return None
    if cfg.get("_class_name") != "HunyuanVideoTransformer3DModel" or cfg.get("image_condition_type") is not None:
        facts.problem(setting, f"{path}/transformer is a {cfg.get('_class_name')!r}"
                               f"{' for image-to-video' if cfg.get('image_condition_type') else ''}, not the "
                               f"text-to-video HunyuanVideoTransformer3DModel; use a HunyuanVideo folder, e.g. {hint}")
        return None
    if sched.get("_class_name", "FlowMatchEulerDiscreteScheduler") != "FlowMatchEulerDiscreteScheduler":
        facts.problem(setting, f"{path}/scheduler is a {sched.get('_class_name')!r}; HunyuanVideo samples with "
                               "FlowMatchEulerDiscreteScheduler")
    if sched.get("use_dynamic_shifting"):
        facts.problem(setting, f"{path}/scheduler uses dynamic shifting, which HunyuanVideoPipeline does not drive; "
                               "set use_dynamic_shifting to false and a fixed shift")
    for sub in ("transformer", "text_encoder", "text_encoder_2") + (("vae",) if decode and vae else ()):
        check_weights(path / sub, setting, facts)
    return cfg


class HunyuanVideoOptions(BackboneOptions):
    """A HunyuanVideo model folder in diffusers format (``HunyuanVideoPipeline.save_pretrained``, e.g.
    ``hunyuanvideo-community/HunyuanVideo``)."""

    #: the pipeline's documented example clip (61 frames there; 33 keeps training affordable), 30 steps,
    #: embedded guidance 6, 15 fps
    defaults: ClassVar[VideoDefaults] = VideoDefaults(num_frames=33, height=320, width=512, steps=30,
                                                      guidance=6.0, fps=15)
    site_presets: ClassVar[dict[str, list[str]]] = {
        "single": ["single_transformer_blocks.*.attn"],
        "double": ["transformer_blocks.*.attn"],
        "all": ["transformer_blocks.*.attn", "single_transformer_blocks.*.attn"],
    }
    #: where the upstream T2VUnlearning release puts HunyuanVideo's erasers
    default_sites: ClassVar[Optional[str]] = "single"
    example_path: ClassVar[str] = "./HunyuanVideo"
    #: ``eval.protocol`` presets (the clip stays the spec's: the paper gives only the sampler settings)
    protocols: ClassVar[dict[str, EvalProtocol]] = {
        "t2vunlearning": EvalProtocol("T2VUnlearning's evaluation: 30 steps, embedded guidance 6", steps=30,
                                      guidance=6.0),
    }

    guidance: float = Field(
        6.0, gt=0, description="Embedded guidance scale of every training forward of a guidance-distilled model "
        "(HunyuanVideo is one: the scale is an input of the transformer, not a second pass). The pipeline's "
        "default; change it only to train the eraser at the scale you will generate with. Ignored by a "
        "transformer without guidance embeddings.")
    max_sequence_length: int = Field(
        256, gt=0, description="Llama tokens per prompt after the template is cropped off (the pipeline's "
        "max_sequence_length). Longer prompts are truncated; lower it to save memory with short prompts.")
    prompt_template: Optional[str] = Field(
        None, description="Text the prompt is formatted into before the Llama encoder, with '{}' where the "
        "prompt goes (default: the pipeline's DEFAULT_PROMPT_TEMPLATE). Change it only for a model trained "
        "with another template.")
    crop_start: Optional[int] = Field(
        None, ge=0, description="Llama tokens of the template before the prompt, cut off the embeddings "
        "(default: 95 for the default template; for a custom template, counted with the tokenizer exactly "
        "as the pipeline does). Set it with a custom template whose count the pipeline would get wrong.")

    def preflight(self, clips: Sequence[Clip], decode: bool = False) -> ModelFacts:
        """The folder (configs, weights headers, ``vae/`` when ``decode``), and each clip: ``4k+1`` frames (the
        VAE's temporal compression, a multiple of ``patch_size_t`` latent frames) and sizes that are multiples of
        VAE scale x patch size. Reads configs only."""
        from t2vu.core.preflight import ModelFacts, frames_rule, size_rule, vae_config

        facts = ModelFacts()
        path = Path(self.model_path)
        cfg = check_folder(path, facts, decode)
        if cfg is None:
            return facts
        vae = vae_config(path, facts)
        temporal = int(vae.get("temporal_compression_ratio", 4) or 1)
        spatial = int(vae.get("spatial_compression_ratio", 8) or 1)
        patch, patch_t = int(cfg.get("patch_size", 2) or 1), int(cfg.get("patch_size_t", 1) or 1)
        for clip in clips:
            frames_rule(clip, temporal, "HunyuanVideo", f"its VAE compresses {temporal} frames into one after the "
                        "first", facts)
            latent = (clip.num_frames - 1) // temporal + 1
            if not (clip.num_frames - 1) % temporal and latent % patch_t:
                facts.problem(clip.setting("num_frames"), f"{clip.num_frames} frames give {latent} latent frames; "
                              f"this HunyuanVideo (patch_size_t {patch_t}) needs a multiple of {patch_t}")
            size_rule(clip, spatial * patch, "HunyuanVideo", f"VAE {spatial}x, patch {patch}", facts)
        facts.sites, facts.config = site_names(cfg), cfg
        return facts

    @field_validator("prompt_template")
    @classmethod
    def _has_placeholder(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and "{}" not in value:
            raise ValueError("prompt_template must contain '{}' where the prompt goes")
        return value

    def memory_facts(self, clip: Clip):
        """What ``t2vu estimate`` needs of this architecture for ``clip`` (configs only; ``preflight`` has
        checked them): video tokens then the ``max_sequence_length`` text tokens through every double- and
        single-stream block, MLP ``mlp_ratio``.

        Units of the hidden width per sequence token (bf16 anchors on one H200, docs/estimate.md): a block saves
        ``7 + r`` for its backward (norm inputs, pre-norm q/k, SDPA's q/k/v/out, the MLP's GELU input), its
        backward adds ``4 + 3r`` transients (the single block's ``[attention, MLP]`` concatenation and its
        gradient); the no-grad forward's working set is ``2 + 4r`` (the MLP hidden, its GELU and the
        concatenation). The capture recomputes q/k (model dtype, RoPE copies), upcasts them (fp32) and scores
        chunks of at most ``2**25`` fp32 elements (two copies). Llama returns every layer's hidden states."""
        from t2vu.core.estimate import Component, MemoryFacts, TextEncoding, Units, library_class, no_vae
        from t2vu.core.preflight import ModelFacts, read_json, vae_config

        path, scratch = Path(self.model_path), ModelFacts()
        cfg = read_json(path / "transformer/config.json", "backbone.model_path", scratch) or {}
        index = read_json(path / "model_index.json", "backbone.model_path", scratch) or {}
        vae = vae_config(path, scratch)
        pixels = no_vae(index)  # the toy world: latents are the clips themselves
        temporal = 1 if pixels else int(vae.get("temporal_compression_ratio", 4) or 1)
        spatial = 1 if pixels else int(vae.get("spatial_compression_ratio", 8) or 1)
        patch, patch_t = int(cfg.get("patch_size", 2) or 1), int(cfg.get("patch_size_t", 1) or 1)
        frames = ((clip.num_frames - 1) // temporal + 1) // patch_t
        video = frames * (clip.height // spatial // patch) * (clip.width // spatial // patch)
        text = int(self.max_sequence_length)
        heads = int(cfg.get("num_attention_heads", 24))
        width = heads * int(cfg.get("attention_head_dim", 128))
        blocks = int(cfg.get("num_layers", 20)) + int(cfg.get("num_single_layers", 40))
        r = float(cfg.get("mlp_ratio", 4.0))
        crop = self.crop_start if self.crop_start is not None else (95 if self.prompt_template is None else 0)
        n = video + text
        llama = Component("text_encoder", "transformers", library_class(index, "text_encoder", "LlamaModel"))
        clip_encoder = Component("text_encoder_2", "transformers", library_class(index, "text_encoder_2",
                                                                                 "CLIPTextModel"))
        return MemoryFacts(
            transformers=(Component("transformer", "diffusers",
                                    cfg.get("_class_name", "HunyuanVideoTransformer3DModel")),),
            text_encoders=(TextEncoding(llama, crop + text, all_hidden_states=True), TextEncoding(clip_encoder, 77)),
            width=width, blocks=blocks, video_tokens=video, text_tokens=text, sequence_tokens=n,
            attention_pairs=blocks * n * n, site_widths={s.name: width for s in site_names(cfg)},
            forward=Units(2 + 4 * r), saved=Units(7 + r), backward=Units(4 + 3 * r),
            attention_live=Units(3 + 2 * r),  # a single block computes its MLP before its attention
            heads=heads, capture=Units(model=2, fp32=2), capture_keys=n, capture_budget=1 << 25,
            guided_rows=1 if cfg.get("guidance_embeds", True) else 2)


@hookimpl
def register_backbones(register):
    register(
        "hunyuanvideo",
        "t2vu.backbones.hunyuanvideo_model:HunyuanVideoBackbone",
        options=HunyuanVideoOptions,
        summary="HunyuanVideo transformer (flow matching, embedded guidance, Llama + CLIP text, video tokens first)",
    )
