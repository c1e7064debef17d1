"""The toy-world plugin (distribution ``t2vu-toy``, found through the ``t2vu`` entry point).

Light on purpose (no torch at import): the implementations live in
:mod:`t2vu_toy.model` and :mod:`t2vu_toy.judges` and load when used.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar, Optional, Sequence

from pydantic import Field

from t2vu.backbones import cogvideox, hunyuanvideo
from t2vu.backbones.cogvideox import CogVideoXOptions
from t2vu.backbones.hunyuanvideo import HunyuanVideoOptions
from t2vu.core.hookspecs import hookimpl
from t2vu.core.protocols import VideoDefaults
from t2vu.core.registry import Options
from t2vu.core.spec import ConceptSourceOptions, Dtype, SpecPath

if TYPE_CHECKING:  # pragma: no cover
    from t2vu.core.preflight import Clip, ModelFacts

#: The shipped base model folders: CogVideoX architecture, HunyuanVideo architecture.
BASE_PATH = Path(__file__).resolve().parent / "base"
BASE_HUNYUAN_PATH = Path(__file__).resolve().parent / "base_hunyuanvideo"


def toy_preflight(path: Path, base: Path, build: str, check_folder: Callable, site_names: Callable,
                  clips: Sequence[Clip]) -> ModelFacts:
    """Pre-load checks of a toy-world folder: ``world.json`` and the architecture's configs and weights headers
    (``check_folder``, no VAE: the toy is pixel-space), and the world's fixed clip shape for every clip."""
    from t2vu.core.preflight import ModelFacts, read_json

    facts = ModelFacts()
    setting = "backbone.model_path"
    path = Path(path)
    if not (path / "world.json").exists() and path.resolve() == base:
        facts.problem(setting, f"the shipped toy base model is missing from {path}; rebuild it with "
                               f"`{build} --out {path}`")
        return facts
    if not path.exists():
        facts.problem(setting, f"{path} does not exist; make a toy model with `{build} --out {path}` (or leave "
                               "model_path out for the shipped base)")
        return facts
    if path.is_dir() and not (path / "world.json").exists():
        facts.problem(setting, f"{path} is not a toy-world model folder (no world.json); make one with "
                               f"`{build} --out DIR`")
        return facts
    cfg = check_folder(path, facts, False, vae=False, hint=f"`{build} --out {{path}}`")
    world = read_json(path / "world.json", setting, facts) if cfg is not None else None
    if cfg is None or world is None:
        return facts
    frames, size = int(world.get("frames", 0)), int(world.get("size", 0))
    for clip in clips:
        for key, want in (("num_frames", frames), ("height", size), ("width", size)):
            if getattr(clip, key) != want:
                facts.problem(clip.setting(key), f"{getattr(clip, key)}: this toy world's clips are {frames} "
                                                 f"frames of {size}x{size}, the only size its model takes; "
                                                 f"set {key} {want} (or leave it out)")
    facts.sites, facts.config = site_names(cfg), cfg
    return facts


class ToyOptions(CogVideoXOptions):
    """A toy-world model folder (default: the base model shipped with t2vu)."""

    #: the world's clips (4 frames of 32x32) and the sampler its benchmarks use (DDIM 25 steps, CFG 5)
    defaults: ClassVar[VideoDefaults] = VideoDefaults(num_frames=4, height=32, width=32, steps=25, guidance=5.0,
                                                      fps=8, upscale=4)
    example_path: ClassVar[str] = str(BASE_PATH)

    model_path: SpecPath = Field(BASE_PATH, description="Toy model folder (default: the shipped base).")
    dtype: Dtype = Field("float32", description="Dtype of the frozen base model.")

    def preflight(self, clips: Sequence[Clip], decode: bool = False) -> ModelFacts:
        """See :func:`toy_preflight` (the CogVideoX architecture)."""
        return toy_preflight(self.model_path, BASE_PATH, "t2vu toy build", cogvideox.check_folder,
                             cogvideox.site_names, clips)


class ToyHunyuanVideoOptions(HunyuanVideoOptions):
    """A HunyuanVideo-architecture toy-world model folder (default: the one shipped with t2vu-toy)."""

    defaults: ClassVar[VideoDefaults] = ToyOptions.defaults
    example_path: ClassVar[str] = str(BASE_HUNYUAN_PATH)

    model_path: SpecPath = Field(BASE_HUNYUAN_PATH, description="Toy model folder (default: the shipped base).")
    dtype: Dtype = Field("float32", description="Dtype of the frozen base model.")
    max_sequence_length: int = Field(8, gt=0, description="Llama tokens per caption (the toy's captions are short).")
    prompt_template: Optional[str] = Field("{}", description="The toy encodes the caption itself, no system prompt.")
    crop_start: Optional[int] = Field(0, ge=0, description="Template tokens before the caption (none).")

    def preflight(self, clips: Sequence[Clip], decode: bool = False) -> ModelFacts:
        """See :func:`toy_preflight` (the HunyuanVideo architecture)."""
        return toy_preflight(self.model_path, BASE_HUNYUAN_PATH, "t2vu toy build --arch hunyuanvideo",
                             hunyuanvideo.check_folder, hunyuanvideo.site_names, clips)


class JudgeOptions(Options):
    """Deterministic toy-world judge (no options)."""


@hookimpl
def register_backbones(register):
    register("toy", "t2vu_toy.model:ToyBackbone", options=ToyOptions,
             summary="Tiny pixel-space CogVideoX trained on the toy world (CPU benchmarks)")
    register("toy_hunyuanvideo", "t2vu_toy.hunyuan:ToyHunyuanBackbone", options=ToyHunyuanVideoOptions,
             summary="Tiny pixel-space HunyuanVideo (flow matching, text last) trained on the toy world")


@hookimpl
def register_evaluators(register):
    register("toy_color", "t2vu_toy.judges:ColorJudge", options=JudgeOptions,
             summary="Toy world: dominant hue of the moving shape")
    register("toy_shape", "t2vu_toy.judges:ShapeJudge", options=JudgeOptions,
             summary="Toy world: circle, square or triangle")
    register("toy_motion", "t2vu_toy.judges:MotionJudge", options=JudgeOptions,
             summary="Toy world: direction of the shape centroid's travel")


@hookimpl
def register_commands(cli):
    import typer

    toy = typer.Typer(help="The toy world: a tiny text-to-video model for CPU benchmarks.",
                      no_args_is_help=True)

    @toy.command("build", epilog="Example: t2vu toy build --out toy-base --seed 0 --checkpoint-every 1000")
    def build(
        out: Path = typer.Option(Path("toy-base"), "--out", help="Folder to write the model to."),
        steps: Optional[int] = typer.Option(None, "--steps", help="Training steps (default: the shipped recipe's)."),
        seed: int = typer.Option(0, "--seed", help="Seed of everything (same seed, same weights)."),
        checkpoint_every: int = typer.Option(0, "--checkpoint-every", help="Also save EMA weights every N steps."),
        arch: str = typer.Option("cogvideox", "--arch", help="Transformer architecture: cogvideox (the `toy` "
                                 "backbone) or hunyuanvideo (the `toy_hunyuanvideo` backbone)."),
    ) -> None:
        """Build and train a toy base model (deterministic; the shipped bases are the default recipes)."""
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        if arch == "cogvideox":
            from t2vu_toy.model import Recipe, build_base
        elif arch == "hunyuanvideo":
            from t2vu_toy.hunyuan import HunyuanRecipe as Recipe
            from t2vu_toy.hunyuan import build_base
        else:
            typer.echo(f"error: --arch must be cogvideox or hunyuanvideo, not {arch!r}", err=True)
            raise typer.Exit(2)
        recipe = Recipe(seed=seed) if steps is None else Recipe(seed=seed, steps=steps)
        with Progress(TextColumn("training toy base"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(),
                      TimeRemainingColumn()) as bar:
            task = bar.add_task("train", total=recipe.steps, loss=float("nan"))

            def progress(step: int, total: int, loss: float) -> None:
                bar.update(task, completed=step, loss=loss)

            build_base(out, recipe=recipe, progress=progress, checkpoint_every=checkpoint_every)
        typer.echo(f"wrote {out}")

    cli.add_typer(toy, name="toy")


class ToyPromptsOptions(Options):
    """Held-out target, synonym and other-value prompts derived from concept.target."""


class ToySiblingsOptions(ConceptSourceOptions):
    """The other values of the target's attribute (red -> orange, yellow, green, blue, magenta)."""

    captions: bool = Field(False, description="Full captions of every other value's combinations "
                           "instead of the bare words.")


@hookimpl
def register_prompt_sets(register):
    register("toy", "t2vu_toy.evaluation:ToyPromptSet", options=ToyPromptsOptions,
             summary="Toy world eval prompts (target held out, synonyms, other values) and their metrics")


@hookimpl
def register_concept_sources(register):
    register("toy_siblings", "t2vu_toy.sources:ToySiblings", options=ToySiblingsOptions,
             summary="Toy world: the other values of the target's attribute")
