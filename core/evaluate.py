"""``t2vu eval``: generate with and without the eraser from the same seeds, judge, report.

Writes ``<output.dir>/eval/report.json`` (``summary``: metric -> {"before", "after"},
plus every row), ``report.md`` (the table and side-by-side thumbnails) and the
thumbnails themselves.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

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


def rows_from_csv(path: Path, seeds: list[int]) -> list[EvalPrompt]:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or "prompt" not in reader.fieldnames:
                raise T2VUError(f"eval.prompts: {path} needs a 'prompt' column (has {reader.fieldnames})")
            raw = list(reader)
    except OSError as exc:
        raise T2VUError(f"eval.prompts: cannot read {path}: {exc}") from None
    rows = []
    for i, r in enumerate(raw, start=2):
        prompt = (r.get("prompt") or "").strip()
        if not prompt:
            continue
        expect = {k[len("expect_"):]: v.strip() for k, v in r.items() if k and k.startswith("expect_") and v}
        if r.get("seed", "").strip():
            try:
                row_seeds = [int(r["seed"])]
            except ValueError:
                raise T2VUError(f"eval.prompts: {path} line {i}: seed {r['seed']!r} is not an integer") from None
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
    return rows_from_csv(Path(ev.prompts), ev.seeds), None


def generic_summary(results: list[EvalResult]) -> dict[str, dict[str, float]]:
    """Per judged attribute with expectations: accuracy before/after; mean pixel change."""
    summary: dict[str, dict[str, float]] = {}
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


def load_for_generation(resolved: ResolvedSpec, eraser_path: Path, prompts: list[str]):
    """The backbone (loaded), the eraser attached to it, and the prompts' embeddings."""
    import torch

    from t2vu.core.eraser_load import load_eraser

    backbone = resolved.backbone.build()
    device = resolved.backbone.options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    backbone.load(device)
    embeddings = backbone.encode_prompts([""] + list(prompts))
    handle = load_eraser(backbone.transformer, eraser_path)
    return backbone, handle, embeddings


def evaluate(resolved: ResolvedSpec, eraser: Optional[Path] = None, console=None) -> dict:
    ev = resolved.spec.eval
    if ev is None:
        raise T2VUError("the spec has no 'eval:' section; add one (see docs/evaluation.md)")
    if not resolved.judges:
        raise T2VUError("eval.judges is empty: name at least one evaluator (`t2vu plugins list --kind evaluator`)")
    eraser_path = default_eraser(resolved, eraser)
    rows, prompt_set = eval_rows(resolved)
    if not rows:
        raise T2VUError("eval.prompts yielded no prompts")
    judges = [j.build() for j in resolved.judges]
    tr = resolved.spec.training
    frames, height, width = ev.num_frames or tr.num_frames, ev.height or tr.height, ev.width or tr.width

    from t2vu.core.sampling import generate

    backbone, handle, embeddings = load_for_generation(resolved, eraser_path, [r.prompt for r in rows])
    kwargs = dict(num_frames=frames, height=height, width=width, steps=ev.steps, guidance=ev.guidance,
                  batch_size=ev.batch_size)
    prompts, seeds = [r.prompt for r in rows], [r.seed for r in rows]
    before = generate(backbone, embeddings, prompts, seeds, disabled_erasers=handle.erasers, **kwargs)
    after = generate(backbone, embeddings, prompts, seeds, **kwargs)
    handle.remove()

    results = []
    for i, item in enumerate(rows):
        results.append(EvalResult(
            item, {j.attribute: j(before[i]) for j in judges}, {j.attribute: j(after[i]) for j in judges},
            float((after[i] - before[i]).abs().mean())))
    summary = prompt_set.summarize(results) if hasattr(prompt_set, "summarize") else generic_summary(results)
    return write_report(resolved, eraser_path, results, summary, before, after, console)


def write_report(resolved, eraser_path, results, summary, before, after, console=None) -> dict:
    from t2vu.core.sampling import side_by_side, write_video

    out = Path(resolved.spec.output.dir) / "eval"
    thumbs = out / "thumbs"
    thumbs.mkdir(parents=True, exist_ok=True)
    picked = _spread(results, resolved.spec.eval.thumbnails)
    for i in picked:
        write_video(thumbs / f"{i:04d}.gif", side_by_side(before[i], after[i]), fps=resolved.video_defaults.fps,
                    upscale=resolved.video_defaults.upscale)
    report = {
        "eraser": str(eraser_path), "summary": summary,
        "rows": [{**asdict(r.item), "before": r.before, "after": r.after, "pixel_change": r.pixel_change}
                 for r in results],
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# Evaluation", "", f"Eraser: `{eraser_path}`", "", "| metric | before | after | n |",
             "|---|---|---|---|"]
    lines += [f"| {k} | {_fmt(v['before'])} | {_fmt(v['after'])} | {v.get('n', '')} |" for k, v in summary.items()]
    if picked:
        lines += ["", "## Without (left) and with (right) the eraser, same seed", ""]
        for i in picked:
            r = results[i]
            lines.append(f"- `{r.item.prompt}` (seed {r.item.seed}{', ' + r.item.group if r.item.group else ''}): "
                         f"{r.before} -> {r.after}  \n  ![](thumbs/{i:04d}.gif)")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    if console is not None:
        print_summary(console, summary)
    return report


def print_summary(console, summary: dict) -> None:
    from rich.table import Table

    table = Table(title="before / after the eraser")
    for col in ("metric", "before", "after", "n"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for k, v in summary.items():
        table.add_row(k, _fmt(v["before"]), _fmt(v["after"]), str(v.get("n", "")))
    console.print(table)


def _fmt(x) -> str:
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def _spread(results: list[EvalResult], n: int) -> list[int]:
    """Up to ``n`` row indices, taking groups in turn so each group is shown."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(results):
        groups.setdefault(r.item.group, []).append(i)
    picked: list[int] = []
    while len(picked) < min(n, len(results)):
        for idx in groups.values():
            if idx and len(picked) < n:
                picked.append(idx.pop(0))
    return sorted(picked)
