"""Implementations: imported only when a run builds them.

``Backbone`` is a tiny pure-torch text-to-video model written from the backbone contract
(:mod:`t2vu.core.protocols`) alone: latents ``[F, C, H, W]`` (pixel space: the "VAE" is the identity),
patchified into frame-major video tokens; a whitespace-word "text encoder" (a fixed random table);
``N`` blocks, each a joint attention ``blocks.<i>.attn`` over ``[text, video]`` that returns
``(video_out, text_out)``, then an MLP; v-prediction with diffusers' ``DDIMScheduler``; two-pass CFG.
"""

from __future__ import annotations

import contextlib
import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from t2vu.core.errors import T2VUError
from t2vu.core.protocols import Guided
from t2vu.plugins.adapter_model import Site

CONFIG = {"_class_name": "ExampleTransformer", "in_channels": 4, "patch_size": 2, "dim": 32, "heads": 2,
          "layers": 2, "mlp_ratio": 2, "text_length": 8, "vocab_size": 128}
SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
             "beta_end": 0.012, "prediction_type": "v_prediction", "clip_sample": False,
             "set_alpha_to_one": True, "timestep_spacing": "trailing", "rescale_betas_zero_snr": True}
FILES = ("config.json", "model.safetensors", "scheduler_config.json")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _sincos(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """``[n]`` positions (or timesteps) -> ``[n, dim]`` sinusoidal features (fp32)."""
    freqs = torch.exp(-math.log(10000.0) * torch.arange(dim // 2, device=positions.device) / (dim // 2))
    angles = positions.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


# -- the transformer --------------------------------------------------------------------------------
class ExampleAttention(nn.Module):
    """Joint attention over ``[text, video]``: ``forward(hidden_states, encoder_hidden_states, text_mask)``
    -> ``(video_out, text_out)``; padding text (``text_mask`` False) is never attended to."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.to_out = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)  # [b, heads, n, head_dim]

    def qk(self, hidden_states, encoder_hidden_states):
        x = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        return x, self._split(self.to_q(x)), self._split(self.to_k(x))

    @staticmethod
    def key_mask(text_mask: torch.Tensor, n_video: int) -> torch.Tensor:
        """Bool ``[b, 1, 1, n_text + n_video]``: the keys a query may attend to."""
        video = text_mask.new_ones(text_mask.size(0), n_video)
        return torch.cat([text_mask.bool(), video.bool()], dim=1)[:, None, None, :]

    def forward(self, hidden_states, encoder_hidden_states, text_mask):
        n_text = encoder_hidden_states.size(1)
        x, q, k = self.qk(hidden_states, encoder_hidden_states)
        keep = self.key_mask(text_mask, hidden_states.size(1))
        out = F.scaled_dot_product_attention(q, k, self._split(self.to_v(x)), attn_mask=keep)
        out = self.to_out(out.transpose(1, 2).reshape(x.shape))
        return out[:, n_text:], out[:, :n_text]


class ExampleBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1, self.norm1_text, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = ExampleAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * mlp_ratio), nn.GELU(), nn.Linear(dim * mlp_ratio, dim))

    def forward(self, video, text, text_mask):
        v, t = self.attn(hidden_states=self.norm1(video), encoder_hidden_states=self.norm1_text(text),
                         text_mask=text_mask)
        video, text = video + v, text + t
        return video + self.mlp(self.norm2(video)), text


class ExampleTransformer(nn.Module):
    """``forward(hidden_states [B, F, C, H, W], encoder_hidden_states [B, L, dim], timestep [B], text_mask [B, L])``
    -> v ``[B, F, C, H, W]``. Video tokens are frame-major: ``F * (H/p) * (W/p)`` of them."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = dict(config)
        c, p, d = config["in_channels"], config["patch_size"], config["dim"]
        self.patch_embed = nn.Linear(c * p * p, d)
        self.time_embed = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.blocks = nn.ModuleList(ExampleBlock(d, config["heads"], config["mlp_ratio"])
                                    for _ in range(config["layers"]))
        self.norm_out = nn.LayerNorm(d)
        self.proj_out = nn.Linear(d, c * p * p)
        self.gradient_checkpointing = False
        self.grid: tuple[int, int] = (0, 0)  # (frames, tokens per frame) of the last forward

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32) -> "ExampleTransformer":
        from safetensors.torch import load_file

        path = Path(path)
        model = cls(json.loads((path / "config.json").read_text()))
        weights = load_file(path / "model.safetensors")
        model.load_state_dict({k[len("transformer."):]: v for k, v in weights.items() if k.startswith("transformer.")})
        return model.to(dtype)

    def forward(self, hidden_states, encoder_hidden_states, timestep, text_mask):
        b, f, c, h, w = hidden_states.shape
        p = self.config["patch_size"]
        x = hidden_states.reshape(b, f, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4, 6)
        x = self.patch_embed(x.reshape(b, f * (h // p) * (w // p), c * p * p))
        self.grid = (f, (h // p) * (w // p))
        dim = x.size(-1)
        pos = _sincos(torch.arange(x.size(1), device=x.device), dim).to(x.dtype)
        temb = self.time_embed(_sincos(timestep.reshape(-1), dim).to(x.dtype))
        video, text = x + pos + temb[:, None], encoder_hidden_states
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                video, text = torch.utils.checkpoint.checkpoint(block, video, text, text_mask, use_reentrant=False)
            else:
                video, text = block(video, text, text_mask)
        out = self.proj_out(self.norm_out(video)).reshape(b, f, h // p, w // p, c, p, p)
        return out.permute(0, 1, 4, 2, 5, 3, 6).reshape(b, f, c, h, w)


def transformer_sites(transformer: nn.Module) -> list[Site]:
    """Per block: ``blocks.<i>.attn`` (its video output) and ``blocks.<i>.attn.text`` (the text it reads)."""
    sites = []
    for i, block in enumerate(transformer.blocks):
        attn, name = block.attn, f"blocks.{i}.attn"
        sites.append(Site(name=name, module=attn, dim=attn.to_out.out_features, attention=name))
        sites.append(Site(name=f"{name}.text", module=attn, dim=attn.to_k.in_features, attention=name,
                          stream="text"))
    return sites


def save_example_model(path, seed: int = 0, **config) -> Path:
    """Write a randomly initialised example model folder (``config`` overrides :data:`CONFIG`)."""
    from diffusers import DDIMScheduler
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = {**CONFIG, **config}
    torch.manual_seed(seed)
    model = ExampleTransformer(cfg)
    table = torch.randn(cfg["vocab_size"], cfg["dim"], generator=torch.Generator().manual_seed(seed + 1))
    tensors = {f"transformer.{k}": v.contiguous() for k, v in model.state_dict().items()}
    save_file({**tensors, "text_encoder.weight": table}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    DDIMScheduler(**SCHEDULER).save_config(path)
    return path


# -- the backbone ------------------------------------------------------------------------------------
@dataclass
class Condition:
    """One prompt's condition (``embeds [L, dim]``, ``mask [L]``) or a batch of them (``[B, L, dim]``, ``[B, L]``)."""

    embeds: torch.Tensor
    mask: torch.Tensor


def _words(text: str) -> list[str]:
    return [w.strip(".,;:!?\"'()").lower() for w in text.split() if w.strip(".,;:!?\"'()")]


class _Sampler:
    """One DDIM (eta 0) trajectory: a fresh scheduler and its own ``step``."""

    def __init__(self, config, num_steps: int, device):
        from diffusers import DDIMScheduler

        self.scheduler = DDIMScheduler.from_config(config)
        self.scheduler.set_timesteps(num_steps, device=device)
        self.timesteps = self.scheduler.timesteps

    def step(self, prediction, t, x):
        return self.scheduler.step(prediction, int(t), x, return_dict=False)[0]

    def guidance_scale(self, scale: float, t) -> float:
        return scale  # the pipeline guides at one scale throughout


class Backbone:
    """The example text-to-video backbone (v-prediction, text first in a joint sequence, two-pass CFG)."""

    name = "example_backbone"
    transformer_sites = staticmethod(transformer_sites)
    upstream = None  # no upstream T2VUnlearning release for this model
    negative_prompting = True  # two-pass CFG: guided()'s uncond is the negative branch

    def __init__(self, options):
        self.options = options
        self.path = Path(options.model_path)
        if not self.path.is_dir():
            raise T2VUError(f"backbone.model_path: {self.path} is not a folder; write one with "
                            "t2vu_example.heavy.save_example_model(path)")
        missing = [f for f in FILES if not (self.path / f).is_file()]
        if missing:
            raise T2VUError(f"backbone.model_path: {self.path} is not an example model (missing {', '.join(missing)})")
        self.config = json.loads((self.path / "config.json").read_text())
        if self.config.get("_class_name") != "ExampleTransformer":
            raise T2VUError(f"backbone.model_path: {self.path} holds a {self.config.get('_class_name')!r}, "
                            "not an ExampleTransformer")
        self.dtype = _DTYPES[options.dtype]
        self.transformer: Optional[ExampleTransformer] = None
        self.scheduler = None
        self.device = torch.device("cpu")
        self.forward_calls = 0

    # -- loading --------------------------------------------------------------------------------------
    def load(self, device=None) -> None:
        from diffusers import DDIMScheduler

        self.device = torch.device(device or "cpu")
        self.transformer = ExampleTransformer.from_pretrained(self.path, self.dtype)
        self.transformer.requires_grad_(False).eval().to(self.device)
        self.config = dict(self.transformer.config)
        self.scheduler = DDIMScheduler.from_config(DDIMScheduler.load_config(self.path))

    def enable_gradient_checkpointing(self) -> None:
        """Real ``torch.utils.checkpoint`` (non-reentrant) around each block, in grad-enabled forwards only."""
        self.transformer.gradient_checkpointing = True

    def sites(self) -> list[Site]:
        return transformer_sites(self.transformer)

    # -- conditioning ---------------------------------------------------------------------------------
    def _ids(self, prompt: str) -> list[int]:
        """Word ids (a stable hash of each word; 0 is never used), truncated to ``text_length``."""
        vocab = self.config["vocab_size"]
        return [1 + zlib.crc32(w.encode()) % (vocab - 1) for w in _words(prompt)][: self.config["text_length"]]

    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, Condition]:
        from safetensors import safe_open

        with safe_open(str(self.path / "model.safetensors"), framework="pt") as fh:
            table = fh.get_tensor("text_encoder.weight")  # the "text encoder": freed when this returns
        length, dim = self.config["text_length"], self.config["dim"]
        out = {}
        for prompt in dict.fromkeys(prompts):
            ids = self._ids(prompt)
            embeds = torch.zeros(length, dim)
            if ids:
                embeds[: len(ids)] = table[ids] + _sincos(torch.arange(len(ids)), dim)
            mask = torch.arange(length) < len(ids)
            out[prompt] = Condition(embeds.to(self.device, self.dtype), mask.to(self.device))
        return out

    def collate(self, conditions: Sequence[Condition]) -> Condition:
        return Condition(torch.stack([c.embeds for c in conditions]), torch.stack([c.mask for c in conditions]))

    def concept_token_mask(self, prompt: str, concept: str) -> torch.Tensor:
        """The words of ``prompt`` that spell ``concept`` (whole words, any case); a prompt without it (a
        paraphrase) uses all its words."""
        words, needle = _words(prompt)[: self.config["text_length"]], _words(concept)
        mask = torch.zeros(self.config["text_length"], dtype=torch.bool)
        for i in range(len(words) - len(needle) + 1 if needle else 0):
            if words[i:i + len(needle)] == needle:
                mask[i:i + len(needle)] = True
        if not mask.any():
            mask[: len(words)] = True
        return mask

    # -- latents and scheduler maths ------------------------------------------------------------------
    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        p = self.config["patch_size"]
        if height % p or width % p:
            raise T2VUError(f"training.height/width must be multiples of {p} for this model (got {height}x{width})")
        return num_frames, self.config["in_channels"], height, width

    def sample_timesteps(self, n: int, generator=None) -> torch.Tensor:
        return torch.randint(0, self.scheduler.config.num_train_timesteps, (n,), generator=generator)

    def add_noise(self, x0, noise, t):
        return self.scheduler.add_noise(x0, noise, t.to(x0.device))

    def sampler(self, num_steps: int, generator=None) -> _Sampler:
        return _Sampler(self.scheduler.config, num_steps, self.device)

    # -- the forward ----------------------------------------------------------------------------------
    def predict(self, x_t, t, cond: Condition) -> torch.Tensor:
        self.forward_calls += 1
        out = self.transformer(hidden_states=x_t.to(self.device, self.dtype),
                               encoder_hidden_states=cond.embeds.to(self.device, self.dtype),
                               timestep=t.to(self.device), text_mask=cond.mask.to(self.device))
        return out.float()

    def guided(self, x_t, t, cond: Condition, uncond: Condition, scale: float) -> Guided:
        """Two-pass classifier-free guidance in one batched forward."""
        b = x_t.size(0)
        both = Condition(torch.cat([uncond.embeds, cond.embeds]), torch.cat([uncond.mask, cond.mask]))
        pred = self.predict(torch.cat([x_t, x_t]), torch.cat([t, t]), both)
        v_u, v_c = pred[:b], pred[b:]
        return Guided(v_u + scale * (v_c - v_u), {"uncond": v_u, "cond": v_c})

    # -- attention ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def capture_attention(self, token_masks, modules: Optional[Sequence[str]] = None, latent_shape=None):
        """Forward hooks that recompute q/k (no grad) and store, per module, the softmax mass each video
        query puts on the masked text tokens, mean over heads: ``[rows, frames, tokens_per_frame]``."""
        store: dict = {}
        names = list(modules) if modules is not None else [s.attention for s in self.sites() if s.stream == "video"]
        masks = token_masks.to(self.device).bool()
        rows = masks.any(dim=1).nonzero().flatten()

        def hook_for(name):
            def hook(attn, _args, kwargs, _output):
                if not len(rows):
                    return None
                with torch.no_grad():
                    video, text = kwargs["hidden_states"][rows], kwargs["encoder_hidden_states"][rows]
                    n_text = text.size(1)
                    _, q, k = attn.qk(video, text)
                    scores = (q[:, :, n_text:] @ k.transpose(-1, -2)).float() / math.sqrt(q.size(-1))
                    keep = attn.key_mask(kwargs["text_mask"][rows], video.size(1))
                    probs = scores.masked_fill(~keep, float("-inf")).softmax(-1)[..., :n_text]
                    mass = (probs * masks[rows][:, None, None, :].float()).sum(-1).mean(1)  # [rows, n_video]
                    frames, per_frame = (self.transformer.grid if latent_shape is None else
                                         (latent_shape[0], (latent_shape[2] // self.config["patch_size"])
                                          * (latent_shape[3] // self.config["patch_size"])))
                    store[name] = mass.reshape(len(rows), frames, per_frame)
                return None

            return hook

        handles = []
        try:
            for name in names:
                try:
                    module = self.transformer.get_submodule(name)
                except AttributeError:
                    raise T2VUError(f"capture_attention: no attention module {name!r} in this model") from None
                handles.append(module.register_forward_hook(hook_for(name), with_kwargs=True))
            yield store
        finally:
            for handle in handles:
                handle.remove()

    # -- decoding -------------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents) -> torch.Tensor:
        """Pixel-space latents ``[B, F, C, H, W]``: the first 3 channels from [-1, 1] to [0, 1]."""
        x = latents.float()
        x = x[:, :, :3] if x.size(2) >= 3 else x[:, :, :1].expand(-1, -1, 3, -1, -1)
        return ((x + 1) / 2).clamp(0, 1)


class Eraser:
    def __init__(self, options):
        self.options = options


class L1Loss:
    def __init__(self, options):
        self.options = options


class Judge:
    """Judges a video [F, 3, H, W] in [0, 1] 'bright' or 'dark' by its mean value."""

    attribute = "brightness"
    labels = ("bright", "dark")

    def __init__(self, options):
        self.options = options

    def __call__(self, video):
        return "bright" if float(video.mean()) > self.options.threshold else "dark"
