"""Toy-world erasure benchmark: train + evaluate erasers on the shipped toy base, on a CPU.

For each concept and each eraser seed, runs the example spec of the concept's
attribute -- `examples/toy-erase-red.yaml` for a colour,
`examples/toy-erase-circle.yaml` for a shape -- with only `concept.target` and
`concept.prompts` changed, evaluates it, prints a table and writes
benchmarks/results/toy_erase.json. Targets (issue: toy world):

  target_rate after <= 0.05 (before >= 0.90), synonym_rate after <= 0.10,
  other/shape/motion accuracy after >= 0.95 x before, other_pixel_change <= 0.03,
  training + evaluation <= 300 s. With --baselines negative_prompt each row also reports negative prompting
  (the stock model with the concept as the negative prompt, same seeds) beside the eraser.

    python benchmarks/toy_erase.py                     # red, blue, green, square, triangle, circle x seeds 0, 1
    python benchmarks/toy_erase.py --concepts red --seeds 0
    python benchmarks/toy_erase.py --concepts red circle --baselines negative_prompt
    python benchmarks/toy_erase.py --spec examples/toy-erase-any.yaml --seeds 0 1 2 3   # one spec, every concept
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
#: attribute -> the example spec whose recipe erases any value of it
SPECS = {"color": ROOT / "examples" / "toy-erase-red.yaml", "shape": ROOT / "examples" / "toy-erase-circle.yaml"}
RESULTS = Path(__file__).with_name("results") / "toy_erase.json"

#: concept -> the eraser's training prompts (the eval holds out every other combination)
CONCEPTS = {
    "red": ["a red circle moving left", "a red square moving up", "a red triangle moving right"],
    "blue": ["a blue circle moving left", "a blue square moving up", "a blue triangle moving right"],
    "green": ["a green circle moving down", "a green square moving right", "a green triangle moving left"],
    # a shape's prompts (examples/toy-erase-circle.yaml's, shape swapped): two per colour, three per
    # direction, so the eval holds out 12 of the 24 combinations
    **{shape: [f"a {c} {shape} moving {d}" for c, pair in zip(
        ("red", "orange", "yellow", "green", "blue", "magenta"),
        (("left", "right"), ("up", "down"), ("down", "up"), ("left", "right"), ("right", "left"), ("down", "up")))
        for d in pair] for shape in ("square", "triangle", "circle")},
}


def check(summary: dict, seconds: float) -> dict[str, bool]:
    s = summary
    out = {
        "target_rate_before>=0.90": s["target_rate"]["before"] >= 0.90,
        "target_rate_after<=0.05": s["target_rate"]["after"] <= 0.05,
        "other_accuracy>=0.95x": s["other_accuracy"]["after"] >= 0.95 * s["other_accuracy"]["before"],
        "shape_accuracy>=0.95x": s["shape_accuracy"]["after"] >= 0.95 * s["shape_accuracy"]["before"],
        "motion_accuracy>=0.95x": s["motion_accuracy"]["after"] >= 0.95 * s["motion_accuracy"]["before"],
        "other_pixel_change<=0.03": s["other_pixel_change"]["after"] <= 0.03,
        "seconds<=300": seconds <= 300,
    }
    if "synonym_rate" in s:
        out["synonym_rate_after<=0.10"] = s["synonym_rate"]["after"] <= 0.10
    return out


def spec_for(concept: str) -> Path:
    from t2vu_toy.evaluation import attribute_of
    from t2vu_toy.world import World

    return SPECS[attribute_of(World(), concept)]


def train_one(concept: str, seed: int, workdir: Path, extra: list[str], spec: Optional[Path] = None):
    """Train one eraser with only ``concept.target``/``concept.prompts`` (and ``extra``) changed from ``spec``
    (default: the example spec of the concept's attribute); returns the resolved spec and the seconds taken."""
    from t2vu.core import plugins
    from t2vu.core.engine import train
    from t2vu.core.spec import load_spec

    prompts = "[" + ", ".join(CONCEPTS[concept]) + "]"
    overrides = [f"concept.target={concept}", f"concept.prompts={prompts}", f"training.seed={seed}",
                 f"output.dir={workdir / f'{concept}-seed{seed}'}", *extra]
    resolved = load_spec(spec or spec_for(concept), plugins.get_registry(), overrides)
    start = time.perf_counter()
    train(resolved)
    return resolved, time.perf_counter() - start


def run_one(concept: str, seed: int, workdir: Path, extra: list[str], spec: Optional[Path] = None) -> dict:
    """Train and evaluate one eraser (``spec``: default the example spec of the concept's attribute)."""
    from t2vu.core.evaluate import evaluate

    spec = spec or spec_for(concept)
    resolved, train_s = train_one(concept, seed, workdir, extra, spec)
    start = time.perf_counter()
    report = evaluate(resolved)
    eval_s = time.perf_counter() - start
    return {"concept": concept, "seed": seed, "spec": str(spec.relative_to(ROOT)), "train_s": round(train_s, 1),
            "eval_s": round(eval_s, 1), "total_s": round(train_s + eval_s, 1), "summary": report["summary"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concepts", nargs="+", default=list(CONCEPTS), choices=list(CONCEPTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--set", dest="sets", action="append", default=[], help="extra spec override")
    parser.add_argument("--spec", type=Path, default=None,
                        help="one spec for every concept (default: the example spec of each concept's attribute)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--baselines", nargs="*", default=[],
                        help="eval.baselines to report beside each eraser, e.g. --baselines negative_prompt (their "
                        "generation counts in eval_s)")
    args = parser.parse_args()
    if args.baselines:
        args.sets = [f"eval.baselines=[{', '.join(args.baselines)}]", *args.sets]

    import torch

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for concept in args.concepts:
            for seed in args.seeds:
                row = run_one(concept, seed, Path(tmp), args.sets, args.spec and args.spec.resolve())
                row["checks"] = check(row["summary"], row["total_s"])
                rows.append(row)
                print_row(row)
    print_table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": platform.platform(), "cpu_threads": 1,
        "overrides": args.sets, "spec": args.spec and str(args.spec), "rows": rows,
        "all_checks_met": all(all(r["checks"].values()) for r in rows)}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if all(all(r["checks"].values()) for r in rows) else 1


METRICS = ("target_rate", "synonym_rate", "other_accuracy", "shape_accuracy", "motion_accuracy",
           "other_pixel_change")


def print_row(row: dict) -> None:
    failed = [k for k, ok in row["checks"].items() if not ok]
    print(f"{row['concept']:>7} seed {row['seed']}: {row['total_s']:.0f} s "
          f"({'all targets met' if not failed else 'missed: ' + ', '.join(failed)})", flush=True)


def print_table(rows: list[dict]) -> None:
    head = f"{'concept':>7} {'seed':>4} " + " ".join(f"{m:>22}" for m in METRICS) + f" {'train s':>7} {'eval s':>6}"
    print(head)
    for r in rows:
        cells = []
        for m in METRICS:
            v = r["summary"].get(m)
            cells.append(f"{v['before']:.2f} -> {v['after']:.3f}".rjust(22) if v else "—".rjust(22))
        baselines = {b: [f"{m} {r['summary'][m][b]:.3f}" for m in METRICS if b in r["summary"].get(m, {})]
                     for b in dict.fromkeys(k for v in r["summary"].values() for k in v
                                            if k not in ("before", "after", "n"))}
        print(f"{r['concept']:>7} {r['seed']:>4} " + " ".join(cells) + f" {r['train_s']:>7} {r['eval_s']:>6}")
        for name, values in baselines.items():
            print(f"{'':>12} {name} instead of the eraser: " + ", ".join(values))


if __name__ == "__main__":
    sys.exit(main())
