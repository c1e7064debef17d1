"""Training states ``x_t``: where the (noisy latent, timestep) pairs come from.

``noise``: noised random latents (cheap, off the model's distribution).
``trajectory``: the frozen model's own CFG sampler run from target prompts;
the unconditional and conditional predictions the sampler computed at each
state are kept and reused as teacher values instead of being recomputed.
``erased_trajectory``: the same sampler with erasers on (ESD), refreshed every
``refresh_every`` steps; its predictions are not the frozen model's, so the
teacher is recomputed.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class States:
    x_t: torch.Tensor  # [B, *latent]
    t: torch.Tensor  # [B]
    prompts: list[str]  # the target prompt each state was sampled from
    teacher: dict[str, torch.Tensor] = field(default_factory=dict)  # "uncond" / "cond" -> [B, *latent]


class NoiseStates:
    def __init__(self, backbone, latent_shape, generator: torch.Generator, device):
        self.backbone, self.shape, self.gen, self.device = backbone, latent_shape, generator, device

    def next(self, step: int, prompts: list[str]) -> States:
        b = len(prompts)
        x0 = torch.randn((b, *self.shape), generator=self.gen)
        noise = torch.randn((b, *self.shape), generator=self.gen)
        t = self.backbone.sample_timesteps(b, self.gen)
        x_t = self.backbone.add_noise(x0, noise, t)
        return States(x_t.to(self.device), t.to(self.device), list(prompts))


class TrajectoryStates:
    """States along sampler trajectories of target prompts, refreshed every ``refresh_every`` steps."""

    def __init__(self, backbone, erasers, latent_shape, generator: torch.Generator, device,
                 embed: Callable[[list[str]], torch.Tensor], *, erased: bool, refresh_every: int,
                 sample_steps: int, guidance_scale: float, rng: random.Random):
        self.backbone, self.erasers, self.shape = backbone, erasers, latent_shape
        self.gen, self.device, self.embed = generator, device, embed
        self.erased, self.refresh_every = erased, refresh_every
        self.sample_steps, self.guidance_scale, self.rng = sample_steps, guidance_scale, rng
        self.pool: list[tuple] = []  # (x_t, t, prompt, v_uncond, v_cond), one per state
        self.sampler_calls = 0

    @torch.no_grad()
    def _refresh(self, prompts: list[str]) -> None:
        b = len(prompts)
        x = torch.randn((b, *self.shape), generator=self.gen).to(self.device)
        timesteps = self.backbone.sampler_timesteps(self.sample_steps)
        # stop at a random depth: states beyond it are never used before the next refresh
        depth = self.rng.randint(1, len(timesteps))
        uncond = self.embed([""] * b)
        cond = self.embed(prompts)
        pool = []
        ctx = self.erasers.disabled() if not self.erased else contextlib.nullcontext()
        with ctx:
            for i, t in enumerate(timesteps[:depth]):
                tt = t.repeat(b)
                pred = self.backbone.predict(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([uncond, cond]))
                self.sampler_calls += 1
                v_u, v_c = pred[:b], pred[b:]
                for j in range(b):
                    pool.append((x[j], t, prompts[j], v_u[j], v_c[j]))
                v = v_u + self.guidance_scale * (v_c - v_u)
                t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else None
                x = self.backbone.sampler_step(v, tt, None if t_prev is None else t_prev.repeat(b), x)
        self.pool = pool

    def next(self, step: int, prompts: list[str]) -> States:
        if not self.pool or step % self.refresh_every == 0:
            self._refresh(prompts)
        picks = [self.rng.randrange(len(self.pool)) for _ in prompts]
        x_t = torch.stack([self.pool[i][0] for i in picks])
        t = torch.stack([self.pool[i][1] for i in picks]).to(self.device)
        chosen = [self.pool[i][2] for i in picks]
        teacher = {}
        if not self.erased:  # the sampler ran the frozen model: its CFG pass is the teacher
            teacher = {"uncond": torch.stack([self.pool[i][3] for i in picks]),
                       "cond": torch.stack([self.pool[i][4] for i in picks])}
        return States(x_t, t, chosen, teacher)


def make_states(kind: str, backbone, erasers, latent_shape, generator, device, embed, training,
                rng: random.Random):
    if kind == "noise":
        return NoiseStates(backbone, latent_shape, generator, device)
    return TrajectoryStates(backbone, erasers, latent_shape, generator, device, embed,
                            erased=(kind == "erased_trajectory"), refresh_every=training.refresh_every,
                            sample_steps=training.sample_steps, guidance_scale=training.guidance_scale, rng=rng)
