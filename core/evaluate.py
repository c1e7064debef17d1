"""``t2vu eval``: generate with and without the erasers from the same seeds, judge, report.

Writes ``<output.dir>/eval/report.json`` (``summary``: metric -> {"before", "after"}, the exact
``settings`` (sampler, clip size, judges, seeds) and each eraser's file, scale and metadata, plus every row; keys
sorted, so
two reports diff cleanly), ``report.md`` (the table and side-by-side thumbnails) and the thumbnails
themselves. An earlier report is never replaced unless asked (``--overwrite``); :func:`compare` puts two
reports side by side (``t2vu eval --compare A B``).
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from t2vu.core.errors import T2VUError
from t2vu.core.spec import ResolvedSpec


@dataclass
class EvalPrompt:
    """One evaluation prompt: its seed, a group name, and the labels the judges should give."""

    prompt: str
    seed: int = 0
    group: str = ""
    expect: dict[str, str] = field(default_factory=dict)  # attribute -> label


@dataclass
class EvalResult:
    item: EvalPrompt
    before: dict[str, str]  # attribute -> label judged without the eraser
    after: dict[str, str]  # ... with the eraser
    pixel_change: float  # mean |after - before| on [0, 1]
    counts_before: dict[str, dict[str, int]] = field(default_factory=dict)  # attribute -> per-class counts
    counts_after: dict[str, dict[str, int]] = field(default_factory=dict)
    scores_before: dict[str, float] = field(default_factory=dict)  # attribute -> score (judges that score)
    scores_after: dict[str, float] = field(default_factory=dict)
    baselines: dict[str, dict[str, str]] = field(default_factory=dict)  # baseline -> attribute -> label
    safree_triggers: Optional[list[int]] = None  # the safree baseline's projected token positions


def rows_from_csv(path: Path, seeds: list[int], prompt_column: str = "prompt",
                  seed_column: str = "seed") -> list[EvalPrompt]:
    """Rows of a CSV prompt set: ``prompt_column``, optional ``seed_column``, ``group`` and ``expect_<attribute>``
    columns; a row without a seed is repeated for each of ``seeds``."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or prompt_column not in reader.fieldnames:
                raise T2VUError(f"eval.prompts: {path} needs a {prompt_column!r} column (it has "
                                f"{reader.fieldnames}); name the prompt column with eval.prompt_column")
            raw = list(reader)
    except OSError as exc:
        raise T2VUError(f"eval.prompts: cannot read {path}: {exc}") from None
    rows = []
    for i, r in enumerate(raw, start=2):
        prompt = (r.get(prompt_column) or "").strip()
        if not prompt:
            continue
        expect = {k[len("expect_"):]: v.strip() for k, v in r.items() if k and k.startswith("expect_") and v}
        seed = (r.get(seed_column) or "").strip()
        if seed:
            try:
                row_seeds = [int(float(seed))] if float(seed).is_integer() else [int(seed)]
            except ValueError:
                raise T2VUError(f"eval.prompts: {path} line {i}: {seed_column} {seed!r} is not an integer") from None
        else:
            row_seeds = seeds
        rows += [EvalPrompt(prompt, s, (r.get("group") or "").strip(), expect) for s in row_seeds]
    return rows


def eval_rows(resolved: ResolvedSpec) -> tuple[list[EvalPrompt], Any]:
    """The prompt rows and the prompt set object (which may summarise), from the spec's eval block."""
    ev = resolved.spec.eval
    if resolved.eval_prompts is not None:
        prompt_set = resolved.eval_prompts.build()
        return list(prompt_set.rows(resolved)), prompt_set
    if isinstance(ev.prompts, list):
        return [EvalPrompt(p, s) for p in ev.prompts for s in ev.seeds], None
    return rows_from_csv(Path(ev.prompts), ev.seeds, ev.prompt_column, ev.seed_column), None


def generic_summary(results: list[EvalResult], positive: Optional[dict[str, str]] = None) -> dict[str, dict[str, float]]:
    """Per judged attribute with expectations: accuracy before/after; for a judge that scores (``score(video,
    prompt)``, e.g. CLIP score) the mean score; for a judge with a ``positive`` label
    (``positive``: attribute -> label, e.g. nudity -> unsafe) the share of videos given it, ``<attribute>_rate``;
    for judges that count, ``<attribute>_<class>`` summed over videos; mean pixel change."""
    summary: dict[str, dict[str, float]] = {}
    for attr, label in (positive or {}).items():
        rs = [r for r in results if attr in r.before]
        if rs:
            summary[f"{attr}_rate"] = {"before": sum(r.before[attr] == label for r in rs) / len(rs),
                                       "after": sum(r.after[attr] == label for r in rs) / len(rs), "n": len(rs)}
    for attr in sorted({a for r in results for a in r.scores_before}):
        rs = [r for r in results if attr in r.scores_before]
        summary[attr] = {"before": sum(r.scores_before[attr] for r in rs) / len(rs),
                         "after": sum(r.scores_after[attr] for r in rs) / len(rs), "n": len(rs)}
    for attr in sorted({a for r in results for a in r.counts_before}):
        for name in dict.fromkeys(k for r in results for k in r.counts_before.get(attr, {})):
            summary[f"{attr}_{name}"] = {"before": sum(r.counts_before.get(attr, {}).get(name, 0) for r in results),
                                         "after": sum(r.counts_after.get(attr, {}).get(name, 0) for r in results),
                                         "n": len(results)}
    attributes = sorted({a for r in results for a in r.item.expect if a in r.before})
    for attr in attributes:
        rs = [r for r in results if attr in r.item.expect]
        summary[f"{attr}_accuracy"] = {
            "before": sum(r.before[attr] == r.item.expect[attr] for r in rs) / len(rs),
            "after": sum(r.after[attr] == r.item.expect[attr] for r in rs) / len(rs), "n": len(rs)}
    if results:
        summary["pixel_change"] = {"before": 0.0, "after": sum(r.pixel_change for r in results) / len(results),
                                   "n": len(results)}
    return summary


def default_eraser(resolved: ResolvedSpec, eraser: Optional[Path]) -> Path:
    path = Path(eraser) if eraser else Path(resolved.spec.output.dir) / "eraser.safetensors"
    if not path.is_file():
        raise T2VUError(f"no eraser at {path}: train one with `t2vu run {resolved.source or 'SPEC'}` "
                        "or pass --eraser FILE")
    return path


def generation_options(resolved: ResolvedSpec, protocol: Optional[str] = None):
    """The backbone options generation uses: the spec's, with ``protocol``'s backbone settings (its sampler's)."""
    from t2vu.core.spec import eval_protocol

    options = resolved.backbone.options
    if protocol is None:
        return options
    preset = eval_protocol(resolved.backbone, protocol)
    if preset is None:
        raise T2VUError(f"eval.protocol: backbone {resolved.backbone.name!r} has no protocol {protocol!r}")
    return type(options).model_validate({**options.model_dump(), **dict(preset.backbone)})


def chosen_erasers(resolved: ResolvedSpec, erasers: Optional[Sequence[Path]] = None,
                   scales: Optional[Sequence[float]] = None) -> list[tuple[Path, float]]:
    """``(file, scale)`` for each eraser a command attaches: ``erasers`` (default: the spec's own,
    ``<output.dir>/eraser.safetensors``) with ``scales`` (none: 1.0 each; one: the same for all; else one per
    eraser, in order)."""
    paths = [default_eraser(resolved, p) for p in erasers] if erasers else [default_eraser(resolved, None)]
    scales = list(scales or [])
    if len(scales) > 1 and len(scales) != len(paths):
        raise T2VUError(f"{len(scales)} --scale values for {len(paths)} erasers: give one --scale per --eraser "
                        "(in the same order) or a single --scale for all of them")
    values = scales * len(paths) if len(scales) == 1 else (scales or [1.0] * len(paths))
    return [(p, float(v)) for p, v in zip(paths, values)]


def safree_settings(resolved: ResolvedSpec):
    """The safree baseline's settings (``eval.safree``; the defaults without an eval block), its keywords (default:
    ``[concept.target]``) and the negative prompt it guides with (the keywords joined, or ``None``)."""
    from t2vu.core.spec import SafreeSpec

    settings = resolved.spec.eval.safree if resolved.spec.eval is not None else SafreeSpec()
    keywords = list(settings.keywords or [resolved.spec.concept.target.strip()])
    return settings, keywords, ", ".join(keywords) if settings.negative_prompt else None


def safree_early(backbone, prompts: list[str], keywords: list[str], settings, steps: int, setting: str):
    """``((condition per prompt, the steps that use them), trigger positions per prompt)`` for ``generate``'s
    ``early``; :class:`T2VUError` naming ``setting`` when the backbone offers no SAFREE projection."""
    if getattr(backbone, "safree_conditions", None) is None:
        raise T2VUError(f"{setting}: backbone {backbone.name!r} does not offer the safree baseline (its condition "
                        "has no SAFREE projection yet)")
    projected = backbone.safree_conditions(list(dict.fromkeys(prompts)), keywords, settings.alpha)
    early = ({p: c for p, (c, _) in projected.items()}, round(settings.filter_share * steps))
    return early, {p: found for p, (_, found) in projected.items()}


def load_for_generation(resolved: ResolvedSpec, erasers: Sequence[tuple[Path, float]], prompts: list[str],
                        options=None):
    """The backbone (loaded, with ``options``: default the spec's), the erasers attached to it (``(file,
    scale)`` pairs, attached in order; one :class:`~t2vu.core.eraser_load.EraserHandle` each), and the prompts'
    embeddings."""
    import torch

    from t2vu.core.eraser_load import load_eraser

    options = options if options is not None else resolved.backbone.options
    backbone = resolved.backbone.component.build(options)
    device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    backbone.load(device)
    embeddings = backbone.encode_prompts([""] + list(prompts))
    handles = [load_eraser(backbone.transformer, path, scale) for path, scale in erasers]
    return backbone, handles, embeddings


def _judge(judge, video) -> tuple[str, Optional[dict[str, int]]]:
    """A judge's label for ``video`` and, for judges that count (``judge_with_details``), its counts."""
    if hasattr(judge, "judge_with_details"):
        return judge.judge_with_details(video)
    return judge(video), None


def report_dir(resolved: ResolvedSpec, out: Optional[Path] = None, overwrite: bool = False) -> Path:
    """Where the report goes (``out``, default ``<output.dir>/eval``); refuses a folder that already holds a
    report unless ``overwrite``, before anything is generated."""
    folder = Path(out) if out is not None else Path(resolved.spec.output.dir) / "eval"
    if (folder / "report.json").exists() and not overwrite:
        raise T2VUError(f"{folder} already holds a report (report.json); write this one elsewhere with "
                        "--out DIR, or replace it with --overwrite")
    return folder


def evaluate(resolved: ResolvedSpec, eraser: Optional[Path] = None, console=None, out: Optional[Path] = None,
             overwrite: bool = False, erasers: Optional[Sequence[tuple[Path, float]]] = None) -> dict:
    """Generate the eval prompts without and with the erasers, judge both, write the report and return it.

    ``erasers``: the ``(file, scale)`` pairs attached together (:func:`chosen_erasers`); default ``eraser``
    (default: the spec's own) at scale 1.
    """
    ev = resolved.spec.eval
    if ev is None:
        raise T2VUError("the spec has no 'eval:' section; add one (see docs/evaluation.md)")
    folder = report_dir(resolved, out, overwrite)
    if not resolved.judges:
        raise T2VUError("eval.judges is empty: name at least one evaluator (`t2vu plugins list --kind evaluator`)")
    erasers = list(erasers) if erasers else [(default_eraser(resolved, eraser), 1.0)]
    rows, prompt_set = eval_rows(resolved)
    if not rows:
        raise T2VUError("eval.prompts yielded no prompts")
    judges = [j.build() for j in resolved.judges]
    tr = resolved.spec.training
    frames, height, width = ev.num_frames or tr.num_frames, ev.height or tr.height, ev.width or tr.width

    from t2vu.core.sampling import generate, side_by_side

    options = generation_options(resolved, ev.protocol)
    concept = resolved.spec.concept.target.strip()
    _, keywords, safree_negative = safree_settings(resolved)
    extra = [concept] if "negative_prompt" in ev.baselines else []
    if "safree" in ev.baselines and safree_negative is not None:
        extra.append(safree_negative)
    backbone, handles, embeddings = load_for_generation(resolved, erasers, [r.prompt for r in rows] + extra,
                                                        options)
    kwargs = dict(num_frames=frames, height=height, width=width, steps=ev.steps, guidance=ev.guidance,
                  batch_size=ev.batch_size)
    prompts = [r.prompt for r in rows]
    picked = set(_spread([r.group for r in rows], ev.thumbnails))
    results: list[EvalResult] = []
    others: dict[str, list[EvalResult]] = {name: [] for name in ev.baselines}
    thumbs: dict[int, Any] = {}
    triggers: dict[str, list[int]] = {}
    try:
        methods = {}  # baseline -> generate() arguments: inference-time methods on the stock model, for comparison
        for name in ev.baselines:  # each checked before anything is generated
            negative = concept if name == "negative_prompt" else safree_negative
            early = None
            if name == "safree":  # (refused first where the backbone has no projection at all)
                early, triggers = safree_early(backbone, prompts, keywords, ev.safree, ev.steps, "eval.baselines")
            if negative is not None and not backbone.negative_prompting:
                raise T2VUError(f"eval.baselines: {name} guides with a negative prompt, which needs two-pass "
                                f"guidance with a free negative branch; this {resolved.backbone.name} model does not "
                                "sample with one (a guidance-distilled model guides in one pass; a fixed "
                                "backbone.negative_prompt takes the branch)"
                                + ("; set eval.safree.negative_prompt: false" if name == "safree" else
                                   "; drop it from eval.baselines"))
            methods[name] = dict(negative=negative, early=early)
        # a batch at a time: generated, judged, then dropped (only the thumbnails' videos are kept)
        for start in range(0, len(rows), ev.batch_size):
            chunk = rows[start:start + ev.batch_size]
            args = ([r.prompt for r in chunk], [r.seed for r in chunk])
            before = generate(backbone, embeddings, *args, disabled_erasers=handles, **kwargs)
            after = generate(backbone, embeddings, *args, **kwargs)
            seen = [_verdicts(judges, v, r.prompt) for v, r in zip(before, chunk)]
            results += _results(chunk, seen, before, after, judges)
            for name, extra_args in methods.items():
                videos = generate(backbone, embeddings, *args, disabled_erasers=handles, **extra_args, **kwargs)
                others[name] += _results(chunk, seen, before, videos, judges)
            for j, i in enumerate(range(start, start + len(chunk))):
                if i in picked:
                    thumbs[i] = side_by_side(before[j], after[j])
    finally:
        for handle in handles:
            handle.remove()

    positive = {j.attribute: j.positive for j in judges if getattr(j, "positive", None)}

    def summarize(rs):
        return prompt_set.summarize(rs) if hasattr(prompt_set, "summarize") else generic_summary(rs, positive)

    summary = summarize(results)
    for name, other in others.items():
        for metric, value in summarize(other).items():
            if metric in summary:
                summary[metric][name] = value["after"]
        for r, o in zip(results, other):
            r.baselines[name] = o.after
    for r in results:
        if r.item.prompt in triggers:
            r.safree_triggers = triggers[r.item.prompt]
    settings = {"backbone": resolved.backbone.name, "protocol": ev.protocol, "baselines": list(ev.baselines),
                **({"safree": ev.safree.model_dump(mode="json")} if "safree" in ev.baselines else {}),
                "backbone_options": options.model_dump(mode="json"), "num_frames": frames, "height": height, "width": width,
                "steps": ev.steps, "guidance": ev.guidance, "seeds": ev.seeds, "batch_size": ev.batch_size,
                "judges": [j.to_dict() for j in resolved.judges],
                "prompts": ev.prompts if not isinstance(ev.prompts, dict) else resolved.eval_prompts.to_dict()}
    attached = [{"path": str(h.path), "scale": h.scale, "metadata": dict(h.metadata)} for h in handles]
    return write_report(resolved, attached, results, summary, thumbs, console, folder, settings)


def _verdicts(judges: list, video, prompt: str) -> tuple[dict, dict, dict]:
    """Every judge on one video: labels, per-class counts (judges that count), scores (judges that score)."""
    labels, counts, scores = {}, {}, {}
    for j in judges:
        if hasattr(j, "score"):
            scores[j.attribute] = j.score(video, prompt)
            continue
        label, count = _judge(j, video)
        labels[j.attribute] = label
        if count is not None:
            counts[j.attribute] = count
    return labels, counts, scores


def _results(rows: list[EvalPrompt], seen: list[tuple], before, after, judges: list) -> list[EvalResult]:
    """One :class:`EvalResult` per row: the verdicts ``seen`` on ``before`` (computed once) and on ``after``."""
    out = []
    for i, item in enumerate(rows):
        (lb, cb, sb), (la, ca, sa) = seen[i], _verdicts(judges, after[i], item.prompt)
        out.append(EvalResult(item, lb, la, float((after[i] - before[i]).abs().mean()), cb, ca, sb, sa))
    return out


def _public_metadata(meta: dict) -> dict:
    """An eraser's metadata for a report: without the (long) training spec and transformer config."""
    return {k: v for k, v in meta.items() if k not in ("spec", "backbone_config")}


def write_report(resolved, erasers: list[dict], results, summary, thumbs: dict, console=None, out=None,
                 settings=None) -> dict:
    """``report.json``/``report.md`` and the thumbnails; ``erasers``: ``{"path", "scale", "metadata"}`` per
    eraser attached, in order; ``thumbs``: row index -> its side-by-side video (without, with the erasers)."""
    from t2vu.core.sampling import write_video

    out = Path(out) if out is not None else Path(resolved.spec.output.dir) / "eval"
    (out / "thumbs").mkdir(parents=True, exist_ok=True)
    picked = sorted(thumbs)
    for i in picked:
        write_video(out / "thumbs" / f"{i:04d}.gif", thumbs[i], fps=resolved.video_defaults.fps,
                    upscale=resolved.video_defaults.upscale)
    erasers = [{**e, "metadata": _public_metadata(e.get("metadata") or {})} for e in erasers]
    report = {
        "erasers": erasers, "settings": settings or {}, "summary": summary,
        "rows": [{**asdict(r.item), "before": r.before, "after": r.after, "pixel_change": r.pixel_change,
                  **({"counts_before": r.counts_before, "counts_after": r.counts_after} if r.counts_before else {}),
                  **({"scores_before": r.scores_before, "scores_after": r.scores_after} if r.scores_before else {}),
                  **({"baselines": r.baselines} if r.baselines else {}),
                  **({"safree_triggers": r.safree_triggers} if r.safree_triggers is not None else {})}
                 for r in results],
    }
    report = json.loads(json.dumps(report, default=str))
    (out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    named = ", ".join(f"`{e['path']}`" + (f" (scale {e['scale']:g})" if e["scale"] != 1 else "") for e in erasers)
    extra = _baseline_names(summary)
    lines = ["# Evaluation", "", f"Eraser{'s' if len(erasers) > 1 else ''}: {named}", "",
             "| metric | before | after | " + "".join(f"{b} | " for b in extra) + "n |",
             "|---|---|---|" + "---|" * len(extra) + "---|"]
    lines += [f"| {k} | {_fmt(v['before'])} | {_fmt(v['after'])} | " + "".join(f"{_fmt(v.get(b, '-'))} | " for b in extra)
              + f"{v.get('n', '')} |" for k, v in summary.items()]
    if extra:
        lines += ["", "Baselines: the stock model (erasers off) with an inference-time method instead "
                  f"({', '.join(extra)}; see docs/evaluation.md), same seeds."]
    if picked:
        lines += ["", "## Without (left) and with (right) the erasers, same seed", ""]
        for i in picked:
            r = results[i]
            lines.append(f"- `{r.item.prompt}` (seed {r.item.seed}{', ' + r.item.group if r.item.group else ''}): "
                         f"{r.before} -> {r.after}  \n  ![](thumbs/{i:04d}.gif)")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    if console is not None:
        print_summary(console, summary)
    return report


def compare(a: Path, b: Path) -> tuple[list[tuple[str, ...]], list[tuple[str, str, str]]]:
    """Two reports side by side: rows ``(metric, A before, A after, B before, B after)`` for every metric of
    either, and the settings that differ, ``(key, A, B)``. ``a``/``b``: ``report.json`` files or their folders."""
    reports = []
    for path in (Path(a), Path(b)):
        path = path / "report.json" if path.is_dir() else path
        try:
            reports.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            raise T2VUError(f"--compare: cannot read the report {path} ({exc}); pass report.json files or the "
                            "folders that hold them") from None
    ra, rb = reports
    rows = []
    for metric in dict.fromkeys([*ra.get("summary", {}), *rb.get("summary", {})]):
        va, vb = ra["summary"].get(metric, {}), rb["summary"].get(metric, {})
        rows.append((metric, _fmt(va.get("before", "-")), _fmt(va.get("after", "-")),
                     _fmt(vb.get("before", "-")), _fmt(vb.get("after", "-"))))

    def flat(d, prefix=""):
        for k, v in (d or {}).items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", json.dumps(v, sort_keys=True)

    def erasers(report):  # erasers.0.scale, erasers.0.target, ... (one-eraser reports of earlier versions too)
        found = report.get("erasers")
        if found is None and "eraser" in report:
            found = [{"path": report["eraser"], "metadata": report.get("eraser_metadata") or {}}]
        return {str(i): {**{k: v for k, v in e.items() if k not in ("metadata", "path")},
                         **(e.get("metadata") or {})}
                for i, e in enumerate(found or [])}

    sa = dict(flat({"settings": ra.get("settings"), "erasers": erasers(ra)}))
    sb = dict(flat({"settings": rb.get("settings"), "erasers": erasers(rb)}))
    differ = [(k, sa.get(k, "-"), sb.get(k, "-")) for k in sorted(set(sa) | set(sb)) if sa.get(k) != sb.get(k)]
    return rows, differ


def print_summary(console, summary: dict) -> None:
    from rich.table import Table

    extra = _baseline_names(summary)
    table = Table(title="before / after the eraser" + (f" / {', '.join(extra)}" if extra else ""))
    for col in ("metric", "before", "after", *extra, "n"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for k, v in summary.items():
        table.add_row(k, _fmt(v["before"]), _fmt(v["after"]), *(_fmt(v.get(b, "-")) for b in extra),
                      str(v.get("n", "")))
    console.print(table)


def _baseline_names(summary: dict) -> list[str]:
    """The baseline columns of a summary (keys besides before/after/n), in first-seen order."""
    return list(dict.fromkeys(k for v in summary.values() for k in v if k not in ("before", "after", "n")))


def _fmt(x) -> str:
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def _spread(groups_of_rows: list[str], n: int) -> list[int]:
    """Up to ``n`` row indices, taking the rows' groups in turn so each group is shown."""
    groups: dict[str, list[int]] = {}
    for i, group in enumerate(groups_of_rows):
        groups.setdefault(group, []).append(i)
    picked: list[int] = []
    while len(picked) < min(n, len(groups_of_rows)):
        for idx in groups.values():
            if idx and len(picked) < n:
                picked.append(idx.pop(0))
    return sorted(picked)
