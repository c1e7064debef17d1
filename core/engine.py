"""Composes a run from a resolved spec and trains the erasers (accelerate).

Data flows one way: prompts -> embeddings (the text encoder runs once, then
leaves memory) -> training states -> predictions (one frozen pass, one erased
pass per step, see :mod:`t2vu.core.context`) -> loss terms -> eraser update ->
``eraser.safetensors``. Checkpoints, resume and interruptions: :mod:`t2vu.core.checkpoint` and
:mod:`t2vu.core.run_folder`; divergence: :class:`_Guard`; several processes: :func:`train`.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from t2vu.core.errors import T2VUError
from t2vu.core.spec import ResolvedSpec
from t2vu.core.text import replace_concept

from t2vu.core.run_folder import ERASER_FILE, RunFolder


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


class Interrupted(T2VUError):
    """SIGINT/SIGTERM: the step finished, a checkpoint was written; exit 128 + the signal's number."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class Diverged(T2VUError):
    """A non-finite or exploding loss, gradient or eraser weight: the run stopped, no eraser written."""


def plan_output(resolved: ResolvedSpec, resume: bool = False) -> RunFolder:
    """Where the run writes (:mod:`t2vu.core.run_folder`); refuses before anything loads."""
    from t2vu.core.run_folder import plan

    return plan(Path(resolved.spec.output.dir), overwrite=resolved.spec.output.overwrite, resume=resume,
                spec_hint=str(resolved.source) if resolved.source else "SPEC")


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
    """``prompt`` with every whole-word ``target`` (any case; :func:`t2vu.core.text.concept_spans`, the rule the
    concept token masks follow) replaced by ``anchor``; "" when no anchor."""
    if anchor is None:
        return ""
    out = replace_concept(prompt, target, anchor.strip())
    return " ".join(out.split())


def run(resolved: ResolvedSpec, console=None, on_step: Optional[Callable[[dict], None]] = None,
        resume: bool = False) -> Path:
    """Train and write ``eraser.safetensors``; return its path."""
    return train(resolved, console=console, on_step=on_step, resume=resume).eraser


def train(resolved: ResolvedSpec, console=None, on_step: Optional[Callable[[dict], None]] = None,
          resume: bool = False) -> RunResult:
    """Train the erasers of ``resolved`` (``resume``: from the newest complete checkpoint in output.dir).

    On several processes (``accelerate launch``, ``torchrun``) every process draws the whole global batch
    (``training.batch_size`` x processes) from the same seeded streams and trains on its own slice; the
    erasers' gradients are averaged by the DDP-prepared step module, and only the main process writes.
    """
    folder = plan_output(resolved, resume)
    if folder.finished is not None:
        if console is not None:
            console.print(f"the run in {folder.out} already finished; nothing to resume")
        return RunResult(folder.finished, [])
    tr = resolved.spec.training
    prompts = gather_prompts(resolved)
    condition = prompts.condition
    backbone = resolved.backbone.build()  # checks the model folder before anything heavy loads

    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed

    from t2vu.core import checkpoint
    from t2vu.core.context import ANCHOR, PRESERVED, TARGET, UNCOND, StepContext
    from t2vu.core.eraser_file import save_eraser
    from t2vu.core.states import make_states

    resumed = checkpoint.load(folder.resume_from[1]) if folder.resume_from else None
    if resumed is not None:
        _check_same_spec(resumed[1]["spec"], resolved, folder.resume_from[1])
    if getattr(resolved.backbone.options, "storage_dtype", None) and tr.gradient_checkpointing is not True:
        from t2vu.core.preflight import FP8_NEEDS_CHECKPOINTING

        raise T2VUError(f"backbone.storage_dtype: {FP8_NEEDS_CHECKPOINTING}")
    if getattr(backbone, "expert_count", 1) > 1 and tr.states != "noise":
        from t2vu.core.preflight import TRAJECTORY_EXPERTS

        raise T2VUError(f"training.states: {tr.states}: {TRAJECTORY_EXPERTS}")
    device_opt = resolved.backbone.options.device
    # some erasers get no gradient in a step: a stream held off (stream_start), or the experts a step does not run
    # (a backbone with several transformers, e.g. Wan 2.2 A14B, says how many with ``expert_count``)
    idle = bool(tr.stream_start) or getattr(backbone, "expert_count", 1) > 1
    accelerator = Accelerator(cpu=(device_opt == "cpu"), kwargs_handlers=[
        DistributedDataParallelKwargs(find_unused_parameters=idle)])
    main = accelerator.is_main_process
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
    every = 1 if tr.gradient_checkpointing is True else int(tr.gradient_checkpointing)
    if every == 1:
        backbone.enable_gradient_checkpointing()
    elif every > 1:  # (False is 0: no checkpointing)
        backbone.enable_gradient_checkpointing(every=every)

    stream_of = {site.name: site.stream for site in sites}
    chosen = set(erasers.site_names)
    attention_names = list(dict.fromkeys(site.attention for site in sites))
    attention_modules = list(dict.fromkeys(s.attention for s in sites if s.name in chosen and s.stream == "video"))
    _check_stream_start(tr, erasers, {stream_of[name] for name in erasers.site_names})
    params = [p for p in erasers.parameters() if p.requires_grad]
    groups = _param_groups(tr, erasers, stream_of)
    optimizer = torch.optim.AdamW(groups, lr=tr.learning_rate, weight_decay=tr.weight_decay)
    # the schedule is stepped once per optimiser step (not prepared: accelerate would step it once per process)
    lr_scheduler = _lr_schedule(tr, optimizer)
    step_module, optimizer = accelerator.prepare(_step_module(erasers), optimizer)

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

    first_step, guard = 0, _Guard(tr, [r.name for r, _ in losses])
    if resumed is not None:
        first_step, state = resumed
        erasers.load_state_dict_by_site({k: v.to(device) for k, v in state["eraser"].items()})
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        if hasattr(state_source, "load_state_dict"):
            state_source.load_state_dict(state["states"], device)
        checkpoint.set_rng_state(state["rng"], rng, generator)
        guard.load_state_dict(state["guard"])

    out, work = folder.out, folder.work
    meta = lambda step: _eraser_meta(backbone, prompts, resolved, step)  # noqa: E731

    def save_checkpoint(step: int) -> Optional[Path]:
        """Every process reaches this; the main one writes."""
        path = None
        if main:
            state = {"spec": resolved.to_dict(), "eraser": erasers.state_dict_by_site(),
                     "optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                     "states": state_source.state_dict() if hasattr(state_source, "state_dict") else {},
                     "rng": checkpoint.rng_state(rng, generator), "guard": guard.state_dict()}
            path = checkpoint.save(work, step, state=state, keep=tr.keep_checkpoints,
                                   write_eraser=lambda p: save_eraser(p, erasers, **meta(step)))
        accelerator.wait_for_everyone()
        return path

    history: list[dict] = []
    if main:
        work.mkdir(parents=True, exist_ok=True)
        (work / "prompts.json").write_text(json.dumps(
            {"target": prompts.target, "condition": condition, "unlearn": prompts.unlearn,
             "target_prompts": prompts.target_prompts, "anchors": prompts.anchors, "preserved": prompts.preserved},
            indent=2) + "\n")
        _write_spec(work / "spec.yaml", resolved)
        history = _kept_metrics(work / "metrics.jsonl", first_step)
    metrics_file = (work / "metrics.jsonl").open("a") if main else None
    progress = _Progress(console if main else None, tr.steps, [r.name for r, _ in losses], done=first_step)
    rank, n_proc = accelerator.process_index, accelerator.num_processes
    start = time.perf_counter()
    try:
        with _Signals() as signals:
            for step in range(first_step, tr.steps):
                b = tr.batch_size
                if tr.stream_start:  # streams not started yet are off for the whole step: its states and its loss
                    erasers.switch_off({stream for stream, start in tr.stream_start.items() if step < start})
                # the global batch, drawn alike on every process; each trains on its own slice
                trajectory_prompts = [rng.choice(prompts.target_prompts or prompts.unlearn) for _ in range(b * n_proc)]
                drawn = state_source.next(step, trajectory_prompts)
                targets = [_unlearn_prompt(condition, prompts, s, rng) for s in drawn.prompts]
                states = _slice(drawn, rank * b, b)
                preserved = [rng.choice(prompts.preserved) for _ in range(b * n_proc)] if prompts.preserved else []
                conds = {UNCOND: [""] * b, TARGET: targets[rank * b:(rank + 1) * b]}
                conds[ANCHOR] = [prompts.anchors[p] for p in conds[TARGET]]
                if preserved:
                    conds[PRESERVED] = preserved[rank * b:(rank + 1) * b]
                terms: dict = {}

                def compute():
                    ctx = StepContext(backbone, erasers, states.x_t, states.t, conds, embed,
                                      token_masks={TARGET: torch.stack([masks[p] for p in conds[TARGET]])},
                                      attention_modules=attention_modules or None,
                                      attention_names=attention_names)
                    if "uncond" in states.teacher:
                        ctx.seed_frozen(UNCOND, states.teacher["uncond"])
                    if "cond" in states.teacher and conds[TARGET] == states.prompts:  # the sampler's conditional pass
                        ctx.seed_frozen(TARGET, states.teacher["cond"])
                    ctx.prefetch(needs)
                    terms.update({r.name: loss(ctx) for r, loss in losses})
                    return sum(r.options.weight * terms[r.name] for r, _ in losses)

                total = step_module(compute)
                accelerator.backward(total)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, tr.max_grad_norm)
                values = {"loss": total.detach(), **{k: v.detach() for k, v in terms.items()}}
                if n_proc > 1:  # the logged (and checked) values are the global batch's
                    values = {k: accelerator.reduce(v.float(), "mean") for k, v in values.items()}
                values = {k: float(v) for k, v in values.items()}
                guard.check(step + 1, values, float(grad_norm), erasers=None, folder=work)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                guard.check(step + 1, values, float(grad_norm), erasers=erasers, folder=work)
                rates = lr_scheduler.get_last_lr()
                row = {"step": step + 1, **values, "grad_norm": float(grad_norm), "lr": rates[0],
                       **{f"lr_{g['stream']}": rate for g, rate in zip(groups, rates) if "stream" in g},
                       "seconds": round(time.perf_counter() - start, 3)}
                history.append(row)
                if main and ((step + 1) % tr.log_every == 0 or step + 1 == tr.steps):
                    metrics_file.write(json.dumps(row) + "\n")
                    metrics_file.flush()
                progress.update(row)
                if on_step:
                    on_step(row)
                stop = signals.agreed(accelerator)
                if stop and step + 1 < tr.steps:
                    path = save_checkpoint(step + 1)
                    name = {2: "SIGINT (Ctrl-C)", 15: "SIGTERM"}.get(stop, f"signal {stop}")
                    where = f"checkpoint written to {path}; " if path else ""
                    raise Interrupted(
                        f"interrupted by {name} after step {step + 1} of {tr.steps}; {where}continue with "
                        f"`t2vu run {resolved.source or 'SPEC'} --resume`", 128 + stop)
                if tr.checkpoint_every and (step + 1) % tr.checkpoint_every == 0 and step + 1 < tr.steps:
                    save_checkpoint(step + 1)
    finally:
        if metrics_file is not None:
            metrics_file.close()
        progress.close()
    path = out / ERASER_FILE
    if main:
        save_eraser(work / ERASER_FILE, erasers, **meta(tr.steps))
        path = folder.promote()
    accelerator.wait_for_everyone()
    erasers.detach()
    return RunResult(path, history)


def _step_module(erasers):
    """The erasers inside a module whose forward runs one step's loss: prepared by accelerate (DDP on several
    processes), its backward averages the erasers' gradients across processes."""
    import torch

    class StepModule(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.erasers = erasers

        def forward(self, compute: Callable[[], Any]):
            return compute()

    return StepModule()


def _slice(states, start: int, size: int):
    """This process's share of the global batch of training states."""
    from t2vu.core.states import States

    if start == 0 and size == len(states.prompts):
        return states
    end = start + size
    return States(states.x_t[start:end], states.t[start:end], states.prompts[start:end],
                  {k: v[start:end] for k, v in states.teacher.items()})


def _kept_metrics(path: Path, step: int) -> list[dict]:
    """Rows of ``metrics.jsonl`` up to ``step`` (a resumed run continues after them; later rows, written after
    the checkpoint it resumes from, are dropped); the file is rewritten with just those."""
    if step == 0 or not path.exists():
        if path.exists():
            path.unlink()
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut short by the interruption
        if isinstance(row, dict) and row.get("step", step + 1) <= step:
            rows.append(row)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)
    return rows


#: settings a resumed run may change: they decide what is written and shown, not what is trained
_RESUMABLE_CHANGES = ("output.", "training.gradient_checkpointing", "backbone.vae_tiling",
                      "backbone.offload_for_decode", "training.log_every", "training.checkpoint_every",
                      "training.keep_checkpoints", "eval", "training.divergence_factor")


def _as_resolved_now(saved: dict, resolved: ResolvedSpec) -> dict:
    """The checkpoint's spec resolved by this t2vu: options added since it was written take their defaults, so
    a run started by an earlier version resumes (its behaviour is what the defaults keep). As saved when it no
    longer validates."""
    import copy

    from t2vu.core import plugins
    from t2vu.core.spec import SpecDocument, SpecError, validate

    try:
        doc = SpecDocument(data=copy.deepcopy(saved), lines={}, source=resolved.source)
        return validate(doc, plugins.get_registry()).to_dict()
    except (SpecError, T2VUError, ValueError, TypeError):
        return saved


def _check_same_spec(saved: dict, resolved: ResolvedSpec, where: Path) -> None:
    """Resume only the run the checkpoint belongs to: the same spec, up to output and logging settings (and
    options this version added, at their defaults)."""
    saved = _as_resolved_now(saved, resolved)

    def flat(value, prefix=""):
        if isinstance(value, dict):
            for k, v in value.items():
                yield from flat(v, f"{prefix}{k}.")
        else:
            yield prefix[:-1], value

    before, now = dict(flat(saved)), dict(flat(resolved.to_dict()))
    for key in sorted(set(before) | set(now)):
        if key.startswith(_RESUMABLE_CHANGES) or before.get(key) == now.get(key):
            continue
        raise T2VUError(f"--resume: {key} is {now.get(key)!r} in the spec but was {before.get(key)!r} in the run "
                        f"that wrote {where}; resume with the spec that run used, or start over with "
                        "--set output.overwrite=true")


class _Guard:
    """Stops a run whose loss, gradients or eraser weights become non-finite or explode, naming the step, the
    term and the likely cause. "Explode": the total loss exceeds ``training.divergence_factor`` times the median
    of the last ``WINDOW`` steps' totals (a median, so one unusually small loss never makes normal ones look
    exploded)."""

    WINDOW = 50

    def __init__(self, tr, names: list[str]):
        self.tr, self.names = tr, names
        self.recent: dict[str, list[float]] = {}  # term (and "loss") -> its values of the last WINDOW steps

    def state_dict(self) -> dict:
        return {"recent": {k: list(v) for k, v in self.recent.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.recent = {k: list(v) for k, v in state["recent"].items()}

    def _median(self, name: str) -> float:
        values = sorted(abs(v) for v in self.recent.get(name, []))
        return values[len(values) // 2] if values else 0.0

    def _stop(self, step: int, what: str, folder: Path, weights_from: int) -> None:
        """Raise :class:`Diverged`; the checkpoint of ``weights_from`` (the update whose weights gave the bad
        values) is set aside as ``step-N.diverged``, so that it is neither offered as good nor resumed."""
        from t2vu.core import checkpoint

        suspect = checkpoint.folder(folder, weights_from)
        note = ""
        if weights_from > 0 and suspect.exists():
            suspect.rename(suspect.with_name(suspect.name + ".diverged"))
            note = f"; the checkpoint of step {weights_from}, whose weights gave these values, is set aside as " \
                   f"{suspect.name}.diverged"
        found = checkpoint.latest(folder)
        kept = (f"the last good checkpoint (step {found[0]}) is kept at {found[1]}" if found else
                "there is no checkpoint (training.checkpoint_every keeps one)")
        raise Diverged(f"step {step}: {what}; the run stopped and no eraser was written ({kept}{note}). Most likely "
                       f"training.learning_rate ({self.tr.learning_rate:g}) is too high: lower it (and/or "
                       f"training.max_grad_norm, {self.tr.max_grad_norm:g}) and start over")

    def check(self, step: int, values: dict[str, float], grad_norm: float, *, erasers, folder: Path) -> None:
        """Before the optimiser step (``erasers`` None): the losses and the gradient; after it: the weights."""
        if erasers is not None:
            import torch

            bad = [n for n, p in erasers.named_parameters() if not bool(torch.isfinite(p).all())]
            if bad:
                self._stop(step, f"the eraser weights became non-finite ({bad[0]}, {len(bad)} tensor(s))", folder,
                           weights_from=0)
            return
        for name in self.names + ["loss"]:
            if not math.isfinite(values[name]):
                self._stop(step, f"the loss term {name!r} became non-finite ({values[name]})", folder, step - 1)
        if not math.isfinite(grad_norm):
            self._stop(step, f"the gradient norm became non-finite ({grad_norm})", folder, step - 1)
        ref = self._median("loss")
        if ref > 0 and abs(values["loss"]) > self.tr.divergence_factor * ref:
            grown = max(self.names, key=lambda n: abs(values[n]) / max(self._median(n), 1e-12))
            self._stop(step, f"the loss exploded to {values['loss']:.3g}, over training.divergence_factor "
                             f"({self.tr.divergence_factor:g}) times its recent median ({ref:.3g}); the term "
                             f"{grown!r} grew most ({values[grown]:.3g})", folder, step - 1)
        for name, value in values.items():
            self.recent[name] = (self.recent.get(name, []) + [value])[-self.WINDOW:]


class _Signals:
    """SIGINT/SIGTERM while training: remember them, so the loop finishes its step, writes a checkpoint and
    exits; a second Ctrl-C stops at once."""

    def __init__(self):
        self.signum = 0
        self._previous: dict = {}

    def __enter__(self) -> "_Signals":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        import signal

        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def agreed(self, accelerator) -> int:
        """The signal to stop for, the same on every process (any process's signal stops them all)."""
        if accelerator.num_processes == 1:
            return self.signum
        import torch

        got = accelerator.reduce(torch.tensor([self.signum], device=accelerator.device), "max")
        return int(got.item())

    def __exit__(self, *exc) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


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

    def __init__(self, console, total: int, names: list[str], done: int = 0):
        self.names = names
        self.done = done
        self.progress = None
        if console is not None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                     console=console, transient=False)
            self.task = self.progress.add_task("train", total=total, info="", completed=done)
            self.progress.start()

    def update(self, row: dict) -> None:
        if self.progress is None:
            return
        speed = (row["step"] - self.done) / max(row["seconds"], 1e-9)
        info = " ".join(f"{n}={row[n]:.4g}" for n in self.names) + f" | {speed:.2f} it/s"
        self.progress.update(self.task, advance=1, info=info)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
