"""Registers one component of each kind through t2vu's hooks, as any outside package would."""

from typing import ClassVar, Literal, Optional

from pydantic import Field

from t2vu.core.hookspecs import hookimpl
from t2vu.core.protocols import VideoDefaults
from t2vu.core.registry import Options
from t2vu.core.spec import BackboneOptions, ConceptSourceOptions, LossOptions


class ToyBackboneOptions(BackboneOptions):
    """A folder written by ``t2vu_example.heavy.save_example_model`` (config.json, model.safetensors,
    scheduler_config.json)."""

    #: a tiny clip and DDIM settings: what training, eval and generate use where the spec is silent
    defaults: ClassVar[VideoDefaults] = VideoDefaults(num_frames=4, height=8, width=8, steps=4, guidance=3.0,
                                                      fps=4, upscale=8)
    site_presets: ClassVar[dict[str, list[str]]] = {"all": ["blocks.*.attn"]}
    default_sites: ClassVar[Optional[str]] = "all"
    example_path: ClassVar[str] = "./example-model"

    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="Dtype of the frozen base model (a tiny CPU model: fp32 by default).")
    frames: int = Field(4, gt=0, description="Not read by the backbone; an option of its own, so that "
                        "option validation of third-party backbones has something to check.")


class ScaledEraserOptions(Options):
    factor: float = 0.5


class L1Options(LossOptions):
    margin: float = Field(0.0, ge=0)


class ColoursOptions(ConceptSourceOptions):
    palette: list[str] = ["blue", "green"]


class RepeatOptions(Options):
    times: int = Field(2, gt=0)


class BrightnessJudgeOptions(Options):
    threshold: float = Field(0.5, ge=0, le=1)


class ColoursSource:
    def __init__(self, options):
        self.options = options

    def concepts(self, target):
        return [c for c in self.options.palette if c != target][: self.options.count]


class RepeatAugmenter:
    def __init__(self, options):
        self.options = options

    def augment(self, target, prompts):
        return [p for p in prompts for _ in range(self.options.times)]


@hookimpl
def register_backbones(register):
    register("example_backbone", "t2vu_example.heavy:Backbone", options=ToyBackboneOptions,
             summary="An example backbone from a third-party package")


@hookimpl
def register_erasers(register):
    register("example_eraser", "t2vu_example.heavy:Eraser", options=ScaledEraserOptions,
             summary="An example eraser")


@hookimpl
def register_losses(register):
    register("example_l1", "t2vu_example.heavy:L1Loss", options=L1Options, summary="An example loss")


@hookimpl
def register_concept_sources(register):
    register("example_colours", ColoursSource, options=ColoursOptions, summary="Colours except the target")


@hookimpl
def register_augmenters(register):
    register("example_repeat", RepeatAugmenter, options=RepeatOptions, summary="Repeat every prompt")


class FixedPromptsOptions(Options):
    prompts: list[str] = ["a blue circle"]


class FixedPrompts:
    def __init__(self, options):
        self.options = options

    def rows(self, spec):
        from t2vu.core.evaluate import EvalPrompt

        return [EvalPrompt(p, seed=i) for i, p in enumerate(self.options.prompts)]


@hookimpl
def register_prompt_sets(register):
    register("example_prompts", FixedPrompts, options=FixedPromptsOptions, summary="Fixed evaluation prompts")


@hookimpl
def register_evaluators(register):
    register("example_judge", "t2vu_example.heavy:Judge", options=BrightnessJudgeOptions,
             summary="Judges a video bright or dark")
