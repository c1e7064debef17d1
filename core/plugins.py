"""The plugin manager: built-ins, entry points, enable/disable by env var.

Built-in modules and third-party entry points are loaded the same way and
register through the same hooks (see :mod:`t2vu.core.hookspecs`).

Environment variables:

``T2VU_LOAD_PLUGINS=a,b``
    load entry points only from these distributions (empty value: none).
``T2VU_DISABLE_PLUGINS=x,y``
    block these plugins: an entry-point name, a distribution name, or a
    built-in module name (``t2vu.losses.localization`` or ``localization``).
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Callable

import pluggy

from t2vu.core import hookspecs
from t2vu.core.registry import KINDS, Component, FailedPlugin, Registry, RegistryError

ENTRY_POINT_GROUP = "t2vu"

#: Built-in plugin modules, registered exactly like third-party ones.
BUILTIN_PLUGINS: tuple[str, ...] = (
    "t2vu.backbones.cogvideox",
    "t2vu.backbones.hunyuanvideo",
    "t2vu.backbones.wan",
    "t2vu.plugins.adapter",
    "t2vu.losses.negative_guidance",
    "t2vu.losses.preservation",
    "t2vu.losses.localization",
    "t2vu.concept_sources.basic",
    "t2vu.concept_sources.wordnet",
    "t2vu.concept_sources.llm",
    "t2vu.plugins.augment",
    "t2vu.plugins.judges",
)


@dataclass
class PluginInfo:
    name: str
    distribution: str | None
    version: str | None
    builtin: bool
    hooks: list[str]


def _split_env(name: str) -> list[str] | None:
    value = os.environ.get(name)
    if value is None:
        return None
    return [part.strip() for part in value.split(",") if part.strip()]


def _blocked(names: list[str], *candidates: str | None) -> bool:
    for candidate in candidates:
        if candidate is None:
            continue
        if candidate in names or candidate.rsplit(".", 1)[-1] in names:
            return True
    return False


class PluginManager:
    """Loads plugins and builds the :class:`Registry` of their components."""

    def __init__(self, builtins: tuple[str, ...] = BUILTIN_PLUGINS, entry_points: bool = True):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.info: dict[str, PluginInfo] = {}
        self.registry = Registry()
        disabled = _split_env("T2VU_DISABLE_PLUGINS") or []
        for module_name in builtins:
            if _blocked(disabled, module_name):
                self.pm.set_blocked(module_name)
                continue
            self._load(module_name, lambda m=module_name: importlib.import_module(m), None, None, True)
        if entry_points:
            self._load_entry_points(disabled)
        self._collect()

    # -- loading ---------------------------------------------------------
    def _load_entry_points(self, disabled: list[str]) -> None:
        only = _split_env("T2VU_LOAD_PLUGINS")
        for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist = getattr(ep, "dist", None)
            dist_name = dist.metadata["Name"] if dist is not None else None
            version = dist.version if dist is not None else None
            if only is not None and not _blocked(only, dist_name, ep.name):
                continue
            if _blocked(disabled, ep.name, dist_name):
                self.pm.set_blocked(ep.name)
                continue
            self._load(ep.name, ep.load, dist_name, version, False)

    def _load(self, name: str, loader: Callable[[], Any], dist: str | None, version: str | None,
              builtin: bool) -> None:
        if name in self.info or self.pm.has_plugin(name):
            return
        try:
            module = loader()
            self.pm.register(module, name=name)
            # tox does this too: a misspelt hook must fail loudly.
            self.pm.check_pending()
        except Exception as exc:  # a broken plugin must not break the CLI
            if self.pm.has_plugin(name):
                self.pm.unregister(name=name)
            self.registry.failed.append(
                FailedPlugin(name, dist, version, f"{type(exc).__name__}: {_describe(exc)}")
            )
            return
        hooks = sorted(impl.name for impl in self.pm.get_hookcallers(module) or [])
        self.info[name] = PluginInfo(name, dist, version, builtin, hooks)

    def _collect(self) -> None:
        for kind, hook_name in KINDS.items():
            caller = getattr(self.pm.hook, hook_name)
            for impl in caller.get_hookimpls():
                plugin = self.info[impl.plugin_name]
                register = self._register_for(kind, plugin)
                try:
                    impl.function(register)
                except RegistryError:
                    raise
                except Exception as exc:
                    self.registry.failed.append(FailedPlugin(
                        plugin.name, plugin.distribution, plugin.version,
                        f"{hook_name} raised {type(exc).__name__}: {_describe(exc)}",
                    ))

    def _register_for(self, kind: str, plugin: PluginInfo) -> Callable[..., None]:
        def register(name: str, implementation: Any, options: type | None = None,
                     summary: str = "") -> None:
            from t2vu.core.registry import Options

            if not isinstance(name, str) or not name:
                raise RegistryError(f"plugin {plugin.name!r} registered a {kind} without a name")
            self.registry.add(Component(
                kind=kind, name=name, implementation=implementation,
                options=options or Options, summary=summary.strip().splitlines()[0] if summary else "",
                plugin=plugin.name,
                distribution=plugin.distribution or ("t2vu" if plugin.builtin else None),
                version=plugin.version or (_own_version() if plugin.builtin else None),
            ))

        return register

    def add_commands(self, cli: Any) -> None:
        for impl in self.pm.hook.register_commands.get_hookimpls():
            try:
                impl.function(cli)
            except Exception as exc:
                plugin = self.info[impl.plugin_name]
                self.registry.failed.append(FailedPlugin(
                    plugin.name, plugin.distribution, plugin.version,
                    f"register_commands raised {type(exc).__name__}: {_describe(exc)}",
                ))


def _describe(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, pluggy.PluginValidationError) and "unknown hook" in text:
        text += f" (known hooks: {', '.join(sorted(KINDS.values()) + ['register_commands'])})"
    return text


def _own_version() -> str:
    from t2vu import __version__

    return __version__


_manager: PluginManager | None = None


def get_plugin_manager() -> PluginManager:
    """The process-wide plugin manager (created on first use)."""
    global _manager
    if _manager is None:
        _manager = PluginManager()
    return _manager


def get_registry() -> Registry:
    return get_plugin_manager().registry


def reset() -> None:
    """Forget loaded plugins (tests change the environment and reload)."""
    global _manager
    _manager = None


def warn_failed(stream=sys.stderr) -> None:
    for failed in get_registry().failed:
        print(f"warning: plugin {failed.name!r} failed to load: {failed.first_line}", file=stream)
