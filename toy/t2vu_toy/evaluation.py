"""The toy world's evaluation prompt set and its summary metrics.

Everything derives from ``concept.target`` (a colour, shape or direction of
the world) and the eraser's training prompts:

- ``target``: every combination with the target value whose caption is not
  among ``concept.prompts`` (held out from eraser training);
- ``synonym``: the same combinations spelt with the target's synonyms
  (colours only), words the eraser never saw;
- ``other``: every combination of every other value of the same attribute.

Summary metrics (``before`` without the eraser, ``after`` with it, same noise):
``target_rate``, ``synonym_rate``, ``other_accuracy``, ``shape_accuracy``,
``motion_accuracy`` and ``other_pixel_change``. ``shape_accuracy`` and
``motion_accuracy`` are over every eval prompt, except the erased attribute's own
accuracy, which is over the ``other`` prompts only (erasing a shape is not shape damage).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from t2vu.core.errors import T2VUError
from t2vu.core.evaluate import EvalPrompt, EvalResult

ATTRIBUTES = ("color", "shape", "motion")


def _world(resolved):
    from t2vu_toy.world import World

    folder = Path(resolved.backbone.options.model_path)
    return World.from_folder(folder) if (folder / "world.json").exists() else World()


def attribute_of(world, target: str) -> str:
    if target in world.colors:
        return "color"
    if target in world.shapes:
        return "shape"
    if target in world.directions:
        return "motion"
    values = list(world.colors) + list(world.shapes) + list(world.directions)
    raise T2VUError(f"concept.target {target!r} is not a value of the toy world ({', '.join(values)})")


class ToyPromptSet:
    """``rows(spec)`` -> the eval prompts; ``summarize(results)`` -> the named metrics."""

    def __init__(self, options):
        self.options = options
        self.target: Optional[str] = None
        self.attribute: Optional[str] = None

    def rows(self, resolved) -> list[EvalPrompt]:
        world = _world(resolved)
        target = resolved.spec.concept.target.strip().lower()
        attr = attribute_of(world, target)
        self.target, self.attribute = target, attr
        trained = set(resolved.spec.concept.prompt_list())
        seeds = resolved.spec.eval.seeds
        index = {"color": 0, "shape": 1, "motion": 2}[attr]
        rows: list[EvalPrompt] = []

        def add(group: str, word: str, combo) -> None:
            c, s, d = combo
            words = [word if i == index else v for i, v in enumerate(combo)]
            prompt = world.caption(*words)
            if group == "target" and prompt in trained:
                return
            expect = {"color": c, "shape": s, "motion": d}
            rows.extend(EvalPrompt(prompt, seed, group, expect) for seed in seeds)

        combos = world.combinations()
        for combo in combos:
            if combo[index] == target:
                add("target", target, combo)
        if attr == "color":
            for synonym in world.synonyms.get(target, []):
                for combo in combos:
                    if combo[0] == target:
                        add("synonym", synonym, combo)
        for combo in combos:
            if combo[index] != target:
                add("other", combo[index], combo)
        if not any(r.group == "target" for r in rows):
            raise T2VUError("every prompt of the target is in concept.prompts: nothing is held out to evaluate")
        return rows

    def summarize(self, results: list[EvalResult]) -> dict[str, dict]:
        attr, target = self.attribute, self.target
        groups = {g: [r for r in results if r.item.group == g] for g in ("target", "synonym", "other")}

        def share(rs, side, test):
            return sum(test(getattr(r, side), r) for r in rs) / len(rs)

        def metric(rs, test):
            return {"before": share(rs, "before", test), "after": share(rs, "after", test), "n": len(rs)}

        is_target = lambda labels, r: labels.get(attr) == target  # noqa: E731
        summary = {"target_rate": metric(groups["target"], is_target)}
        if groups["synonym"]:
            summary["synonym_rate"] = metric(groups["synonym"], is_target)
        summary["other_accuracy"] = metric(groups["other"], lambda labels, r: labels.get(attr) == r.item.expect[attr])
        for name in ("shape", "motion"):
            # Over all eval prompts; for the erased attribute itself only over the other values'
            # prompts (a target prompt judged by its prompt's shape would count erasing as damage).
            rs = groups["other"] if name == attr else results
            if any(name in r.before for r in rs):
                summary[f"{name}_accuracy"] = metric(rs, lambda labels, r, n=name: labels.get(n) == r.item.expect[n])
        others = groups["other"]
        summary["other_pixel_change"] = {"before": 0.0, "after": sum(r.pixel_change for r in others) / len(others),
                                         "n": len(others)}
        return summary

