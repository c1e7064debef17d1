"""The backbone contract: what the engine, the sampler and ``load_eraser`` call on a backbone.

A backbone plugin registers ``"module:Class"`` with an ``Options`` model (a
:class:`t2vu.core.spec.BackboneOptions` subclass). Core calls ``Class(options)``
(cheap: check the model folder and read configs, raise :class:`T2VUError` with
what is wrong, load no weights), then the methods below. Core never looks
inside the transformer, never stacks a condition, never computes a noise
schedule and never names a block: all of that is the backbone's.

Shapes: ``B`` is the batch; ``*latent`` is whatever :meth:`Backbone.latent_shape`
returns (CogVideoX ``[F, C, h, w]``, HunyuanVideo ``[C, F, h, w]``); ``L`` the
text length of the backbone's condition. Predictions are fp32 and shaped like
``x_t``. This module is light (no torch) so that ``Options`` classes can use
:class:`VideoDefaults`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, ContextManager, Mapping, Optional, Protocol, Sequence, runtime_checkable


@dataclass(frozen=True)
class VideoDefaults:
    """A backbone's own defaults for what the spec leaves out (``training``, ``eval``, ``t2vu generate``).

    Set as ``defaults: ClassVar[VideoDefaults]`` on the backbone's ``Options`` class, so a spec can be
    completed without importing torch. ``None`` means "no default: the spec must say".
    """

    num_frames: Optional[int] = None
    height: Optional[int] = None
    width: Optional[int] = None
    steps: Optional[int] = None  # sampler steps (training trajectories, eval, generate)
    guidance: Optional[float] = None  # guidance scale, in the model's own sense (two-pass CFG or embedded)
    fps: int = 8  # frames per second of written videos
    upscale: int = 1  # nearest-neighbour upscaling of written videos (tiny pixel-space models)


@dataclass(frozen=True)
class EvalProtocol:
    """A named set of sampler settings for ``t2vu eval`` (``eval.protocol``), such as a paper's evaluation.

    Set as ``protocols: ClassVar[dict[str, EvalProtocol]]`` on the backbone's ``Options`` class. Each field the
    eval block leaves out takes the protocol's value; ``backbone`` holds options of this backbone (its sampler's,
    e.g. ``{"scheduler": "dpm", "dynamic_cfg": True}``) that eval's generation uses instead of the spec's
    (training is unaffected). ``None`` fields leave the usual default.
    """

    description: str
    steps: Optional[int] = None
    guidance: Optional[float] = None
    num_frames: Optional[int] = None
    height: Optional[int] = None
    width: Optional[int] = None
    backbone: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Guided:
    """What :meth:`Backbone.guided` returns.

    ``prediction``: the guided prediction the sampler steps with, ``[B, *latent]``.
    ``frozen``: condition role (``"cond"``, ``"uncond"``) -> the prediction computed on the way that equals
    :meth:`Backbone.predict` for that condition at the same ``x_t`` and ``t``; training reuses them as teacher
    values instead of recomputing. Only predictions that are exactly ``predict``'s belong here (a
    guidance-distilled model with a different embedded scale returns ``{}``).
    """

    prediction: Any
    frozen: dict = field(default_factory=dict)


@runtime_checkable
class Sampler(Protocol):
    """One inference trajectory's scheduler (stateful schedulers keep their state here, one per trajectory)."""

    timesteps: Any  # 1-D tensor, noisiest first

    def step(self, prediction: Any, t: Any, x: Any) -> Any:
        """``x`` at the next timestep (the clean sample after the last) from the guided ``prediction`` at ``t``."""

    def guidance_scale(self, scale: float, t: Any) -> float:
        """The guidance scale :meth:`Backbone.guided` gets at ``t``: ``scale`` itself for a constant schedule;
        a schedule over the steps where the pipeline has one (CogVideoX's dynamic CFG)."""


@runtime_checkable
class Backbone(Protocol):
    """The methods and attributes the engine uses. ``Options`` classes may add ``ClassVar`` s:

    - ``defaults: VideoDefaults`` (see above);
    - ``site_presets: dict[str, list[str]]``: names for groups of eraser sites, each a list of fnmatch
      patterns over attention-module names (each backbone documents its own); ``eraser.sites`` may name a
      preset or give patterns;
    - ``default_sites: str``: the preset used when ``eraser.sites`` is unset.

    and may override the method ``preflight(clips, decode=False) -> ModelFacts`` (see
    :meth:`t2vu.core.spec.BackboneOptions.preflight` and :mod:`t2vu.core.preflight`): the pre-load checks
    ``t2vu spec validate``, ``--dry-run`` and the start of ``run``/``generate``/``eval`` make, reading only the
    model folder's configs and file headers (never torch): missing or damaged files, clip sizes the model cannot
    take (each :class:`~t2vu.core.preflight.Clip` names its spec settings), and the model's eraser sites and
    transformer config, so that ``eraser.sites`` and eraser files are checked before anything loads.
    """

    name: str  # the registered name, recorded in eraser files
    transformer: Any  # the frozen torch module, after load(); erasers hook into it
    config: dict  # the transformer's config (hashed into eraser files); readable before load()
    device: Any  # torch.device the transformer runs on, after load()
    negative_prompting: bool  # guided()'s ``uncond`` is the negative branch it steps with (two-pass CFG without a
    # fixed negative prompt), so the concept as ``uncond`` is negative prompting; False for one-pass guidance
    forward_calls: int  # transformer forward calls so far (a batched two-pass CFG step is one); tests count
    # the passes per training step with it

    #: where erasers attach on a transformer: ``transformer_sites(transformer) -> list[Site]``. A staticmethod,
    #: so ``load_eraser`` can find sites on a stock diffusers pipeline without building the backbone.
    transformer_sites: ClassVar[Any]
    #: optional: ``transformer_of(pipe_or_transformer) -> nn.Module``, the module of a stock pipeline erasers attach
    #: to and ``transformer_sites`` reads, for pipelines that run more than one transformer (Wan 2.2 A14B's two
    #: experts; the module then lists them in ``experts``). Default: ``pipe.transformer``.
    #: optional: ``latent_dtype`` (default fp32), the dtype the pipeline draws its noise in and keeps the latents in
    #: between steps (CogVideoX: the model dtype); ``generate`` and the sampler follow it so a seed gives the
    #: pipeline's video in bf16 too.
    #: optional: ``expert_count`` (default 1), how many transformers forwards choose from by timestep; with more
    #: than one, a step's erasers of the others get no gradient (training tells DDP so).
    #: the upstream T2VUnlearning layout of this backbone's erasers (``t2vu.core.upstream.UpstreamLayout``),
    #: or ``None`` where upstream released none.
    upstream: ClassVar[Any]

    # -- loading (engine: once, before anything else heavy) ---------------------------------------------
    def load(self, device: Any) -> None:
        """Load the frozen transformer (``requires_grad_(False)``, eval mode) and the scheduler on ``device``.
        No VAE, no text encoder."""

    def enable_gradient_checkpointing(self, every: int = 1) -> None:
        """Checkpoint the transformer's blocks in erased (grad) passes; ``every=k`` (``training.gradient_checkpointing:
        k``) only every k-th block (the engine passes ``every`` only when it is above 1, so a backbone that
        checkpoints all blocks only may leave it out). Use non-reentrant checkpointing (diffusers' default): with
        reentrant checkpointing the erasers get no gradient, since the frozen block inputs need none. The eraser
        hooks run again when a block is recomputed; that is expected."""

    def sites(self) -> list:
        """``transformer_sites(self.transformer)``: every place an eraser can attach
        (:class:`t2vu.plugins.adapter_model.Site`, named by the module path the backbone gives them).

        A video site's module returns its video tokens ``[B, N_video, dim]`` (alone, or as ``output[0]``), in the
        frame-major order :meth:`capture_attention` flattens (the localization term multiplies the two); a text
        site's module takes the text tokens as its ``encoder_hidden_states`` keyword or second positional argument.
        For ``t2vu.load_eraser`` on a stock model, the transformer has a ``.config`` mapping equal to
        :attr:`config` (hashed into the file) and takes ``hidden_states`` as its first argument or keyword."""

    # -- conditioning (engine: once per run; the text encoders leave device memory after it) ------------
    def encode_prompts(self, prompts: Sequence[str]) -> Mapping[str, Any]:
        """Each distinct prompt (``""`` included when asked for) -> its condition, an object only the backbone
        reads (CogVideoX: a ``[L, D]`` tensor; HunyuanVideo: embeddings, attention mask and pooled projection).
        Text encoders run once here, then leave device memory."""

    def collate(self, conditions: Sequence[Any]) -> Any:
        """Batch per-prompt conditions (in order) into the object :meth:`predict` and :meth:`guided` take."""

    def concept_token_mask(self, prompt: str, concept: str) -> Any:
        """Bool ``[L]``: the condition positions of ``prompt`` that spell ``concept`` (padding never). A prompt that
        does not contain the concept's text stands for it whole (all its real tokens); an empty mask means the
        prompt has no token in the condition, which the engine refuses before training."""

    # -- latents and scheduler maths (engine, states, sampler) ------------------------------------------
    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple:
        """Shape of one latent video (no batch dimension); :class:`T2VUError` for sizes the model cannot take."""

    def sample_timesteps(self, n: int, generator: Any) -> Any:
        """``[n]`` training timesteps, in the unit :meth:`predict` takes, from the CPU ``generator`` (the states
        are made on the CPU and moved to :attr:`device` afterwards)."""

    def add_noise(self, x0: Any, noise: Any, t: Any) -> Any:
        """The forward process: ``x_t`` ``[B, *latent]`` from clean latents and noise at timesteps ``t`` ``[B]``."""

    def sampler(self, num_steps: int, generator: Any = None) -> Sampler:
        """A fresh inference scheduler for one trajectory of ``num_steps`` steps (the pipeline's own).
        ``generator``: a ``torch.Generator``, or a list with one per batch row, that drew the trajectory's initial
        noise; a stochastic scheduler (CogVideoX's DPM solver) draws its step noise from it, as the stock
        pipeline does from the generator it is given, so a seed reproduces the pipeline's video."""

    # -- the forward ---------------------------------------------------------------------------------------
    def predict(self, x_t: Any, t: Any, cond: Any) -> Any:
        """One transformer forward: ``x_t`` ``[B, *latent]``, ``t`` ``[B]``, ``cond`` from :meth:`collate`
        (``B`` rows) -> the model's prediction ``[B, *latent]`` (fp32). What the erasers change; the losses
        compare these. Moves its inputs to :attr:`device` itself. Increments ``forward_calls``."""

    def guided(self, x_t: Any, t: Any, cond: Any, uncond: Any, scale: float) -> Guided:
        """The guided prediction the stock pipeline steps with, however the model guides: two-pass
        classifier-free guidance (CogVideoX, Wan) or one pass with an embedded guidance scale
        (guidance-distilled HunyuanVideo, which ignores ``uncond``)."""

    # -- attention (localization term) -----------------------------------------------------------------
    def capture_attention(self, token_masks: Any, modules: Optional[Sequence[str]],
                          latent_shape: Sequence[int]) -> ContextManager[dict]:
        """While active, the next forward records, for each attention module named in ``modules`` (``None``:
        those holding a video site) and each batch row whose ``token_masks`` row (bool ``[B, L]``) has a token,
        the frozen video->concept attention: ``{module: [rows, frames, tokens_per_frame]}`` (softmax mass on the
        masked tokens, mean over heads, padding excluded), frames and tokens in the order of the video sites'
        outputs. The forward's outputs are unchanged. Core reads the store after the ``with`` block."""

    # -- generation and evaluation only (training never loads the VAE) -------------------------------------
    def decode(self, latents: Any) -> Any:
        """Latents ``[B, *latent]`` -> video ``[B, frames, 3, H, W]`` in [0, 1]."""
