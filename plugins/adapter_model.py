"""The adapter eraser: modules, attachment to a backbone's sites, on/off switch.

One copy of the base weights: the frozen prediction ``v*`` is the same
transformer with every eraser switched off (:meth:`EraserSet.disabled`).
"""

from __future__ import annotations

import contextlib
import fnmatch
import re
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import nn


class Adapter(nn.Module):
    """``Linear(dim -> rank) -> GELU -> Linear(rank -> dim)``, up zero-initialised.

    Input and output: ``[batch, tokens, dim]``. Parameters stay fp32; the input
    is cast up and the output back to the input's dtype.
    """

    def __init__(self, dim: int, rank: int):
        super().__init__()
        self.down = nn.Linear(dim, rank)
        self.act = nn.GELU()
        self.up = nn.Linear(rank, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        dtype = self.down.weight.dtype
        return self.up(self.act(self.down(h.to(dtype))))


@dataclass
class Site:
    """Where an eraser attaches: a module's video output ``[B, N_video, dim]`` (``stream="video"``)
    or the text tokens ``[B, N_text, dim]`` it is called with (``stream="text"``: its
    ``encoder_hidden_states``, the keys and values every video token reads the prompt through)."""

    name: str  # e.g. "transformer_blocks.3.attn1" (video) or "transformer_blocks.3.attn1.text"
    module: nn.Module
    dim: int
    attention: str  # the attention module's name: what eraser.sites patterns match, and where its
    # video->text attention is captured (localization)
    stream: str = "video"


class _SiteHooks:
    """Every eraser attached at one module, from every :class:`EraserSet`, behind one hook per stream.

    The video hook replaces the module's video output ``h`` by ``h + sum_i scale_i * eraser_i(h)`` and the text
    pre-hook does the same to the text tokens it is called with: each eraser reads the model's own activation,
    so erasers attached together compose in any order (attaching A then B equals B then A).
    """

    ATTRIBUTE = "_t2vu_site_hooks"

    def __init__(self, module: nn.Module, stream: str):
        self.entries: list[tuple["EraserSet", str]] = []
        if stream == "text":
            self.handle = module.register_forward_pre_hook(self._text_hook, with_kwargs=True)
        else:
            self.handle = module.register_forward_hook(self._video_hook)

    @classmethod
    def at(cls, module: nn.Module, stream: str) -> "_SiteHooks":
        hooks = module.__dict__.setdefault(cls.ATTRIBUTE, {})
        if stream not in hooks:
            hooks[stream] = cls(module, stream)
        return hooks[stream]

    def remove(self, module: nn.Module, stream: str, entry: tuple["EraserSet", str]) -> None:
        self.entries = [e for e in self.entries if e is not entry]
        if not self.entries:
            self.handle.remove()
            module.__dict__.get(self.ATTRIBUTE, {}).pop(stream, None)

    def _add(self, x: torch.Tensor, stream: str) -> Optional[torch.Tensor]:
        deltas = [d for d in (s._delta(name, x, stream) for s, name in self.entries) if d is not None]
        if not deltas:
            return None
        for delta in deltas:
            x = x + delta
        return x

    def _video_hook(self, _module, _inputs, output):
        h, rest = (output[0], output[1:]) if isinstance(output, tuple) else (output, ())
        new = self._add(h, "video")
        if new is None:
            return output
        return (new, *rest) if isinstance(output, tuple) else new

    def _text_hook(self, _module, args, kwargs):
        if "encoder_hidden_states" in kwargs:
            new = self._add(kwargs["encoder_hidden_states"], "text")
            return None if new is None else (args, {**kwargs, "encoder_hidden_states": new})
        new = self._add(args[1], "text")  # called positionally: (hidden_states, encoder_hidden_states, ...)
        return None if new is None else ((args[0], new, *args[2:]), kwargs)


class EraserSet(nn.Module):
    """All erasers of one backbone, attached by forward hooks.

    At a video site the module's video output ``h`` becomes ``h + scale * eraser(h)``; at a text site the text
    tokens the module is called with change the same way. Several sets may be attached to one transformer (a
    nudity and a celebrity eraser): each adds its own scaled output, computed from the module's own activation,
    so the order of attachment does not matter. While :meth:`disabled` is active a set changes nothing, so with
    every set disabled the transformer computes exactly the stock prediction.
    """

    def __init__(self, erasers: dict[str, nn.Module], eraser_type: str = "adapter",
                 options: Optional[dict] = None):
        super().__init__()
        self.site_names = list(erasers)
        # ModuleDict keys cannot contain dots.
        self.erasers = nn.ModuleDict({_key(n): m for n, m in erasers.items()})
        self.eraser_type = eraser_type
        self.options = dict(options or {})
        self.enabled = True
        self.off_streams: frozenset[str] = frozenset()  # "video" / "text": see switch_off()
        self.scale = 1.0
        self.record = False
        self.outputs: dict[str, torch.Tensor] = {}
        self._attached: list[tuple[nn.Module, str, _SiteHooks, tuple]] = []

    def eraser(self, site: str) -> nn.Module:
        return self.erasers[_key(site)]

    def attach(self, sites: list[Site]) -> "EraserSet":
        by_name = {s.name: s for s in sites}
        missing = [n for n in self.site_names if n not in by_name]
        if missing:
            raise ValueError(f"eraser sites not in this model: {', '.join(missing[:5])}")
        for name in self.site_names:
            site = by_name[name]
            stream = "text" if site.stream == "text" else "video"
            hooks = _SiteHooks.at(site.module, stream)
            entry = (self, name)
            hooks.entries.append(entry)
            self._attached.append((site.module, stream, hooks, entry))
        return self

    def detach(self) -> None:
        for module, stream, hooks, entry in self._attached:
            hooks.remove(module, stream, entry)
        self._attached.clear()

    def _delta(self, name: str, x: torch.Tensor, stream: str) -> Optional[torch.Tensor]:
        """``scale * eraser(x)`` in ``x``'s dtype (the eraser computes in fp32), or ``None`` while this set or
        ``stream`` is switched off."""
        if not self.enabled or stream in self.off_streams:
            return None
        delta = self.eraser(name)(x)
        if self.record and stream == "video":
            self.outputs[name] = delta
        return (self.scale * delta).to(x.dtype)

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Switch every eraser off: the model computes the frozen prediction."""
        previous = self.enabled
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = previous

    def switch_off(self, streams: set[str]) -> None:
        """From now on the erasers of ``streams`` ("video", "text") change nothing (and their adapters get no
        gradient) while the others act as usual; ``switch_off(set())`` switches every stream back on."""
        self.off_streams = frozenset(streams)

    @contextlib.contextmanager
    def recording(self) -> Iterator[dict[str, torch.Tensor]]:
        """Keep each video eraser's output (``[B, N_video, dim]``) of the next forward (text sites are
        not recorded: their tokens have no place in the video). The set lets go of them when the block ends: the
        caller's dict is then the only reference, so they (and their graph) are freed with it after the loss."""
        outputs: dict[str, torch.Tensor] = {}
        self.outputs = outputs
        self.record = True
        try:
            yield outputs
        finally:
            self.record = False
            self.outputs = {}

    def state_dict_by_site(self) -> dict[str, torch.Tensor]:
        """``{site}.{param}`` -> tensor, e.g. ``transformer_blocks.0.attn1.down.weight``."""
        out = {}
        for name in self.site_names:
            for pname, p in self.eraser(name).state_dict().items():
                out[f"{name}.{pname}"] = p.detach().contiguous()
        return out


    def load_state_dict_by_site(self, state: dict[str, torch.Tensor]) -> None:
        """The inverse of :meth:`state_dict_by_site` (every tensor must be there, nothing else)."""
        for name in self.site_names:
            prefix = f"{name}."
            self.eraser(name).load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})


def _key(site: str) -> str:
    return site.replace(".", "__")


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def expand_site_patterns(wanted: list[str], presets: dict[str, list[str]]) -> list[str]:
    """``eraser.sites`` entries -> fnmatch patterns over attention-module names: a preset name stands for
    its patterns, anything else is a pattern itself (``single_transformer_blocks.*.attn``)."""
    out: list[str] = []
    for item in wanted:
        out += presets.get(item, [item])
    return list(dict.fromkeys(out))


class AdapterEraserFactory:
    """The registered implementation: ``factory(options)`` then ``factory.build(sites)``."""

    eraser_type = "adapter"

    def __init__(self, options):
        self.options = options

    def build(self, sites: list[Site], presets: Optional[dict[str, list[str]]] = None,
              default: Optional[str] = None) -> EraserSet:
        """Adapters on the ``sites`` of ``eraser.streams`` whose attention module matches ``eraser.sites``
        (patterns, or the name of one of the backbone's ``presets``; unset: the ``default`` preset, else all)."""
        streams = set(self.options.streams)
        missing = streams - {s.stream for s in sites}
        if missing:
            raise ValueError(f"eraser.streams: this backbone has no {sorted(missing)} sites "
                             f"(it has {sorted({s.stream for s in sites})})")
        chosen = [s for s in sites if s.stream in streams]
        wanted = self.options.sites if self.options.sites is not None else ([default] if default else None)
        if wanted is not None:
            patterns = expand_site_patterns(wanted, presets or {})
            chosen = [s for s in chosen if any(fnmatch.fnmatchcase(s.attention, p) for p in patterns)]
            unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(s.attention, p) for s in sites)]
            if unmatched:
                names = sorted({s.attention for s in sites}, key=_natural)
                raise ValueError(f"eraser.sites: {unmatched[0]!r} matches no attention module of this model (it has "
                                 f"{len(names)}: {names[0]} ... {names[-1]}; presets: {sorted(presets or {})})")
        if not chosen:
            raise ValueError("eraser.sites and eraser.streams select no site of this model")
        erasers = {s.name: Adapter(s.dim, self.options.rank) for s in chosen}
        return EraserSet(erasers, self.eraser_type, self.options.model_dump(mode="json"))

    @staticmethod
    def from_state(state: dict[str, torch.Tensor], sites: list[str], options: dict) -> EraserSet:
        """Rebuild an EraserSet from ``state_dict_by_site`` tensors."""
        erasers = {}
        for name in sites:
            down = state[f"{name}.down.weight"]
            rank, dim = down.shape
            adapter = Adapter(dim, rank)
            # exact keys: one site's name can prefix another's ("...attn1" and "...attn1.text")
            adapter.load_state_dict({p: state[f"{name}.{p}"] for p in adapter.state_dict()})
            erasers[name] = adapter
        return EraserSet(erasers, "adapter", options)
