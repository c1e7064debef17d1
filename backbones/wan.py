"""Built-in backbone plugin: Wan 2.1 text-to-video (1.3B, 14B) from a local diffusers folder.

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

DOWNLOAD_HINT = "`huggingface-cli download Wan-AI/Wan2.1-T2V-1.3B-Diffusers --local-dir {path}`"
#: what a Wan folder must hold for training (``vae/`` too for generate and eval)
REQUIRED = ("model_index.json", "transformer/config.json", "scheduler/scheduler_config.json",
            "text_encoder/config.json", "tokenizer")
PIPELINE_CLASS = "WanPipeline"
TRANSFORMER_CLASS = "WanTransformer3DModel"
SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "UniPCMultistepScheduler")
WAN22_REASON = ("Wan 2.2 A14B (two experts: transformer for high noise, transformer_2 for low noise, switched at "
                "boundary_ratio) is not supported yet: an eraser would have to be trained for both experts")


def site_names(config: dict) -> list[SiteName]:
    """The eraser sites of a Wan transformer with this config (what ``transformer_sites`` finds once it is
    loaded): each block's self-attention (``blocks.<i>.attn1``) and cross-attention (``blocks.<i>.attn2``)
    video output."""
    from t2vu.core.preflight import SiteName

    sites = []
    for i in range(int(config.get("num_layers", 0) or 0)):
        for attn in ("attn1", "attn2"):
            name = f"blocks.{i}.{attn}"
            sites.append(SiteName(name, name, "video"))
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
    two = index.get("transformer_2")
    if index.get("boundary_ratio") is not None or (isinstance(two, (list, tuple)) and any(two)):
        return f"{path} is a two-expert pipeline. {WAN22_REASON}. Use a Wan 2.1 folder, e.g. {hint}"
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
    for sub in ("transformer", "text_encoder") + (("vae",) if decode else ()):
        check_weights(path / sub, setting, facts)
    return cfg


class WanOptions(BackboneOptions):
    """A Wan 2.1 text-to-video model folder in diffusers format (``WanPipeline.save_pretrained``, e.g.
    ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers`` or ``Wan-AI/Wan2.1-T2V-14B-Diffusers``)."""

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
        facts.sites, facts.config = site_names(cfg), cfg
        return facts


@hookimpl
def register_backbones(register):
    register(
        "wan",
        "t2vu.backbones.wan_model:WanBackbone",
        options=WanOptions,
        summary="Wan 2.1 text-to-video transformer (flow matching, UMT5 text through cross-attention, two-pass CFG)",
    )
