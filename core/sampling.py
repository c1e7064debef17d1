"""Sampling through the backbone contract, and writing videos.

``t2vu generate`` and ``t2vu eval`` sample the same noise (from a seed) with and
without the eraser, so the two videos differ only by it; training states come
from the same :func:`run_sampler`.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence

import torch


def initial_noise(shape: Sequence[int], seed: int, generator: Optional[torch.Generator] = None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Seeded noise on the CPU (the same on every device) in ``dtype``; drawn from ``generator`` when given (it then
    goes on to feed a stochastic sampler, as a diffusers pipeline's ``generator`` does)."""
    gen = generator if generator is not None else torch.Generator().manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=gen, dtype=dtype)


def latent_dtype(backbone) -> torch.dtype:
    """The dtype the backbone's pipeline keeps latents in between steps (``Backbone.latent_dtype``; default fp32)."""
    return getattr(backbone, "latent_dtype", torch.float32)


@torch.no_grad()
def run_sampler(backbone, noise: torch.Tensor, cond, uncond, *, steps: int, guidance: float,
                depth: Optional[int] = None, visit: Optional[Callable] = None, generator=None,
                early: Optional[tuple] = None) -> torch.Tensor:
    """The one trajectory generator (``generate``, ``eval`` and training states all sample through it).

    From ``noise`` ``[B, *latent]``, step the backbone's own sampler (:meth:`Backbone.sampler`) with its guided
    prediction (:meth:`Backbone.guided`: two-pass CFG or embedded guidance, the backbone decides) under the
    batched conditions ``cond`` / ``uncond``, at the sampler's guidance scale for each step
    (:meth:`Sampler.guidance_scale`). ``visit(t, x, guided)`` sees every state before its step; ``depth`` stops
    after that many steps; ``generator`` (one, or one per row) is what drew ``noise`` and feeds a stochastic
    sampler's step noise; ``early`` ``(condition, n)``: the first ``n`` steps condition on that instead of ``cond``
    (SAFREE's filtered prompt). Returns the latents where it stopped (clean ones after the last step).
    """
    dtype = latent_dtype(backbone)
    x = noise.to(backbone.device, dtype)
    sampler = backbone.sampler(steps, generator=generator)
    b = x.size(0)
    for i, t in enumerate(sampler.timesteps):
        if depth is not None and i >= depth:
            break
        now = early[0] if early is not None and i < early[1] else cond
        out = backbone.guided(x, t.repeat(b), now, uncond, sampler.guidance_scale(guidance, t))
        if visit is not None:
            visit(t, x, out)
        x = sampler.step(out.prediction, t, x).to(dtype)
    return x


@torch.no_grad()
def generate(backbone, embeddings: dict, prompts: Sequence[str], seeds: Sequence[int], *, num_frames: int,
             height: int, width: int, steps: int, guidance: float, disabled_erasers=None, batch_size: int = 8,
             negative: Optional[str] = None, early: Optional[tuple[dict, int]] = None) -> torch.Tensor:
    """Videos ``[B, F, 3, H, W]`` in [0, 1]; with ``disabled_erasers`` (an eraser set or handle, or a list of them:
    anything with ``disabled()``) those erasers are switched off.

    Each video's noise (and a stochastic sampler's step noise) comes from ``torch.Generator().manual_seed(seed)``
    on the CPU, so a diffusers pipeline given that generator and the same settings makes the same video.

    ``embeddings`` maps each prompt (and ``""``) to its condition (:meth:`Backbone.encode_prompts`); ``negative``
    (one of them) is the negative branch of a two-pass guidance instead of ``""`` (negative prompting); ``early``
    ``(conditions, n)``: each prompt's condition in ``conditions`` for the first ``n`` sampler steps.
    """
    shape = backbone.latent_shape(num_frames, height, width)
    videos = []
    if disabled_erasers is None:
        disabled_erasers = []
    elif hasattr(disabled_erasers, "disabled"):
        disabled_erasers = [disabled_erasers]
    with contextlib.ExitStack() as off:
        for erasers in disabled_erasers:
            off.enter_context(erasers.disabled())
        for i in range(0, len(prompts), batch_size):
            chunk, chunk_seeds = list(prompts[i:i + batch_size]), list(seeds[i:i + batch_size])
            generators = [torch.Generator().manual_seed(int(s)) for s in chunk_seeds]
            noise = torch.stack([initial_noise(shape, s, g, latent_dtype(backbone))
                                 for s, g in zip(chunk_seeds, generators)])
            cond = backbone.collate([embeddings[p] for p in chunk])
            uncond = backbone.collate([embeddings[negative if negative is not None else ""]] * len(chunk))
            first = (backbone.collate([early[0][p] for p in chunk]), early[1]) if early is not None else None
            latents = run_sampler(backbone, noise, cond, uncond, steps=steps, guidance=guidance,
                                  generator=generators, early=first)
            videos.append(backbone.decode(latents).float().cpu())
    return torch.cat(videos)


def to_uint8_frames(video: torch.Tensor, upscale: int = 1):
    """``[F, 3, H, W]`` in [0, 1] -> numpy ``[F, H*k, W*k, 3]`` uint8 (nearest upscaling)."""
    v = (video.clamp(0, 1) * 255).round().to(torch.uint8)
    if upscale > 1:
        v = v.repeat_interleave(upscale, dim=-1).repeat_interleave(upscale, dim=-2)
    return v.permute(0, 2, 3, 1).numpy()


def write_video(path, video: torch.Tensor, fps: int = 8, upscale: int = 1) -> None:
    """mp4 (diffusers' ``export_to_video``) or gif, from ``[F, 3, H, W]`` in [0, 1]; ``upscale`` enlarges
    each pixel (the backbone's ``defaults.upscale``: tiny pixel-space models)."""
    frames = to_uint8_frames(video, upscale)
    if str(path).endswith(".gif"):
        import imageio.v3 as iio

        iio.imwrite(path, frames, duration=int(1000 / fps), loop=0)
    else:
        from diffusers.utils import export_to_video

        export_to_video(list(frames), str(path), fps=fps)


def side_by_side(left: torch.Tensor, right: torch.Tensor, gap: int = 1) -> torch.Tensor:
    """Two ``[F, 3, H, W]`` videos next to each other with a white gap."""
    bar = torch.ones(left.shape[0], 3, left.shape[2], gap)
    return torch.cat([left, bar, right], dim=-1)
