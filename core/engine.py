"""Composes a run from a resolved spec and trains the erasers (accelerate).

Data flows one way: prompts -> embeddings (the text encoder runs once, then
leaves memory) -> training states -> predictions (one frozen pass, one erased
pass per step, see :mod:`t2vu.core.context`) -> loss terms -> eraser update ->
``eraser.safetensors``.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from t2vu.core.errors import T2VUError
from t2vu.core.spec import ResolvedSpec

ERASER_FILE = "eraser.safetensors"
OUTPUTS = (ERASER_FILE, "metrics.jsonl", "spec.yaml", "prompts.json", "checkpoints")


@dataclass
class Prompts:
    target: str
    target_prompts: list[str]  # after augmentation
    unlearn: list[str]  # the pool the unlearning condition is drawn from
    preserved: list[str]
    condition: str  # concept / prompts / mix, as applied
    anchors: dict[str, str] = field(default_factory=dict)  # unlearning prompt -> its anchor ("" by default)


@dataclass
class RunResult:
    eraser: Path
    metrics: list[dict] = field(default_factory=list)


def check_output_dir(resolved: ResolvedSpec) -> Path:
    """Refuse to touch a folder that holds a previous run unless ``output.overwrite``."""
    out = Path(resolved.spec.output.dir)
    if out.exists() and not out.is_dir():
        raise T2VUError(f"output.dir {out} is a file")
    existing = [name for name in OUTPUTS if (out / name).exists()]
    if existing and not resolved.spec.output.overwrite:
        raise T2VUError(
            f"output.dir {out} already holds a run ({', '.join(existing)}); choose another output.dir "
            "or set output.overwrite: true (--set output.overwrite=true)")
    return out


def gather_prompts(resolved: ResolvedSpec) -> Prompts:
    from t2vu.core.concepts import anchor_text, augment_prompts, collect_preserved

    concept = resolved.spec.concept
    target = concept.target.strip()
    prompts = concept.prompt_list()
    prompts = augment_prompts(resolved.augment, target, prompts) if resolved.augment else prompts
    if concept.condition == "prompts" and not prompts:
        raise T2VUError("concept.condition is 'prompts' but concept.prompts gives no prompts")
    condition = "concept" if concept.condition == "mix" and not prompts else concept.condition
    unlearn = {"concept": [target], "prompts": prompts, "mix": [target] + prompts}[condition]
    preserved = collect_preserved(resolved.preserved, target) if resolved.preserved else []
    if any(getattr(loss.options, "requires_preserved", False) for loss in resolved.losses) and not preserved:
        raise T2VUError("the preserved sources yielded no concepts, but a loss term needs them")
    anchor = anchor_text(resolved)
    anchors = {p: anchor_prompt(p, target, anchor) for p in dict.fromkeys(unlearn)}
    missing = [p for p, a in anchors.items() if a == p] if anchor is not None else []
    if missing:
        raise T2VUError(f"concept.anchor replaces {target!r} in every unlearning prompt, but {missing[0]!r} "
                        f"does not contain it ({len(missing)} such prompt(s)); use prompts that name the concept "
                        "or leave concept.anchor unset")
    return Prompts(target, prompts, unlearn, preserved, condition, anchors)


def anchor_prompt(prompt: str, target: str, anchor: Optional[str]) -> str:
    """``prompt`` with every whole-word ``target`` (any case) replaced by ``anchor``; "" when no anchor."""
    if anchor is None:
        return ""
    out = re.sub(rf"(?<!\w){re.escape(target)}(?!\w)", anchor.strip(), prompt, flags=re.IGNORECASE)
    return " ".join(out.split())


def run(resolved: ResolvedSpec, console=None, on_step: Optional[Callable[[dict], None]] = None) -> Path:
    """Train and write ``eraser.safetensors``; return its path."""
    return train(resolved, console=console, on_step=on_step).eraser


def train(resolved: ResolvedSpec, console=None, on_step: Optional[Callable[[dict], None]] = None) -> RunResult:
    out = check_output_dir(resolved)
    tr = resolved.spec.training
    prompts = gather_prompts(resolved)
    condition = prompts.condition
    backbone = resolved.backbone.build()  # checks the model folder before anything heavy loads

    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from t2vu.core.context import ANCHOR, PRESERVED, TARGET, UNCOND, StepContext
    from t2vu.core.eraser_file import save_eraser
    from t2vu.core.states import make_states

    device_opt = resolved.backbone.options.device
    accelerator = Accelerator(cpu=(device_opt == "cpu"))
    set_seed(tr.seed)
    device = torch.device(device_opt) if device_opt else accelerator.device
    backbone.load(device)

    # prompts -> conditions, once; the text encoders leave memory after this
    every = [""] + prompts.unlearn + prompts.target_prompts + list(prompts.anchors.values()) + prompts.preserved
    conditions = backbone.encode_prompts(every)

    def embed(batch: list[str]):
        """Prompts -> the backbone's batched condition."""
        return backbone.collate([conditions[p] for p in batch])

    masks = {p: backbone.concept_token_mask(p, prompts.target) for p in dict.fromkeys(prompts.unlearn + prompts.target_prompts)}
    empty = [p for p, m in masks.items() if not bool(m.any())]
    if empty:
        raise T2VUError(f"the prompt {empty[0]!r} has no token in the {resolved.backbone.name} condition (it is empty "
                        f"or truncated away: check the backbone's text length and prompt template options)")

    sites = backbone.sites()
    options_cls = type(resolved.backbone.options)
    try:
        erasers = resolved.eraser.build().build(sites, presets=options_cls.site_presets,
                                                default=options_cls.default_sites).to(device)
    except ValueError as exc:
        raise T2VUError(str(exc)) from None
    erasers.attach(sites)
    losses = [(r, r.build()) for r in resolved.losses]
    if tr.gradient_checkpointing:
        backbone.enable_gradient_checkpointing()

    stream_of = {site.name: site.stream for site in sites}
    chosen = set(erasers.site_names)
    attention_names = list(dict.fromkeys(site.attention for site in sites))
    attention_modules = list(dict.fromkeys(s.attention for s in sites if s.name in chosen and s.stream == "video"))
    _check_stream_start(tr, erasers, {stream_of[name] for name in erasers.site_names})
    params = [p for p in erasers.parameters() if p.requires_grad]
    groups = _param_groups(tr, erasers, stream_of)
    optimizer = torch.optim.AdamW(groups, lr=tr.learning_rate, weight_decay=tr.weight_decay)
    lr_scheduler = _lr_schedule(tr, optimizer)
    optimizer, lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)

    rng = random.Random(tr.seed)
    generator = torch.Generator().manual_seed(tr.seed)
    latent_shape = backbone.latent_shape(tr.num_frames, tr.height, tr.width)
    state_source = make_states(tr.states, backbone, erasers, latent_shape, generator, device, embed, tr, rng)
    needs = [need for _, loss in losses for need in loss.needs()]
    video_sites = {name for name, stream in stream_of.items() if stream == "video"}
    if any(n.kind == "eraser_outputs" for n in needs) and not video_sites & set(erasers.site_names):
        erasers.detach()
        raise T2VUError("a loss term (localization) penalises the erasers' video outputs, but no eraser edits "
                        "the video (eraser.streams has no 'video'); add 'video' or drop that term")

    out.mkdir(parents=True, exist_ok=True)
    (out / "prompts.json").write_text(json.dumps(
        {"target": prompts.target, "condition": condition, "unlearn": prompts.unlearn,
         "target_prompts": prompts.target_prompts, "anchors": prompts.anchors, "preserved": prompts.preserved},
        indent=2) + "\n")
    _write_spec(out / "spec.yaml", resolved)
    metrics_file = (out / "metrics.jsonl").open("w")
    history: list[dict] = []
    progress = _Progress(console, tr.steps, [r.name for r, _ in losses])
    start = time.perf_counter()
    try:
        for step in range(tr.steps):
            b = tr.batch_size
            if tr.stream_start:  # streams not started yet are off for the whole step: its states and its loss
                erasers.switch_off({stream for stream, start in tr.stream_start.items() if step < start})
            trajectory_prompts = [rng.choice(prompts.target_prompts or prompts.unlearn) for _ in range(b)]
            states = state_source.next(step, trajectory_prompts)
            conds = {UNCOND: [""] * b,
                     TARGET: [_unlearn_prompt(condition, prompts, s, rng) for s in states.prompts]}
            conds[ANCHOR] = [prompts.anchors[p] for p in conds[TARGET]]
            if prompts.preserved:
                conds[PRESERVED] = [rng.choice(prompts.preserved) for _ in range(b)]
            ctx = StepContext(backbone, erasers, states.x_t, states.t, conds, embed,
                              token_masks={TARGET: torch.stack([masks[p] for p in conds[TARGET]])},
                              attention_modules=attention_modules or None, attention_names=attention_names)
            if "uncond" in states.teacher:
                ctx.seed_frozen(UNCOND, states.teacher["uncond"])
            if "cond" in states.teacher and conds[TARGET] == states.prompts:  # the sampler's conditional pass
                ctx.seed_frozen(TARGET, states.teacher["cond"])
            ctx.prefetch(needs)
            terms = {r.name: loss(ctx) for r, loss in losses}
            total = sum(r.options.weight * terms[r.name] for r, _ in losses)
            accelerator.backward(total)
            if accelerator.num_processes > 1:
                for p in params:
                    if p.grad is not None:
                        p.grad = accelerator.reduce(p.grad, "mean")
            grad_norm = torch.nn.utils.clip_grad_norm_(params, tr.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            rates = lr_scheduler.get_last_lr()
            row = {"step": step + 1, "loss": float(total.detach()),
                   **{k: float(v.detach()) for k, v in terms.items()},
                   "grad_norm": float(grad_norm), "lr": rates[0],
                   **{f"lr_{g['stream']}": rate for g, rate in zip(groups, rates) if "stream" in g},
                   "seconds": round(time.perf_counter() - start, 3)}
            if not all(math.isfinite(v) for k, v in row.items() if isinstance(v, float)):
                raise T2VUError(f"step {step + 1}: the loss became non-finite ({row}); lower training.learning_rate")
            history.append(row)
            if (step + 1) % tr.log_every == 0 or step + 1 == tr.steps:
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
            progress.update(row)
            if on_step:
                on_step(row)
            if tr.checkpoint_every and (step + 1) % tr.checkpoint_every == 0 and step + 1 < tr.steps:
                save_eraser(out / "checkpoints" / f"step-{step + 1:06d}" / ERASER_FILE, erasers,
                            **_eraser_meta(backbone, prompts, resolved, step + 1))
    finally:
        metrics_file.close()
        progress.close()
    path = save_eraser(out / ERASER_FILE, erasers, **_eraser_meta(backbone, prompts, resolved, tr.steps))
    erasers.detach()
    return RunResult(path, history)


def _check_stream_start(tr, erasers, streams: set[str]) -> None:
    """``training.stream_start`` names ``streams`` the eraser has, each starting before the last step."""
    problems = []
    if tr.stream_start and not (hasattr(erasers, "switch_off") and hasattr(erasers, "eraser")):
        problems.append(f"training.stream_start: the {getattr(erasers, 'eraser_type', '?')!r} eraser cannot switch "
                        "streams off; remove training.stream_start")
    for stream, start in tr.stream_start.items():
        if stream not in streams:
            problems.append(f"training.stream_start.{stream}: the eraser has no {stream!r} adapters (its streams: "
                            f"{sorted(streams)}); add {stream!r} to eraser.streams or drop it here")
        elif start >= tr.steps:
            problems.append(f"training.stream_start.{stream}: {start} is not before the last step "
                            f"(training.steps {tr.steps}), so those adapters would never train")
    if problems:
        erasers.detach()
        raise T2VUError(problems[0])


def _param_groups(tr, erasers, stream_of: dict[str, str]) -> list[dict]:
    """The optimizer's parameter groups: one, unless ``training.stream_start`` is set; then one per stream,
    with its name (``"stream"``, logged as ``lr_<stream>``) and the step it starts at (``"start"``)."""
    if not tr.stream_start:
        return [{"params": [p for p in erasers.parameters() if p.requires_grad]}]
    by_stream: dict[str, list] = {}
    for name in erasers.site_names:
        by_stream.setdefault(stream_of[name], []).extend(p for p in erasers.eraser(name).parameters()
                                                         if p.requires_grad)
    start = {s: tr.stream_start.get(s, 0) for s in by_stream}
    return [{"params": by_stream[s], "stream": s, "start": start[s]}  # "lr" logs the first to start
            for s in sorted(by_stream, key=lambda s: (start[s], s))]


def _lr_schedule(tr, optimizer):
    """``training.lr_scheduler`` (diffusers' schedules) with its warmup; a parameter group with a ``"start"``
    step runs the whole schedule, warmup included, over the steps it trains (and has rate 0 before)."""
    import torch
    from diffusers.optimization import get_scheduler

    starts = [group.get("start", 0) for group in optimizer.param_groups]
    if not any(starts):
        return get_scheduler(tr.lr_scheduler, optimizer, num_warmup_steps=tr.warmup_steps,
                             num_training_steps=tr.steps)
    shapes = []
    for start in starts:  # the schedule's shape over this group's steps, from a one-parameter stand-in
        stand_in = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        shape = get_scheduler(tr.lr_scheduler, stand_in, num_warmup_steps=tr.warmup_steps,
                              num_training_steps=tr.steps - start).lr_lambdas[0]
        shapes.append(lambda step, start=start, shape=shape: shape(step - start) if step >= start else 0.0)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, shapes)


def _unlearn_prompt(condition: str, prompts: Prompts, trajectory_prompt: str, rng: random.Random) -> str:
    """The bare concept, or a target prompt (the state's own when it came from one)."""
    if condition == "concept" or (condition == "mix" and rng.random() < 0.5):
        return prompts.target
    return trajectory_prompt if trajectory_prompt in prompts.target_prompts else rng.choice(prompts.target_prompts)


def _eraser_meta(backbone, prompts: Prompts, resolved: ResolvedSpec, step: int) -> dict[str, Any]:
    return {"backbone": resolved.backbone.name, "backbone_config": backbone.config, "target": prompts.target,
            "spec": resolved.to_dict(), "extra": {"step": step}}


def _write_spec(path: Path, resolved: ResolvedSpec) -> None:
    import yaml

    path.write_text("# the resolved spec of this run (defaults filled in, paths absolute)\n"
                    + yaml.safe_dump(resolved.to_dict(), sort_keys=False))


class _Progress:
    """A rich progress bar with each loss term and the speed; silent without a console."""

    def __init__(self, console, total: int, names: list[str]):
        self.names = names
        self.progress = None
        if console is not None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                     console=console, transient=False)
            self.task = self.progress.add_task("train", total=total, info="")
            self.progress.start()

    def update(self, row: dict) -> None:
        if self.progress is None:
            return
        speed = row["step"] / max(row["seconds"], 1e-9)
        info = " ".join(f"{n}={row[n]:.4g}" for n in self.names) + f" | {speed:.2f} it/s"
        self.progress.update(self.task, advance=1, info=info)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
