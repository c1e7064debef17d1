"""How well the toy base model draws what it is asked for, by the deterministic judges.

Samples every held-out (colour, shape, direction) combination — never in the
base model's training captions — with several seeds (DDIM 25 steps, CFG 5),
plus the held-out combinations spelt with colour synonyms and a slice of the
training combinations; prints per-attribute accuracy and writes
benchmarks/results/toy_base.json.

    python benchmarks/toy_base.py                  # the shipped base (CogVideoX architecture)
    python benchmarks/toy_base.py --backbone toy_hunyuanvideo   # the shipped HunyuanVideo-architecture base
    python benchmarks/toy_base.py --model DIR      # another toy model folder
    python benchmarks/toy_base.py --transformer DIR/checkpoints/step-004000
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

TARGETS = {"color": 0.95, "motion": 0.90, "shape": 0.80}


def evaluate(backbone, combos, seeds, *, synonyms=False, steps=25, guidance=5.0):
    from t2vu_toy.judges import accuracy, judge_all
    from t2vu_toy.model import sample

    world = backbone.world
    prompts, truths, seed_list = [], [], []
    for c, s, d in combos:
        words = world.color_words(c)[1:] if synonyms else [c]
        for w in words:
            for seed in seeds:
                prompts.append(world.caption(w, s, d))
                truths.append((c, s, d))
                seed_list.append(seed)
    if not prompts:
        return None
    videos = sample(backbone, prompts, seed_list, steps=steps, guidance=guidance)
    acc = accuracy(videos, truths, world)
    acc["clips"] = len(prompts)
    confusion: dict = {}
    for video, (_, shape, _) in zip(videos, truths):
        got = judge_all(video, world)["shape"]
        confusion.setdefault(shape, {}).setdefault(got, 0)
        confusion[shape][got] += 1
    acc["shape_confusion"] = confusion  # true shape -> judged shape -> clips
    return acc


def main() -> int:
    import torch

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    from t2vu.core import plugins

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="toy", choices=["toy", "toy_hunyuanvideo"],
                    help="which toy base: the CogVideoX (toy) or the HunyuanVideo (toy_hunyuanvideo) architecture")
    ap.add_argument("--model", type=Path, default=None, help="a toy model folder (default: the shipped base)")
    ap.add_argument("--transformer", type=Path, default=None,
                    help="a checkpoint folder holding transformer/ (replaces the model's weights)")
    ap.add_argument("--seeds", type=int, default=8, help="seeds per held-out combination")
    ap.add_argument("--train-combos", type=int, default=12, help="training combinations to sample too (0: none)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--out", type=Path, default=None,
                    help="results file (default: benchmarks/results/toy_base.json, toy_base_hunyuanvideo.json)")
    args = ap.parse_args()
    suffix = "" if args.backbone == "toy" else "_hunyuanvideo"
    args.out = args.out or Path(__file__).with_name("results") / f"toy_base{suffix}.json"

    backbone = plugins.get_registry().get("backbone", args.backbone).build(
        {"model_path": str(args.model)} if args.model else {})
    backbone.load("cpu")
    args.model = backbone.path
    if args.transformer is not None:
        backbone.transformer = type(backbone.transformer).from_pretrained(
            args.transformer, subfolder="transformer").eval().requires_grad_(False)
    world = backbone.world
    seeds = list(range(1000, 1000 + args.seeds))
    train = world.train_combinations()
    step = max(1, len(train) // max(1, args.train_combos))
    sets = {
        "held-out": (world.held_out(), False),
        "held-out, synonyms": ([x for x in world.held_out() if world.synonyms.get(x[0])], True),
        "training combos": (train[::step][:args.train_combos], False),
    }
    rows, started = {}, time.time()
    for name, (combos, syn) in sets.items():
        t0 = time.time()
        acc = evaluate(backbone, combos, seeds if name == "held-out" else seeds[:4], synonyms=syn,
                       steps=args.steps, guidance=args.guidance)
        if acc is not None:
            acc["seconds"] = round(time.time() - t0, 1)
            rows[name] = acc
    print(f"{'set':20} {'clips':>5} {'color':>6} {'shape':>6} {'motion':>6} {'all':>6} {'s':>6}")
    for name, a in rows.items():
        print(f"{name:20} {a['clips']:5d} {a['color']:6.3f} {a['shape']:6.3f} {a['motion']:6.3f} "
              f"{a['all']:6.3f} {a['seconds']:6.1f}")
    held = rows["held-out"]
    met = {k: held[k] >= v for k, v in TARGETS.items()}
    print("targets on held-out: " + ", ".join(
        f"{k} >= {v} {'met' if met[k] else 'NOT met'}" for k, v in TARGETS.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "model": str(args.model if args.transformer is None else args.transformer),
        "backbone": args.backbone,
        "sampler": {"name": "DDIM" if args.backbone == "toy" else "flow-matching Euler", "steps": args.steps,
                    "guidance": args.guidance},
        "seeds": seeds, "targets": TARGETS, "targets_met": met, "results": rows,
        "held_out": [list(x) for x in world.held_out()],
        "machine": platform.platform(), "threads": 1, "seconds": round(time.time() - started, 1),
    }, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if all(met.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
