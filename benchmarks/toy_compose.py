"""Two erasers at once on the toy world: a colour and a shape eraser, trained separately, attached together.

For each eraser seed, trains the colour eraser (examples/toy-erase-red.yaml) and the shape eraser
(examples/toy-erase-circle.yaml) exactly as benchmarks/toy_erase.py does, then evaluates both specs' prompt sets
with BOTH erasers attached (each at scale 1). Targets, the single-eraser ones applied to each concept:

  colour target_rate after <= 0.05, colour synonym_rate after <= 0.10, shape target_rate after <= 0.05,
  and over the prompts with neither concept (other colour AND other shape): colour, shape and motion accuracy
  after >= 0.95 x before, mean pixel change <= 0.03.

Prints a table and writes benchmarks/results/toy_compose.json.

    python benchmarks/toy_compose.py                          # red + circle, eraser seeds 0 and 1
    python benchmarks/toy_compose.py --color blue --shape square --seeds 0
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from toy_erase import CONCEPTS, train_one  # noqa: E402

RESULTS = Path(__file__).with_name("results") / "toy_compose.json"


def neither(rows: list[dict], color: str, shape: str) -> dict[str, dict]:
    """Accuracy of every attribute before/after and the mean pixel change over the report rows whose prompt has
    neither concept (each (prompt, seed) once, whichever report it came from)."""
    seen, kept = set(), []
    for row in rows:
        key = (row["prompt"], row["seed"])
        if row["expect"].get("color") == color or row["expect"].get("shape") == shape or key in seen:
            continue
        seen.add(key)
        kept.append(row)
    out = {}
    for attr in ("color", "shape", "motion"):
        judged = [r for r in kept if attr in r["before"]]
        out[f"{attr}_accuracy"] = {
            side: sum(r[side][attr] == r["expect"][attr] for r in judged) / len(judged) for side in ("before", "after")}
        out[f"{attr}_accuracy"]["n"] = len(judged)
    out["pixel_change"] = {"before": 0.0, "after": sum(r["pixel_change"] for r in kept) / len(kept), "n": len(kept)}
    return out


def check(color_summary: dict, shape_summary: dict, rest: dict) -> dict[str, bool]:
    out = {
        "color_target_rate<=0.05": color_summary["target_rate"]["after"] <= 0.05,
        "shape_target_rate<=0.05": shape_summary["target_rate"]["after"] <= 0.05,
        **{f"rest_{a}_accuracy>=0.95x": rest[f"{a}_accuracy"]["after"] >= 0.95 * rest[f"{a}_accuracy"]["before"]
           for a in ("color", "shape", "motion")},
        "rest_pixel_change<=0.03": rest["pixel_change"]["after"] <= 0.03,
    }
    if "synonym_rate" in color_summary:
        out["color_synonym_rate<=0.10"] = color_summary["synonym_rate"]["after"] <= 0.10
    return out


def run_pair(color: str, shape: str, seed: int, workdir: Path) -> dict:
    from t2vu.core.evaluate import evaluate

    color_spec, color_s = train_one(color, seed, workdir, [])
    shape_spec, shape_s = train_one(shape, seed, workdir, [])
    erasers = [(Path(color_spec.spec.output.dir) / "eraser.safetensors", 1.0),
               (Path(shape_spec.spec.output.dir) / "eraser.safetensors", 1.0)]
    start = time.perf_counter()
    reports = {name: evaluate(resolved, out=workdir / f"{name}-eval-{seed}", erasers=erasers)
               for name, resolved in (("color", color_spec), ("shape", shape_spec))}
    rest = neither(reports["color"]["rows"] + reports["shape"]["rows"], color, shape)
    row = {"color": color, "shape": shape, "seed": seed, "train_s": round(color_s + shape_s, 1),
           "eval_s": round(time.perf_counter() - start, 1), "color_summary": reports["color"]["summary"],
           "shape_summary": reports["shape"]["summary"], "neither": rest}
    row["checks"] = check(row["color_summary"], row["shape_summary"], rest)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--color", default="red", choices=[c for c in CONCEPTS if c in ("red", "blue", "green")])
    parser.add_argument("--shape", default="circle", choices=["square", "triangle", "circle"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            row = run_pair(args.color, args.shape, seed, Path(tmp))
            rows.append(row)
            print_row(row)
    met = all(all(r["checks"].values()) for r in rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": platform.platform(), "cpu_threads": 1, "rows": rows,
                                    "all_checks_met": met}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if met else 1


def print_row(row: dict) -> None:
    c, s, n = row["color_summary"], row["shape_summary"], row["neither"]
    failed = [k for k, ok in row["checks"].items() if not ok]
    print(f"{row['color']} + {row['shape']} seed {row['seed']}: "
          f"{row['color']} {c['target_rate']['before']:.2f}->{c['target_rate']['after']:.3f}"
          + (f" (synonyms ->{c['synonym_rate']['after']:.3f})" if "synonym_rate" in c else "")
          + f", {row['shape']} {s['target_rate']['before']:.2f}->{s['target_rate']['after']:.3f}; neither (n "
          f"{n['pixel_change']['n']}): colour {n['color_accuracy']['before']:.3f}->{n['color_accuracy']['after']:.3f}"
          f", shape {n['shape_accuracy']['before']:.3f}->{n['shape_accuracy']['after']:.3f}, motion "
          f"{n['motion_accuracy']['before']:.3f}->{n['motion_accuracy']['after']:.3f}, pixel change "
          f"{n['pixel_change']['after']:.4f}; train {row['train_s']:.0f} s, eval {row['eval_s']:.0f} s; "
          + ("all targets met" if not failed else f"missed: {', '.join(failed)}"))


if __name__ == "__main__":
    sys.exit(main())
