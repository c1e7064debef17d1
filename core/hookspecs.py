"""The t2vu plugin API: pluggy hook specifications.

Every hook receives a ``register`` callback and calls it once per component::

    register(name, implementation, options=Options, summary="one line")

``implementation`` is either the object itself (a class or factory) or a
``"module:attribute"`` string that is imported only when the component is
built, so that listing plugins never imports torch or diffusers. ``options``
is a pydantic model describing the component's block in the run spec.
Built-in components register through exactly these hooks.
"""

from __future__ import annotations

from typing import Any, Callable

import pluggy

PROJECT = "t2vu"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

Register = Callable[..., None]


@hookspec
def register_backbones(register: Register) -> None:
    """Register video diffusion backbones (models the erasers are trained inside)."""


@hookspec
def register_erasers(register: Register) -> None:
    """Register eraser types (the small trainable modules attached to a backbone)."""


@hookspec
def register_losses(register: Register) -> None:
    """Register loss terms that the trainer sums, each with a weight."""


@hookspec
def register_concept_sources(register: Register) -> None:
    """Register sources of preserved concepts (file, list, wordnet, llm, ...)."""


@hookspec
def register_augmenters(register: Register) -> None:
    """Register prompt augmenters that expand the target prompts before training."""


@hookspec
def register_evaluators(register: Register) -> None:
    """Register evaluators: the judges ``t2vu eval`` scores generated videos with."""


@hookspec
def register_prompt_sets(register: Register) -> None:
    """Register evaluation prompt generators that ``t2vu eval`` can draw prompts from."""


@hookspec
def register_commands(cli: Any) -> None:
    """Add sub-commands to the ``t2vu`` Typer application ``cli``."""
