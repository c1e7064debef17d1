"""CogVideoX backbone implementation (torch + diffusers; imported only to run)."""

from __future__ import annotations

import contextlib
import gc
import json
import math
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from t2vu.backbones._folders import decoding, enable_checkpointing, load_frozen_transformer
from t2vu.core.errors import T2VUError
from t2vu.core.protocols import Guided
from t2vu.core.text import concept_spans, overlapping
from t2vu.core.upstream import UpstreamLayout
from t2vu.plugins.adapter_model import Site


#: most fp32 scores one chunk of :class:`_CaptureProcessor` holds (rows x heads x queries x keys)
CAPTURE_BUDGET = 1 << 25

def transformer_sites(transformer: nn.Module) -> list[Site]:
    """Eraser sites of a CogVideoX transformer, per block: ``attn1``'s video output (stream ``video``,
    named ``transformer_blocks.<i>.attn1``) and the text tokens ``attn1`` is called with (stream
    ``text``, named ``transformer_blocks.<i>.attn1.text``).

    The width comes from the loaded module (``to_out`` / ``to_k`` of each attention), never a constant.
    """
    sites = []
    for i, block in enumerate(transformer.transformer_blocks):
        attn, name = block.attn1, f"transformer_blocks.{i}.attn1"
        sites.append(Site(name=name, module=attn, dim=attn.to_out[0].out_features, attention=name))
        sites.append(Site(name=f"{name}.text", module=attn, dim=attn.to_k.in_features, attention=name,
                          stream="text"))
    return sites


#: The upstream T2VUnlearning release: one adapter on every block's attn1 video output.
UPSTREAM = UpstreamLayout(site=r"transformer_blocks\.(\d+)\.attn1", layers_key="num_layers",
                          example="transformer_blocks.<i>.attn1")


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
REQUIRED = ("model_index.json", "transformer/config.json", "scheduler/scheduler_config.json",
            "text_encoder/config.json", "tokenizer")


def check_model_folder(path: Path) -> dict:
    """Fail with an actionable message before anything heavy loads."""
    path = Path(path)
    if not path.exists():
        raise T2VUError(
            f"backbone.model_path: {path} does not exist. Download the model first, e.g. "
            f"`hf download THUDM/CogVideoX-5b --local-dir {path}` (`huggingface-cli download` before huggingface_hub 1.0)")
    if not path.is_dir():
        raise T2VUError(f"backbone.model_path: {path} is a file; point it at the diffusers model folder")
    missing = [r for r in REQUIRED if not (path / r).exists()]
    if missing:
        raise T2VUError(f"backbone.model_path: {path} is not a diffusers CogVideoX folder "
                        f"(missing {', '.join(missing)})")
    index = json.loads((path / "model_index.json").read_text())
    if not str(index.get("_class_name", "")).startswith("CogVideoX"):
        raise T2VUError(f"backbone.model_path: {path} holds a {index.get('_class_name')!r}, not a CogVideoX pipeline")
    cfg = json.loads((path / "transformer/config.json").read_text())
    if cfg.get("_class_name") != "CogVideoXTransformer3DModel":
        raise T2VUError(f"backbone.model_path: {path}/transformer is a {cfg.get('_class_name')!r}, "
                        "not a CogVideoXTransformer3DModel")
    return cfg


class _CaptureProcessor:
    """Wraps CogVideoX's attention processor; also records video->concept attention.

    The attention output is the original processor's (untouched). With no
    grad, query/key are recomputed exactly as the model does (QK-norm, then
    RoPE on video tokens; text first in the joint sequence) and the softmax
    row of each video query is evaluated in chunks, so the full
    ``[tokens, tokens]`` matrix is never materialised. The scores and the
    softmax are fp32 whatever the model's dtype (q and k are upcast after
    their projections, before the matmul).
    """

    def __init__(self, inner, store: dict, block: str, token_masks: torch.Tensor, chunk: int):
        self.inner, self.store, self.block = inner, store, block
        self.token_masks, self.chunk = token_masks, chunk

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None,
                 image_rotary_emb=None, **kwargs):
        out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask=attention_mask,
                         image_rotary_emb=image_rotary_emb, **kwargs)
        rows = self.token_masks.any(dim=1).nonzero().flatten()
        if len(rows):
            with torch.no_grad():
                self.store[self.block] = self._concept_attention(
                    attn, hidden_states[rows], encoder_hidden_states[rows], image_rotary_emb,
                    self.token_masks[rows])
        return out

    def _concept_attention(self, attn, hidden, text, rotary, masks):
        from diffusers.models.embeddings import apply_rotary_emb

        n_text = text.size(1)
        x = torch.cat([text, hidden], dim=1)
        b = x.size(0)
        q = attn.to_q(x).view(b, -1, attn.heads, attn.to_q.out_features // attn.heads).transpose(1, 2)
        k = attn.to_k(x).view(b, -1, attn.heads, attn.to_k.out_features // attn.heads).transpose(1, 2)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if rotary is not None:
            q[:, :, n_text:] = apply_rotary_emb(q[:, :, n_text:], rotary)
            k[:, :, n_text:] = apply_rotary_emb(k[:, :, n_text:], rotary)
        scale = 1.0 / math.sqrt(q.size(-1))
        # scores and softmax in fp32 (a bf16 model's q/k are upcast before the matmul, not its result)
        video_q, k = q[:, :, n_text:].float(), k.float()
        keep = masks.float()[:, None, None, :]  # [b, 1, 1, n_text]
        pieces = []
        b, heads, n_keys = video_q.size(0), video_q.size(1), k.size(2)
        chunk = min(self.chunk, max(1, CAPTURE_BUDGET // max(1, b * heads * n_keys)))  # bounded fp32 scores
        for start in range(0, video_q.size(2), chunk):
            scores = (video_q[:, :, start:start + chunk] @ k.transpose(-1, -2)) * scale
            lse = torch.logsumexp(scores, dim=-1, keepdim=True)
            probs = torch.exp(scores[..., :n_text] - lse) * keep
            pieces.append(probs.sum(-1).mean(1))  # sum over concept tokens, mean over heads
        return torch.cat(pieces, dim=1)  # [b, n_video]


class _Sampler:
    """One trajectory of ``CogVideoXPipeline``'s loop with its scheduler: DDIM (eta 0) or the DPM solver, made from
    the folder's scheduler config, stepped through the scheduler's own ``step``.

    ``CogVideoXDPMScheduler`` (SDE DPM-Solver++) is stochastic: each step draws noise from ``generator`` and takes
    the previous step's clean-sample estimate and timestep, as the pipeline passes them. With ``dynamic_cfg`` the
    guidance scale follows the pipeline's ``use_dynamic_cfg`` formula, evaluated on the timestep value as the
    pipeline does (``1 + s * (1 - cos(pi * ((n - t) / n) ** 5)) / 2`` with ``t`` the timestep, not the step index).
    """

    def __init__(self, scheduler_class, config, num_steps: int, device, generator=None, dynamic_cfg: bool = False):
        self.scheduler = scheduler_class.from_config(config)
        self.scheduler.set_timesteps(num_steps, device=device)
        self.timesteps = self.scheduler.timesteps
        self.num_steps, self.generator, self.dynamic_cfg = num_steps, generator, dynamic_cfg
        from diffusers import CogVideoXDPMScheduler

        self.dpm = isinstance(self.scheduler, CogVideoXDPMScheduler)
        self._previous_t = None  # DPM: the timestep and clean-sample estimate of the step before
        self._previous_x0 = None

    def guidance_scale(self, scale: float, t) -> float:
        if not self.dynamic_cfg:
            return scale
        n = self.num_steps
        return 1 + scale * ((1 - math.cos(math.pi * ((n - float(t)) / n) ** 5.0)) / 2)

    def step(self, prediction: torch.Tensor, t, x: torch.Tensor) -> torch.Tensor:
        if not self.dpm:
            return self.scheduler.step(prediction, int(t), x, return_dict=False)[0]
        x, self._previous_x0 = self.scheduler.step(prediction, self._previous_x0, t, self._previous_t, x,
                                                   generator=self.generator, return_dict=False)
        self._previous_t = t
        return x


class CogVideoXBackbone:
    """CogVideoX transformer from a local diffusers folder (v-prediction, text tokens first, two-pass CFG)."""

    name = "cogvideox"
    #: where erasers attach on a loaded transformer (load_eraser asks the backbone class)
    transformer_sites = staticmethod(transformer_sites)
    upstream = UPSTREAM
    #: guided()'s ``uncond`` is the negative branch of its two-pass CFG (negative prompting works)
    negative_prompting = True

    @property
    def latent_dtype(self) -> torch.dtype:
        """CogVideoXPipeline draws its noise in, and casts the latents back to after every step, the model dtype."""
        return self.dtype

    def __init__(self, options):
        self.options = options
        self.path = Path(options.model_path)
        self.config = check_model_folder(self.path)
        self.dtype = _DTYPES[options.dtype]
        self.transformer = None
        self.scheduler = None
        self.device = torch.device("cpu")
        self.forward_calls = 0
        self._rotary_cache: dict = {}
        self._tokenizer = None
        #: CogVideoX 1.5: padded latent frame count -> the padding frames of the latest latent_shape() giving it
        self._frame_padding: dict[int, int] = {}
        vae_cfg_path = self.path / "vae" / "config.json"
        vae_cfg = json.loads(vae_cfg_path.read_text()) if vae_cfg_path.exists() else {}
        self.vae_scale_spatial = 2 ** (len(vae_cfg.get("block_out_channels", [0] * 4)) - 1)
        self.vae_scale_temporal = vae_cfg.get("temporal_compression_ratio",
                                              self.config.get("temporal_compression_ratio", 4))

    # -- loading ---------------------------------------------------------------
    def load(self, device=None) -> None:
        from diffusers import CogVideoXTransformer3DModel

        self.device = torch.device(device or "cpu")
        self.transformer = load_frozen_transformer(CogVideoXTransformer3DModel, self.path, self.dtype, self.device,
                                                   storage=self.options.storage_dtype)
        self.config = dict(self.transformer.config)
        self.scheduler = self._load_scheduler()

    def _load_scheduler(self):
        import diffusers

        cfg = json.loads((self.path / "scheduler/scheduler_config.json").read_text())
        cls = getattr(diffusers, cfg.get("_class_name", "CogVideoXDDIMScheduler"), None)
        if cls is None:
            raise T2VUError(f"unknown scheduler class {cfg.get('_class_name')!r} in {self.path}/scheduler")
        scheduler = cls.from_pretrained(self.path, subfolder="scheduler")
        if scheduler.config.get("prediction_type", "v_prediction") != "v_prediction":
            raise T2VUError("CogVideoX backbone expects a v_prediction scheduler; "
                            f"{self.path}/scheduler says {scheduler.config.prediction_type!r}")
        return scheduler

    def enable_gradient_checkpointing(self, every: int = 1) -> None:
        enable_checkpointing(self.transformer, every)

    def sites(self):
        return transformer_sites(self.transformer)

    # -- text --------------------------------------------------------------------
    @property
    def text_length(self) -> int:
        return self.options.max_text_length or int(self.config["max_text_seq_length"])

    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.path / "tokenizer")
        return self._tokenizer

    def _tokenize(self, prompts: Sequence[str], **kwargs):
        return self.tokenizer()(list(prompts), padding="max_length", max_length=self.text_length,
                                truncation=True, add_special_tokens=True, return_tensors="pt", **kwargs)

    def collate(self, conditions: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-prompt ``[L, D]`` embeddings -> ``[B, L, D]``."""
        return torch.stack(list(conditions))

    def encode_prompts(self, prompts: Sequence[str], batch_size: int = 8) -> dict[str, torch.Tensor]:
        """T5-encode each distinct prompt once, as CogVideoXPipeline does; then free the encoder."""
        from transformers import T5EncoderModel

        unique = list(dict.fromkeys(prompts))
        encoder = T5EncoderModel.from_pretrained(self.path / "text_encoder", torch_dtype=self.dtype)
        encoder.requires_grad_(False).eval().to(self.device)
        out: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for i in range(0, len(unique), batch_size):
                chunk = unique[i:i + batch_size]
                ids = self._tokenize(chunk).input_ids.to(self.device)
                embeds = encoder(ids)[0].to(self.dtype)
                out.update(zip(chunk, embeds))
        del encoder
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return out

    @torch.no_grad()
    def safree_conditions(self, prompts: Sequence[str], keywords: Sequence[str], alpha: float,
                          batch_size: int = 8) -> dict[str, tuple[torch.Tensor, list[int]]]:
        """SAFREE's projected condition of each prompt (:mod:`t2vu.core.safree`) and its trigger positions.

        Encoded as :meth:`encode_prompts` encodes (T5, padded to ``max_length``, no attention mask); a prompt's
        pooled embedding is the encoder output at the first position, as SAFREE's CogVideoX pipeline pools; a
        token is masked by the pad id. Loads the text encoder for this, then frees it."""
        from transformers import T5EncoderModel

        from t2vu.core.safree import projected_tokens

        encoder = T5EncoderModel.from_pretrained(self.path / "text_encoder", torch_dtype=self.dtype)
        encoder.requires_grad_(False).eval().to(self.device)
        tok = self.tokenizer()
        special = set(tok.all_special_ids)

        def encode(ids: torch.Tensor) -> torch.Tensor:
            return torch.cat([encoder(ids[i:i + batch_size].to(self.device))[0].to(self.dtype)
                              for i in range(0, len(ids), batch_size)])

        out: dict[str, tuple[torch.Tensor, list[int]]] = {}
        try:
            concept = encode(self._tokenize(list(keywords)).input_ids)[:, 0]
            for prompt in dict.fromkeys(prompts):
                enc = self._tokenize([prompt])
                ids = enc.input_ids[0]
                real = [i for i, (m, t) in enumerate(zip(enc.attention_mask[0].tolist(), ids.tolist()))
                        if m and t not in special]
                tokens = encode(ids[None])[0]
                if len(real) < 2:
                    out[prompt] = (tokens, [])
                    continue
                masked_ids = ids.repeat(len(real), 1)
                masked_ids[torch.arange(len(real)), torch.tensor(real)] = tok.pad_token_id
                out[prompt] = projected_tokens(tokens, real, encode(masked_ids)[:, 0], concept, alpha)
        finally:
            encoder = None  # frees it (the closure above holds the name only)
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        return out

    def concept_token_mask(self, prompt: str, concept: str) -> torch.Tensor:
        """The prompt's tokens whose character offsets overlap a whole-word, case-insensitive occurrence of
        ``concept`` (:func:`t2vu.core.text.concept_spans`: ``red`` is not in ``hundred``); never padding nor
        special tokens (an ``<unk>`` spelling part of the concept counts).

        A prompt that does not contain the concept's words (a paraphrase) uses all of its
        real tokens: the whole prompt then stands for the concept.
        """
        enc = self._tokenize([prompt], return_offsets_mapping=True)
        real = enc["attention_mask"][0].bool().tolist()
        tok = self.tokenizer()
        special = set(tok.all_special_ids) - {tok.unk_token_id}
        keep = [r and i not in special for r, i in zip(real, enc["input_ids"][0].tolist())]
        hits = overlapping(enc["offset_mapping"][0].tolist(), concept_spans(prompt, concept))
        mask = torch.tensor([k and h for k, h in zip(keep, hits)], dtype=torch.bool)
        return mask if mask.any() else torch.tensor(keep, dtype=torch.bool)

    # -- latents and scheduler maths -------------------------------------------------
    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """``(F, C, H // s, W // s)``; with ``patch_size_t`` (CogVideoX 1.5) ``F`` is padded up to a multiple of
        it, as ``CogVideoXPipeline`` pads, and the padding is remembered for :meth:`decode` to drop."""
        tr = self.vae_scale_temporal
        if num_frames < 1 or (num_frames - 1) % tr:
            lower = max(1, (num_frames - 1) // tr * tr + 1)
            raise T2VUError(f"CogVideoX needs num_frames = {tr}k+1 (its VAE compresses {tr} frames into one after "
                            f"the first); got {num_frames}, try {lower} or {lower + tr}")
        frames = (num_frames - 1) // tr + 1
        p_t = self.config.get("patch_size_t")
        pad = (p_t - frames % p_t) % p_t if p_t else 0
        frames += pad
        s = self.vae_scale_spatial
        if height % (s * self.config["patch_size"]) or width % (s * self.config["patch_size"]):
            raise T2VUError(f"training.height/width must be multiples of {s * self.config['patch_size']} "
                            f"for this model (got {height}x{width})")
        self._frame_padding[frames] = pad
        return frames, int(self.config["in_channels"]), height // s, width // s

    def token_grid(self, latent_shape) -> tuple[int, int]:
        """(frames, tokens per frame) of the video part of the joint sequence."""
        frames, _, h, w = latent_shape
        p, p_t = self.config["patch_size"], self.config.get("patch_size_t") or 1
        return frames // p_t, (h // p) * (w // p)

    def sample_timesteps(self, n: int, generator=None) -> torch.Tensor:
        total = self.scheduler.config.num_train_timesteps
        return torch.randint(0, total, (n,), generator=generator)

    def add_noise(self, x0, noise, t):
        """The scheduler's own forward process (``sqrt(abar) x0 + sqrt(1 - abar) noise``)."""
        return self.scheduler.add_noise(x0, noise, t)

    def sampler(self, num_steps: int, generator=None) -> _Sampler:
        """The pipeline's loop with ``options.scheduler`` (``folder``: the folder's scheduler class; ``ddim``;
        ``dpm``) made from the folder's scheduler config (``timestep_spacing``, zero-terminal-SNR betas), and
        ``options.dynamic_cfg``."""
        import diffusers

        name = {"ddim": "CogVideoXDDIMScheduler", "dpm": "CogVideoXDPMScheduler"}.get(
            self.options.scheduler, type(self.scheduler).__name__)
        return _Sampler(getattr(diffusers, name), self.scheduler.config, num_steps, self.device, generator,
                        self.options.dynamic_cfg)

    # -- the forward ----------------------------------------------------------------------
    def _rotary(self, latent_shape):
        if not self.config.get("use_rotary_positional_embeddings"):
            return None
        key = tuple(latent_shape)
        if key not in self._rotary_cache:
            from diffusers.models.embeddings import get_3d_rotary_pos_embed
            from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

            frames, _, h, w = latent_shape
            p, p_t = self.config["patch_size"], self.config.get("patch_size_t")
            gh, gw = h // p, w // p
            base_w, base_h = self.config["sample_width"] // p, self.config["sample_height"] // p
            if p_t is None:
                crops = get_resize_crop_region_for_grid((gh, gw), base_w, base_h)
                cos, sin = get_3d_rotary_pos_embed(
                    embed_dim=self.config["attention_head_dim"], crops_coords=crops, grid_size=(gh, gw),
                    temporal_size=frames, device=self.device)
            else:
                cos, sin = get_3d_rotary_pos_embed(
                    embed_dim=self.config["attention_head_dim"], crops_coords=None, grid_size=(gh, gw),
                    temporal_size=(frames + p_t - 1) // p_t, grid_type="slice", max_size=(base_h, base_w),
                    device=self.device)
            self._rotary_cache[key] = (cos, sin)
        return self._rotary_cache[key]

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """x_t ``[B, F, C, H, W]``, t ``[B]``, embeds ``[B, text_len, D]`` -> v ``[B, F, C, H, W]`` (fp32)."""
        self.forward_calls += 1
        ofs = None
        if self.config.get("ofs_embed_dim") is not None:
            ofs = x_t.new_full((x_t.size(0),), 2.0, dtype=self.dtype)
        out = self.transformer(
            hidden_states=x_t.to(self.device, self.dtype), encoder_hidden_states=embeds.to(self.device, self.dtype),
            timestep=t.to(self.device), image_rotary_emb=self._rotary(x_t.shape[1:]), ofs=ofs,
            return_dict=False)[0]
        return out.float()

    def guided(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
               scale: float) -> Guided:
        """Two-pass classifier-free guidance in one batched forward, as ``CogVideoXPipeline`` does."""
        b = x_t.size(0)
        pred = self.predict(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([uncond, cond]))
        v_u, v_c = pred[:b], pred[b:]
        return Guided(v_u + scale * (v_c - v_u), {"uncond": v_u, "cond": v_c})

    @contextlib.contextmanager
    def capture_attention(self, token_masks: torch.Tensor, modules: Optional[Sequence[str]] = None,
                          latent_shape=None):
        """Record video->concept attention of the next forward (see :class:`_CaptureProcessor`) in the
        attention modules named ``modules`` (default: every block's ``attn1``).

        Yields ``{module: [rows, frames, tokens_per_frame]}`` filled by the next forward.
        """
        store: dict = {}
        names = list(modules) if modules is not None else [
            f"transformer_blocks.{i}.attn1" for i in range(len(self.transformer.transformer_blocks))]
        saved = {}
        chunk = 1024
        try:
            for name in names:
                attn = self.transformer.get_submodule(name)
                saved[name] = (attn, attn.processor)
                attn.processor = _CaptureProcessor(attn.processor, store, name, token_masks.to(self.device), chunk)
            yield store
        finally:
            for attn, proc in saved.values():
                attn.processor = proc
        if latent_shape is not None:
            frames, per_frame = self.token_grid(latent_shape)
            for name in list(store):
                store[name] = store[name].reshape(store[name].size(0), frames, per_frame)

    # -- decoding (generation and evaluation only; training never loads the VAE) ----------
    @torch.no_grad()
    def decode(self, latents: torch.Tensor, num_frames: Optional[int] = None) -> torch.Tensor:
        """Latents ``[B, F, C, h, w]`` -> video ``[B, frames, 3, H, W]`` in [0, 1] (CogVideoX VAE).

        CogVideoX 1.5 (``patch_size_t``): the latent frames :meth:`latent_shape` padded on are dropped first, as
        ``CogVideoXPipeline`` drops them (``latents[:, additional_frames:]``: the FIRST ones), so the video has
        the frames the pipeline returns for the same request. The padding is the one :meth:`latent_shape`
        remembered for this latent frame count (the latest request giving it), or, with ``num_frames`` (the
        requested pixel frames), the difference to ``(num_frames - 1) // r + 1`` (``r`` the VAE's temporal
        compression). Latents of a count no :meth:`latent_shape` gave are decoded whole.
        """
        if num_frames is not None:
            pad = latents.size(1) - ((num_frames - 1) // self.vae_scale_temporal + 1)
            if pad < 0:
                raise T2VUError(f"decode: {latents.size(1)} latent frames cannot make {num_frames} frames")
        else:
            pad = self._frame_padding.get(latents.size(1), 0)
        latents = latents[:, pad:]
        if getattr(self, "_vae", None) is None:
            from diffusers import AutoencoderKLCogVideoX

            self._vae = AutoencoderKLCogVideoX.from_pretrained(self.path, subfolder="vae", torch_dtype=self.dtype)
            self._vae.requires_grad_(False).eval()
        with decoding(self._vae, [self.transformer], self.device, self.options) as vae:
            x = latents.to(self.device, self.dtype).permute(0, 2, 1, 3, 4) / vae.config.scaling_factor
            frames = vae.decode(x).sample  # [B, 3, frames, H, W] in [-1, 1]
        return ((frames.float() + 1) / 2).clamp(0, 1).permute(0, 2, 1, 3, 4)
