"""HunyuanVideo backbone implementation (torch + diffusers; imported only to run).

What a run sees, following ``HunyuanVideoPipeline`` (diffusers) step by step:

- conditions: the prompt formatted into the Llama-3 chat template, encoded by the Llama text encoder (the
  hidden states two layers before the last, the template's tokens cropped off, with their attention mask),
  plus CLIP's pooled projection of the bare prompt;
- latents ``[C, F, h, w]`` (channels first), flow matching with the scheduler's ``shift``: ``x_t = (1 - sigma)
  x0 + sigma noise`` and ``t = 1000 sigma``; the transformer predicts the velocity ``noise - x0``;
- guidance: embedded in one pass (guidance-distilled HunyuanVideo: ``guidance = scale * 1000`` is an input of
  the transformer) or, for a transformer without guidance embeddings, two-pass "true" CFG;
- the joint sequence of every block is video tokens FIRST, text tokens LAST; the text's padding keys are
  masked out (the transformer assumes the real tokens form a prefix: right padding).
"""

from __future__ import annotations

import contextlib
import gc
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from t2vu.backbones._folders import component_class, decoding, enable_checkpointing, load_frozen_transformer
from t2vu.backbones._folders import read_json as _read_json
from t2vu.core.errors import T2VUError
from t2vu.core.protocols import Guided
from t2vu.core.text import concept_spans, overlapping
from t2vu.core.upstream import UpstreamLayout
from t2vu.plugins.adapter_model import Site

DOWNLOAD_HINT = "`hf download hunyuanvideo-community/HunyuanVideo --local-dir {path}` (`huggingface-cli download` before huggingface_hub 1.0)"
REQUIRED = ("model_index.json", "transformer/config.json", "scheduler/scheduler_config.json", "text_encoder",
            "tokenizer", "text_encoder_2", "tokenizer_2")
TRANSFORMER_CLASS = "HunyuanVideoTransformer3DModel"
PIPELINE_CLASS = "HunyuanVideoPipeline"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: the pipeline's CLIP length and Llama layer (``hidden_states[-(2 + 1)]``)
CLIP_LENGTH = 77
LLAMA_LAYERS_TO_SKIP = 2
#: text-encoder batch size of :meth:`HunyuanVideoBackbone.encode_prompts`
ENCODE_BATCH = 8
#: most fp32 scores one chunk of :class:`_CaptureProcessor` holds (rows x heads x queries x keys)
CAPTURE_BUDGET = 1 << 25

_V15_REASON = (
    "HunyuanVideo 1.5 is not supported yet: its transformer (HunyuanVideo15Transformer3DModel) takes a Qwen2.5-VL "
    "prompt embedding, a ByT5 glyph embedding and a SigLIP image embedding (zeros for text-to-video) instead of "
    "Llama + CLIP-pooled conditions, has no guidance embedding (two-pass CFG through a guider), only double-stream "
    "blocks, 65 input channels (latents + condition latents + mask) with a 16x VAE, and re-packs the valid text "
    "tokens of each row in front of the padding inside forward, so condition positions differ per row. Use a "
    "HunyuanVideo (1.0) folder, e.g. " + DOWNLOAD_HINT)


def transformer_sites(transformer: nn.Module) -> list[Site]:
    """Eraser sites of a HunyuanVideo transformer, per double-stream block (``transformer_blocks.<i>.attn``) and
    single-stream block (``single_transformer_blocks.<i>.attn``):

    - the attention's video output (stream ``video``, named like the module): both block types' attention
      returns ``(video, text)``; double blocks project it with ``to_out`` (``[B, N_video, dim]``), single blocks
      (``pre_only``) return the raw attention output, which the block's ``proj_out`` mixes with its MLP;
    - the text tokens the attention is called with (stream ``text``, ``<module>.text``: its
      ``encoder_hidden_states`` keyword), the keys and values every video token reads the prompt through.

    Widths come from the loaded modules, never a constant.
    """
    sites = []
    for prefix, blocks in (("transformer_blocks", transformer.transformer_blocks),
                           ("single_transformer_blocks", transformer.single_transformer_blocks)):
        for i, block in enumerate(blocks):
            attn, name = block.attn, f"{prefix}.{i}.attn"
            to_out = getattr(attn, "to_out", None)
            video_dim = to_out[0].out_features if to_out is not None else attn.to_v.out_features
            text_in = attn.add_k_proj if getattr(attn, "add_k_proj", None) is not None else attn.to_k
            sites.append(Site(name=name, module=attn, dim=video_dim, attention=name))
            sites.append(Site(name=f"{name}.text", module=attn, dim=text_in.in_features, attention=name,
                              stream="text"))
    return sites


def check_model_folder(path: Path) -> dict:
    """Fail with an actionable message before anything heavy loads; return the transformer config."""
    path = Path(path)
    hint = DOWNLOAD_HINT.format(path=path)
    if not path.exists():
        raise T2VUError(f"backbone.model_path: {path} does not exist. Download the model first, e.g. {hint}")
    if not path.is_dir():
        raise T2VUError(f"backbone.model_path: {path} is a file; point it at the diffusers HunyuanVideo folder "
                        f"(the one with model_index.json), e.g. from {hint}")
    if (path / "model_index.json").is_file():
        index = _read_json(path / "model_index.json", f"{path}/model_index.json")
        kind = str(index.get("_class_name", ""))
        if kind.startswith("HunyuanVideo15"):
            raise T2VUError(f"backbone.model_path: {path} holds a {kind!r}. {_V15_REASON.format(path=path)}")
        if kind != PIPELINE_CLASS:
            what = ("an image-to-video HunyuanVideo variant" if kind.startswith(("HunyuanVideo", "HunyuanSkyreels"))
                    else "not a HunyuanVideo pipeline")
            raise T2VUError(f"backbone.model_path: {path} holds a {kind or 'pipeline without _class_name'!r}, "
                            f"{what}; the hunyuanvideo backbone needs a text-to-video {PIPELINE_CLASS} folder, "
                            f"e.g. {hint}")
    missing = [r for r in REQUIRED if not (path / r).exists()]
    if missing:
        raise T2VUError(f"backbone.model_path: {path} is not a complete diffusers HunyuanVideo folder (missing "
                        f"{', '.join(missing)}). Download the whole model, e.g. {hint}")
    cfg = _read_json(path / "transformer/config.json", f"{path}/transformer/config.json")
    kind = cfg.get("_class_name")
    if kind == "HunyuanVideo15Transformer3DModel":
        raise T2VUError(f"backbone.model_path: {path}/transformer is a {kind}. {_V15_REASON.format(path=path)}")
    if kind != TRANSFORMER_CLASS:
        raise T2VUError(f"backbone.model_path: {path}/transformer is a {kind!r}, not a {TRANSFORMER_CLASS}")
    if cfg.get("image_condition_type") is not None:
        raise T2VUError(f"backbone.model_path: {path}/transformer is an image-to-video HunyuanVideo "
                        f"(image_condition_type {cfg['image_condition_type']!r}); use the text-to-video model, "
                        f"e.g. {hint}")
    sched = _read_json(path / "scheduler/scheduler_config.json", f"{path}/scheduler/scheduler_config.json")
    if sched.get("_class_name", "FlowMatchEulerDiscreteScheduler") != "FlowMatchEulerDiscreteScheduler":
        raise T2VUError(f"backbone.model_path: {path}/scheduler is a {sched.get('_class_name')!r}; HunyuanVideo "
                        "samples with FlowMatchEulerDiscreteScheduler")
    if sched.get("use_dynamic_shifting"):
        raise T2VUError(f"backbone.model_path: {path}/scheduler uses dynamic shifting, which HunyuanVideoPipeline "
                        "does not drive (it passes no mu); set use_dynamic_shifting to false and a fixed shift")
    return cfg


@dataclass
class HunyuanCondition:
    """One prompt's condition (``embeds [L, D]``, ``mask [L]``, ``pooled [D2]``) or, after
    :meth:`HunyuanVideoBackbone.collate`, a batch (``[B, L, D]``, ``[B, L]``, ``[B, D2]``).

    ``embeds``: Llama hidden states of the templated prompt, template cropped off; ``mask``: 1 for real tokens,
    0 for padding (in the options dtype, as the pipeline passes it); ``pooled``: CLIP's pooled output.
    """

    embeds: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    def to(self, device=None, dtype=None) -> "HunyuanCondition":
        return HunyuanCondition(self.embeds.to(device, dtype), self.mask.to(device, dtype),
                                self.pooled.to(device, dtype))

    @staticmethod
    def cat(parts: Sequence["HunyuanCondition"]) -> "HunyuanCondition":
        return HunyuanCondition(torch.cat([p.embeds for p in parts]), torch.cat([p.mask for p in parts]),
                                torch.cat([p.pooled for p in parts]))

    def __len__(self) -> int:
        return self.embeds.size(0) if self.embeds.dim() == 3 else 1


class _FlowSampler:
    """One trajectory of the pipeline's sampler: a fresh copy of the folder's scheduler with the pipeline's
    sigmas (``linspace(1, 0, n + 1)[:-1]``, shifted by the scheduler), begin index 0, and its own ``step``."""

    def __init__(self, scheduler, num_steps: int, device):
        import numpy as np

        self.scheduler = type(scheduler).from_config(scheduler.config)
        sigmas = np.linspace(1.0, 0.0, num_steps + 1)[:-1]
        self.scheduler.set_timesteps(num_steps, device=device, sigmas=sigmas)
        self.scheduler.set_begin_index(0)
        self.timesteps = self.scheduler.timesteps

    def step(self, prediction: torch.Tensor, t, x: torch.Tensor) -> torch.Tensor:
        return self.scheduler.step(prediction, t, x, return_dict=False)[0]

    def guidance_scale(self, scale: float, t) -> float:
        return scale  # the pipeline guides at one scale throughout


class _CaptureProcessor:
    """Wraps a HunyuanVideo attention processor; also records video->concept attention.

    The attention output is the wrapped processor's, untouched. With no grad, query and key are recomputed as
    ``HunyuanVideoAttnProcessor2_0`` does them: double-stream blocks project video with ``to_q``/``to_k`` and
    text with ``add_q_proj``/``add_k_proj`` (+ ``norm_added_*``), single-stream blocks project the concatenation
    ``[video, text]`` with ``to_q``/``to_k``; QK-norm; RoPE on the video tokens only; video FIRST, text LAST.
    Each video query's softmax runs over all keys with the forward's own attention mask (padding text keys
    excluded), in query chunks (the full ``[N, N]`` matrix is never built); the mass on the concept tokens
    (``token_masks``) is averaged over heads: ``[rows, N_video]``.
    """

    def __init__(self, inner, store: dict, name: str, token_masks: torch.Tensor, budget: int = CAPTURE_BUDGET):
        self.inner, self.store, self.name = inner, store, name
        self.token_masks, self.budget = token_masks, budget

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        out = self.inner(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                         attention_mask=attention_mask, image_rotary_emb=image_rotary_emb)
        if encoder_hidden_states is not None:
            rows = self.token_masks.any(dim=1).nonzero().flatten()
            if len(rows):
                with torch.no_grad():
                    mask = attention_mask[rows] if attention_mask is not None else None
                    self.store[self.name] = self._concept_attention(
                        attn, hidden_states[rows], encoder_hidden_states[rows], mask, image_rotary_emb,
                        self.token_masks[rows])
        return out

    @staticmethod
    def query_key(attn, hidden, text, rotary):
        """``query, key`` ``[b, N_video + N_text, heads, head_dim]`` exactly as the processor computes them."""
        from diffusers.models.embeddings import apply_rotary_emb

        n_text = text.size(1)
        single = attn.add_q_proj is None
        x = torch.cat([hidden, text], dim=1) if single else hidden
        q = attn.to_q(x).unflatten(2, (attn.heads, -1))
        k = attn.to_k(x).unflatten(2, (attn.heads, -1))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if rotary is not None:
            if single:
                q = torch.cat([apply_rotary_emb(q[:, :-n_text], rotary, sequence_dim=1), q[:, -n_text:]], dim=1)
                k = torch.cat([apply_rotary_emb(k[:, :-n_text], rotary, sequence_dim=1), k[:, -n_text:]], dim=1)
            else:
                q = apply_rotary_emb(q, rotary, sequence_dim=1)
                k = apply_rotary_emb(k, rotary, sequence_dim=1)
        if not single:
            tq = attn.add_q_proj(text).unflatten(2, (attn.heads, -1))
            tk = attn.add_k_proj(text).unflatten(2, (attn.heads, -1))
            if attn.norm_added_q is not None:
                tq = attn.norm_added_q(tq)
            if attn.norm_added_k is not None:
                tk = attn.norm_added_k(tk)
            q, k = torch.cat([q, tq], dim=1), torch.cat([k, tk], dim=1)
        return q, k

    def _concept_attention(self, attn, hidden, text, mask, rotary, concept):
        n_video = hidden.size(1)
        q, k = self.query_key(attn, hidden, text, rotary)
        q = q[:, :n_video].transpose(1, 2).float()  # [b, heads, N_video, d]
        k = k.transpose(1, 2).float()  # [b, heads, N, d]
        b, heads, _, d = q.shape
        n = k.size(2)
        bias = torch.zeros(b, 1, 1, n, device=q.device)
        if mask is not None:  # the forward's [b, 1, 1, N] bool mask: True = attend
            bias = bias.masked_fill(~mask.reshape(b, 1, 1, n).bool(), float("-inf"))
        weight = concept.to(q.device, torch.float32)[:, None, None, :]  # [b, 1, 1, N_text]
        chunk = max(1, self.budget // max(1, b * heads * n))
        scale = 1.0 / math.sqrt(d)
        pieces = []
        for start in range(0, n_video, chunk):
            scores = (q[:, :, start:start + chunk] @ k.transpose(-1, -2)) * scale + bias
            probs = scores.softmax(dim=-1)[..., n_video:]
            pieces.append((probs * weight).sum(-1).mean(1))  # concept mass, mean over heads: [b, chunk]
        return torch.cat(pieces, dim=1)


#: The upstream T2VUnlearning release: one adapter on each single-stream block's attention video output
#: (``single_transformer_blocks.{i}.attn.adapter``), scaled by its ``eraser_weight`` when injected.
UPSTREAM = UpstreamLayout(site=r"single_transformer_blocks\.(\d+)\.attn", layers_key="num_single_layers",
                          example="single_transformer_blocks.<i>.attn")


class HunyuanVideoBackbone:
    """HunyuanVideo transformer from a local diffusers folder (flow matching, embedded guidance, video tokens
    first). Implements :class:`t2vu.core.protocols.Backbone`."""

    name = "hunyuanvideo"
    #: where erasers attach on a loaded transformer (load_eraser asks the backbone class)
    transformer_sites = staticmethod(transformer_sites)
    upstream = UPSTREAM

    def __init__(self, options):
        self.options = options
        self.path = Path(options.model_path)
        self.config = check_model_folder(self.path)
        self.dtype = _DTYPES[options.dtype]
        self.transformer = None
        self.scheduler = None
        self.device = torch.device(getattr(options, "device", None) or "cpu")
        self.forward_calls = 0
        self._tokenizer = None
        self._crop_start: Optional[int] = None
        self._vae = None
        self.index = _read_json(self.path / "model_index.json", f"{self.path}/model_index.json")
        vae_cfg_path = self.path / "vae" / "config.json"
        vae_cfg = _read_json(vae_cfg_path, str(vae_cfg_path)) if vae_cfg_path.exists() else {}
        self.vae_scale_temporal = int(vae_cfg.get("temporal_compression_ratio", 4))
        self.vae_scale_spatial = int(vae_cfg.get("spatial_compression_ratio", 8))

    @property
    def negative_prompting(self) -> bool:
        """Only without guidance embeddings: a guidance-distilled model guides in one pass and has no negative
        branch."""
        return not self.distilled

    @property
    def distilled(self) -> bool:
        """Guidance-distilled (the transformer embeds the guidance scale; one pass per guided step)."""
        return bool(self.config.get("guidance_embeds", True))

    # -- loading ---------------------------------------------------------------
    def load(self, device=None) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoTransformer3DModel

        self.device = torch.device(device or getattr(self.options, "device", None) or "cpu")
        self.transformer = load_frozen_transformer(HunyuanVideoTransformer3DModel, self.path, self.dtype, self.device,
                                                   storage=self.options.storage_dtype)
        self.config = dict(self.transformer.config)
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(self.path, subfolder="scheduler")

    def enable_gradient_checkpointing(self, every: int = 1) -> None:
        enable_checkpointing(self.transformer, every)

    def sites(self) -> list[Site]:
        return transformer_sites(self.transformer)

    # -- text --------------------------------------------------------------------
    def tokenizer(self):
        """The Llama tokenizer (light; kept for :meth:`concept_token_mask`)."""
        if self._tokenizer is None:
            self._tokenizer = component_class(self.index, "tokenizer", "LlamaTokenizerFast").from_pretrained(
                self.path / "tokenizer")
            if self._tokenizer.padding_side != "right":
                warnings.warn(f"{self.path}/tokenizer pads on the {self._tokenizer.padding_side}; HunyuanVideo's "
                              "transformer and template crop assume right padding (set padding_side: right in "
                              "tokenizer_config.json)", stacklevel=2)
        return self._tokenizer

    @property
    def template(self) -> str:
        if self.options.prompt_template is not None:
            return self.options.prompt_template
        from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

        return DEFAULT_PROMPT_TEMPLATE["template"]

    @property
    def crop_start(self) -> int:
        """Template tokens cut off the front: the option, the default template's 95, or, for a custom
        template, counted as ``HunyuanVideoPipeline._get_llama_prompt_embeds`` does (the template's tokens
        padded to ``max_length`` minus 2: ``{}`` and ``<|eot_id|>``)."""
        if self._crop_start is None:
            if self.options.crop_start is not None:
                self._crop_start = int(self.options.crop_start)
            elif self.options.prompt_template is None:
                from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

                self._crop_start = int(DEFAULT_PROMPT_TEMPLATE["crop_start"])
            else:
                ids = self.tokenizer()(self.template, padding="max_length", return_tensors="pt",
                                       return_length=False, return_overflowing_tokens=False,
                                       return_attention_mask=False)["input_ids"]
                self._crop_start = int(ids.shape[-1]) - 2
        return self._crop_start

    @property
    def text_length(self) -> int:
        """``L``: condition positions per prompt."""
        return int(self.options.max_sequence_length)

    def _llama_inputs(self, prompts: Sequence[str], **kwargs):
        return self.tokenizer()([self.template.format(p) for p in prompts],
                                max_length=self.text_length + self.crop_start, padding="max_length",
                                truncation=True, return_tensors="pt", return_length=False,
                                return_overflowing_tokens=False, return_attention_mask=True, **kwargs)

    def collate(self, conditions: Sequence[HunyuanCondition]) -> HunyuanCondition:
        """Per-prompt conditions -> one batch (``[B, L, D]``, ``[B, L]``, ``[B, D2]``)."""
        conditions = list(conditions)
        return HunyuanCondition(torch.stack([c.embeds for c in conditions]),
                                torch.stack([c.mask for c in conditions]),
                                torch.stack([c.pooled for c in conditions]))

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], batch_size: int = ENCODE_BATCH) -> dict[str, HunyuanCondition]:
        """Each distinct prompt -> its :class:`HunyuanCondition`, exactly as ``HunyuanVideoPipeline.encode_prompt``
        computes it (template, crop, ``hidden_states[-3]``, attention mask; CLIP ``pooler_output`` over 77
        tokens), in batches; then both text encoders leave memory."""
        unique = list(dict.fromkeys(prompts))
        out: dict[str, HunyuanCondition] = {}
        if not unique:
            return out
        llama_cls = component_class(self.index, "text_encoder", "LlamaModel")
        clip_cls = component_class(self.index, "text_encoder_2", "CLIPTextModel")
        clip_tok = component_class(self.index, "tokenizer_2", "CLIPTokenizer").from_pretrained(self.path / "tokenizer_2")
        llama = llama_cls.from_pretrained(self.path / "text_encoder", dtype=self.dtype)
        llama.requires_grad_(False).eval().to(self.device)
        clip = clip_cls.from_pretrained(self.path / "text_encoder_2", dtype=self.dtype)
        clip.requires_grad_(False).eval().to(self.device)
        crop = self.crop_start
        try:
            for i in range(0, len(unique), batch_size):
                chunk = unique[i:i + batch_size]
                inputs = self._llama_inputs(chunk)
                ids, mask = inputs.input_ids.to(self.device), inputs.attention_mask.to(self.device)
                embeds = llama(input_ids=ids, attention_mask=mask, output_hidden_states=True
                               ).hidden_states[-(LLAMA_LAYERS_TO_SKIP + 1)].to(self.dtype)
                if crop > 0:
                    embeds, mask = embeds[:, crop:], mask[:, crop:]
                clip_ids = clip_tok(chunk, padding="max_length", max_length=CLIP_LENGTH, truncation=True,
                                    return_tensors="pt").input_ids
                pooled = clip(clip_ids.to(self.device), output_hidden_states=False).pooler_output.to(self.dtype)
                for j, prompt in enumerate(chunk):
                    out[prompt] = HunyuanCondition(embeds[j], mask[j].to(self.dtype), pooled[j])
        finally:
            del llama, clip
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        return out

    def concept_token_mask(self, prompt: str, concept: str) -> torch.Tensor:
        """Bool ``[L]`` over the cropped positions: the tokens whose character offsets overlap a whole-word,
        case-insensitive occurrence of ``concept`` inside the user prompt (:func:`t2vu.core.text.concept_spans`
        on the prompt, shifted to where the prompt starts in the formatted text, the template's ``{}``); never
        padding nor template tokens. A prompt that does not contain the concept's words (a paraphrase) uses all
        of its real tokens: the whole prompt then stands for the concept."""
        enc = self._llama_inputs([prompt], return_offsets_mapping=True)
        crop, length = self.crop_start, self.text_length
        offsets = enc["offset_mapping"][0].tolist()[crop:crop + length]
        real = enc["attention_mask"][0].bool().tolist()[crop:crop + length]
        sentinel = "\x00t2vu\x00"
        start = self.template.format(sentinel).index(sentinel)  # where the prompt begins in the formatted text
        spans = [(start + a, start + b) for a, b in concept_spans(prompt, concept)]

        def pick(ranges):
            return torch.tensor([k and h for k, h in zip(real, overlapping(offsets, ranges))], dtype=torch.bool)

        mask = pick(spans)
        return mask if mask.any() else pick([(start, start + len(prompt))])

    # -- latents and scheduler maths -------------------------------------------------
    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """``(C, (F - 1) // 4 + 1, H // 8, W // 8)`` for HunyuanVideo's VAE (the folder's compression ratios)."""
        s, tr, p = self.vae_scale_spatial, self.vae_scale_temporal, int(self.config.get("patch_size", 2))
        step = s * p
        bad = [(n, v) for n, v in (("height", height), ("width", width)) if v % step or v <= 0]
        if bad:
            names = ", ".join(f"{n} {v} (try {max(step, v // step * step)} or {(v // step + 1) * step})"
                              for n, v in bad)
            raise T2VUError(f"HunyuanVideo needs height and width that are multiples of {step} "
                            f"(VAE {s}x, patch {p}); got {names}")
        if num_frames < 1 or (num_frames - 1) % tr:
            lower = max(1, (num_frames - 1) // tr * tr + 1)
            raise T2VUError(f"HunyuanVideo needs num_frames = {tr}k+1 (its VAE compresses {tr} frames into one "
                            f"after the first); got {num_frames}, try {lower} or {lower + tr}")
        frames = (num_frames - 1) // tr + 1
        p_t = int(self.config.get("patch_size_t", 1) or 1)
        if frames % p_t:
            raise T2VUError(f"HunyuanVideo with patch_size_t {p_t} needs a multiple of {p_t} latent frames; "
                            f"{num_frames} frames give {frames}")
        return int(self.config["in_channels"]), frames, height // s, width // s

    def token_grid(self, latent_shape) -> tuple[int, int]:
        """(frames, tokens per frame) of the video tokens (patchified ``[C, F, h, w]``, frame-major)."""
        _, frames, h, w = latent_shape
        p, p_t = int(self.config["patch_size"]), int(self.config.get("patch_size_t", 1) or 1)
        return frames // p_t, (h // p) * (w // p)

    @property
    def shift(self) -> float:
        return float(self.scheduler.shift)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    def sample_timesteps(self, n: int, generator=None) -> torch.Tensor:
        """``[n]`` timesteps ``1000 sigma`` with ``sigma = shift u / (1 + (shift - 1) u)``, ``u ~ U(0, 1)``: the
        scheduler's own shift applied to uniform times, as the sampler's schedule is (CPU, fp32)."""
        u = torch.rand(n, generator=generator, dtype=torch.float32)
        s = self.shift
        sigma = s * u / (1 + (s - 1) * u)
        return sigma * self.num_train_timesteps

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``(1 - sigma) x0 + sigma noise`` with ``sigma = t / 1000``: the flow-matching forward process.

        Not ``scheduler.scale_noise``: that looks each timestep up in the schedule of the last ``set_timesteps``
        (``index_for_timestep``: exact matches only), so it cannot take the arbitrary timesteps of
        :meth:`sample_timesteps`; it computes the same formula at the timesteps it can take.
        """
        sigma = (t.to(x0.device, torch.float32) / self.num_train_timesteps).to(x0.dtype)
        sigma = sigma.reshape(-1, *([1] * (x0.dim() - 1)))
        return sigma * noise + (1.0 - sigma) * x0

    def sampler(self, num_steps: int, generator=None) -> _FlowSampler:
        """The pipeline's flow-matching Euler trajectory (sigmas ``linspace(1, 0, n + 1)[:-1]``, shifted)."""
        return _FlowSampler(self.scheduler, num_steps, self.device)

    # -- the forward ----------------------------------------------------------------------
    def _forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: HunyuanCondition,
                 guidance_scale: Optional[float]) -> torch.Tensor:
        self.forward_calls += 1
        b = x_t.size(0)
        guidance = None
        if self.distilled:  # as the pipeline builds it: the scale in the transformer dtype, times 1000
            guidance = torch.tensor([guidance_scale] * b, dtype=self.dtype, device=self.device) * 1000.0
        out = self.transformer(
            hidden_states=x_t.to(self.device, self.dtype), timestep=t.to(self.device, torch.float32),
            encoder_hidden_states=cond.embeds.to(self.device, self.dtype),
            encoder_attention_mask=cond.mask.to(self.device, self.dtype),
            pooled_projections=cond.pooled.to(self.device, self.dtype), guidance=guidance, return_dict=False)[0]
        return out.float()

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: HunyuanCondition) -> torch.Tensor:
        """x_t ``[B, C, F, h, w]``, t ``[B]`` (0..1000), a batched condition -> velocity ``[B, C, F, h, w]``
        (fp32). A guidance-distilled transformer runs at the embedded scale ``options.guidance``; one without
        guidance embeddings gets none (the pipeline's guidance tensor is ignored by such a model)."""
        return self._forward(x_t, t, cond, self.options.guidance)

    def guided(self, x_t: torch.Tensor, t: torch.Tensor, cond: HunyuanCondition,
               uncond: Optional[HunyuanCondition], scale: float) -> Guided:
        """The prediction ``HunyuanVideoPipeline`` steps with.

        Guidance-distilled: ONE pass with embedded guidance ``scale`` (``uncond`` ignored); it equals
        :meth:`predict` only when ``scale == options.guidance``. Otherwise two-pass true CFG in one batched
        forward, ``v_u + scale (v_c - v_u)`` (the pipeline's ``true_cfg_scale`` with a negative prompt; at
        ``scale <= 1`` the pipeline runs the conditional pass alone, and so does this).
        """
        if self.distilled:
            pred = self._forward(x_t, t, cond, scale)
            return Guided(pred, {"cond": pred} if scale == self.options.guidance else {})
        if scale <= 1:
            pred = self.predict(x_t, t, cond)
            return Guided(pred, {"cond": pred})
        b = x_t.size(0)
        pred = self.predict(torch.cat([x_t, x_t]), torch.cat([t, t]), HunyuanCondition.cat([uncond, cond]))
        v_u, v_c = pred[:b], pred[b:]
        return Guided(v_u + scale * (v_c - v_u), {"uncond": v_u, "cond": v_c})

    # -- attention (localization) ------------------------------------------------------------
    def attention_modules(self) -> list[str]:
        """Every attention module that holds a video site: double then single blocks."""
        return ([f"transformer_blocks.{i}.attn" for i in range(len(self.transformer.transformer_blocks))]
                + [f"single_transformer_blocks.{i}.attn"
                   for i in range(len(self.transformer.single_transformer_blocks))])

    @contextlib.contextmanager
    def capture_attention(self, token_masks: torch.Tensor, modules: Optional[Sequence[str]] = None,
                          latent_shape=None):
        """Record the video->concept attention of the next forward (see :class:`_CaptureProcessor`) in the
        attention modules named ``modules`` (default: :meth:`attention_modules`).

        Yields ``{module: [rows, frames, tokens_per_frame]}`` (``[rows, N_video]`` without ``latent_shape``),
        filled by the next forward, for the rows of ``token_masks`` (bool ``[B, L]``) that have a token.
        """
        store: dict = {}
        names = list(modules) if modules is not None else self.attention_modules()
        masks = token_masks.to(self.device).bool()
        saved = []
        try:
            for name in names:
                attn = self.transformer.get_submodule(name)
                saved.append((attn, attn.processor))
                attn.processor = _CaptureProcessor(attn.processor, store, name, masks)
            yield store
        finally:
            for attn, proc in saved:
                attn.processor = proc
        if latent_shape is not None:
            frames, per_frame = self.token_grid(latent_shape)
            for name in list(store):
                store[name] = store[name].reshape(store[name].size(0), frames, per_frame)

    # -- decoding (generation and evaluation only; training never loads the VAE) ----------
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``[B, C, F, h, w]`` -> video ``[B, frames, 3, H, W]`` in [0, 1] (HunyuanVideo's VAE)."""
        if self._vae is None:
            from diffusers import AutoencoderKLHunyuanVideo

            if not (self.path / "vae").is_dir():
                raise T2VUError(f"backbone.model_path: {self.path} has no vae/ folder; decoding videos needs it "
                                f"(download the whole model, e.g. {DOWNLOAD_HINT.format(path=self.path)})")
            self._vae = AutoencoderKLHunyuanVideo.from_pretrained(self.path, subfolder="vae", torch_dtype=self.dtype)
            self._vae.requires_grad_(False).eval()
        with decoding(self._vae, [self.transformer], self.device, self.options) as vae:
            x = latents.to(self.device, vae.dtype) / vae.config.scaling_factor
            video = vae.decode(x, return_dict=False)[0]  # [B, 3, frames, H, W] in [-1, 1]
        return (video.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)  # the pipeline's denormalize
