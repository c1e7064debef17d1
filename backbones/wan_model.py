"""Wan 2.1 / 2.2 A14B backbone implementation (torch + diffusers; imported only to run).

What a run sees, following ``WanPipeline`` (diffusers) step by step:

- conditions: the cleaned prompt (``prompt_clean``: ftfy when installed, HTML unescaping, whitespace) tokenized
  to ``max_text_length`` UMT5 tokens, the UMT5 encoder's last hidden state with its attention mask, cut to the
  prompt's real length and zero-padded back to ``max_text_length`` (the pipeline's embeddings exactly);
- latents ``[C, F, h, w]`` (channels first), flow matching with the scheduler's shift (``flow_shift`` of the
  UniPC scheduler the released folders ship, or ``shift`` of FlowMatchEuler): ``x_t = (1 - sigma) x0 + sigma
  noise`` and ``t = 1000 sigma``; the transformer predicts the velocity ``noise - x0``;
- guidance: classic two-pass CFG, ``v_neg + scale (v_c - v_neg)``, the negative branch on
  ``options.negative_prompt`` (the pipeline's default: the empty prompt);
- the text enters every block through its cross-attention ``attn2`` (video queries, text keys, no mask: the
  zero-padded positions are keys too, as in the pipeline); ``attn1`` is video self-attention;
- Wan 2.2 A14B: two experts of one architecture, ``transformer`` for the timesteps ``t >= boundary_ratio * 1000``
  (high noise) and ``transformer_2`` below (low noise, guided at ``options.guidance_2`` when set, the pipeline's
  ``guidance_scale_2``). Every site exists once per expert (``transformer.blocks.<i>.attn2``,
  ``transformer_2.blocks.<i>.attn2``), so one eraser file holds both experts' erasers; each forward runs the
  expert of its timestep, so each expert's erasers learn on the timesteps it serves.
"""

from __future__ import annotations

import contextlib
import gc
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from t2vu.backbones._folders import component_class, decoding, enable_checkpointing, load_frozen_transformer
from t2vu.backbones._folders import read_json as _read_json
from t2vu.backbones.wan import DOWNLOAD_HINT, EXPERTS, REQUIRED, experts_config, folder_problem, two_experts
from t2vu.core.errors import T2VUError
from t2vu.core.protocols import Guided
from t2vu.core.text import concept_spans, overlapping
from t2vu.plugins.adapter_model import Site

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: text-encoder batch size of :meth:`WanBackbone.encode_prompts`
ENCODE_BATCH = 8
#: most fp32 scores one chunk of :class:`_CaptureProcessor` holds (rows x heads x queries x keys)
CAPTURE_BUDGET = 1 << 25


class Experts(nn.Module):
    """Wan 2.2 A14B's two experts as the one module erasers attach to: ``transformer`` (high noise) and
    ``transformer_2`` (low noise), switched at ``boundary_ratio``. Holds the pipeline's own modules (nothing is
    copied); ``config`` is what eraser files record (:func:`t2vu.backbones.wan.experts_config`)."""

    def __init__(self, transformer: nn.Module, transformer_2: nn.Module, boundary_ratio: float):
        super().__init__()
        self.transformer, self.transformer_2 = transformer, transformer_2
        self.boundary_ratio = float(boundary_ratio)
        self.config = experts_config(dict(transformer.config), dict(transformer_2.config), boundary_ratio)

    @property
    def experts(self) -> list[nn.Module]:
        """Every transformer that runs (``load_eraser`` follows their devices)."""
        return [self.transformer, self.transformer_2]


def transformer_sites(transformer: nn.Module) -> list[Site]:
    """Eraser sites of a Wan transformer, two per block, both the attention's video output ``[B, N_video, dim]``
    (stream ``video``, named like the module): the self-attention ``blocks.<i>.attn1`` and the cross-attention
    ``blocks.<i>.attn2`` (where the text enters). Widths come from the loaded ``to_out`` projections. On
    :class:`Experts` each expert's sites, prefixed ``transformer.`` / ``transformer_2.``, with the unprefixed
    attention name (``eraser.sites`` patterns and localization address both experts' module alike)."""
    if isinstance(transformer, Experts):
        return [Site(f"{prefix}.{s.name}", s.module, s.dim, s.attention, s.stream)
                for prefix in EXPERTS for s in transformer_sites(getattr(transformer, prefix))]
    sites = []
    for i, block in enumerate(transformer.blocks):
        for attn_name in ("attn1", "attn2"):
            attn, name = getattr(block, attn_name), f"blocks.{i}.{attn_name}"
            sites.append(Site(name=name, module=attn, dim=attn.to_out[0].out_features, attention=name))
    return sites


def transformer_of(pipe_or_transformer) -> nn.Module:
    """What ``load_eraser`` attaches to: a two-expert ``WanPipeline``'s :class:`Experts`, else the pipeline's
    ``transformer`` (or the module given)."""
    if isinstance(pipe_or_transformer, Experts):
        return pipe_or_transformer
    second = getattr(pipe_or_transformer, "transformer_2", None)
    if second is not None:
        ratio = getattr(getattr(pipe_or_transformer, "config", None), "boundary_ratio", None)
        if ratio is None:
            raise T2VUError("this WanPipeline has a transformer_2 but no boundary_ratio, so it never runs it; "
                            "an eraser for it cannot be used")
        return Experts(pipe_or_transformer.transformer, second, ratio)
    transformer = getattr(pipe_or_transformer, "transformer", None)
    return transformer if isinstance(transformer, nn.Module) else pipe_or_transformer


def check_model_folder(path: Path) -> tuple[dict, dict]:
    """Fail with an actionable message before anything heavy loads; return the transformer and scheduler
    configs."""
    path = Path(path)
    hint = DOWNLOAD_HINT.format(path=path)
    if not path.exists():
        raise T2VUError(f"backbone.model_path: {path} does not exist. Download the model first, e.g. {hint}")
    if not path.is_dir():
        raise T2VUError(f"backbone.model_path: {path} is a file; point it at the diffusers Wan folder (the one "
                        f"with model_index.json), e.g. from {hint}")
    missing = [r for r in REQUIRED if not (path / r).exists()]
    if missing:
        raise T2VUError(f"backbone.model_path: {path} is not a complete diffusers Wan folder (missing "
                        f"{', '.join(missing)}). Download the whole model, e.g. {hint}")
    index = _read_json(path / "model_index.json", f"{path}/model_index.json")
    cfg = _read_json(path / "transformer/config.json", f"{path}/transformer/config.json")
    sched = _read_json(path / "scheduler/scheduler_config.json", f"{path}/scheduler/scheduler_config.json")
    problem = folder_problem(path, index, cfg, sched, hint)
    if problem is not None:
        raise T2VUError(f"backbone.model_path: {problem}")
    return cfg, sched


@dataclass
class WanCondition:
    """One prompt's condition (``embeds [L, D]``, ``length`` a 0-d long tensor) or, after
    :meth:`WanBackbone.collate`, a batch (``[B, L, D]``, ``[B]``).

    ``embeds``: UMT5's last hidden state of the cleaned prompt, zero beyond its ``length`` real tokens (EOS
    included), exactly the pipeline's ``prompt_embeds``.
    """

    embeds: torch.Tensor
    length: torch.Tensor

    @staticmethod
    def cat(parts: Sequence["WanCondition"]) -> "WanCondition":
        return WanCondition(torch.cat([p.embeds for p in parts]), torch.cat([p.length for p in parts]))

    def real(self) -> torch.Tensor:
        """Bool ``[B, L]``: the real (not padding) positions."""
        return torch.arange(self.embeds.size(-2), device=self.length.device)[None] < self.length.reshape(-1, 1)

    def __len__(self) -> int:
        return self.embeds.size(0) if self.embeds.dim() == 3 else 1


class _Sampler:
    """One trajectory of the pipeline's sampler: a fresh copy of the folder's scheduler (UniPC keeps the
    previous model outputs: its state is per trajectory), ``set_timesteps(n)`` as the pipeline calls it, begin
    index 0, and the scheduler's own ``step``."""

    def __init__(self, scheduler, num_steps: int, device):
        self.scheduler = type(scheduler).from_config(scheduler.config)
        self.scheduler.set_timesteps(num_steps, device=device)
        self.scheduler.set_begin_index(0)
        self.timesteps = self.scheduler.timesteps

    def step(self, prediction: torch.Tensor, t, x: torch.Tensor) -> torch.Tensor:
        return self.scheduler.step(prediction, t, x, return_dict=False)[0]

    def guidance_scale(self, scale: float, t) -> float:
        return scale  # the pipeline guides at one scale throughout


class _CaptureProcessor:
    """Wraps a Wan cross-attention processor; also records video->concept attention.

    The attention output is the wrapped processor's, untouched. With no grad, query and key are recomputed as
    ``WanAttnProcessor`` does for ``attn2``: ``norm_q(to_q(video))`` and ``norm_k(to_k(text))`` (RMS norm across
    heads), split into heads, no RoPE, no mask. Each video query's softmax runs over every text key (padding keys
    too, as in the forward), in query chunks; the mass on the concept tokens (``token_masks`` and the real
    positions of the condition, set by :meth:`WanBackbone._forward`) is averaged over heads: ``[rows, N_video]``.
    """

    def __init__(self, inner, store: dict, names: Sequence[str], token_masks: torch.Tensor,
                 budget: int = CAPTURE_BUDGET):
        self.inner, self.store, self.names = inner, store, list(names)
        self.token_masks, self.budget = token_masks, budget
        self.real: Optional[torch.Tensor] = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
                 **kwargs):
        out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kwargs)
        if encoder_hidden_states is not None:
            concept = self.token_masks
            if self.real is not None:
                concept = concept & self.real.to(concept.device)
            rows = self.token_masks.any(dim=1).nonzero().flatten()
            if len(rows):
                with torch.no_grad():
                    mass = self._concept_attention(attn, hidden_states[rows], encoder_hidden_states[rows],
                                                   concept[rows])
                for name in self.names:
                    self.store[name] = mass
        return out

    @staticmethod
    def query_key(attn, hidden, text):
        """``query [b, heads, N_video, d], key [b, heads, L, d]`` exactly as the processor computes them."""
        q = attn.norm_q(attn.to_q(hidden)).unflatten(2, (attn.heads, -1))
        k = attn.norm_k(attn.to_k(text)).unflatten(2, (attn.heads, -1))
        return q.transpose(1, 2), k.transpose(1, 2)

    def _concept_attention(self, attn, hidden, text, concept):
        q, k = self.query_key(attn, hidden, text)
        q, k = q.float(), k.float()
        b, heads, n_video, d = q.shape
        n = k.size(2)
        weight = concept.to(q.device, torch.float32)[:, None, None, :]  # [b, 1, 1, L]
        chunk = max(1, self.budget // max(1, b * heads * n))
        scale = 1.0 / math.sqrt(d)
        pieces = []
        for start in range(0, n_video, chunk):
            probs = ((q[:, :, start:start + chunk] @ k.transpose(-1, -2)) * scale).softmax(dim=-1)
            pieces.append((probs * weight).sum(-1).mean(1))  # concept mass, mean over heads: [b, chunk]
        return torch.cat(pieces, dim=1)


class WanBackbone:
    """Wan 2.1 text-to-video transformer from a local diffusers folder (flow matching, UMT5 text through
    cross-attention, two-pass CFG). Implements :class:`t2vu.core.protocols.Backbone`."""

    name = "wan"
    #: where erasers attach on a loaded transformer (load_eraser asks the backbone class)
    transformer_sites = staticmethod(transformer_sites)
    #: the module of a stock pipeline erasers attach to (both experts of Wan 2.2 A14B)
    transformer_of = staticmethod(transformer_of)
    #: the upstream T2VUnlearning release has no Wan erasers
    upstream = None

    def __init__(self, options):
        self.options = options
        self.path = Path(options.model_path)
        self.config, self.scheduler_config = check_model_folder(self.path)
        #: one transformer's config (the architecture; both experts of Wan 2.2 A14B share it)
        self.arch = dict(self.config)
        self.dtype = _DTYPES[options.dtype]
        self.transformer = None
        self.scheduler = None
        self.device = torch.device(getattr(options, "device", None) or "cpu")
        self.forward_calls = 0
        self._tokenizer = None
        self._vae = None
        self._negative: Optional[WanCondition] = None
        self._captures: list[_CaptureProcessor] = []
        self.index = _read_json(self.path / "model_index.json", f"{self.path}/model_index.json")
        #: Wan 2.2 A14B: the timestep below which ``transformer_2`` (low noise) runs; ``None`` for one transformer
        self.boundary: Optional[float] = None
        if two_experts(self.index):
            self.boundary = float(self.index["boundary_ratio"]) * int(self.scheduler_config.get(
                "num_train_timesteps", 1000))
            second = _read_json(self.path / "transformer_2/config.json", f"{self.path}/transformer_2/config.json")
            self.config = experts_config(self.config, second, self.index["boundary_ratio"])
        self.experts: list[nn.Module] = []
        vae_cfg_path = self.path / "vae" / "config.json"
        vae_cfg = _read_json(vae_cfg_path, str(vae_cfg_path)) if vae_cfg_path.exists() else {}
        self.vae_scale_temporal = int(vae_cfg.get("scale_factor_temporal", 4) or 4)
        self.vae_scale_spatial = int(vae_cfg.get("scale_factor_spatial", 8) or 8)

    # -- loading ---------------------------------------------------------------
    def load(self, device=None) -> None:
        import diffusers
        from diffusers import WanTransformer3DModel

        self.device = torch.device(device or getattr(self.options, "device", None) or "cpu")
        storage = self.options.storage_dtype
        first = load_frozen_transformer(WanTransformer3DModel, self.path, self.dtype, self.device, storage=storage)
        if self.boundary is None:
            self.transformer, self.experts = first, [first]
        else:
            second = load_frozen_transformer(WanTransformer3DModel, self.path, self.dtype, self.device,
                                             subfolder="transformer_2", storage=storage)
            self.transformer = Experts(first, second, self.index["boundary_ratio"])
            self.experts = [first, second]
        self.config = dict(self.transformer.config)
        self.arch = dict(first.config)
        cls = getattr(diffusers, self.scheduler_config.get("_class_name", "UniPCMultistepScheduler"))
        self.scheduler = cls.from_pretrained(self.path, subfolder="scheduler")

    def enable_gradient_checkpointing(self, every: int = 1) -> None:
        for expert in self.experts:
            enable_checkpointing(expert, every)

    def sites(self) -> list[Site]:
        return transformer_sites(self.transformer)

    @property
    def expert_count(self) -> int:
        """Transformers a forward chooses from by timestep (2 for Wan 2.2 A14B): a step runs one, so the other's
        erasers get no gradient in it."""
        return 1 if self.boundary is None else 2

    def expert(self, t: torch.Tensor) -> nn.Module:
        """The transformer that serves timesteps ``t`` ``[B]`` (Wan 2.2 A14B: all of them on one side of the
        boundary, as the pipeline's steps and this backbone's training timesteps are)."""
        if self.boundary is None:
            return self.experts[0]
        high = t.float() >= self.boundary
        if high.all():
            return self.experts[0]
        if not high.any():
            return self.experts[1]
        raise T2VUError("a batch mixes timesteps of both Wan 2.2 experts (t >= and < the boundary "
                        f"{self.boundary:g}); each forward runs one expert: give it timesteps of one side (training "
                        "does: use training.states: noise)")

    # -- text --------------------------------------------------------------------
    def tokenizer(self):
        """The UMT5 tokenizer (light; kept for :meth:`concept_token_mask`)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.path / "tokenizer")
        return self._tokenizer

    @property
    def negative_prompting(self) -> bool:
        """guided()'s ``uncond`` is the negative branch unless ``options.negative_prompt`` fixes it."""
        return not self.options.negative_prompt

    @property
    def text_length(self) -> int:
        """``L``: condition positions per prompt."""
        return int(self.options.max_text_length)

    @staticmethod
    def clean(prompt: str) -> str:
        """The pipeline's own ``prompt_clean``."""
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        return prompt_clean(prompt)

    def _tokenize(self, prompts: Sequence[str], **kwargs):
        return self.tokenizer()([self.clean(p) for p in prompts], padding="max_length", max_length=self.text_length,
                                truncation=True, add_special_tokens=True, return_attention_mask=True,
                                return_tensors="pt", **kwargs)

    def collate(self, conditions: Sequence[WanCondition]) -> WanCondition:
        """Per-prompt conditions -> one batch (``[B, L, D]``, ``[B]``)."""
        conditions = list(conditions)
        return WanCondition(torch.stack([c.embeds for c in conditions]),
                            torch.stack([c.length for c in conditions]))

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], batch_size: int = ENCODE_BATCH) -> dict[str, WanCondition]:
        """Each distinct prompt -> its :class:`WanCondition`, exactly as ``WanPipeline._get_t5_prompt_embeds``
        computes it, in batches; ``options.negative_prompt`` is encoded along (the CFG branch of :meth:`guided`).
        Then the text encoder leaves memory."""
        unique = list(dict.fromkeys(prompts))
        negative = self.options.negative_prompt
        todo = unique + ([negative] if negative and negative not in unique else [])
        out: dict[str, WanCondition] = {}
        if not todo:
            return out
        encoder = component_class(self.index, "text_encoder", "UMT5EncoderModel").from_pretrained(
            self.path / "text_encoder", dtype=self.dtype)
        encoder.requires_grad_(False).eval().to(self.device)
        L = self.text_length
        try:
            for i in range(0, len(todo), batch_size):
                chunk = todo[i:i + batch_size]
                inputs = self._tokenize(chunk)
                ids, mask = inputs.input_ids, inputs.attention_mask
                lengths = mask.gt(0).sum(dim=1).long()
                embeds = encoder(ids.to(self.device), mask.to(self.device)).last_hidden_state.to(self.dtype)
                for j, prompt in enumerate(chunk):
                    u = embeds[j, :lengths[j]]
                    padded = torch.cat([u, u.new_zeros(L - u.size(0), u.size(1))])
                    out[prompt] = WanCondition(padded, lengths[j].to(self.device))
        finally:
            del encoder
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        self._negative = out[negative] if negative else None
        return {p: out[p] for p in unique}

    def concept_token_mask(self, prompt: str, concept: str) -> torch.Tensor:
        """Bool ``[L]``: the tokens whose character offsets overlap a whole-word, case-insensitive occurrence of
        ``concept`` in the cleaned prompt (:func:`t2vu.core.text.concept_spans`; never padding nor EOS). A prompt
        that does not contain the concept's words (a paraphrase) uses all of its real text tokens: the whole
        prompt then stands for the concept."""
        text = self.clean(prompt)
        enc = self._tokenize([prompt], return_offsets_mapping=True)
        offsets = enc["offset_mapping"][0].tolist()
        real = enc["attention_mask"][0].bool().tolist()

        def pick(ranges):
            return torch.tensor([k and h for k, h in zip(real, overlapping(offsets, ranges))], dtype=torch.bool)

        mask = pick(concept_spans(text, self.clean(concept)))
        return mask if mask.any() else pick([(0, len(text))])

    # -- latents and scheduler maths -------------------------------------------------
    @property
    def patch_size(self) -> tuple[int, int, int]:
        p = self.arch.get("patch_size", (1, 2, 2))
        return int(p[0]), int(p[1]), int(p[2])

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """``(C, (F - 1) // 4 + 1, H // 8, W // 8)`` for Wan's VAE (the folder's compression factors)."""
        s, tr = self.vae_scale_spatial, self.vae_scale_temporal
        p_t, p_h, _ = self.patch_size
        step = s * p_h
        bad = [(n, v) for n, v in (("height", height), ("width", width)) if v % step or v <= 0]
        if bad:
            names = ", ".join(f"{n} {v} (try {max(step, v // step * step)} or {(v // step + 1) * step})"
                              for n, v in bad)
            raise T2VUError(f"Wan needs height and width that are multiples of {step} (VAE {s}x, patch {p_h}); "
                            f"got {names}")
        if num_frames < 1 or (num_frames - 1) % tr:
            lower = max(1, (num_frames - 1) // tr * tr + 1)
            raise T2VUError(f"Wan needs num_frames = {tr}k+1 (its VAE compresses {tr} frames into one after the "
                            f"first); got {num_frames}, try {lower} or {lower + tr}")
        frames = (num_frames - 1) // tr + 1
        if frames % p_t:
            raise T2VUError(f"Wan with temporal patch {p_t} needs a multiple of {p_t} latent frames; {num_frames} "
                            f"frames give {frames}")
        return int(self.arch["in_channels"]), frames, height // s, width // s

    def token_grid(self, latent_shape) -> tuple[int, int]:
        """(frames, tokens per frame) of the video tokens (patchified ``[C, F, h, w]``, frame-major)."""
        _, frames, h, w = latent_shape
        p_t, p_h, p_w = self.patch_size
        return frames // p_t, (h // p_h) * (w // p_w)

    @property
    def shift(self) -> float:
        """The scheduler's shift: UniPC's ``flow_shift`` or FlowMatchEuler's ``shift``."""
        cfg = self.scheduler.config if self.scheduler is not None else self.scheduler_config
        key = "flow_shift" if "flow_shift" in cfg and "UniPC" in str(cfg.get("_class_name", "UniPC")) else "shift"
        return float(cfg.get(key, 1.0))

    @property
    def num_train_timesteps(self) -> int:
        cfg = self.scheduler.config if self.scheduler is not None else self.scheduler_config
        return int(cfg.get("num_train_timesteps", 1000))

    def sample_timesteps(self, n: int, generator=None) -> torch.Tensor:
        """``[n]`` timesteps ``1000 sigma`` with ``sigma = shift u / (1 + (shift - 1) u)``, ``u ~ U(0, 1)``: the
        scheduler's own shift applied to uniform times, as the sampler's sigmas are (CPU, fp32).

        Wan 2.2 A14B: one expert per call, the high-noise one with the probability of its share of ``u``, then
        the ``n`` times uniform within its share: each timestep still has the distribution above, and a training
        step's rows all go to one expert (which trains that expert's erasers)."""
        s = self.shift
        if self.boundary is None:
            u = torch.rand(n, generator=generator, dtype=torch.float32)
        else:
            sigma_b = self.boundary / self.num_train_timesteps
            u_b = sigma_b / (s - (s - 1) * sigma_b)  # the u whose shifted sigma is the boundary
            high = bool(torch.rand(1, generator=generator).item() >= u_b)
            r = torch.rand(n, generator=generator, dtype=torch.float32)
            u = u_b + (1 - u_b) * r if high else u_b * r
        t = s * u / (1 + (s - 1) * u) * self.num_train_timesteps
        if self.boundary is not None:  # fp32 rounding at the edges must not cross to the other expert
            b = torch.tensor(self.boundary, dtype=t.dtype)
            t = t.clamp(min=b) if high else t.clamp(max=torch.nextafter(b, torch.zeros(())))
        return t

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``(1 - sigma) x0 + sigma noise`` with ``sigma = t / 1000``: the flow-matching forward process (what
        UniPC's ``add_noise`` with flow sigmas and FlowMatchEuler's ``scale_noise`` compute at their own
        timesteps; neither takes arbitrary ones)."""
        sigma = (t.to(x0.device, torch.float32) / self.num_train_timesteps).to(x0.dtype)
        sigma = sigma.reshape(-1, *([1] * (x0.dim() - 1)))
        return sigma * noise + (1.0 - sigma) * x0

    def sampler(self, num_steps: int, generator=None) -> _Sampler:
        """The pipeline's trajectory: the folder's scheduler, ``set_timesteps(num_steps)``."""
        return _Sampler(self.scheduler, num_steps, self.device)

    # -- the forward ----------------------------------------------------------------------
    def _forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: WanCondition) -> torch.Tensor:
        self.forward_calls += 1
        for capture in self._captures:
            capture.real = cond.real().to(self.device)
        out = self.expert(t)(hidden_states=x_t.to(self.device, self.dtype), timestep=t.to(self.device),
                             encoder_hidden_states=cond.embeds.to(self.device, self.dtype), return_dict=False)[0]
        return out.float()

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: WanCondition) -> torch.Tensor:
        """x_t ``[B, C, F, h, w]``, t ``[B]`` (0..1000), a batched condition -> velocity ``[B, C, F, h, w]``
        (fp32)."""
        return self._forward(x_t, t, cond)

    def guided(self, x_t: torch.Tensor, t: torch.Tensor, cond: WanCondition, uncond: Optional[WanCondition],
               scale: float) -> Guided:
        """The prediction ``WanPipeline`` steps with: two-pass CFG ``v_n + scale (v_c - v_n)`` in one batched
        forward (the pipeline runs the two passes one after the other; at ``scale <= 1`` it runs the conditional
        pass alone, and so does this). The negative branch is ``options.negative_prompt`` when set (then its
        prediction is not ``predict(uncond)``'s and is not offered as a teacher value), else ``uncond``."""
        if self.boundary is not None and self.options.guidance_2 is not None and float(t.max()) < self.boundary:
            scale = self.options.guidance_2  # the low-noise expert's scale (the pipeline's guidance_scale_2)
        if scale <= 1:
            pred = self.predict(x_t, t, cond)
            return Guided(pred, {"cond": pred})
        b = x_t.size(0)
        negative = uncond
        if self._negative is not None:
            negative = self.collate([self._negative] * b)
        pred = self.predict(torch.cat([x_t, x_t]), torch.cat([t, t]), WanCondition.cat([negative, cond]))
        v_n, v_c = pred[:b], pred[b:]
        frozen = {"cond": v_c} if self._negative is not None else {"uncond": v_n, "cond": v_c}
        return Guided(v_n + scale * (v_c - v_n), frozen)

    # -- attention (localization) ------------------------------------------------------------
    def attention_modules(self) -> list[str]:
        """The cross-attention modules (where video reads text): ``blocks.<i>.attn2``."""
        return [f"blocks.{i}.attn2" for i in range(len(self.experts[0].blocks))]

    @contextlib.contextmanager
    def capture_attention(self, token_masks: torch.Tensor, modules: Optional[Sequence[str]] = None,
                          latent_shape=None):
        """Record the video->concept attention of the next forward (see :class:`_CaptureProcessor`) for the
        attention modules named ``modules`` (default: :meth:`attention_modules`).

        A cross-attention ``blocks.<i>.attn2`` records its own map. A self-attention ``blocks.<i>.attn1`` has no
        text keys: it is given the map of its block's cross-attention (the text attention of the same block's
        video tokens), so erasers on ``attn1`` are localized too. Yields ``{module: [rows, frames,
        tokens_per_frame]}`` (``[rows, N_video]`` without ``latent_shape``), for the rows of ``token_masks``
        (bool ``[B, L]``) that have a token; padding positions never count as concept tokens.
        """
        store: dict = {}
        names = list(modules) if modules is not None else self.attention_modules()
        by_cross: dict[str, list[str]] = {}
        for name in names:
            parts = name.split(".")
            if len(parts) != 3 or parts[0] != "blocks" or parts[2] not in ("attn1", "attn2"):
                raise T2VUError(f"{name!r} is not a Wan attention module (blocks.<i>.attn1 / blocks.<i>.attn2)")
            by_cross.setdefault(f"blocks.{parts[1]}.attn2", []).append(name)
        masks = token_masks.to(self.device).bool()
        saved = []
        try:
            for cross, asked in by_cross.items():
                for expert in self.experts:  # the one of each forward's timesteps records
                    attn = expert.get_submodule(cross)
                    saved.append((attn, attn.processor))
                    capture = _CaptureProcessor(attn.processor, store, asked, masks)
                    self._captures.append(capture)
                    attn.processor = capture
            yield store
        finally:
            for attn, proc in saved:
                attn.processor = proc
            self._captures = []
        if latent_shape is not None:
            frames, per_frame = self.token_grid(latent_shape)
            for name in list(store):
                store[name] = store[name].reshape(store[name].size(0), frames, per_frame)

    # -- decoding (generation and evaluation only; training never loads the VAE) ----------
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``[B, C, F, h, w]`` -> video ``[B, frames, 3, H, W]`` in [0, 1] (Wan's VAE, with the pipeline's
        latent de-normalisation ``latents * std + mean``)."""
        if self._vae is None:
            from diffusers import AutoencoderKLWan

            if not (self.path / "vae").is_dir():
                raise T2VUError(f"backbone.model_path: {self.path} has no vae/ folder; decoding videos needs it "
                                f"(download the whole model, e.g. {DOWNLOAD_HINT.format(path=self.path)})")
            self._vae = AutoencoderKLWan.from_pretrained(self.path, subfolder="vae", torch_dtype=self.dtype)
            self._vae.requires_grad_(False).eval()
        with decoding(self._vae, self.experts, self.device, self.options) as vae:
            x = latents.to(self.device, vae.dtype)
            z = vae.config.z_dim
            mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(x.device, x.dtype)
            inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1).to(x.device, x.dtype)
            video = vae.decode(x / inv_std + mean, return_dict=False)[0]  # [B, 3, frames, H, W] in [-1, 1]
        return (video.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)  # the pipeline's denormalize
