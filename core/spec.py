"""The run spec: YAML, validated in two phases with pydantic 2.

Phase 1 checks the structure (top-level sections, ``concept``, ``training``,
``output``); phase 2 validates every component block (``backbone``,
``eraser``, ``losses[i]``, ``preserved``, ``augment[i]``) against the
``Options`` model of the plugin it names. Every problem is reported with its
YAML path and line, and a close valid key or registered name is suggested.
"""

from __future__ import annotations

import difflib
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Optional, Union

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo

from t2vu.core.errors import T2VUError
from t2vu.core.protocols import EvalProtocol, VideoDefaults
from t2vu.core.registry import Component, Options, Registry

if typing.TYPE_CHECKING:  # pragma: no cover
    from t2vu.core.preflight import Clip, ModelFacts

PathKey = tuple[Union[str, int], ...]


# -- types plugins may use --------------------------------------------------
def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    value = value.expanduser()
    base = (info.context or {}).get("base_dir")
    if base is not None and not value.is_absolute():
        value = Path(base) / value
    return value


#: A path in the spec: relative paths resolve against the spec file's folder.
SpecPath = Annotated[Path, AfterValidator(_resolve_path)]

Dtype = Literal["float32", "float16", "bfloat16"]


class BackboneOptions(Options):
    """Options every backbone shares; backbone plugins subclass this.

    Class-level settings a backbone may override (read without importing torch):
    ``defaults`` (a :class:`~t2vu.core.protocols.VideoDefaults`: frames, size, sampler steps and guidance
    for what the spec leaves out), ``site_presets`` (names for groups of eraser sites) and
    ``default_sites`` (the preset used when ``eraser.sites`` is unset), ``example_path`` (shown by
    ``t2vu spec init``), ``protocols`` (named :class:`~t2vu.core.protocols.EvalProtocol` s for ``eval.protocol``).
    """

    defaults: ClassVar[VideoDefaults] = VideoDefaults()
    protocols: ClassVar[dict[str, EvalProtocol]] = {}
    site_presets: ClassVar[dict[str, list[str]]] = {}
    default_sites: ClassVar[Optional[str]] = None
    example_path: ClassVar[str] = "./model"

    model_path: SpecPath = Field(description="Local diffusers-format model folder.")
    dtype: Dtype = Field("bfloat16", description="Dtype of the frozen base model.")
    device: Optional[str] = Field(None, description="Device to run on, e.g. 'cuda:1' or 'cpu' (default: "
                                  "accelerate's choice for training, the first GPU if any for generate/eval).")
    storage_dtype: Optional[Literal["float8_e4m3fn", "float8_e5m2"]] = Field(
        None, description="Keep the frozen transformer's weights in this fp8 type and cast each layer up to dtype "
        "as it runs (diffusers' layerwise casting): half the weight memory of bf16 at a small cost in precision. "
        "Training needs training.gradient_checkpointing: true with it (an un-checkpointed block keeps the up-cast "
        "copies for backward). Norms, embeddings and the input and output projections stay in dtype; erasers and "
        "their optimiser state stay fp32.")
    vae_tiling: bool = Field(False, description="generate/eval: decode tile by tile and video by video (the VAE's "
                             "enable_tiling and enable_slicing), for cards where decoding a whole clip does not fit; "
                             "videos then differ slightly from the untiled pipeline's.")
    offload_for_decode: bool = Field(False, description="generate/eval: keep the transformer in CPU memory while the "
                                     "VAE decodes and the VAE while the transformer samples, as diffusers' model CPU "
                                     "offload moves whole components: peak memory is the larger of the two, not "
                                     "their sum, for a transfer each time.")

    def preflight(self, clips: "typing.Sequence[Clip]", decode: bool = False) -> "ModelFacts":
        """Check what can be known without loading a weight (``t2vu spec validate``, ``--dry-run``, the start of
        ``run``/``generate``/``eval``): read configs and file headers only, import no torch.

        ``clips``: the clip sizes the command will ask for (:class:`t2vu.core.preflight.Clip`, each number with
        the spec setting it came from); ``decode``: the command decodes videos (``generate``, ``eval``), so the
        VAE is needed too. Returns a :class:`t2vu.core.preflight.ModelFacts`: problems as ``(setting, message)``
        and, where the configs tell, the model's eraser sites and transformer config. Backbones override this;
        the default checks only that ``model_path`` exists.
        """
        from t2vu.core.preflight import ModelFacts

        facts = ModelFacts()
        if not Path(self.model_path).exists():
            facts.problem("backbone.model_path", f"{self.model_path} does not exist; point it at the model folder")
        return facts


class LossOptions(Options):
    """Options every loss term shares; loss plugins subclass this."""

    weight: float = Field(1.0, ge=0, description="Multiplier of this term in the total loss.")


class ConceptSourceOptions(Options):
    """Options every preserved-concept source shares."""

    count: Optional[int] = Field(None, gt=0, description="Keep at most this many concepts.")


# -- structure (phase 1) ------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ConceptSpec(_Strict):
    target: str = Field(min_length=1, description="The concept to erase, e.g. 'nudity'.")
    prompts: Optional[Union[SpecPath, list[str]]] = Field(
        None, description="Target prompts: a file (one a line, '#' comments) or an inline list.")
    condition: Literal["concept", "prompts", "mix"] = Field(
        "mix", description="Condition of the unlearning term: the bare concept text, the target "
        "prompts, or each half the time (mix; the bare concept alone when there are no prompts).")
    anchor: Optional[Union[str, dict[str, Any]]] = Field(
        None, description="Guide away from the concept relative to the same prompt with the concept "
        "replaced by this text ('' deletes it), instead of relative to the empty prompt; e.g. 'shape' "
        "turns 'a red square moving left' into 'a red shape moving left'. A concept-source block "
        "({source: NAME, ...options}, as in 'preserved:') uses the first concept that source gives for "
        "the target, so the anchor follows concept.target (toy_siblings: 'square' for 'circle').")

    def prompt_list(self) -> list[str]:
        """The target prompts: the inline list, or the file's lines ('#' comments dropped)."""
        if isinstance(self.prompts, list):
            return [p.strip() for p in self.prompts if p.strip()]
        if self.prompts is not None:
            return read_lines_file(Path(self.prompts))
        return []


class TrainingSpec(_Strict):
    steps: int = Field(500, gt=0)
    batch_size: int = Field(1, gt=0)
    learning_rate: float = Field(1.0e-4, gt=0)
    warmup_steps: int = Field(0, ge=0)
    lr_scheduler: Literal["cosine", "constant", "linear"] = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    num_frames: Optional[int] = Field(None, gt=0, description="Frames of the training videos (default: the backbone's).")
    height: Optional[int] = Field(None, gt=0, description="Height in pixels (default: the backbone's).")
    width: Optional[int] = Field(None, gt=0, description="Width in pixels (default: the backbone's).")
    seed: int = 42
    gradient_checkpointing: Union[bool, Annotated[int, Field(ge=1)]] = Field(
        True, description="Recompute the transformer blocks' activations in the backward pass instead of keeping "
        "them: true (every block: the least memory), false (none: the fastest, the most memory), or k (every k-th "
        "block: in between; 2 keeps about half the activations a run without checkpointing keeps).")
    checkpoint_every: int = Field(0, ge=0, description="Save a checkpoint every N steps (0: never): the eraser "
                                  "plus the optimiser, schedule, RNG and state-pool state that `t2vu run --resume` "
                                  "continues from. Also written when the run is interrupted (Ctrl-C, SIGTERM).")
    keep_checkpoints: int = Field(2, gt=0, description="How many of the newest checkpoints to keep; older ones are "
                                  "deleted once a newer one is complete.")
    divergence_factor: float = Field(1.0e4, gt=1, description="Stop the run when the loss exceeds this multiple of "
                                     "its median over the last 50 steps (a diverging run, typically a too high "
                                     "learning_rate); non-finite losses, gradients and eraser weights always stop it.")
    states: Literal["noise", "trajectory", "erased_trajectory"] = Field(
        "noise", description="Where x_t comes from: noised random latents; the frozen model's guided sampler "
        "run from a target prompt (its predictions reused as teacher values); or the erased model's sampler.")
    refresh_every: int = Field(50, gt=0, description="Trajectory states: sample new trajectories every N steps.")
    trajectory_states: Literal["visited", "uniform_step"] = Field(
        "visited", description="Trajectory states: which states of a trajectory are trained on. 'visited': the "
        "sampler stops at a random depth and any state it visited is drawn, so the first (noisiest) steps are "
        "drawn most often (about half the states lie in the noisiest fifth of the steps). 'uniform_step': the "
        "state at a sampler step drawn uniformly (as ESD and Receler train), so every step, the late low-noise "
        "ones included, is trained on equally often.")
    sample_steps: Optional[int] = Field(None, gt=1, description="Trajectory states: sampler steps per trajectory "
                                        "(default: the backbone's inference steps).")
    guidance_scale: Optional[float] = Field(None, ge=1, description="Trajectory states: guidance scale, as the "
                                            "backbone guides (default: the backbone's).")
    stream_start: dict[Literal["video", "text"], Annotated[int, Field(ge=0)]] = Field(
        default_factory=dict, description="Eraser stream -> the step its adapters start training at; before it "
        "they are off (no change, no gradient). A late stream runs the whole lr_scheduler, warmup included, over "
        "the steps it trains. E.g. {text: 100} with eraser.streams [video, text]: the video adapters train alone "
        "first (docs/training.md, 'What the adapter edits').")
    log_every: int = Field(1, gt=0)


class OutputSpec(_Strict):
    dir: SpecPath = Field(description="Folder for eraser.safetensors, metrics.jsonl and checkpoints.")
    overwrite: bool = Field(False, description="Replace an eraser already in dir.")


class SafreeSpec(_Strict):
    """``eval.safree``: the settings of the ``safree`` baseline (docs/evaluation.md)."""

    keywords: Optional[list[str]] = Field(
        None, min_length=1, description="Words or phrases that span the concept's subspace (for nudity e.g. "
        "['nudity', 'naked', 'sexual acts']); default: [concept.target].")
    alpha: float = Field(0.01, ge=0, description="Trigger threshold: a token is projected when masking it moves the "
                         "prompt (1 + alpha) times further from the concept subspace than masking another token "
                         "does on average. Higher: fewer tokens projected.")
    filter_share: float = Field(0.26, ge=0, le=1, description="Share of the sampler steps, from the first, that use "
                                "the projected prompt (SAFREE's CogVideoX pipeline: 13 of 50); the rest use the "
                                "original prompt.")
    negative_prompt: bool = Field(True, description="Also guide away from the keywords, joined with commas, as the "
                                  "negative prompt (as SAFREE's video pipeline does; needs two-pass guidance).")


class EvalSpec(_Strict):
    """``t2vu eval``: which prompts to generate, how, and which judges score them."""

    prompts: Union[SpecPath, list[str], dict[str, Any]] = Field(
        description="A CSV file (columns: prompt, optional seed, group, expect_<attribute>), an inline "
        "list, or a generator block {generator: NAME, ...options}.")
    judges: list[Union[str, dict[str, Any]]] = Field(default_factory=list, description="Evaluator names or blocks.")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1,
                             description="Seeds for prompts that do not carry their own.")
    protocol: Optional[str] = Field(
        None, min_length=1, description="A named evaluation protocol of the backbone (e.g. 't2vunlearning': the "
        "sampler settings of the T2VUnlearning paper's evaluation, for numbers comparable with it). It fills "
        "steps, guidance, num_frames, height and width where this block leaves them out, and sets the backbone's "
        "sampler options for eval only. Listed per backbone in docs/evaluation.md.")
    steps: Optional[int] = Field(None, gt=0, description="Sampler steps (default: the protocol's, else the backbone's).")
    guidance: Optional[float] = Field(None, ge=1, description="Guidance scale, as the backbone guides: two-pass "
                                      "classifier-free or embedded (default: the protocol's, else the backbone's).")
    batch_size: int = Field(8, gt=0)
    baselines: list[Literal["negative_prompt", "safree"]] = Field(
        default_factory=list, description="Inference-time methods generated from the same seeds beside the "
        "eraser, so the report shows what the eraser adds: 'negative_prompt' samples the stock model (erasers "
        "off) with concept.target as the negative prompt (backbones that guide in two passes); 'safree' samples "
        "it with SAFREE's training-free prompt projection (settings in eval.safree; backbones that offer it). "
        "Each metric gets a column per baseline.")
    safree: SafreeSpec = Field(default_factory=SafreeSpec, description="Settings of the 'safree' baseline.")
    num_frames: Optional[int] = Field(None, gt=0, description="Default: the protocol's, else training.num_frames.")
    height: Optional[int] = Field(None, gt=0, description="Default: the protocol's, else training.height.")
    width: Optional[int] = Field(None, gt=0, description="Default: the protocol's, else training.width.")
    thumbnails: int = Field(12, ge=0, description="Side-by-side GIFs in report.md.")
    prompt_column: str = Field("prompt", min_length=1, description="CSV prompt sets: the column holding the "
                               "prompt (for CSVs from other evaluations, which name it their own way).")
    seed_column: str = Field("seed", min_length=1, description="CSV prompt sets: the column holding a row's "
                             "seed (rows without one use eval.seeds).")


class RunSpec(_Strict):
    backbone: dict[str, Any]
    eraser: dict[str, Any] = Field(default_factory=lambda: {"name": "adapter"})
    concept: ConceptSpec
    preserved: Union[dict[str, Any], list[dict[str, Any]], None] = None
    augment: list[dict[str, Any]] = Field(default_factory=list)
    losses: list[dict[str, Any]] = Field(min_length=1)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    output: OutputSpec
    eval: Optional[EvalSpec] = None


#: spec section -> (component kind, key naming the component)
COMPONENT_SECTIONS: dict[str, tuple[str, str]] = {
    "backbone": ("backbone", "name"),
    "eraser": ("eraser", "name"),
    "losses": ("loss", "name"),
    "preserved": ("concept_source", "source"),
    "augment": ("augmenter", "name"),
}


# -- results --------------------------------------------------------------------
@dataclass
class Problem:
    path: PathKey
    message: str
    line: Optional[int] = None
    origin: str = ""

    def __str__(self) -> str:
        where = format_path(self.path) or "<spec>"
        if self.line is not None:
            where += f" (line {self.line})"
        elif self.origin:
            where += f" ({self.origin})"
        return f"{where}: {self.message}"


class SpecError(Exception):
    """The spec is invalid; ``problems`` lists every problem found."""

    def __init__(self, problems: list[Problem], source: Optional[Path] = None):
        self.problems = problems
        self.source = source
        super().__init__(str(self))

    def __str__(self) -> str:
        head = f"{self.source}: " if self.source else ""
        n = len(self.problems)
        lines = [f"{head}invalid spec ({n} problem{'s' if n != 1 else ''})"]
        lines += [f"  {p}" for p in self.problems]
        return "\n".join(lines)


@dataclass
class Resolved:
    """One component block after phase 2: the component and its validated options."""

    component: Component
    options: BaseModel
    path: str

    @property
    def name(self) -> str:
        return self.component.name

    def build(self, **kwargs: Any) -> Any:
        return self.component.build(self.options, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        key = "generator" if self.component.kind == "prompt_set" else (
            "source" if self.component.kind == "concept_source" else "name")
        return {key: self.component.name, **self.options.model_dump(mode="json")}


@dataclass
class ResolvedSpec:
    spec: RunSpec
    backbone: Resolved
    eraser: Resolved
    losses: list[Resolved]
    preserved: list[Resolved]
    augment: list[Resolved]
    source: Optional[Path] = None
    raw: dict[str, Any] = field(default_factory=dict)
    eval_prompts: Optional[Resolved] = None  # a prompt-set generator block, when eval.prompts is one
    anchor_source: Optional[Resolved] = None  # a concept-source block, when concept.anchor is one
    judges: list[Resolved] = field(default_factory=list)
    document: Optional["SpecDocument"] = None  # the loaded YAML (lines of each key), for later problems

    def to_dict(self) -> dict[str, Any]:
        """The resolved spec, defaults filled in, paths absolute."""
        data = self.spec.model_dump(mode="json", exclude={"backbone", "eraser", "losses", "preserved", "augment"})
        if data.get("eval") is not None:
            if self.eval_prompts is not None:
                data["eval"]["prompts"] = self.eval_prompts.to_dict()
            data["eval"]["judges"] = [j.to_dict() for j in self.judges]
        out: dict[str, Any] = {
            "backbone": self.backbone.to_dict(),
            "eraser": self.eraser.to_dict(),
            "concept": data["concept"],
            "preserved": [p.to_dict() for p in self.preserved],
            "augment": [a.to_dict() for a in self.augment],
            "losses": [loss.to_dict() for loss in self.losses],
            "training": data["training"],
            "output": data["output"],
        }
        if data.get("eval") is not None:
            out["eval"] = data["eval"]
        return out

    @property
    def video_defaults(self) -> VideoDefaults:
        """The backbone's defaults (sampler steps, guidance, fps, upscaling of written videos)."""
        return getattr(type(self.backbone.options), "defaults", VideoDefaults())

    def components(self) -> list[Resolved]:
        anchor = [self.anchor_source] if self.anchor_source is not None else []
        return [self.backbone, self.eraser, *anchor, *self.preserved, *self.augment, *self.losses]


# -- paths, lines ------------------------------------------------------------------
def format_path(path: PathKey) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def parse_path(text: str) -> PathKey:
    """``losses[2].eta`` or ``losses.2.eta`` -> ``('losses', 2, 'eta')``."""
    parts: list[Union[str, int]] = []
    for token in re.findall(r"[^.\[\]]+|\[\d+\]", text):
        if token.startswith("["):
            parts.append(int(token[1:-1]))
        elif token.isdigit() and parts:
            parts.append(int(token))
        else:
            parts.append(token)
    if not parts:
        raise ValueError(f"empty key in {text!r}")
    return tuple(parts)


def _line_map(node: yaml.Node, path: PathKey = (), out: Optional[dict] = None) -> dict[PathKey, int]:
    out = {} if out is None else out
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            out[path + (key,)] = key_node.start_mark.line + 1
            _line_map(value_node, path + (key,), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _line_map(item, path + (i,), out)
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {seen[key]})", key_node.start_mark)
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


@dataclass
class SpecDocument:
    """A spec as loaded from YAML, before validation."""

    data: dict[str, Any]
    lines: dict[PathKey, int]
    source: Optional[Path] = None
    overridden: set = field(default_factory=set)

    @property
    def base_dir(self) -> Path:
        return self.source.parent if self.source else Path.cwd()

    def line(self, path: PathKey) -> Optional[int]:
        while path:
            if path in self.overridden:
                return None
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return None

    def origin(self, path: PathKey) -> str:
        while path:
            if path in self.overridden:
                return "from --set"
            path = path[:-1]
        return ""


def not_text(data: bytes, path: Path) -> Optional[str]:
    """Why ``data`` (the contents of ``path``) is not UTF-8 text, or ``None`` when it is."""
    if b"\x00" in data[:65536]:
        return f"{path} is a binary file, not text; name a UTF-8 text file"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        return (f"{path} is not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}: Latin-1 or another "
                f"legacy encoding?); save it as UTF-8, e.g. `iconv -f latin1 -t utf-8 {Path(path).name} > fixed`")
    return None


def read_text_file(path: Path) -> str:
    """The text of a UTF-8 file (a leading BOM dropped); :class:`T2VUError` naming the file when it is
    binary or in another encoding."""
    data = Path(path).read_bytes()
    problem = not_text(data, Path(path))
    if problem is not None:
        raise T2VUError(problem)
    return data.decode("utf-8-sig")


def load_document(path: Union[str, Path]) -> SpecDocument:
    path = Path(path)
    try:
        text = read_text_file(path)
    except FileNotFoundError:
        raise SpecError([Problem((), f"spec file not found: {path}")]) from None
    except IsADirectoryError:
        raise SpecError([Problem((), f"{path} is a folder; name the spec's YAML file")]) from None
    except OSError as exc:
        raise SpecError([Problem((), f"cannot read spec file {path}: {exc.strerror or exc}")]) from None
    except T2VUError as exc:
        raise SpecError([Problem((), f"{exc} (a spec is a YAML text file)")]) from None
    return parse_document(text, source=path)


def parse_document(text: str, source: Optional[Path] = None) -> SpecDocument:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        msg = str(getattr(exc, "problem", None) or exc)
        raise SpecError([Problem((), f"not valid YAML: {msg}", line)], source) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError([Problem((), "the spec must be a YAML mapping of sections", 1)], source)
    lines = _line_map(node) if node is not None else {}
    return SpecDocument(data, lines, source)


def apply_overrides(doc: SpecDocument, overrides: list[str]) -> None:
    """Apply ``key.path=value`` overrides; the value is parsed as YAML."""
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            problems.append(Problem((), f"--set {item!r}: expected KEY=VALUE, e.g. training.steps=10", origin="from --set"))
            continue
        try:
            path = parse_path(key.strip())
            value = yaml.safe_load(raw) if raw.strip() else ""
        except (ValueError, yaml.YAMLError) as exc:
            problems.append(Problem((), f"--set {item!r}: {exc}", origin="from --set"))
            continue
        try:
            _set_in(doc.data, path, value)
        except (KeyError, IndexError, TypeError) as exc:
            problems.append(Problem(path, f"--set cannot set this key: {exc}", origin="from --set"))
            continue
        doc.overridden.add(path)
    if problems:
        raise SpecError(problems, doc.source)


def _set_in(data: Any, path: PathKey, value: Any) -> None:
    for i, part in enumerate(path[:-1]):
        nxt = path[i + 1]
        if isinstance(part, int):
            if not isinstance(data, list):
                raise TypeError(f"{format_path(path[:i]) or 'spec'} is not a list")
            data = data[part]
        else:
            if not isinstance(data, dict):
                raise TypeError(f"{format_path(path[:i]) or 'spec'} is not a mapping")
            if part not in data or data[part] is None:
                data[part] = [] if isinstance(nxt, int) else {}
            data = data[part]
    last = path[-1]
    if isinstance(last, int):
        if not isinstance(data, list):
            raise TypeError(f"{format_path(path[:-1])} is not a list")
        if last == len(data):
            data.append(value)
        else:
            data[last] = value
    else:
        if not isinstance(data, dict):
            raise TypeError(f"{format_path(path[:-1]) or 'spec'} is not a mapping")
        data[last] = value


# -- validation ----------------------------------------------------------------------
def _model_at(model: Any, loc: PathKey) -> Any:
    """The pydantic model class that holds the key at the end of ``loc``."""
    current: Any = model
    for part in loc[:-1]:
        current = _unwrap(current, part)
        if current is None:
            return None
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap(tp: Any, part: Any) -> Any:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        f = tp.model_fields.get(part) if isinstance(part, str) else None
        return _pick_model(f.annotation) if f else None
    return None


def _pick_model(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is None:
        return tp
    for arg in typing.get_args(tp):
        found = _pick_model(arg)
        if isinstance(found, type) and issubclass(found, BaseModel):
            return found
    return None


def _valid_keys(model: Any) -> list[str]:
    return list(model.model_fields) if model is not None else []


def _pydantic_problems(exc: ValidationError, prefix: PathKey, model: Any, doc: SpecDocument,
                       extra_keys: tuple[str, ...] = ()) -> list[Problem]:
    problems = []
    for err in exc.errors(include_url=False):
        loc = tuple(p for p in err["loc"] if not _is_union_tag(p))
        path = prefix + loc
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            holder = _model_at(model, loc)
            valid = _valid_keys(holder) + (list(extra_keys) if len(loc) == 1 else [])
            msg = f"unknown key {loc[-1]!r}"
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            if close:
                msg += f"; did you mean {close[0]!r}?"
            elif valid:
                msg += f" (valid keys: {', '.join(valid)})"
        problems.append(Problem(path, msg, doc.line(path), doc.origin(path)))
    return problems


# pydantic puts the names of union members ("list[str]", "function-after[...]")
# into error locations; they mean nothing to a user, and no spec key looks so.
def _is_union_tag(part: Any) -> bool:
    return isinstance(part, str) and bool(re.search(r"[\[\](),]", part))


def _phase2_block(registry: Registry, kind: str, key: str, block: Any, path: PathKey,
                  doc: SpecDocument, problems: list[Problem]) -> Optional[Resolved]:
    label = kind.replace("_", " ")
    if not isinstance(block, dict):
        problems.append(Problem(path, f"expected a mapping with '{key}:' naming a {label}",
                                doc.line(path), doc.origin(path)))
        return None
    name = block.get(key)
    if not isinstance(name, str) or not name:
        hint = ""
        if key == "source" and "name" in block:
            hint = " (preserved-concept blocks name their plugin with 'source:', not 'name:')"
        problems.append(Problem(path + (key,), f"missing '{key}:' naming a {label}{hint}",
                                doc.line(path), doc.origin(path)))
        return None
    if name not in registry.components[kind]:
        problems.append(Problem(path + (key,), registry.unknown_message(kind, name),
                                doc.line(path + (key,)), doc.origin(path + (key,))))
        return None
    component = registry.components[kind][name]
    options = {k: v for k, v in block.items() if k != key}
    try:
        validated = component.options.model_validate(options, context={"base_dir": doc.base_dir})
    except ValidationError as exc:
        problems.extend(_pydantic_problems(exc, path, component.options, doc, extra_keys=(key,)))
        return None
    return Resolved(component, validated, format_path(path))


def validate(doc: SpecDocument, registry: Registry) -> ResolvedSpec:
    """Validate a loaded spec against the registry; raise :class:`SpecError`."""
    problems: list[Problem] = []
    data = doc.data
    spec: Optional[RunSpec] = None
    try:
        spec = RunSpec.model_validate(data, context={"base_dir": doc.base_dir})
    except ValidationError as exc:
        problems.extend(_pydantic_problems(exc, (), RunSpec, doc))

    resolved: dict[str, Any] = {}
    for section, (kind, key) in COMPONENT_SECTIONS.items():
        value = data.get(section)
        if section == "eraser" and value is None:
            value = {"name": "adapter"}
        elif section == "eraser" and isinstance(value, dict) and "name" not in value:
            value = {"name": "adapter", **value}  # the default eraser, as when the section is left out
        if value is None:
            resolved[section] = [] if section in ("losses", "preserved", "augment") else None
            continue
        if section in ("losses", "augment", "preserved"):
            blocks = value if isinstance(value, list) else ([value] if section == "preserved" else None)
            if blocks is None:
                continue  # phase 1 reported the type error
            indexed = isinstance(value, list)
            resolved[section] = [
                _phase2_block(registry, kind, key, block, (section, i) if indexed else (section,), doc, problems)
                for i, block in enumerate(blocks)
            ]
        else:
            resolved[section] = _phase2_block(registry, kind, key, value, (section,), doc, problems)

    eval_prompts, judges = _phase2_eval(registry, data.get("eval"), doc, problems)
    concept = data.get("concept")
    anchor = concept.get("anchor") if isinstance(concept, dict) else None
    anchor_source = (_phase2_block(registry, "concept_source", "source", anchor, ("concept", "anchor"), doc, problems)
                     if isinstance(anchor, dict) else None)
    if spec is not None and not problems:
        problems.extend(_cross_checks(spec, resolved, doc))
    if spec is not None and not problems:
        spec = _fill_backbone_defaults(spec, resolved["backbone"], doc, problems)
    if problems:
        raise SpecError(problems, doc.source)
    assert spec is not None
    return ResolvedSpec(
        spec=spec, backbone=resolved["backbone"], eraser=resolved["eraser"],
        losses=resolved["losses"], preserved=resolved["preserved"], augment=resolved["augment"],
        source=doc.source, raw=data, eval_prompts=eval_prompts, judges=judges, anchor_source=anchor_source,
        document=doc,
    )


def _phase2_eval(registry: Registry, block: Any, doc: SpecDocument, problems: list[Problem]):
    """The eval section's component blocks: a prompt generator and the judges."""
    if not isinstance(block, dict):
        return None, []
    prompts = None
    if isinstance(block.get("prompts"), dict):
        prompts = _phase2_block(registry, "prompt_set", "generator", block["prompts"], ("eval", "prompts"),
                                doc, problems)
    judges = []
    for i, judge in enumerate(block.get("judges") or []):
        judge = {"name": judge} if isinstance(judge, str) else judge
        judges.append(_phase2_block(registry, "evaluator", "name", judge, ("eval", "judges", i), doc, problems))
    return prompts, judges


def _cross_checks(spec: RunSpec, resolved: dict[str, Any], doc: SpecDocument) -> list[Problem]:
    problems = []
    seen: dict[str, int] = {}
    for i, loss in enumerate(resolved["losses"]):
        if loss.name in seen:
            path = ("losses", i, "name")
            problems.append(Problem(path, f"loss {loss.name!r} appears twice (also losses[{seen[loss.name]}])",
                                    doc.line(path), doc.origin(path)))
        seen[loss.name] = i
        needs = getattr(loss.options, "requires_preserved", None)
        if needs and not resolved["preserved"]:
            path = ("losses", i)
            problems.append(Problem(path, f"loss {loss.name!r} needs preserved concepts: add a 'preserved:' section",
                                    doc.line(path), doc.origin(path)))
    if isinstance(spec.concept.prompts, Path) and not spec.concept.prompts.is_file():
        path = ("concept", "prompts")
        problems.append(Problem(path, f"prompts file not found: {spec.concept.prompts}", doc.line(path), doc.origin(path)))
    return problems


#: spec field -> the VideoDefaults field that fills it when the spec leaves it out
_DEFAULTED = {("training", "num_frames"): "num_frames", ("training", "height"): "height",
              ("training", "width"): "width", ("training", "sample_steps"): "steps",
              ("training", "guidance_scale"): "guidance", ("eval", "steps"): "steps", ("eval", "guidance"): "guidance"}


def _fill_backbone_defaults(spec: RunSpec, backbone: Optional[Resolved], doc: SpecDocument,
                            problems: list[Problem]) -> RunSpec:
    """Fields the spec leaves out, from the backbone's ``defaults``; a field with neither is a problem."""
    if backbone is None:
        return spec
    defaults: VideoDefaults = getattr(type(backbone.options), "defaults", VideoDefaults())
    sections = {"training": spec.training, "eval": spec.eval}
    updates: dict[str, dict[str, Any]] = {"training": {}, "eval": {}}
    if spec.eval is not None and spec.eval.protocol is not None:
        protocol = eval_protocol(backbone, spec.eval.protocol, doc, problems)
        for key in ("steps", "guidance", "num_frames", "height", "width"):
            if protocol is not None and getattr(spec.eval, key) is None and getattr(protocol, key) is not None:
                updates["eval"][key] = getattr(protocol, key)
        sections["eval"] = spec.eval.model_copy(update=updates["eval"])
    for (section, key), default_key in _DEFAULTED.items():
        model = sections[section]
        if model is None or getattr(model, key) is not None:
            continue
        value = getattr(defaults, default_key)
        needed = not (section == "training" and key in ("sample_steps", "guidance_scale")
                      and spec.training.states == "noise")  # only trajectory states run a sampler
        if value is None and needed:
            path = (section, key)
            problems.append(Problem(path, f"backbone {backbone.name!r} has no default for {section}.{key}; set it",
                                    doc.line(path), doc.origin(path)))
        updates[section][key] = value
    training = spec.training.model_copy(update=updates["training"])
    ev = spec.eval.model_copy(update=updates["eval"]) if spec.eval is not None else None
    return spec.model_copy(update={"training": training, "eval": ev})


def eval_protocol(backbone: Resolved, name: str, doc: Optional[SpecDocument] = None,
                  problems: Optional[list[Problem]] = None) -> Optional[EvalProtocol]:
    """The backbone's ``eval.protocol`` preset ``name``; an unknown name is a problem (listing the known ones)."""
    known: dict[str, EvalProtocol] = getattr(type(backbone.options), "protocols", {}) or {}
    if name in known:
        return known[name]
    if problems is not None:
        path = ("eval", "protocol")
        have = ", ".join(sorted(known)) or "none"
        problems.append(Problem(path, f"backbone {backbone.name!r} has no evaluation protocol {name!r} (it has: "
                                f"{have})", doc.line(path) if doc else None, doc.origin(path) if doc else ""))
    return None


def load_spec(path: Union[str, Path], registry: Registry, overrides: Optional[list[str]] = None) -> ResolvedSpec:
    """Load, override and validate a spec file."""
    doc = load_document(path)
    if overrides:
        apply_overrides(doc, overrides)
    return validate(doc, registry)


def read_lines_file(path: Path) -> list[str]:
    """One item a line; '#' comments and blank lines ignored; duplicates dropped, order kept.
    :class:`T2VUError` when the file is not UTF-8 text; ``OSError`` when it cannot be read."""
    items: list[str] = []
    seen: set[str] = set()
    for raw in read_text_file(path).splitlines():
        line = raw.split("#", 1)[0].strip()
        if line and line not in seen:
            seen.add(line)
            items.append(line)
    return items


# -- JSON schema ---------------------------------------------------------------------------
def json_schema(registry: Registry) -> dict[str, Any]:
    """JSON Schema of the whole spec, every registered plugin's options included."""
    from pydantic import create_model

    def union_for(kind: str, key: str) -> Any:
        members = []
        for name in registry.names(kind):
            comp = registry.components[kind][name]
            model_name = f"{kind}_{name}".replace("-", "_").replace(".", "_")
            members.append(create_model(
                model_name, __base__=comp.options,
                __doc__=comp.summary or comp.options.__doc__,
                **{key: (Literal[name], Field(description=f"{kind.replace('_', ' ')} plugin"))},
            ))
        if not members:
            return dict[str, Any]
        if len(members) == 1:
            return members[0]
        return Annotated[Union[tuple(members)], Field(discriminator=key)]

    backbone, eraser, loss, source, augmenter = (union_for(*k) for k in COMPONENT_SECTIONS.values())
    generator, judge = union_for("prompt_set", "generator"), union_for("evaluator", "name")
    concept_model = create_model(
        "ConceptSpec", __base__=ConceptSpec,
        anchor=(Optional[Union[str, source]], Field(None, description=ConceptSpec.model_fields["anchor"].description)),
    )
    eval_model = create_model(
        "EvalSpec", __base__=EvalSpec,
        prompts=(Union[str, list[str], generator], ...),
        judges=(list[Union[str, judge]], Field(default_factory=list)),
    )
    model = create_model(
        "RunSpec", __base__=RunSpec,
        backbone=(backbone, ...),
        concept=(concept_model, ...),
        eraser=(eraser, Field(default_factory=lambda: {"name": "adapter"})),
        preserved=(Optional[Union[source, list[source]]], None),
        augment=(list[augmenter], Field(default_factory=list)),
        losses=(list[loss], Field(min_length=1)),
        eval=(Optional[eval_model], None),
    )
    schema = model.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "t2vu run spec"
    return schema
