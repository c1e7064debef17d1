"""Generic classifier-free-guidance sampling through the backbone API.

Used by ``t2vu generate`` and ``t2vu eval``: the same noise (from a seed) is
sampled with and without the eraser, so the two videos differ only by it.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch


def initial_noise(shape: Sequence[int], seed: int) -> torch.Tensor:
    """Seeded noise on the CPU (the same on every device)."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(seed)))


@torch.no_grad()
def sample_latents(backbone, cond: torch.Tensor, uncond: torch.Tensor, noise: torch.Tensor,
                   steps: int, guidance: float) -> torch.Tensor:
    """DDIM with CFG from ``noise`` ``[B, *latent]``; ``cond``/``uncond`` ``[B, text_len, D]``."""
    x = noise.to(backbone.device)
    b = x.size(0)
    timesteps = backbone.sampler_timesteps(steps)
    for i, t in enumerate(timesteps):
        tt = t.repeat(b)
        pred = backbone.predict(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([uncond, cond]))
        v_u, v_c = pred[:b], pred[b:]
        v = v_u + guidance * (v_c - v_u)
        t_prev = timesteps[i + 1].repeat(b) if i + 1 < len(timesteps) else None
        x = backbone.sampler_step(v, tt, t_prev, x)
    return x


@torch.no_grad()
def generate(backbone, embeddings: dict, prompts: Sequence[str], seeds: Sequence[int], *, num_frames: int,
             height: int, width: int, steps: int, guidance: float, disabled_erasers=None, batch_size: int = 8
             ) -> torch.Tensor:
    """Videos ``[B, F, 3, H, W]`` in [0, 1]; with ``disabled_erasers`` those erasers are switched off."""
    shape = backbone.latent_shape(num_frames, height, width)
    videos = []
    off = disabled_erasers.disabled() if disabled_erasers is not None else contextlib.nullcontext()
    with off:
        for i in range(0, len(prompts), batch_size):
            chunk, chunk_seeds = list(prompts[i:i + batch_size]), list(seeds[i:i + batch_size])
            noise = torch.stack([initial_noise(shape, s) for s in chunk_seeds])
            cond = torch.stack([embeddings[p] for p in chunk])
            uncond = torch.stack([embeddings[""]] * len(chunk))
            latents = sample_latents(backbone, cond, uncond, noise, steps, guidance)
            videos.append(backbone.decode(latents).float().cpu())
    return torch.cat(videos)


def to_uint8_frames(video: torch.Tensor, upscale: int = 1):
    """``[F, 3, H, W]`` in [0, 1] -> numpy ``[F, H*k, W*k, 3]`` uint8 (nearest upscaling)."""
    v = (video.clamp(0, 1) * 255).round().to(torch.uint8)
    if upscale > 1:
        v = v.repeat_interleave(upscale, dim=-1).repeat_interleave(upscale, dim=-2)
    return v.permute(0, 2, 3, 1).numpy()


def write_video(path, video: torch.Tensor, fps: int = 8, upscale: Optional[int] = None) -> None:
    """mp4 (imageio-ffmpeg) or gif, from ``[F, 3, H, W]`` in [0, 1]."""
    import imageio.v3 as iio

    k = upscale or max(1, 256 // max(video.shape[-2:]))
    frames = to_uint8_frames(video, k)
    if str(path).endswith(".gif"):
        iio.imwrite(path, frames, duration=int(1000 / fps), loop=0)
    else:
        _write_mp4(path, frames, fps)


def _write_mp4(path, frames, fps: int) -> None:
    import imageio_ffmpeg

    h, w = frames.shape[1:3]
    writer = imageio_ffmpeg.write_frames(str(path), (w, h), fps=fps, codec="libx264", pix_fmt_out="yuv420p",
                                         macro_block_size=16, quality=8)
    writer.send(None)
    for frame in frames:
        writer.send(frame.tobytes() if frame.flags.c_contiguous else frame.copy().tobytes())
    writer.close()


def side_by_side(left: torch.Tensor, right: torch.Tensor, gap: int = 1) -> torch.Tensor:
    """Two ``[F, 3, H, W]`` videos next to each other with a white gap."""
    bar = torch.ones(left.shape[0], 3, left.shape[2], gap)
    return torch.cat([left, bar, right], dim=-1)
