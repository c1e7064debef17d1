"""The step context: lazy, memoised, batched predictions for the loss terms.

Loss terms ask for what they need (``needs()``) and then read it
(``ctx.frozen(cond)``, ``ctx.erased(cond)``, ...). The context runs at most
one no-grad frozen forward (erasers off) over every frozen condition still
missing, stacked into one batch, and one erased forward (with grad) over every
erased condition. A prediction two terms share is computed once, and so is one
of two conditions with the same prompts (``ANCHOR`` is ``UNCOND`` unless the
spec sets ``concept.anchor``).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

from t2vu.core.errors import T2VUError

#: condition names the engine provides
UNCOND = "uncond"  # the empty prompt
TARGET = "target"  # the unlearning condition of this step (concept text and/or target prompts)
PRESERVED = "preserved"  # a preserved concept, sampled per step
ANCHOR = "anchor"  # what the unlearning term guides away from: the empty prompt or the TARGET prompts with
# the concept replaced (concept.anchor)


@dataclass(frozen=True)
class Need:
    """What a loss term reads: ``kind`` in frozen / erased / attention / eraser_outputs."""

    kind: str
    cond: str
    modules: Optional[tuple[str, ...]] = None  # attention only: the attention modules whose maps are averaged


class StepContext:
    """Predictions at one batch of training states ``x_t`` (``[B, ...]``) at timesteps ``t`` (``[B]``)."""

    def __init__(self, backbone, erasers, x_t: torch.Tensor, t: torch.Tensor,
                 conds: dict[str, list[str]], embed: Callable[[list[str]], Any],
                 token_masks: Optional[dict[str, torch.Tensor]] = None,
                 attention_modules: Optional[Sequence[str]] = None, attention_names: Sequence[str] = ()):
        self.backbone, self.erasers = backbone, erasers
        self.x_t, self.t = x_t, t
        self.conds = conds
        first: dict[tuple, str] = {}  # a condition whose prompts equal an earlier one's is an alias of it
        self._canonical = {c: first.setdefault(tuple(ps), c) for c, ps in conds.items()}
        if ANCHOR not in conds and UNCOND in conds:
            self._canonical[ANCHOR] = self._canonical[UNCOND]
        self.embed = embed  # prompts -> the backbone's batched condition (Backbone.collate)
        self.token_masks = token_masks or {}
        self.attention_modules = list(attention_modules) if attention_modules is not None else None
        self.attention_names = list(attention_names)  # every attention module of the model's sites
        self._frozen: dict[str, torch.Tensor] = {}
        self._erased: dict[str, torch.Tensor] = {}
        self._attention: dict[str, dict[str, torch.Tensor]] = {}
        self._outputs: dict[str, dict[str, torch.Tensor]] = {}

    def _key(self, cond: str) -> str:
        """The condition whose predictions ``cond`` shares (itself unless its prompts repeat another's)."""
        return self._canonical.get(cond, cond)

    # -- what loss terms call ----------------------------------------------------
    def frozen(self, cond: str) -> torch.Tensor:
        """``v*(x_t, cond)``: the frozen model's prediction (no grad)."""
        cond = self._key(cond)
        if cond not in self._frozen:
            self.prefetch([Need("frozen", cond)])
        return self._frozen[cond]

    def erased(self, cond: str) -> torch.Tensor:
        """``v'(x_t, cond)``: the prediction with erasers on (differentiable)."""
        cond = self._key(cond)
        if cond not in self._erased:
            self.prefetch([Need("erased", cond)])
        return self._erased[cond]

    def attention(self, cond: str, modules: Optional[Iterable[str]] = None) -> torch.Tensor:
        """Frozen video->concept attention ``[B, frames, tokens_per_frame]``, averaged over the attention
        ``modules`` (names; default: the step's ``attention_modules``, those holding the video erasers, even when
        another term had more modules captured; without ``attention_modules``, every module captured)."""
        if modules is not None:
            key = self.expand(modules)
        else:
            key = tuple(self.attention_modules) if self.attention_modules is not None else None
        cond = self._key(cond)
        if cond not in self._attention or (key and not set(key) <= set(self._attention[cond])):
            self.prefetch([Need("attention", cond, key)])
        maps = self._attention[cond]
        chosen = key if key is not None else sorted(maps)
        return torch.stack([maps[m] for m in chosen]).mean(0)

    def expand(self, patterns: Iterable[str]) -> tuple[str, ...]:
        """Attention-module names matching ``patterns`` (fnmatch patterns)."""
        patterns = list(patterns)
        found = tuple(n for n in self.attention_names if any(fnmatch.fnmatchcase(n, p) for p in patterns))
        if not found:
            raise T2VUError(f"{patterns} match no attention module of this model (it has "
                            f"{', '.join(self.attention_names[:3])} ... {len(self.attention_names)} in all)")
        return found

    def eraser_outputs(self, cond: str) -> dict[str, torch.Tensor]:
        """Each eraser's output ``[B, N_video, dim]`` in the erased forward of ``cond``."""
        cond = self._key(cond)
        if cond not in self._outputs:
            self.prefetch([Need("eraser_outputs", cond)])
        return self._outputs[cond]

    def seed_frozen(self, cond: str, value: torch.Tensor) -> None:
        """Provide a frozen prediction computed elsewhere (a sampler's CFG pass)."""
        self._frozen[self._key(cond)] = value

    # -- batching -------------------------------------------------------------------
    def prefetch(self, needs: Iterable[Need]) -> None:
        """Compute everything in ``needs`` not yet memoised: one frozen and one erased forward at most."""
        default = tuple(self.attention_modules) if self.attention_modules is not None else None
        needs = [Need(n.kind, self._key(n.cond), self.expand(n.modules) if n.modules is not None else default)
                 for n in needs]
        attention_conds: dict[str, Optional[set]] = {}
        for n in needs:
            if n.kind == "attention":
                modules = attention_conds.get(n.cond, set())
                if n.modules is None or modules is None:
                    attention_conds[n.cond] = None
                else:
                    attention_conds[n.cond] = modules | set(n.modules)
        frozen = [c for c in dict.fromkeys(n.cond for n in needs if n.kind == "frozen") if c not in self._frozen]
        frozen += [c for c in attention_conds if c not in frozen]
        erased = [c for c in dict.fromkeys(n.cond for n in needs if n.kind in ("erased", "eraser_outputs"))
                  if c not in self._erased]
        record = {n.cond for n in needs if n.kind == "eraser_outputs"}
        if frozen:
            self._frozen_pass(frozen, attention_conds)
        if erased:
            self._erased_pass(erased, record)

    def _stack(self, conds: list[str]):
        """The states repeated once per condition, and the conditions batched by the backbone, in order."""
        b = self.x_t.size(0)
        x = self.x_t.repeat(len(conds), *([1] * (self.x_t.dim() - 1)))
        t = self.t.repeat(len(conds))
        cond = self.embed([p for c in conds for p in self.conds[c]])
        return b, x, t, cond

    def _frozen_pass(self, conds: list[str], attention_conds: dict[str, Optional[set]]) -> None:
        b, x, t, cond = self._stack(conds)
        capture = [c for c in conds if c in attention_conds]
        with torch.no_grad(), self.erasers.disabled():
            if capture:
                like = self.token_masks[capture[0]]
                masks = torch.cat([self.token_masks[c] if c in attention_conds else torch.zeros_like(like)
                                   for c in conds])
                modules: Optional[set] = set()
                for c in capture:
                    modules = None if (modules is None or attention_conds[c] is None) else modules | attention_conds[c]
                with self.backbone.capture_attention(masks, sorted(modules) if modules is not None else None,
                                                     latent_shape=self.x_t.shape[1:]) as store:
                    pred = self.backbone.predict(x, t, cond)
                # rows of the store follow the order of capture conds (rows whose mask has tokens)
                for j, c in enumerate(capture):
                    self._attention[c] = {m: a[j * b:(j + 1) * b] for m, a in store.items()}
            else:
                pred = self.backbone.predict(x, t, cond)
        for i, c in enumerate(conds):
            self._frozen[c] = pred[i * b:(i + 1) * b]

    def _erased_pass(self, conds: list[str], record: set[str]) -> None:
        b, x, t, cond = self._stack(conds)
        if record:
            with self.erasers.recording() as outputs:
                pred = self.backbone.predict(x, t, cond)
            for i, c in enumerate(conds):
                if c in record:
                    self._outputs[c] = {site: o[i * b:(i + 1) * b] for site, o in outputs.items()}
        else:
            pred = self.backbone.predict(x, t, cond)
        for i, c in enumerate(conds):
            self._erased[c] = pred[i * b:(i + 1) * b]
