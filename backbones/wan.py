"""Built-in backbone plugin: Wan 2.1 (1.3B, 14B) and Wan 2.2 A14B text-to-video from a local diffusers folder.

Registration and options only; the implementation (torch, diffusers) lives in
:mod:`t2vu.backbones.wan_model` and is imported when a run builds it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Optional, Sequence

from pydantic import Field

from t2vu.core.hookspecs import hookimpl
from t2vu.core.protocols import VideoDefaults
from t2vu.core.spec import BackboneOptions

if TYPE_CHECKING:  # pragma: no cover
    from t2vu.core.preflight import Clip, ModelFacts, SiteName

DOWNLOAD_HINT = "`hf download Wan-AI/Wan2.1-T2V-1.3B-Diffusers --local-dir {path}` (`huggingface-cli download` before huggingface_hub 1.0)"
#: what a Wan folder must hold for training (``vae/`` too for generate and eval)
REQUIRED = ("model_index.json", "transformer/config.json", "scheduler/scheduler_config.json",
            "text_encoder/config.json", "tokenizer")
PIPELINE_CLASS = "WanPipeline"
TRANSFORMER_CLASS = "WanTransformer3DModel"
SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "UniPCMultistepScheduler")
#: the two experts of a Wan 2.2 A14B folder: ``transformer`` serves t >= boundary_ratio * 1000, ``transformer_2``
#: the rest
EXPERTS = ("transformer", "transformer_2")


def two_experts(index: dict) -> bool:
    """The folder's pipeline has a second expert (Wan 2.2 A14B: ``transformer_2`` and ``boundary_ratio``)."""
    two = index.get("transformer_2")
    return isinstance(two, (list, tuple)) and any(two)


def site_names(config: dict, experts: bool = False) -> list[SiteName]:
    """The eraser sites of a Wan transformer with this config (what ``transformer_sites`` finds once it is
    loaded): each block's self-attention (``blocks.<i>.attn1``) and cross-attention (``blocks.<i>.attn2``)
    video output. With ``experts`` (Wan 2.2 A14B) every site twice, ``transformer.blocks.<i>.attn2`` and
    ``transformer_2.blocks.<i>.attn2``, both of the attention module ``blocks.<i>.attn2`` (what ``eraser.sites``
    patterns and localization name)."""
    from t2vu.core.preflight import SiteName

    sites = []
    for prefix in ([f"{e}." for e in EXPERTS] if experts else [""]):
        for i in range(int(config.get("num_layers", 0) or 0)):
            for attn in ("attn1", "attn2"):
                name = f"blocks.{i}.{attn}"
                sites.append(SiteName(prefix + name, name, "video"))
    return sites


def folder_problem(path: Path, index: dict, cfg: dict, sched: dict, hint: str) -> Optional[str]:
    """Why the configs of ``path`` are not a Wan 2.1 text-to-video folder this backbone can drive, or ``None``.
    Shared by :meth:`WanOptions.preflight` and the backbone's own check (no torch)."""
    kind = str(index.get("_class_name", ""))
    if kind != PIPELINE_CLASS:
        what = ("a Wan variant that is not text-to-video (image-to-video, VACE, ...)" if kind.startswith("Wan")
                else "not a Wan pipeline")
        return (f"{path} holds a {kind or 'pipeline without _class_name'!r}, {what}; the wan backbone needs a "
                f"text-to-video {PIPELINE_CLASS} folder, e.g. {hint}")
    if two_experts(index) != (index.get("boundary_ratio") is not None):
        has = "transformer_2 but no boundary_ratio" if two_experts(index) else "a boundary_ratio but no transformer_2"
        return (f"{path}/model_index.json has {has}; a two-expert (Wan 2.2 A14B) folder needs both, as "
                "WanPipeline.save_pretrained writes them")
    if two_experts(index) and not (path / "transformer_2" / "config.json").is_file():
        return f"{path} names a second expert but has no transformer_2/config.json; download the whole model"
    if index.get("expand_timesteps"):
        return (f"{path} is a Wan 2.2 TI2V pipeline (expand_timesteps: per-token timesteps), which the wan backbone "
                f"does not drive yet; use a Wan 2.1 folder, e.g. {hint}")
    if cfg.get("_class_name") != TRANSFORMER_CLASS:
        return f"{path}/transformer is a {cfg.get('_class_name')!r}, not a {TRANSFORMER_CLASS}"
    if cfg.get("image_dim") is not None or cfg.get("added_kv_proj_dim") is not None:
        return (f"{path}/transformer is an image-to-video Wan transformer (image_dim / added_kv_proj_dim set); use "
                f"the text-to-video model, e.g. {hint}")
    sched_kind = sched.get("_class_name", "UniPCMultistepScheduler")
    if sched_kind not in SCHEDULERS:
        return f"{path}/scheduler is a {sched_kind!r}; the wan backbone samples with {' or '.join(SCHEDULERS)}"
    if sched_kind == "UniPCMultistepScheduler" and (not sched.get("use_flow_sigmas")
                                                    or sched.get("prediction_type") != "flow_prediction"):
        return (f"{path}/scheduler is a UniPCMultistepScheduler without flow sigmas (use_flow_sigmas: true, "
                "prediction_type: flow_prediction, as the Wan folders ship it)")
    if sched.get("use_dynamic_shifting"):
        return (f"{path}/scheduler uses dynamic shifting, which WanPipeline does not drive (it passes no mu); set "
                "use_dynamic_shifting to false and a fixed shift")
    return None


def check_folder(path: Path, facts: ModelFacts, decode: bool, hint: str = DOWNLOAD_HINT) -> Optional[dict]:
    """Check a Wan folder from its configs and weights headers; return the transformer config (``None`` after a
    problem that stops further checks)."""
    from t2vu.core.preflight import check_weights, read_diffusers_folder

    setting = "backbone.model_path"
    hint = hint.format(path=path)
    required = REQUIRED + (("vae/config.json",) if decode else ())
    found = read_diffusers_folder(path, facts, required, "Wan", hint)
    if found is None:
        return None
    index, cfg, sched = found
    problem = folder_problem(path, index, cfg, sched, hint)
    if problem is not None:
        facts.problem(setting, problem)
        return None
    experts = EXPERTS[1:] if two_experts(index) else ()
    for sub in ("transformer", *experts, "text_encoder") + (("vae",) if decode else ()):
        check_weights(path / sub, setting, facts)
    if experts:
        from t2vu.core.preflight import read_json

        second = read_json(path / "transformer_2" / "config.json", setting, facts)
        from t2vu.core.eraser_file import _public_config

        if second is not None and _public_config(second) != _public_config(cfg):
            facts.problem(setting, f"{path}/transformer_2 has another architecture than {path}/transformer; the two "
                                   "experts of a Wan 2.2 A14B folder share one config")
            return None
    return cfg


def experts_config(first: dict, second: dict, boundary_ratio: float) -> dict:
    """The config a two-expert model is known by (hashed into its eraser files): both experts' configs (without
    the ``_`` keys, which differ between diffusers versions) and the boundary."""
    from t2vu.core.eraser_file import _public_config

    return {"transformer": _public_config(first), "transformer_2": _public_config(second),
            "boundary_ratio": float(boundary_ratio)}


class WanOptions(BackboneOptions):
    """A Wan text-to-video model folder in diffusers format (``WanPipeline.save_pretrained``): Wan 2.1
    (``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``, ``Wan-AI/Wan2.1-T2V-14B-Diffusers``) or Wan 2.2 A14B
    (``Wan-AI/Wan2.2-T2V-A14B-Diffusers``: two experts, both erased, one eraser file)."""

    #: the pipeline's documented example clip: 81 frames of 480x832, 50 steps, CFG 5, 16 fps
    defaults: ClassVar[VideoDefaults] = VideoDefaults(num_frames=81, height=480, width=832, steps=50,
                                                      guidance=5.0, fps=16)
    site_presets: ClassVar[dict[str, list[str]]] = {
        "cross": ["blocks.*.attn2"],
        "self": ["blocks.*.attn1"],
        "all": ["blocks.*.attn1", "blocks.*.attn2"],
    }
    #: the text reaches the video through the cross-attention only
    default_sites: ClassVar[Optional[str]] = "cross"
    example_path: ClassVar[str] = "./Wan2.1-T2V-1.3B-Diffusers"

    max_text_length: int = Field(
        512, gt=0, description="UMT5 tokens per prompt (the pipeline's max_sequence_length, 512). Longer prompts "
        "are truncated; every condition is zero-padded to this length, as WanPipeline does. Lower it only to save "
        "memory, knowing the model was trained with 512.")
    negative_prompt: str = Field(
        "", description="The negative prompt of the classifier-free guidance branch when sampling (generate, eval "
        "and training trajectories); WanPipeline's default is the empty prompt. Training's unconditional "
        "prediction v*(x_t, empty) stays the empty prompt whatever this is (docs/backbones.md).")
    guidance_2: Optional[float] = Field(
        None, ge=1, description="Wan 2.2 A14B: the guidance scale of the low-noise expert (transformer_2), "
        "WanPipeline's guidance_scale_2, in generate, eval and training trajectories; default: the same scale as "
        "the high-noise expert. The released A14B examples sample with 4 and 3.")

    def preflight(self, clips: Sequence[Clip], decode: bool = False) -> ModelFacts:
        """The folder (configs, weights headers, ``vae/`` when ``decode``), and each clip: ``4k+1`` frames (the
        VAE's temporal compression) and sizes that are multiples of VAE scale x patch size (16). Reads configs
        only."""
        from t2vu.core.preflight import ModelFacts, frames_rule, size_rule, vae_config

        facts = ModelFacts()
        path = Path(self.model_path)
        cfg = check_folder(path, facts, decode)
        if cfg is None:
            return facts
        vae = vae_config(path, facts)
        temporal = int(vae.get("scale_factor_temporal", 4) or 1)
        spatial = int(vae.get("scale_factor_spatial", 8) or 1)
        patch = cfg.get("patch_size", [1, 2, 2]) or [1, 2, 2]
        for clip in clips:
            frames_rule(clip, temporal, "Wan", f"its VAE compresses {temporal} frames into one after the first",
                        facts)
            size_rule(clip, spatial * int(patch[1]), "Wan", f"VAE {spatial}x, patch {patch[1]}", facts)
        from t2vu.core.preflight import read_json

        index = read_json(path / "model_index.json", "backbone.model_path", facts) or {}
        if two_experts(index):
            second = read_json(path / "transformer_2" / "config.json", "backbone.model_path", facts) or {}
            facts.sites, facts.experts = site_names(cfg, experts=True), len(EXPERTS)
            facts.config = experts_config(cfg, second, index["boundary_ratio"])
        else:
            facts.sites, facts.config = site_names(cfg), cfg
        return facts

    def memory_facts(self, clip: Clip):
        """What ``t2vu estimate`` needs of this architecture for ``clip`` (configs only; ``preflight`` has
        checked them): self-attention over the video tokens, cross-attention onto ``max_text_length`` text
        tokens, feed-forward ``ffn_dim``; Wan 2.2 A14B holds both experts, a forward runs one.

        Units of the hidden width per video token, from the block's code (no GPU anchor yet, docs/estimate.md):
        a block saves ``9 + r`` in the model dtype (pre-norm q/k, both SDPAs, the FFN's GELU input; ``r`` =
        ffn_dim / width) and 3 in fp32 (the FP32LayerNorms' inputs), its backward adds ``1 + 2r`` (+2 fp32); the
        no-grad forward's working set is ``3 + 2r`` (+2 fp32). The capture scores video queries against the text
        keys in chunks of at most ``2**25`` fp32 elements."""
        from t2vu.core.estimate import Component, MemoryFacts, TextEncoding, Units, library_class
        from t2vu.core.preflight import ModelFacts, read_json, vae_config

        path, scratch = Path(self.model_path), ModelFacts()
        cfg = read_json(path / "transformer/config.json", "backbone.model_path", scratch) or {}
        index = read_json(path / "model_index.json", "backbone.model_path", scratch) or {}
        vae = vae_config(path, scratch)
        temporal = int(vae.get("scale_factor_temporal", 4) or 1)
        spatial = int(vae.get("scale_factor_spatial", 8) or 1)
        patch = [int(p) for p in (cfg.get("patch_size") or [1, 2, 2])]
        frames = ((clip.num_frames - 1) // temporal + 1) // patch[0]
        video = frames * (clip.height // spatial // patch[1]) * (clip.width // spatial // patch[2])
        text = int(self.max_text_length)
        heads = int(cfg.get("num_attention_heads", 40))
        width = heads * int(cfg.get("attention_head_dim", 128))
        blocks = int(cfg.get("num_layers", 40))
        r = float(cfg.get("ffn_dim", 4 * width)) / width
        experts = two_experts(index)
        transformer = cfg.get("_class_name", TRANSFORMER_CLASS)
        return MemoryFacts(
            transformers=tuple(Component(e, "diffusers", transformer) for e in (EXPERTS if experts else EXPERTS[:1])),
            text_encoders=(TextEncoding(Component("text_encoder", "transformers",
                                                  library_class(index, "text_encoder", "UMT5EncoderModel")), text),),
            width=width, blocks=blocks, video_tokens=video, text_tokens=text, sequence_tokens=video,
            attention_pairs=blocks * (video * video + video * text),
            site_widths={s.name: width for s in site_names(cfg, experts=experts)},
            forward=Units(3 + 2 * r, fp32=2), saved=Units(9 + r, fp32=3), backward=Units(1 + 2 * r, fp32=2),
            heads=heads, capture=Units(fp32=1), capture_keys=text, capture_budget=1 << 25, guided_rows=2,
            notes=("the Wan numbers are derived from the block's code, not yet checked against a GPU measurement",))


@hookimpl
def register_backbones(register):
    register(
        "wan",
        "t2vu.backbones.wan_model:WanBackbone",
        options=WanOptions,
        summary="Wan 2.1 text-to-video transformer (flow matching, UMT5 text through cross-attention, two-pass CFG)",
    )
