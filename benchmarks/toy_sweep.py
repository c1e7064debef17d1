"""Parallel sweep of toy-world erasure runs and teacher diagnostics (for a machine with many cores / a GPU).

    python benchmarks/toy_sweep.py main benchmarks/sweeps/shapes-2.json GPU_WORKERS CPU_WORKERS BUDGET_S TINY

Each job of the JSON list is one of

- ``{"kind": "erase", "concept", "seed", "sets"}``: train + evaluate as benchmarks/toy_erase.py does, with
  ``sets`` as extra spec overrides on ``spec`` (default examples/toy-erase-red.yaml);
- ``{"kind": "teacher", "shape", "anchor", "eta", "push_limit"}``: sample the target's prompts with the
  negative-guidance teacher itself, ``v(u) + 5 (T - v(u))`` with ``T = v(a) - eta (v(c) - v(a))`` (the step
  capped as the loss caps it with ``push_limit``, optional), and judge them -- what an eraser that fit its
  target perfectly would draw; ``step_ratio`` is the mean ``|v(c) - v(a)| / |v(a)|`` at sampler steps 0, 5, 12;
- ``{"kind": "probe", "concept", "seed", "sets", "spec", "eval_seeds"}``: train one eraser and judge every
  combination of the target (its training prompts and the held-out ones, counted apart) and every fourth
  prompt of the other values, from each of ``eval_seeds``; with ``"fit": true`` also how much of the loss's
  teacher step the eraser reaches along its own sampling trajectories (``push_reached``, per sampler step);
  with ``"teacher_steps": [0, 1, ...]`` the target's prompts are sampled with the teacher at those steps.

Workers claim jobs through files in /tmp/sweepclaims, so any number can run; results are collected into
$OUT/results.jsonl every 10 s (a killed run still returns what finished). TINY=1 shortens everything (a
smoke test of the script on a CPU). The numbers of benchmarks/results/toy_erase_sweep_device.json and the
"teacher" and "reproduced" rows of benchmarks/results/toy_erase_sweep_states.json came from this script.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
SPEC = ROOT / "examples" / "toy-erase-red.yaml"


def teacher_job(job, tiny, workdir=None):
    import torch

    from t2vu.core import plugins
    from t2vu.core.engine import anchor_prompt
    from t2vu.core.sampling import initial_noise
    from t2vu.core.spec import load_spec
    from t2vu.losses.terms import guided_away
    from t2vu_toy.evaluation import attribute_of
    from t2vu_toy.judges import judge_all
    from t2vu_toy.world import World

    world = World()
    resolved = load_spec(SPEC, plugins.get_registry(), [])
    bb = resolved.backbone.build()
    bb.load("cuda" if torch.cuda.is_available() else "cpu")
    target, anchor, eta = job["shape"], job["anchor"], job["eta"]  # "shape": the target, a shape or a colour
    attr = attribute_of(world, target)
    index = {"color": 0, "shape": 1}[attr]
    combos = [c for c in world.combinations() if c[index] == target][: 2 if tiny else None]
    rows = [(world.caption(*c), c, seed) for c in combos for seed in (0, 1)]
    prompts = [p for p, _, _ in rows]
    anchors = [anchor_prompt(p, target, anchor) for p in prompts]  # "" (the empty prompt) without an anchor
    emb = bb.encode_prompts(list(dict.fromkeys([""] + prompts + anchors)))
    b = len(rows)
    u = bb.collate([emb[""]] * b)
    c = bb.collate([emb[p] for p in prompts])
    a = bb.collate([emb[p] for p in anchors])
    guidance, limit, ratios = 5.0, job.get("push_limit"), {}
    with torch.no_grad():
        x = torch.stack([initial_noise(bb.latent_shape(4, 32, 32), seed) for _, _, seed in rows]).to(bb.device)
        sampler = bb.sampler(2 if tiny else 25)
        for i, t in enumerate(sampler.timesteps):
            tt = t.repeat(b)
            vu, vc, va = bb.predict(torch.cat([x, x, x]), torch.cat([tt, tt, tt]), torch.cat([u, c, a])).chunk(3)
            teacher = guided_away(va, vc, eta, limit)
            if i in (0, 5, 12):
                ratios[i] = round(float(((vc - va).flatten(1).norm(dim=1) / va.flatten(1).norm(dim=1)).mean()), 3)
            x = sampler.step(vu + guidance * (teacher - vu), t, x)
        videos = bb.decode(x).float().cpu()
    labels = [judge_all(videos[i]) for i in range(b)]
    values = world.colors if attr == "color" else world.shapes
    accuracy = {name: sum(lab.get(name) == combo[k] for lab, (_, combo, _) in zip(labels, rows)) / b
                for k, name in enumerate(("color", "shape", "motion"))}
    return {"target_rate": sum(lab.get(attr) == target for lab in labels) / b,
            "shape_counts": {v: sum(lab.get(attr) == v for lab in labels) for v in (*values, None)},
            "shape_acc": accuracy["shape"], "motion_acc": accuracy["motion"], "color_acc": accuracy["color"],
            "step_ratio": ratios}


def _spec_args(job, tiny) -> dict:
    """The spec (``job["spec"]``, default the colour spec) and extra overrides of an erase or probe job."""
    extra = ["eval.batch_size=64", *job["sets"]]
    if tiny:
        extra += ["training.steps=3", "eval.steps=2", "training.sample_steps=3"]
    return {"extra": extra, "spec": ROOT / job.get("spec", SPEC)}


def erase_job(job, tiny, workdir):
    from toy_erase import check, run_one

    row = run_one(job["concept"], job["seed"], workdir / job["id"], **_spec_args(job, tiny))
    return {"summary": row["summary"], "train_s": row["train_s"], "eval_s": row["eval_s"],
            "checks": check(row["summary"], 0)}


def probe_job(job, tiny, workdir):
    """Where the target survives: training prompts against held-out ones, over several noise seeds."""
    import time

    from toy_erase import CONCEPTS, train_one

    from t2vu.core.evaluate import load_for_generation
    from t2vu.core.sampling import generate
    from t2vu_toy.evaluation import attribute_of
    from t2vu_toy.judges import judge_all
    from t2vu_toy.world import World

    world, target = World(), job["concept"]
    index = {"color": 0, "shape": 1}[attribute_of(world, target)]
    resolved, train_s = train_one(target, job["seed"], workdir / job["id"], **_spec_args(job, tiny))
    start = time.perf_counter()
    trained = set(CONCEPTS[target])
    mine = [c for c in world.combinations() if c[index] == target]
    others = [c for c in world.combinations() if c[index] != target][::4]
    rows = [(world.caption(*c), c, "trained" if world.caption(*c) in trained else "heldout") for c in mine]
    rows += [(world.caption(*c), c, "other") for c in others]
    prompts = [p for p, _, _ in rows]
    backbone, (handle,), embeds = load_for_generation(resolved, [(resolved.spec.output.dir / "eraser.safetensors", 1.0)],
                                                      prompts)
    count = {"trained": [0, 0], "heldout": [0, 0], "other_correct": [0, 0], "motion_correct": [0, 0]}
    still, fit = [], []
    for seed in job.get("eval_seeds", [0, 1]):
        if job.get("fit") or job.get("teacher_steps"):
            videos = _fit_sample(resolved, backbone, handle.erasers, embeds, rows, seed, 2 if tiny else 25, fit,
                                 set(job.get("teacher_steps", [])))
        else:
            videos = generate(backbone, embeds, prompts, [seed] * len(prompts), num_frames=world.frames,
                              height=world.size, width=world.size, steps=2 if tiny else 25, guidance=5.0,
                              batch_size=24)
        for video, (prompt, combo, group) in zip(videos, rows):
            labels = judge_all(video)
            value = labels.get(("color", "shape")[index])
            if group == "other":
                tally = [(count["other_correct"], value == combo[index])]
            else:
                tally = [(count[group], value == target), (count["motion_correct"], labels.get("motion") == combo[2])]
                if value == target:
                    still.append([seed, prompt])
            for pair, hit in tally:
                pair[0] += hit
                pair[1] += 1
    survived = count["trained"][0] + count["heldout"][0]
    if fit:  # mean share of the teacher's push reached at each sampler step, surviving and erased apart
        survivors = [tuple(s) for s in still]
        fit = {name: [round(sum(col) / len(col), 3) for col in zip(*shares)] if shares else []
               for name, shares in (("surviving", [f for key, f in fit if key in survivors]),
                                    ("erased", [f for key, f in fit if key not in survivors]))}
    return {**{k: f"{a}/{b}" for k, (a, b) in count.items()}, **({"push_reached": fit} if fit else {}),
            "target_rate": round(survived / (count["trained"][1] + count["heldout"][1]), 3),
            "still": still, "train_s": round(train_s, 1), "eval_s": round(time.perf_counter() - start, 1)}


def _fit_sample(resolved, backbone, erasers, embeds, rows, seed, steps, fit, teacher_steps=frozenset()):
    """Sample the target's prompts of ``rows`` with the eraser (CFG 5) as generate() does, and append to ``fit``
    one ``((seed, prompt), [share per step])`` each: the projection of the eraser's change of the conditional
    prediction on the loss's teacher step ``T - v*(c)``, divided by its length squared (1: the eraser reaches
    the teacher, 0: it changes nothing along it). At the sampler steps in ``teacher_steps`` the target's
    prompts take the teacher ``T`` itself instead of the eraser's prediction (which steps decide a survivor).
    Returns the videos of every row (the other rows sampled with the eraser throughout)."""
    import torch

    from t2vu.core.concepts import anchor_text
    from t2vu.core.engine import anchor_prompt
    from t2vu.core.sampling import initial_noise
    from t2vu.losses.terms import guided_away
    from t2vu_toy.world import World

    world, concept = World(), resolved.spec.concept
    loss = next(x.options for x in resolved.losses if x.name == "negative_guidance")
    prompts = [p for p, _, _ in rows]
    mine = [i for i, (_, _, group) in enumerate(rows) if group != "other"]
    word = anchor_text(resolved)  # runs the anchor's source, if any, once
    anchor_of = [anchor_prompt(prompts[i], concept.target, word) for i in mine]
    anchor_embeds = backbone.encode_prompts(anchor_of)
    b, m = len(rows), len(mine)
    cond = backbone.collate([embeds[p] for p in prompts])
    uncond = backbone.collate([embeds[""]] * b)
    anchor = backbone.collate([anchor_embeds[a] for a in anchor_of])
    x = torch.stack([initial_noise(backbone.latent_shape(world.frames, world.size, world.size), seed)] * b)
    x = x.to(backbone.device)
    sampler = backbone.sampler(steps)
    shares = []
    with torch.no_grad():
        for i, t in enumerate(sampler.timesteps):
            tt = t.repeat(b)
            vu, vc = backbone.predict(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([uncond, cond])).chunk(2)
            with erasers.disabled():
                frozen_c, frozen_a = backbone.predict(torch.cat([x[mine], x[mine]]), torch.cat([tt[:m], tt[:m]]),
                                                      torch.cat([cond[mine], anchor])).chunk(2)
            step = (guided_away(frozen_a, frozen_c, loss.eta, loss.push_limit) - frozen_c).flatten(1)
            shares.append(((vc[mine] - frozen_c).flatten(1) * step).sum(1) / (step * step).sum(1))
            if i in teacher_steps:
                vc[mine] = frozen_c + step.view_as(frozen_c)
            x = sampler.step(vu + 5.0 * (vc - vu), t, x)
    per_row = torch.stack(shares, 1).tolist()
    fit.extend(((seed, prompts[i]), per_row[k]) for k, i in enumerate(mine))
    return backbone.decode(x).float().cpu()


JOBS = {"teacher": teacher_job, "erase": erase_job, "probe": probe_job}


def worker(jobs_file, claim_dir, res_dir, tiny, deadline):
    import torch
    torch.set_num_threads(1)
    jobs = json.loads(Path(jobs_file).read_text())
    work = Path("/tmp/sweepruns")
    work.mkdir(exist_ok=True)
    for job in jobs:
        if time.time() > deadline - job.get("cost", 60):
            continue
        try:
            os.close(os.open(f"{claim_dir}/{job['id']}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            continue
        t0 = time.time()
        try:
            r = JOBS[job["kind"]](job, tiny, work)
            r.update(job=job, ok=True)
        except Exception:
            r = {"job": job, "ok": False, "error": traceback.format_exc()[-2000:]}
        r["wall_s"] = round(time.time() - t0, 1)
        r["device"] = os.environ.get("SWEEP_DEV", "?")
        (Path(res_dir) / f"{job['id']}.json").write_text(json.dumps(r))
        print(f"[{r['device']}] {job['id']} {'ok' if r['ok'] else 'FAIL'} {r['wall_s']}s", flush=True)


def collect(res_dir, out):
    rows = [json.loads(p.read_text()) for p in sorted(Path(res_dir).glob("*.json"))]
    Path(out).write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return rows


def main():
    if sys.argv[1] == "worker":
        worker(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5] == "1", float(sys.argv[6]))
        return
    jobs_file, n_gpu, n_cpu = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    budget, tiny = float(sys.argv[5]), sys.argv[6] == "1"
    out = Path(os.environ.get("OUT", "/tmp/sweepout"))
    out.mkdir(exist_ok=True, parents=True)
    claim, res = Path("/tmp/sweepclaims"), Path("/tmp/sweepres")
    for d in (claim, res):
        d.mkdir(exist_ok=True)
    deadline = time.time() + budget
    procs = []
    base_env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for i in range(n_gpu + n_cpu):
        env = dict(base_env, SWEEP_DEV=("cuda" if i < n_gpu else "cpu"))
        if i >= n_gpu:
            env["CUDA_VISIBLE_DEVICES"] = ""
        procs.append(subprocess.Popen([sys.executable, __file__, "worker", jobs_file, str(claim), str(res),
                                       "1" if tiny else "0", str(deadline)], env=env))
        time.sleep(0.5)
    while any(p.poll() is None for p in procs):
        time.sleep(10)
        collect(res, out / "results.jsonl")
        if time.time() > deadline + 30:
            for p in procs:
                p.kill()
    rows = collect(res, out / "results.jsonl")
    print(f"{len(rows)} results, {sum(r['ok'] for r in rows)} ok")


if __name__ == "__main__":
    main()
