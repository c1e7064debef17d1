"""The toy world's preserved-concept source: the other values of the target's attribute.

Erasing ``red`` preserves ``orange, yellow, green, blue, magenta``; erasing
``circle`` preserves ``square, triangle``. So a toy spec erases another concept
by changing only ``concept.target`` and ``concept.prompts``.
"""

from __future__ import annotations

from t2vu_toy.evaluation import attribute_of


class ToySiblings:
    def __init__(self, options):
        self.options = options

    def concepts(self, target: str) -> list[str]:
        from t2vu_toy.world import World

        world = World()
        attr = attribute_of(world, target.strip().lower())
        values = {"color": list(world.colors), "shape": list(world.shapes),
                  "motion": [f"moving {d}" for d in world.directions]}[attr]
        target_value = target.strip().lower() if attr != "motion" else f"moving {target.strip().lower()}"
        siblings = [v for v in values if v != target_value]
        if self.options.captions:
            index = {"color": 0, "shape": 1, "motion": 2}[attr]
            siblings = [world.caption(*combo) for combo in world.combinations()
                        if combo[index] != target.strip().lower()]
        return siblings[: self.options.count]
