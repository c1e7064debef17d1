"""``t2vu estimate``: peak training memory and per-iteration cost of a spec, without loading a weight.

What is counted (docs/estimate.md has the model, its coefficients and its accuracy):

- **weights**: the transformer(s), built on the meta device from the folder's configs (the diffusers class the
  backbone names), parameters times the dtype's size (modules the library keeps in fp32 counted at 4 bytes);
- **text encoders**: the same for each text encoder, plus their forward over one encoding batch; they run
  once at the start, next to the transformer, then leave device memory (the *encoding* phase);
- **erasers**: the eraser plugin's own modules for the spec's sites, built on the meta device: parameters,
  gradients and AdamW's two moments, fp32 (16 bytes a parameter);
- **activations** of the erased forward + backward over its rows: with gradient checkpointing every block's
  input plus one block's saved activations and backward transients, without it every block's saved
  activations; the erasers' own saved inputs on top;
- **frozen pass**: the working set of the no-grad forward over its rows;
- **attention capture** (localization): the reduced maps and one module's chunked score working set;
- **eraser outputs** (localization): each video eraser's fp32 output over the erased rows, kept from the
  erased forward through the backward, and the loss's saved products.

Per-token working sets are ``units`` of the hidden width (``Units``): a backbone's options describe its
architecture with :class:`MemoryFacts` (``Options.memory_facts(clip)``); core names no backbone. The run's
peak is the largest of three phases: encoding, the frozen pass, the erased pass. GB are 2**30 bytes, as
``torch.cuda.max_memory_allocated`` counts them (what the reference measurements report).

This module imports neither torch nor diffusers at import time (backbone options import the dataclasses);
:func:`estimate` imports torch for the meta-device models.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Optional

GB = float(2 ** 30)
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
#: the throughput seconds are computed with: CogVideoX-5B's bf16 forward on one H200 reached 405 TFLOP/s by
#: the analytic count (shared/anchors); an H100/H200-class estimate, not a measurement of your card
TFLOPS = 405.0
#: attention's backward costs this many times its forward (flash attention); linears' backward of a frozen base
#: computes input gradients only (no weight gradients): 1x their forward
ATTENTION_BACKWARD = 2.5
#: fixed working buffers of a CUDA training step (rotary tables, cuBLAS workspace, the output and its loss);
#: the intercepts of the reference measurements (0.06-0.10 GB)
CUDA_FIXED_GB = 0.1
#: a card fits the run when peak * SLACK + CONTEXT_GB <= its memory: the CUDA context is not in torch's count and
#: the caching allocator reserves more than it allocates
SLACK, CONTEXT_GB = 1.05, 0.5


# -- what a backbone tells the estimate ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Units:
    """Bytes per token, as multiples of the hidden width ``D``: ``model`` tensors in the model's dtype plus
    ``fp32`` tensors in float32 (``D * (model * dtype_bytes + fp32 * 4)`` bytes a token)."""

    model: float = 0.0
    fp32: float = 0.0

    def bytes(self, width: int, tokens: float, dtype_bytes: int) -> float:
        return width * tokens * (self.model * dtype_bytes + self.fp32 * 4)


@dataclass(frozen=True)
class Component:
    """A model of the folder to count on the meta device: ``subfolder`` holding its ``config.json``, the library
    (``diffusers`` or ``transformers``) and the class that library builds it with."""

    subfolder: str
    library: str
    class_name: str


@dataclass(frozen=True)
class TextEncoding:
    """How a text encoder runs during encoding: ``tokens`` per prompt, ``batch`` prompts per forward, and
    whether every layer's hidden states are returned (``output_hidden_states``)."""

    component: Component
    tokens: int
    batch: int = 8
    all_hidden_states: bool = False


@dataclass(frozen=True)
class MemoryFacts:
    """A backbone's architecture as the estimate needs it, for one clip (per row of a batch).

    ``forward``: the no-grad forward's working set per sequence token; ``saved``: what one block saves for its
    backward per sequence token (the erasers' own inputs excluded, core adds them); ``backward``: one block's
    backward transients; ``kept``: what gradient checkpointing keeps per block (its inputs); ``attention_live``:
    what a block holds while its attention runs (when the capture adds its working set). ``capture``: the
    localization capture's working set per captured row and sequence token besides the scores of one chunk of
    queries (``capture_chunk`` queries, or as many as ``capture_budget`` fp32 scores allow, each scored against
    ``capture_keys`` keys by ``heads`` heads).
    """

    transformers: tuple[Component, ...]  # all resident; one forward runs one of them
    text_encoders: tuple[TextEncoding, ...]  # loaded together during encoding
    width: int
    blocks: int
    video_tokens: int
    text_tokens: int
    sequence_tokens: int  # tokens every block carries per row (joint sequence: video + text)
    attention_pairs: int  # sum over one forward's attentions of queries x keys, per row
    site_widths: Mapping[str, int]
    forward: Units
    saved: Units
    backward: Units
    kept: Units = Units(model=1.0)
    attention_live: Units = Units(model=3.0)  # what a block holds while its attention runs (the capture's moment)
    capture: Units = Units()
    heads: int = 1
    capture_keys: int = 0  # keys each captured video query is scored against
    capture_chunk: int = 0  # video queries scored at a time (0: all)
    capture_budget: int = 0  # or: at most this many fp32 scores at a time (rows x heads x queries x keys)
    capture_copies: int = 2  # score-sized fp32 tensors alive at once (scores and their scaled / softmaxed copy)
    guided_rows: int = 2  # rows of one guided sampler step per video (two-pass CFG: 2)
    notes: tuple[str, ...] = ()


def no_vae(index: Mapping[str, Any]) -> bool:
    """``model_index.json`` says the pipeline has no VAE (``"vae": [null, null]``): latents are pixels."""
    entry = index.get("vae")
    return isinstance(entry, (list, tuple)) and not any(entry)


def library_class(index: Mapping[str, Any], key: str, default: str) -> str:
    """The class ``model_index.json`` names for component ``key``, or ``default``."""
    entry = index.get(key)
    return str(entry[1]) if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] else default


# -- the settings an estimate depends on (the levers) ----------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    dtype: str
    gradient_checkpointing: int  # 0: none, 1: every block, k: every k-th block
    batch_size: int
    rank: Optional[int]
    num_frames: int
    height: int
    width: int
    # levers not built yet, to say what they would save
    fp8_weights: bool = False
    offload_blocks: bool = False
    encode_first: bool = False
    release_outputs: bool = False

    def spec_values(self) -> dict[str, Any]:
        return {"backbone.dtype": self.dtype, "training.gradient_checkpointing": self.gradient_checkpointing,
                "backbone.storage_dtype": "float8_e4m3fn" if self.fp8_weights else None,
                "training.batch_size": self.batch_size, "eraser.rank": self.rank,
                "training.num_frames": self.num_frames, "training.height": self.height,
                "training.width": self.width}


@dataclass
class ParamCount:
    """Parameters of one meta-device model: all, those the library keeps in fp32 (``fp32``: always;
    ``fp32_half``: when loading fp16/bf16; ``fp32_fp16``: when loading fp16) and those fp8 layerwise casting
    would store in one byte."""

    name: str
    total: int
    fp32: int = 0
    fp32_half: int = 0
    fp32_fp16: int = 0
    fp8_castable: int = 0
    config: dict = field(default_factory=dict)

    def bytes(self, dtype: str, fp8: bool = False) -> float:
        size = DTYPE_BYTES[dtype]
        kept = self.fp32 + (self.fp32_half if dtype in ("float16", "bfloat16") else 0) + (
            self.fp32_fp16 if dtype == "float16" else 0)
        kept = min(kept, self.total)
        if fp8:
            castable = min(self.fp8_castable, self.total - kept)
            return castable * 1 + (self.total - kept - castable) * size + kept * 4
        return (self.total - kept) * size + kept * 4


# -- results -----------------------------------------------------------------------------------------------------
#: breakdown lines: key -> (label, what it is)
LINES = {
    "weights": ("weights", "the frozen transformer(s), resident the whole run"),
    "text_encoders": ("text encoders (encoding only)", "text encoders' weights and forward; they leave after encoding"),
    "erasers": ("erasers + AdamW", "eraser parameters, gradients and AdamW moments, fp32"),
    "activations": ("activations (erased fwd+bwd)",
                    "what the erased forward keeps for its backward, and the backward's transients"),
    "frozen_pass": ("frozen pass working set", "the no-grad forward over the frozen rows"),
    "attention_capture": ("attention capture", "localization: reduced maps and one module's score chunk"),
    "eraser_outputs": ("eraser outputs (localization)",
                       "each video eraser's fp32 output over the erased rows, and the loss's products"),
    "buffers": ("fixed buffers", "rotary tables, cuBLAS workspace, predictions and losses"),
}
PHASES = {"encoding": ("weights", "text_encoders"),
          "frozen": ("weights", "erasers", "buffers", "frozen_pass", "attention_capture"),
          "erased": ("weights", "erasers", "buffers", "activations", "eraser_outputs")}


@dataclass
class Prediction:
    settings: Settings
    parts: dict[str, dict[str, float]]  # phase -> line -> bytes
    rows: dict[str, int]
    flops: dict[str, float]
    facts: MemoryFacts
    eraser_params: int

    def phase_bytes(self, phase: str) -> float:
        return sum(self.parts[phase].values())

    @property
    def peak_phase(self) -> str:
        return max(self.parts, key=self.phase_bytes)

    @property
    def peak(self) -> float:
        return self.phase_bytes(self.peak_phase)

    def line(self, key: str) -> float:
        """A line's largest value over the phases it appears in."""
        return max((p.get(key, 0.0) for p in self.parts.values()), default=0.0)

    @property
    def seconds(self) -> float:
        return self.flops["total"] / (TFLOPS * 1e12)


@dataclass
class Step:
    """One lever of a recommendation: the spec settings it changes, the peak after it (on top of the levers
    before it), whether that fits."""

    changes: dict[str, Any]  # spec path -> value, e.g. {"training.gradient_checkpointing": True}
    why: str
    peak: float
    fits: bool
    available: bool = True
    saving: float = 0.0
    kept: bool = True  # False: saved under 1 % and did not fit, so the levers after it start without it

    @property
    def setting(self) -> str:
        return " ".join(f"{k}={_yaml(v)}" for k, v in self.changes.items())


def _yaml(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


@dataclass
class Estimate:
    prediction: Prediction
    gpu_memory: Optional[float] = None
    steps: list[Step] = field(default_factory=list)  # levers tried, in order (available ones)
    unavailable: list[Step] = field(default_factory=list)  # levers not built yet, with their saving
    recommended: Optional[int] = None  # index into steps of the first that fits (None: none needed / none fits)
    device: str = "cuda"
    notes: list[str] = field(default_factory=list)
    training_steps: int = 0

    @property
    def fits(self) -> Optional[bool]:
        return None if self.gpu_memory is None else fits(self.prediction.peak, self.gpu_memory)

    def recommended_changes(self) -> Optional[dict[str, Any]]:
        """The spec settings of every lever up to the first that fits (later values win); ``{}`` when the spec
        fits as it is, ``None`` when no lever makes it fit."""
        if self.fits:
            return {}
        if self.recommended is None:
            return None
        out: dict[str, Any] = {}
        for step in self.steps[:self.recommended + 1]:
            if step.kept:
                out.update(step.changes)
        return out

    def to_dict(self) -> dict[str, Any]:
        p = self.prediction
        gb = lambda v: round(v / GB, 6)  # noqa: E731
        out: dict[str, Any] = {
            "peak_gb": gb(p.peak),
            "peak_phase": p.peak_phase,
            "breakdown": {key: gb(p.line(key)) for key in LINES},
            "phases": {name: {"total_gb": gb(p.phase_bytes(name)), "parts": {k: gb(v) for k, v in parts.items()}}
                       for name, parts in p.parts.items()},
            "iteration": {"frozen_rows": p.rows["frozen"], "erased_rows": p.rows["erased"],
                          "captured_rows": p.rows["captured"], "passes": p.rows["passes"],
                          "tflop": round(p.flops["total"] / 1e12, 1),
                          "tflop_by_pass": {k: round(v / 1e12, 1) for k, v in p.flops.items() if k != "total"},
                          "seconds": round(p.seconds, 3), "run_hours": round(p.seconds * self.training_steps / 3600, 2),
                          "assumed_tflops": TFLOPS, "card": "H100/H200-class, bf16 (estimate)"},
            "tokens": {"video": p.facts.video_tokens, "text": p.facts.text_tokens,
                       "sequence": p.facts.sequence_tokens, "width": p.facts.width, "blocks": p.facts.blocks},
            "eraser_params": p.eraser_params,
            "settings": p.settings.spec_values(),
            "device": self.device,
            "notes": list(self.notes),
        }
        if self.gpu_memory is not None:
            out["gpu_memory_gb"] = self.gpu_memory
            out["fits"] = self.fits
            out["recommendation"] = {
                "steps": [{"set": s.changes, "why": s.why, "peak_gb": gb(s.peak), "fits": s.fits, "kept": s.kept}
                          for s in self.steps],
                "recommended": self.recommended_changes(),
                "not_available_yet": [{"lever": s.why.split(":")[0], "why": s.why, "saving_gb": gb(s.saving),
                                       "peak_gb": gb(s.peak), "fits": s.fits} for s in self.unavailable],
            }
        return out


def fits(peak_bytes: float, gpu_memory_gb: float) -> bool:
    return peak_bytes / GB * SLACK + CONTEXT_GB <= gpu_memory_gb


# -- checks ------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _weights_optional():
    """The backbone's preflight without its weights-file checks: a folder holding only configs is estimated.
    (Backbones call :func:`t2vu.core.preflight.check_weights` through the module, so it is swapped here.)"""
    from t2vu.core import preflight

    saved = preflight.check_weights
    preflight.check_weights = lambda *args, **kwargs: None
    try:
        yield
    finally:
        preflight.check_weights = saved


def _clip(resolved):
    from t2vu.core.preflight import Clip

    tr = resolved.spec.training
    return Clip(tr.num_frames, tr.height, tr.width)


def check(resolved):
    """The preflight's folder, clip and site checks (weights files not required): ``(ModelFacts, options)``;
    a :class:`~t2vu.core.spec.SpecError` (exit 2) with every problem."""
    from t2vu.core.errors import T2VUError
    from t2vu.core.preflight import _problems, _site_problems
    from t2vu.core.spec import SpecError, parse_path

    options = resolved.backbone.options
    tr = resolved.spec.training
    if None in (tr.num_frames, tr.height, tr.width):
        raise T2VUError("training.num_frames, height and width must be set (the backbone has no default)")
    with _weights_optional():
        facts = options.preflight([_clip(resolved)], decode=False)
    found = [(parse_path(setting), message) for setting, message in facts.problems]
    if facts.sites is not None:
        found += _site_problems(resolved, facts.sites)
    problems = _problems(resolved, found)
    if problems:
        raise SpecError(problems, resolved.source)
    if not callable(getattr(options, "memory_facts", None)):
        raise T2VUError(f"backbone {resolved.backbone.name!r} does not describe its memory (its options have no "
                        "memory_facts), so t2vu estimate cannot predict it")
    if facts.sites is None:
        raise T2VUError(f"backbone {resolved.backbone.name!r} does not list its eraser sites before loading, so the "
                        "erasers cannot be counted")
    return facts, options


def clip_valid(options, num_frames: int, height: int, width: int) -> bool:
    """The backbone's preflight accepts this training clip (configs only)."""
    from t2vu.core.preflight import Clip

    with _weights_optional():
        facts = options.preflight([Clip(num_frames, height, width)], decode=False)
    return not [s for s, _ in facts.problems if s.startswith("training.")]


# -- counting on the meta device ----------------------------------------------------------------------------
_COUNTS: dict[tuple, ParamCount] = {}


def count_parameters(folder: Path, component: Component) -> ParamCount:
    """Build ``component`` of ``folder`` from its config on the meta device (no weight read) and count its
    parameters. Cached per folder and component."""
    key = (str(Path(folder).resolve()), component)
    if key in _COUNTS:
        return _COUNTS[key]
    import importlib
    import re

    import torch

    from t2vu.core.errors import T2VUError

    where = Path(folder) / component.subfolder
    try:
        library = importlib.import_module(component.library)
        cls = getattr(library, component.class_name)
    except (ImportError, AttributeError):
        raise T2VUError(f"{where}: {component.library} has no class {component.class_name!r} (named by the model "
                        "folder); update it or check the folder") from None
    try:
        with torch.device("meta"):
            if component.library == "diffusers":
                model = cls.from_config(cls.load_config(where))
            else:
                config = cls.config_class.from_pretrained(where)
                model = cls(config)
    except Exception as exc:  # noqa: BLE001 - a config the class cannot build is the folder's problem
        raise T2VUError(f"cannot build {component.class_name} from {where}/config.json on the meta device "
                        f"({type(exc).__name__}: {str(exc)[:200]}); check the folder's config") from None
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    config = getattr(model, "config", None)
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
    count = ParamCount(component.class_name, total, config=config)
    if component.library == "diffusers":
        keep = list(getattr(cls, "_keep_in_fp32_modules", None) or [])
        count.fp32 = sum(p.numel() for n, p in params.items() if any(m in n.split(".") for m in keep))
        # what enable_layerwise_casting(fp8) would store in one byte: supported layers outside the skip patterns
        from diffusers.hooks._common import _GO_LC_SUPPORTED_PYTORCH_LAYERS
        from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

        patterns = tuple(DEFAULT_SKIP_MODULES_PATTERN) + tuple(keep) + tuple(
            getattr(cls, "_skip_layerwise_casting_patterns", None) or ())

        def castable(module, prefix: str) -> int:
            if any(re.search(p, prefix) for p in patterns):
                return 0
            if isinstance(module, _GO_LC_SUPPORTED_PYTORCH_LAYERS):
                return sum(p.numel() for p in module.parameters())
            return sum(castable(m, f"{prefix}.{n}" if prefix else n) for n, m in module.named_children())

        count.fp8_castable = castable(model, "")
    else:
        def matching(names) -> int:
            names = list(names or [])
            return sum(p.numel() for n, p in params.items() if any(m in n.split(".") for m in names))

        count.fp32_half = matching(getattr(model, "_keep_in_fp32_modules_strict", None))
        count.fp32_fp16 = matching(getattr(model, "_keep_in_fp32_modules", None))
    del model
    _COUNTS[key] = count
    return count


def _config_int(config: Mapping[str, Any], *names: str, default: int = 0) -> int:
    for name in names:
        value = config.get(name)
        if isinstance(value, (int, float)) and value:
            return int(value)
    return default


def eraser_parameters(resolved, sites, widths: Mapping[str, int], rank: Optional[int]) -> dict[str, int]:
    """Site name -> trainable parameters of the spec's eraser plugin there, built on the meta device from the
    sites' names and widths, with the plugin's own site selection (``eraser.sites`` / ``streams``, the backbone's
    presets)."""
    import torch

    from t2vu.core.errors import T2VUError
    from t2vu.plugins.adapter_model import Site

    options = resolved.eraser.options
    if rank is not None and "rank" in type(options).model_fields:
        options = options.model_copy(update={"rank": rank})
    built = resolved.eraser.component.build(options)
    opts_cls = type(resolved.backbone.options)
    fake = [Site(name=s.name, module=None, dim=int(widths[s.name]), attention=s.attention, stream=s.stream)
            for s in sites if s.name in widths]
    try:
        with torch.device("meta"):
            erasers = built.build(fake, presets=getattr(opts_cls, "site_presets", {}),
                                  default=getattr(opts_cls, "default_sites", None))
    except ValueError as exc:
        raise T2VUError(str(exc)) from None
    out = {}
    for name in erasers.site_names:
        module = erasers.eraser(name) if hasattr(erasers, "eraser") else None
        params = module.parameters() if module is not None else []
        out[name] = sum(p.numel() for p in params if p.requires_grad)
    return out


# -- the model ---------------------------------------------------------------------------------------------------
@dataclass
class Context:
    """What does not change with the levers: the spec, the folder's counts, the loss terms' rows."""

    resolved: Any
    options: Any
    sites: list
    folder: Path
    frozen_conds: list[str]
    erased_conds: list[str]
    captured_conds: list[str]
    capture_patterns: Optional[list[str]]  # localization sites patterns (None: the video erasers' modules)
    records_outputs: bool
    device: str
    _facts: dict = field(default_factory=dict)
    _erasers: dict = field(default_factory=dict)

    def facts(self, s: Settings) -> MemoryFacts:
        from t2vu.core.preflight import Clip

        key = (s.num_frames, s.height, s.width)
        if key not in self._facts:
            self._facts[key] = self.options.memory_facts(Clip(*key))
        return self._facts[key]

    def erasers(self, facts: MemoryFacts, rank: Optional[int]) -> dict[str, int]:
        if rank not in self._erasers:
            self._erasers[rank] = eraser_parameters(self.resolved, self.sites, facts.site_widths, rank)
        return self._erasers[rank]


def _conditions(resolved) -> tuple[list[str], list[str], list[str], Optional[list[str]], bool]:
    """The conditions of the frozen and erased passes (one row each per video of the batch), those the frozen
    pass captures attention for, the localization patterns, and whether eraser outputs are recorded: from the
    loss terms' own ``needs()``, aliased as :class:`t2vu.core.context.StepContext` aliases them."""
    from t2vu.core.context import ANCHOR, PRESERVED, UNCOND

    needs = [n for r in resolved.losses for n in r.build().needs()]
    has_anchor = resolved.spec.concept.anchor is not None
    has_preserved = bool(resolved.preserved)

    def key(cond: str) -> Optional[str]:
        if cond == ANCHOR and not has_anchor:
            return UNCOND
        if cond == PRESERVED and not has_preserved:
            return None
        return cond

    def distinct(kinds) -> list[str]:
        return [c for c in dict.fromkeys(key(n.cond) for n in needs if n.kind in kinds) if c is not None]

    captured = distinct(("attention",))
    frozen = distinct(("frozen", "attention"))
    erased = distinct(("erased", "eraser_outputs"))
    patterns: Optional[list[str]] = None
    for n in needs:
        if n.kind == "attention" and n.modules is not None:
            patterns = (patterns or []) + list(n.modules)
    return frozen, erased, captured, patterns, any(n.kind == "eraser_outputs" for n in needs)


def context(resolved) -> Context:
    facts, options = check(resolved)
    frozen, erased, captured, patterns, records = _conditions(resolved)
    device = str(resolved.backbone.options.device or "cuda")
    return Context(resolved, options, list(facts.sites), Path(options.model_path), frozen, erased, captured,
                   patterns, records, "cpu" if device.startswith("cpu") else "cuda")


def _text_encoder_bytes(ctx: Context, facts: MemoryFacts, dtype: str) -> float:
    """Every text encoder's weights plus one encoding batch's forward (they are loaded together)."""
    size = DTYPE_BYTES[dtype]
    total = 0.0
    for use in facts.text_encoders:
        count = count_parameters(ctx.folder, use.component)
        total += count.bytes(dtype)
        cfg = count.config
        hidden = _config_int(cfg, "hidden_size", "d_model", default=facts.width)
        inner = _config_int(cfg, "intermediate_size", "d_ff", default=4 * hidden)
        heads = _config_int(cfg, "num_attention_heads", "num_heads", default=1)
        layers = _config_int(cfg, "num_hidden_layers", "num_layers", default=1)
        kept = layers + 1 if use.all_hidden_states else 1
        rows, tokens = use.batch, use.tokens
        # hidden states kept + a layer's working set (norm, q/k/v/out, two feed-forward halves), and the
        # attention scores an eager attention materialises (fp32)
        total += rows * tokens * size * (hidden * (kept + 6) + 2 * inner) + rows * heads * tokens * tokens * 4 * 2
    return total


def _weights(ctx: Context, facts: MemoryFacts, s: Settings) -> float:
    weights = sum(count_parameters(ctx.folder, c).bytes(s.dtype, fp8=s.fp8_weights) for c in facts.transformers)
    if s.offload_blocks:  # only the blocks being computed (two) stay on the device
        weights *= min(1.0, 2.0 / max(1, facts.blocks))
    return weights


def _erased_activations(ctx: Context, facts: MemoryFacts, s: Settings, rows: int, per_site: Mapping[str, int],
                        eraser_bytes: int = 4) -> float:
    """What the erased forward keeps for its backward plus one block's backward transients, over ``rows``; the
    erasers' own saved tensors (the adapter's input copy, hidden and activation) in ``eraser_bytes``."""
    size = DTYPE_BYTES[s.dtype]
    D, N = facts.width, facts.sequence_tokens
    stream = {site.name: site.stream for site in ctx.sites}
    rank = s.rank if s.rank is not None else getattr(ctx.resolved.eraser.options, "rank", None)

    def eraser_saved(name: str) -> float:
        width = facts.site_widths[name]
        hidden = rank if rank is not None else max(1, (per_site[name] - width) // max(1, 2 * width + 1))
        tokens = facts.text_tokens if stream.get(name) == "text" else facts.video_tokens
        return rows * tokens * (width + 2 * hidden) * eraser_bytes

    erasers = sum(eraser_saved(n) for n in per_site)
    one_block = (facts.saved.bytes(D, N, size) + facts.backward.bytes(D, N, size)) * rows
    if s.gradient_checkpointing:  # checkpointed blocks keep their inputs, one is recomputed at a time; with every
        # k-th block checkpointed the others keep everything, their erasers' tensors included
        done = _checkpointed_blocks(facts, s)
        plain = facts.blocks - done
        share = math.ceil(len(per_site) / max(1, facts.blocks)) / max(1, len(per_site))
        return ((done * facts.kept.bytes(D, N, size) + plain * facts.saved.bytes(D, N, size)) * rows + one_block
                + erasers * (share + plain / max(1, facts.blocks)))
    return facts.blocks * facts.saved.bytes(D, N, size) * rows + facts.backward.bytes(D, N, size) * rows + erasers


def _checkpointed_blocks(facts, s: "Settings") -> int:
    """How many blocks recompute in the backward: all with checkpointing every block, ceil(n / k) every k-th."""
    if not s.gradient_checkpointing:
        return 0
    return math.ceil(facts.blocks / max(1, int(s.gradient_checkpointing)))


def _frozen_working_set(ctx: Context, facts: MemoryFacts, s: Settings, rows: int, captured_rows: int,
                        video_sites: list[str]) -> tuple[float, float]:
    """``(forward, capture)`` at the frozen pass's peak moment: the larger of the forward's own working set and,
    while a module's attention is captured, what the block holds there plus the capture's working set."""
    size = DTYPE_BYTES[s.dtype]
    D, N, Nv = facts.width, facts.sequence_tokens, facts.video_tokens
    forward = facts.forward.bytes(D, N, size) * rows
    if not captured_rows:
        return forward, 0.0
    maps = _captured_modules(ctx, video_sites) * captured_rows * Nv * 4
    capture = facts.capture.bytes(D, N, size) * captured_rows + 4 * facts.capture_copies * _score_chunk(
        facts, captured_rows)
    live = facts.attention_live.bytes(D, N, size) * rows
    if live + capture > forward:
        return live, capture + maps
    return forward, maps


def _score_chunk(facts: MemoryFacts, rows: int) -> int:
    """fp32 elements of one chunk of capture scores over ``rows`` captured rows."""
    per_query = rows * facts.heads * facts.capture_keys
    queries = facts.video_tokens
    if facts.capture_chunk:
        queries = min(queries, facts.capture_chunk)
    if facts.capture_budget:
        queries = min(queries, max(1, facts.capture_budget // max(1, per_query)))
    return per_query * queries


def predict(ctx: Context, s: Settings) -> Prediction:
    """Bytes per phase and FLOPs per iteration for settings ``s``."""
    facts = ctx.facts(s)
    b = s.batch_size
    D, N, Nv = facts.width, facts.sequence_tokens, facts.video_tokens
    weights = _weights(ctx, facts, s)
    per_site = ctx.erasers(facts, s.rank)
    eraser_params = sum(per_site.values())
    stream = {site.name: site.stream for site in ctx.sites}

    tr = ctx.resolved.spec.training
    frozen_rows = b * len(ctx.frozen_conds)
    if tr.states != "noise":  # the sampler's guided passes (no grad) may hold more rows than the frozen pass
        frozen_rows = max(frozen_rows, b * facts.guided_rows)
    erased_rows = b * len(ctx.erased_conds)
    captured_rows = b * len(ctx.captured_conds)
    activations = _erased_activations(ctx, facts, s, erased_rows, per_site)

    video_sites = [n for n in per_site if stream.get(n) == "video"]
    kept_outputs = loss_outputs = 0.0
    if ctx.records_outputs and video_sites:
        widths = [facts.site_widths[n] for n in video_sites]
        # recorded by the erased forward (every erased row), referenced until the step's loss is done
        kept_outputs = erased_rows * Nv * sum(widths) * 4
        # the loss saves each site's masked output (its target rows) for the backward; one site's square on top
        products = b * Nv * (sum(widths) + max(widths)) * 4
        loss_outputs = max(kept_outputs, products) if s.release_outputs else kept_outputs + products
    frozen, capture = _frozen_working_set(ctx, facts, s, frozen_rows, captured_rows, video_sites)
    buffers = CUDA_FIXED_GB * GB if ctx.device == "cuda" else 0.0
    parts = {
        "encoding": {"weights": 0.0 if s.encode_first else weights,
                     "text_encoders": _text_encoder_bytes(ctx, facts, s.dtype)},
        "frozen": {"weights": weights, "erasers": 12.0 * eraser_params, "buffers": buffers, "frozen_pass": frozen,
                   "attention_capture": capture},  # (the previous step's eraser outputs are freed with its context)
        # fp32 parameters, gradients, AdamW exp_avg and exp_avg_sq (gradients are freed between steps)
        "erased": {"weights": weights, "erasers": 16.0 * eraser_params, "buffers": buffers,
                   "activations": activations, "eraser_outputs": loss_outputs},
    }

    # FLOPs: 2 params tokens + 4 width pairs per forward row; backward: input gradients of the linears (1x) and
    # attention's backward (2.5x); checkpointing recomputes the forward
    params = count_parameters(ctx.folder, facts.transformers[0]).total if facts.transformers else 0
    forward, backward = _pass_flops(facts, params)
    flops = {"frozen": frozen_rows * forward,
             "erased": erased_rows * (forward * (1 + _recomputed_share(facts, s)) + backward)}
    if captured_rows:
        flops["capture"] = _captured_modules(ctx, video_sites) * captured_rows * (
            2.0 * Nv * facts.capture_keys * D + 4.0 * N * D * D)
    if tr.states != "noise":
        sample_steps = tr.sample_steps or 50
        per_refresh = sample_steps if tr.trajectory_states == "uniform_step" else (sample_steps + 1) / 2
        flops["sampler"] = per_refresh / tr.refresh_every * b * facts.guided_rows * forward
    flops["total"] = sum(flops.values())
    passes = 2 + (1 if s.gradient_checkpointing else 0)
    rows = {"frozen": frozen_rows, "erased": erased_rows, "captured": captured_rows, "passes": passes}
    return Prediction(s, parts, rows, flops, facts, eraser_params)


def _pass_flops(facts: MemoryFacts, params: int) -> tuple[float, float]:
    """``(forward, backward)`` FLOPs of one row."""
    linear = 2.0 * params * facts.sequence_tokens
    attention = 4.0 * facts.width * facts.attention_pairs
    return linear + attention, linear + ATTENTION_BACKWARD * attention


def reference_pass(ctx: Context, s: Settings, mode: str) -> tuple[float, float]:
    """``(peak bytes, seconds)`` of one plain pass of one row as the reference measurements ran it
    (shared/anchors: erasers in the model dtype, no optimiser, no loss terms): ``mode`` ``forward`` (no grad),
    ``backward`` (forward + backward through the erasers, checkpointing per ``s``)."""
    facts = ctx.facts(s)
    size = DTYPE_BYTES[s.dtype]
    per_site = ctx.erasers(facts, s.rank)
    params = sum(per_site.values())
    total = _weights(ctx, facts, s) + params * size + (CUDA_FIXED_GB * GB if ctx.device == "cuda" else 0.0)
    forward, backward = _pass_flops(facts, count_parameters(ctx.folder, facts.transformers[0]).total)
    if mode == "forward":
        return total + facts.forward.bytes(facts.width, facts.sequence_tokens, size), forward / (TFLOPS * 1e12)
    total += params * size + _erased_activations(ctx, facts, s, 1, per_site, eraser_bytes=size)
    flops = forward * (1 + _recomputed_share(facts, s)) + backward
    return total, flops / (TFLOPS * 1e12)


def _recomputed_share(facts, s: "Settings") -> float:
    """The share of the blocks checkpointing recomputes in the backward (a second forward of each)."""
    return _checkpointed_blocks(facts, s) / max(1, facts.blocks)


def _captured_modules(ctx: Context, video_sites: list[str]) -> int:
    attention = {site.name: site.attention for site in ctx.sites}
    if ctx.capture_patterns:
        names = {site.attention for site in ctx.sites}
        return sum(1 for n in names if any(fnmatch.fnmatchcase(n, p) for p in ctx.capture_patterns))
    return len({attention[n] for n in video_sites})


# -- recommendations ---------------------------------------------------------------------------------------------
def _frames_below(ctx: Context, s: Settings, floor: int) -> list[int]:
    return [f for f in range(s.num_frames - 1, max(1, floor) - 1, -1)
            if clip_valid(ctx.options, f, s.height, s.width)]


def _scaled_size(ctx: Context, s: Settings, scale: float) -> Optional[tuple[int, int]]:
    """The largest valid (height, width) at most ``scale`` times the current size, same aspect roughly."""
    h0, w0 = int(s.height * scale), int(s.width * scale)
    for step in range(0, 64):
        h, w = h0 - step * 8, w0 - round(step * 8 * s.width / max(1, s.height))
        for hh in (h - d for d in range(0, 8)):
            if hh <= 0 or w <= 0:
                return None
            for ww in (w - d for d in range(0, 16)):
                if ww > 0 and clip_valid(ctx.options, s.num_frames, hh, ww):
                    return hh, ww
    return None


def recommend(ctx: Context, start: Settings, gpu_memory: float) -> tuple[list[Step], Optional[int], list[Step]]:
    """Levers the spec has today, cheapest first, applied one after another until the run fits ``gpu_memory``
    (a lever that saves under 1 % without making it fit is listed but not kept); then levers not built yet with
    what each would save on the spec's own settings."""
    steps: list[Step] = []
    s = start

    def attempt(new: Settings, changes: dict[str, Any], why: str) -> bool:
        nonlocal s
        before, peak = predict(ctx, s).peak, predict(ctx, new).peak
        step = Step(changes, why, peak, fits(peak, gpu_memory), saving=before - peak)
        step.kept = step.fits or step.saving >= 0.01 * before
        steps.append(step)
        if step.kept:
            s = new
        return step.fits

    done = fits(predict(ctx, s).peak, gpu_memory)
    if not done and s.gradient_checkpointing != 1:
        done = attempt(replace(s, gradient_checkpointing=1), {"training.gradient_checkpointing": True},
                       "recomputes each block in the backward: about a third more time per iteration")
    if not done and not s.fp8_weights and s.gradient_checkpointing == 1:
        done = attempt(replace(s, fp8_weights=True), {"backbone.storage_dtype": "float8_e4m3fn"},
                       "frozen weights stored in fp8 and cast per layer (diffusers' layerwise casting): half the "
                       "weight memory at no measured time; needs checkpointing every block")
    if not done and s.dtype == "float32":
        done = attempt(replace(s, dtype="bfloat16"), {"backbone.dtype": "bfloat16"},
                       "halves weights and activations; the erasers and their optimiser stay fp32")
    while not done and s.batch_size > 1:
        new = max(1, s.batch_size // 2)
        done = attempt(replace(s, batch_size=new), {"training.batch_size": new},
                       "fewer videos per step (noisier gradients); keep the global batch with more processes")
    if not done and s.rank is not None and s.rank > 16:
        new = s.rank // 2
        done = attempt(replace(s, rank=new), {"eraser.rank": new}, "smaller erasers (less capacity); saves little")
    if not done:
        frames = _frames_below(ctx, s, (s.num_frames + 1) // 2)
        found = None
        for f in frames:
            if fits(predict(ctx, replace(s, num_frames=f)).peak, gpu_memory):
                found = f
                break
        if found is None and frames:
            found = frames[-1]
        if found is not None:
            done = attempt(replace(s, num_frames=found), {"training.num_frames": found},
                           "shorter training clips (the eraser sees fewer frames than it will generate)")
    for scale in (0.75, 0.5):
        if done:
            break
        size = _scaled_size(ctx, s, scale)
        if size is not None and size != (s.height, s.width):
            done = attempt(replace(s, height=size[0], width=size[1]),
                           {"training.height": size[0], "training.width": size[1]},
                           "smaller training clips (trains at another resolution than it generates)")
    first = next((i for i, step in enumerate(steps) if step.fits), None)
    s, base = start, predict(ctx, start).peak  # what each missing lever would save on the spec as it is
    unavailable = []
    for flag, name, why in (
            ("offload_blocks", "offload of frozen blocks", "frozen blocks kept in CPU memory and streamed in"),
            ("encode_first", "encode prompts before loading the transformer", "the text encoders never share "
             "the device with the transformer"),
            ("release_outputs", "free localization's recorded eraser outputs before the loss's own copies",
             "today both are alive while the loss runs")):
        peak = predict(ctx, replace(s, **{flag: True})).peak
        if base - peak > 0.01 * GB:
            unavailable.append(Step({}, f"{name}: {why}", peak, fits(peak, gpu_memory), available=False,
                                    saving=base - peak))
    return steps, first, unavailable


def settings_of(resolved) -> Settings:
    tr = resolved.spec.training
    every = 1 if tr.gradient_checkpointing is True else int(tr.gradient_checkpointing)
    return Settings(dtype=resolved.backbone.options.dtype, gradient_checkpointing=every,
                    fp8_weights=bool(getattr(resolved.backbone.options, "storage_dtype", None)),
                    batch_size=tr.batch_size, rank=getattr(resolved.eraser.options, "rank", None),
                    num_frames=tr.num_frames, height=tr.height, width=tr.width)


def estimate(resolved, gpu_memory: Optional[float] = None) -> Estimate:
    """The estimate of ``resolved`` (and, with ``gpu_memory`` in GB, the levers that make it fit)."""
    ctx = context(resolved)
    start = settings_of(resolved)
    prediction = predict(ctx, start)
    result = Estimate(prediction, gpu_memory, device=ctx.device, training_steps=resolved.spec.training.steps)
    result.notes += list(prediction.facts.notes)
    if ctx.device == "cpu":
        result.notes.append("backbone.device is cpu: the bytes are allocations in host memory (the process adds its "
                            "libraries); the seconds are still an H100/H200-class estimate")
    if start.dtype == "float32" and ctx.device == "cuda":
        result.notes.append("float32 runs much slower than the bf16 throughput the seconds assume")
    if gpu_memory is not None:
        result.steps, result.recommended, result.unavailable = recommend(ctx, start, gpu_memory)
    return result


# -- output ------------------------------------------------------------------------------------------------------
def render(result: Estimate, console) -> None:
    """Breakdown table, peak, iteration cost and the recommendation, with rich."""
    from rich.table import Table

    p = result.prediction
    gb = lambda v: f"{v / GB:.2f}" if v >= 0.01 * GB or not v else f"{v / GB:.2g}"  # noqa: E731
    s = p.settings
    table = Table(title=f"Estimated training memory (GB = 2^30 bytes), {s.num_frames}x{s.height}x{s.width}, "
                        f"batch {s.batch_size}, {s.dtype}, checkpointing {'on' if s.gradient_checkpointing else 'off'}")
    table.add_column("line")
    for phase in PHASES:
        table.add_column(phase, justify="right")
    table.add_column("what", overflow="fold")
    for key, (label, what) in LINES.items():
        values = [p.parts[phase].get(key) for phase in PHASES]
        if all(not v for v in values):
            continue
        table.add_row(label, *["" if v is None else gb(v) for v in values], what)
    table.add_row("[bold]total[/]", *[f"[bold]{gb(p.phase_bytes(phase))}[/]" for phase in PHASES], "", end_section=True)
    console.print(table)
    f = p.facts
    console.print(f"tokens per row: {f.video_tokens} video + {f.text_tokens} text (blocks carry {f.sequence_tokens}); "
                  f"rows: frozen pass {p.rows['frozen']}, erased pass {p.rows['erased']}"
                  + (f", attention captured for {p.rows['captured']}" if p.rows['captured'] else "")
                  + f"; eraser parameters {p.eraser_params:,}")
    console.print(f"[bold]peak: {p.peak / GB:.1f} GB[/] (during the {p.peak_phase} phase)", highlight=False)
    console.print(f"per iteration: {p.flops['total'] / 1e12:,.0f} TFLOP, about {p.seconds:.2f} s on an H100/H200-class "
                  f"card at {TFLOPS:.0f} TFLOP/s bf16 (an estimate); {result.training_steps} steps: about "
                  f"{p.seconds * result.training_steps / 3600:.1f} h", highlight=False)
    for note in result.notes:
        console.print(f"note: {note}", highlight=False)
    if result.gpu_memory is None:
        return
    g = result.gpu_memory
    if result.fits:
        console.print(f"[green]fits a {g:g} GB card[/] as it is (peak x {SLACK} + {CONTEXT_GB} GB context "
                      f"= {p.peak / GB * SLACK + CONTEXT_GB:.1f} GB)", highlight=False)
        return
    console.print(f"[yellow]does not fit a {g:g} GB card[/] (needs about {p.peak / GB * SLACK + CONTEXT_GB:.1f} GB "
                  f"with the CUDA context and allocator slack). Levers, in order, each on top of the ones before:",
                  highlight=False)
    for i, step in enumerate(result.steps):
        mark = "[green]fits[/]" if step.fits else ("still too big" if step.kept else "saves little, not kept")
        sets = " ".join(f"--set {k}={_yaml(v)}" for k, v in step.changes.items())
        console.print(f"  {i + 1}. {sets}: peak {step.peak / GB:.1f} GB, {mark} ({step.why})", highlight=False)
    chosen = result.recommended_changes()
    if chosen:
        console.print("[bold]recommended:[/] " + " ".join(f"--set {k}={_yaml(v)}" for k, v in chosen.items()),
                      highlight=False)
    else:
        console.print("[red]no setting the spec has today makes it fit this card[/]", highlight=False)
    for step in result.unavailable:
        name, why = step.why.split(": ", 1)
        console.print(f"  not available yet: {name} would save about {step.saving / GB:.1f} GB on this spec "
                      f"(peak {step.peak / GB:.1f} GB{', fits' if step.fits else ''}): {why}", highlight=False)
