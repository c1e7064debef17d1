"""Training states ``x_t``: where the (noisy latent, timestep) pairs come from.

``noise``: noised random latents (cheap, off the model's distribution).
``trajectory``: the frozen model's own guided sampler (:func:`t2vu.core.sampling.run_sampler`) run from
target prompts; the frozen predictions the sampler computed at each state (two-pass CFG: unconditional and
conditional; see :class:`t2vu.core.protocols.Guided`) are kept and reused as teacher values.
``erased_trajectory``: the same sampler with erasers on (ESD), refreshed every
``refresh_every`` steps; its predictions are not the frozen model's, so the
teacher is recomputed.
Which states of a trajectory are trained on (``training.trajectory_states``): ``visited``, any state the
sampler visited on its way to a random depth, or ``uniform_step``, the state at a uniformly drawn sampler
step (see :class:`TrajectoryStates`).
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
    """States along sampler trajectories of target prompts, refreshed every ``refresh_every`` steps.

    Each refresh runs the sampler once, for the batch of prompts it is given, from fresh noise. ``pick`` decides
    which of its states the steps until the next refresh train on:

    - ``"visited"``: the sampler stops at a depth ``d`` drawn uniformly from ``1..sample_steps``; every state it
      visited (``d`` per row) enters the pool and each training state is drawn uniformly from the pool. The
      sampler step index ``i`` (0 = noisiest) of a drawn state then has ``P(i) = (1/S) sum_{d > i} 1/d``
      (``S = sample_steps``): skewed to the first, noisiest steps (index 0 is ``H_S`` times as likely as under
      a uniform draw, about 4.5 times for 50 steps).
    - ``"uniform_step"`` (ESD, Receler: the state at a uniformly drawn step): the refresh first draws, for every
      training state until the next scheduled refresh (``refresh_every - step % refresh_every`` steps of
      ``len(prompts)`` states), a batch row uniformly and a step index uniformly from ``0..S-1``, then runs the
      sampler to the deepest drawn index only and keeps just the drawn states, served in the order drawn. Each
      training state's step index is therefore exactly uniform, and independent of the others; the refresh
      still costs one sampler run, never deeper than ``S`` steps (shallower when few states are drawn, e.g.
      ``refresh_every: 1`` with batch 1 runs ``(S + 1) / 2`` steps on average, as ESD does).
    """

    def __init__(self, backbone, erasers, latent_shape, generator: torch.Generator, device,
                 embed: Callable[[list[str]], object], *, erased: bool, refresh_every: int,
                 sample_steps: int, guidance_scale: float, rng: random.Random, pick: str = "visited"):
        if pick not in ("visited", "uniform_step"):
            raise ValueError(f"pick must be 'visited' or 'uniform_step', not {pick!r}")
        self.backbone, self.erasers, self.shape = backbone, erasers, latent_shape
        self.gen, self.device, self.embed = generator, device, embed
        self.erased, self.refresh_every = erased, refresh_every
        self.sample_steps, self.guidance_scale, self.rng = sample_steps, guidance_scale, rng
        self.pick = pick
        self.pool: list[tuple] = []  # (x_t, t, prompt, {role: frozen prediction}), one per state
        self.queue: list[int] = []  # uniform_step: the pool entries the next training states are, in order
        self.sampler_calls = 0

    @torch.no_grad()
    def _refresh(self, prompts: list[str], step: int = 0) -> None:
        from t2vu.core.sampling import run_sampler

        b = len(prompts)
        x = torch.randn((b, *self.shape), generator=self.gen)
        wanted: dict[tuple[int, int], int] = {}  # uniform_step: (step index, row) -> its pool entry
        queue: list[int] = []
        if self.pick == "uniform_step":
            # every training state until the next scheduled refresh, drawn now: a row and a step index each
            for _ in range((self.refresh_every - step % self.refresh_every) * b):
                key = (self.rng.randrange(self.sample_steps), self.rng.randrange(b))
                queue.append(wanted.setdefault(key, len(wanted)))
            depth = 1 + max(i for i, _ in wanted)  # deeper states are not drawn
        else:
            # stop at a random depth: states beyond it are never used before the next refresh
            depth = self.rng.randint(1, self.sample_steps)
        pool: list = [None] * len(wanted)
        index = 0  # the sampler step index of the state visited next

        def visit(t, x_t, guided):
            nonlocal index
            self.sampler_calls += 1
            for j in range(b):
                if self.pick == "visited" or (index, j) in wanted:
                    entry = (x_t[j], t, prompts[j], {role: v[j] for role, v in guided.frozen.items()})
                    if self.pick == "visited":
                        pool.append(entry)
                    else:
                        pool[wanted[(index, j)]] = entry
            index += 1

        with self.erasers.disabled() if not self.erased else contextlib.nullcontext():
            run_sampler(self.backbone, x, self.embed(prompts), self.embed([""] * b), steps=self.sample_steps,
                        guidance=self.guidance_scale, depth=depth, visit=visit, generator=self.gen)
        if any(entry is None for entry in pool):
            raise RuntimeError(f"the sampler stopped after {index} steps, before the drawn step {depth - 1} "
                               f"(training.sample_steps is {self.sample_steps})")
        self.pool, self.queue = pool, queue

    def state_dict(self) -> dict:
        """The pool (a resumed run continues with the same states), the queue of states still to serve
        (``uniform_step``) and the sampler-call count."""
        pool, extra = self.pool, {}
        if self.pick == "uniform_step":  # only the entries still to serve
            kept = sorted(set(self.queue))
            pool = [self.pool[i] for i in kept]
            where = {i: k for k, i in enumerate(kept)}
            extra = {"queue": [where[i] for i in self.queue]}
        if not pool:
            return {"calls": self.sampler_calls}
        roles = sorted(set.intersection(*(set(entry[3]) for entry in pool)))
        return {"calls": self.sampler_calls, "x_t": torch.stack([e[0] for e in pool]),
                "t": torch.stack([torch.as_tensor(e[1]) for e in pool]), "prompts": [e[2] for e in pool],
                "frozen": {role: torch.stack([e[3][role] for e in pool]) for role in roles}, **extra}

    def load_state_dict(self, state: dict, device) -> None:
        self.sampler_calls = state["calls"]
        self.queue = [int(i) for i in state.get("queue", [])]
        if "x_t" not in state:
            self.pool, self.queue = [], []
            return
        frozen = {role: v.to(device) for role, v in state["frozen"].items()}
        self.pool = [(x.to(device), t.to(device), p, {role: v[i] for role, v in frozen.items()})
                     for i, (x, t, p) in enumerate(zip(state["x_t"], state["t"], state["prompts"]))]

    def next(self, step: int, prompts: list[str]) -> States:
        if self.pick == "uniform_step":
            if len(self.queue) < len(prompts) or step % self.refresh_every == 0:
                self._refresh(prompts, step)
            picks, self.queue = self.queue[:len(prompts)], self.queue[len(prompts):]
        else:
            if not self.pool or step % self.refresh_every == 0:
                self._refresh(prompts, step)
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
                            sample_steps=training.sample_steps, guidance_scale=training.guidance_scale, rng=rng,
                            pick=training.trajectory_states)
