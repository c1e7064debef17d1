"""Kind -> name -> component: what the plugins registered.

A :class:`Component` is cheap: it holds the pydantic ``Options`` model and a
reference to the implementation, which is imported by :meth:`Component.load`
only when a run needs it.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict

#: kind -> (hook name, spec key that names a component of this kind)
KINDS: dict[str, str] = {
    "backbone": "register_backbones",
    "eraser": "register_erasers",
    "loss": "register_losses",
    "concept_source": "register_concept_sources",
    "augmenter": "register_augmenters",
    "evaluator": "register_evaluators",
    "prompt_set": "register_prompt_sets",
}


class Options(BaseModel):
    """Base class for component options: unknown keys are an error."""

    model_config = ConfigDict(extra="forbid", frozen=False)


class RegistryError(Exception):
    """Registration went wrong (name collisions, bad arguments)."""


class ComponentUnavailable(Exception):
    """A spec needs a component whose plugin failed to load, or none exists."""


@dataclass
class Component:
    kind: str
    name: str
    implementation: Any
    options: type[BaseModel]
    summary: str
    plugin: str
    distribution: str | None = None
    version: str | None = None

    def load(self) -> Any:
        """Import (if needed) and return the implementation."""
        impl = self.implementation
        if isinstance(impl, str):
            module_name, _, attr = impl.partition(":")
            obj: Any = importlib.import_module(module_name)
            for part in attr.split(".") if attr else ():
                obj = getattr(obj, part)
            self.implementation = impl = obj
        return impl

    def build(self, options: BaseModel | dict | None = None, **kwargs: Any) -> Any:
        """Validate ``options`` and call the implementation with them."""
        if not isinstance(options, self.options):
            options = self.options.model_validate(options or {})
        return self.load()(options, **kwargs)


@dataclass
class FailedPlugin:
    name: str
    distribution: str | None
    version: str | None
    error: str

    @property
    def first_line(self) -> str:
        return (self.error.strip().splitlines() or [""])[0]


@dataclass
class Registry:
    components: dict[str, dict[str, Component]] = field(
        default_factory=lambda: {kind: {} for kind in KINDS}
    )
    failed: list[FailedPlugin] = field(default_factory=list)

    def add(self, component: Component) -> None:
        existing = self.components[component.kind].get(component.name)
        if existing is not None:
            raise RegistryError(
                f"{component.kind} {component.name!r} is registered twice: by plugin "
                f"{existing.plugin!r} and by plugin {component.plugin!r}. Disable one "
                f"with T2VU_DISABLE_PLUGINS."
            )
        self.components[component.kind][component.name] = component

    def names(self, kind: str) -> list[str]:
        return sorted(self.components[kind])

    def get(self, kind: str, name: str) -> Component:
        try:
            return self.components[kind][name]
        except KeyError:
            raise ComponentUnavailable(self.unknown_message(kind, name)) from None

    def unknown_message(self, kind: str, name: str) -> str:
        label = kind.replace("_", " ")
        msg = f"unknown {label} {name!r}"
        close = difflib.get_close_matches(str(name), self.names(kind), n=1)
        if close:
            msg += f"; did you mean {close[0]!r}?"
        elif self.names(kind):
            msg += f" (available: {', '.join(self.names(kind))})"
        else:
            msg += f" (no {label} is installed)"
        if self.failed:
            broken = ", ".join(f"{f.name} ({f.first_line})" for f in self.failed)
            msg += f". Plugins that failed to load: {broken}"
        return msg

    def __iter__(self):
        for kind in KINDS:
            yield from (self.components[kind][n] for n in self.names(kind))
