"""Training states ``x_t``: where the (noisy latent, timestep) pairs come from.

``noise``: noised random latents (cheap, off the model's distribution).
``trajectory``: the frozen model's own guided sampler (:func:`t2vu.core.sampling.run_sampler`) run from
target prompts; the frozen predictions the sampler computed at each state (two-pass CFG: unconditional and
conditional; see :class:`t2vu.core.protocols.Guided`) are kept and reused as teacher values.
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
                 embed: Callable[[list[str]], object], *, erased: bool, refresh_every: int,
                 sample_steps: int, guidance_scale: float, rng: random.Random):
        self.backbone, self.erasers, self.shape = backbone, erasers, latent_shape
        self.gen, self.device, self.embed = generator, device, embed
        self.erased, self.refresh_every = erased, refresh_every
        self.sample_steps, self.guidance_scale, self.rng = sample_steps, guidance_scale, rng
        self.pool: list[tuple] = []  # (x_t, t, prompt, {role: frozen prediction}), one per state
        self.sampler_calls = 0

    @torch.no_grad()
    def _refresh(self, prompts: list[str]) -> None:
        from t2vu.core.sampling import run_sampler

        b = len(prompts)
        x = torch.randn((b, *self.shape), generator=self.gen)
        # stop at a random depth: states beyond it are never used before the next refresh
        depth = self.rng.randint(1, self.sample_steps)
        pool = []

        def visit(t, x_t, guided):
            self.sampler_calls += 1
            for j in range(b):
                pool.append((x_t[j], t, prompts[j], {role: v[j] for role, v in guided.frozen.items()}))

        with self.erasers.disabled() if not self.erased else contextlib.nullcontext():
            run_sampler(self.backbone, x, self.embed(prompts), self.embed([""] * b), steps=self.sample_steps,
                        guidance=self.guidance_scale, depth=depth, visit=visit)
        self.pool = pool

    def state_dict(self) -> dict:
        """The pool (a resumed run continues with the same states) and the sampler-call count."""
        if not self.pool:
            return {"calls": self.sampler_calls}
        roles = sorted(set.intersection(*(set(entry[3]) for entry in self.pool)))
        return {"calls": self.sampler_calls, "x_t": torch.stack([e[0] for e in self.pool]),
                "t": torch.stack([torch.as_tensor(e[1]) for e in self.pool]), "prompts": [e[2] for e in self.pool],
                "frozen": {role: torch.stack([e[3][role] for e in self.pool]) for role in roles}}

    def load_state_dict(self, state: dict, device) -> None:
        self.sampler_calls = state["calls"]
        if "x_t" not in state:
            self.pool = []
            return
        frozen = {role: v.to(device) for role, v in state["frozen"].items()}
        self.pool = [(x.to(device), t.to(device), p, {role: v[i] for role, v in frozen.items()})
                     for i, (x, t, p) in enumerate(zip(state["x_t"], state["t"], state["prompts"]))]

    def next(self, step: int, prompts: list[str]) -> States:
        if not self.pool or step % self.refresh_every == 0:
            self._refresh(prompts)
        picks = [self.rng.randrange(len(self.pool)) for _ in prompts]
        x_t = torch.stack([self.pool[i][0] for i in picks])
        t = torch.stack([torch.as_tensor(self.pool[i][1]) for i in picks]).to(self.device)
        chosen = [self.pool[i][2] for i in picks]
        teacher = {}
        if not self.erased:  # the sampler ran the frozen model: the predictions it made are teacher values
            roles = set.intersection(*(set(self.pool[i][3]) for i in picks))
            teacher = {role: torch.stack([self.pool[i][3][role] for i in picks]) for role in sorted(roles)}
        return States(x_t, t, chosen, teacher)


def make_states(kind: str, backbone, erasers, latent_shape, generator, device, embed, training,
                rng: random.Random):
    if kind == "noise":
        return NoiseStates(backbone, latent_shape, generator, device)
    return TrajectoryStates(backbone, erasers, latent_shape, generator, device, embed,
                            erased=(kind == "erased_trajectory"), refresh_every=training.refresh_every,
                            sample_steps=training.sample_steps, guidance_scale=training.guidance_scale, rng=rng)
