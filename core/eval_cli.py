"""``t2vu generate`` and ``t2vu eval``: generic over backbones; heavy imports inside the commands."""

from __future__ import annotations

import re
from pathlib import Path
from typing import List, Optional, Tuple

import typer

SET_HELP = "Override a spec field, e.g. --set eval.steps=10 (value parsed as YAML)."


ERASER_HELP = ("Eraser file; repeat to attach several at once, e.g. a nudity and a celebrity eraser "
               "(default: <output.dir>/eraser.safetensors).")
SCALE_HELP = ("Eraser strength: one value for all erasers, or one per --eraser in order (default 1; 0 switches an "
              "eraser off, below 1 weakens it, above 1 strengthens it).")


def _erasers(resolved, erasers: Optional[List[Path]], scales: Optional[List[float]]):
    """The ``(file, scale)`` pairs a command attaches and the setting that names them (``--eraser`` or
    ``output.dir``); exit 1 for a missing file or a --scale count that does not match."""
    from t2vu.core.cli import fail
    from t2vu.core.errors import T2VUError
    from t2vu.core.evaluate import chosen_erasers

    try:
        chosen = chosen_erasers(resolved, erasers, scales)
    except T2VUError as exc:
        fail(str(exc))
    return chosen, "--eraser" if erasers else "output.dir"


def generate_command(
    spec: Path = typer.Argument(..., help="The run spec (YAML) whose backbone generates."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="The text prompt."),
    eraser: Optional[List[Path]] = typer.Option(None, "--eraser", help=ERASER_HELP),
    scale: Optional[List[float]] = typer.Option(None, "--scale", help=SCALE_HELP),
    compare: bool = typer.Option(False, "--compare", help="Also generate without the erasers, same seed, and a side-by-side GIF."),
    negative_prompt: Optional[str] = typer.Option(
        None, "--negative-prompt", help="Negative prompt of two-pass guidance for the erased video (e.g. the "
        "concept, for negative prompting; with --scale 0 it alone acts); default: the backbone's."),
    safree: bool = typer.Option(
        False, "--safree", help="Sample the erased video with SAFREE's prompt projection too (settings: the spec's "
        "eval.safree; with --scale 0 it alone acts)."),
    seed: int = typer.Option(0, "--seed", help="Noise seed."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Sampler steps (default: the backbone's)."),
    guidance: Optional[float] = typer.Option(
        None, "--guidance", help="Guidance scale, as the backbone guides (default: the backbone's)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for the videos (default: <output.dir>/samples)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
) -> None:
    """Generate a video with the erasers (and, with --compare, without them from the same seed)."""
    from t2vu.core.cli import console, fail, load_resolved, preflight
    from t2vu.core.errors import T2VUError

    resolved = load_resolved(spec, set_)
    erasers, setting = _erasers(resolved, eraser, scale)
    preflight(resolved, "generate", [p for p, _ in erasers], setting)
    if out is not None:
        from t2vu.core.preflight import writable_problem

        problem = writable_problem(out, "--out")
        if problem is not None:
            fail(f"--out: {problem}", 2)
    try:
        from t2vu.core.evaluate import load_for_generation
        from t2vu.core.sampling import generate, side_by_side, write_video

        from t2vu.core.evaluate import safree_early, safree_settings

        sf, keywords, safree_negative = safree_settings(resolved)
        if safree and negative_prompt is None:
            negative_prompt = safree_negative  # as the safree baseline guides
        backbone, handles, embeddings = load_for_generation(
            resolved, erasers, [prompt] + ([negative_prompt] if negative_prompt is not None else []))
        if negative_prompt is not None and not backbone.negative_prompting:
            raise T2VUError(f"--negative-prompt: this {resolved.backbone.name} model guides without a free negative "
                            "branch (one-pass guidance, or a fixed backbone.negative_prompt)")
        tr, defaults = resolved.spec.training, resolved.video_defaults
        steps = steps or defaults.steps
        guidance = guidance if guidance is not None else defaults.guidance
        if steps is None or guidance is None:
            raise T2VUError(f"backbone {resolved.backbone.name!r} has no default sampler steps or guidance; "
                            "pass --steps and --guidance")
        kwargs = dict(num_frames=tr.num_frames, height=tr.height, width=tr.width, steps=steps, guidance=guidance)
        early = None
        if safree:
            early, triggers = safree_early(backbone, [prompt], keywords, sf, steps, "--safree")
            console.print(f"SAFREE projected token positions: {triggers[prompt] or 'none'}")
        erased = generate(backbone, embeddings, [prompt], [seed], negative=negative_prompt, early=early,
                          **kwargs)[0]
        original = generate(backbone, embeddings, [prompt], [seed], disabled_erasers=handles,
                            **kwargs)[0] if compare else None
        for handle in handles:
            handle.remove()
    except T2VUError as exc:
        fail(str(exc))
        return
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:60] or "prompt"
    folder = (out or Path(resolved.spec.output.dir) / "samples") / f"{slug}-seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    video = {"fps": resolved.video_defaults.fps, "upscale": resolved.video_defaults.upscale}
    write_video(folder / "erased.mp4", erased, **video)
    written = [folder / "erased.mp4"]
    if original is not None:
        write_video(folder / "original.mp4", original, **video)
        write_video(folder / "compare.gif", side_by_side(original, erased), **video)
        written += [folder / "original.mp4", folder / "compare.gif"]
        console.print(f"mean pixel change: {float((erased - original).abs().mean()):.4f}")
    for path in written:
        console.print(f"[green]wrote[/] {path}")


def eval_command(
    spec: Optional[Path] = typer.Argument(None, help="The run spec (YAML) with an 'eval:' section."),
    eraser: Optional[List[Path]] = typer.Option(None, "--eraser", help=ERASER_HELP),
    scale: Optional[List[float]] = typer.Option(None, "--scale", help=SCALE_HELP),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for the report (default: <output.dir>/eval)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a report already in the report folder."),
    compare: Optional[Tuple[Path, Path]] = typer.Option(
        None, "--compare", help="Print two existing reports side by side (report.json files or their folders) "
        "and the settings that differ; nothing is generated. Example: t2vu eval --compare runs/a/eval runs/b/eval"),
) -> None:
    """Generate the eval prompts with and without the erasers, judge them, write eval/report.{json,md}."""
    from t2vu.core.cli import console, fail, load_resolved, preflight
    from t2vu.core.errors import T2VUError

    if compare is not None:
        _print_comparison(console, *compare)
        return
    if spec is None:
        fail("t2vu eval needs a SPEC (or --compare A B)", 2)
    resolved = load_resolved(spec, set_)
    if resolved.spec.eval is None:
        fail("the spec has no 'eval:' section; add one (see docs/evaluation.md)")
    try:
        from t2vu.core.evaluate import report_dir

        folder = report_dir(resolved, out, overwrite)  # refused before anything loads
    except T2VUError as exc:
        fail(str(exc))
    erasers, setting = _erasers(resolved, eraser, scale)
    preflight(resolved, "eval", [p for p, _ in erasers], setting)
    try:
        from t2vu.core.evaluate import evaluate

        evaluate(resolved, console=console, out=folder, overwrite=overwrite, erasers=erasers)
    except T2VUError as exc:
        fail(str(exc))
        return
    console.print(f"[green]report:[/] {folder / 'report.md'}")


def _print_comparison(console, a: Path, b: Path) -> None:
    from rich.table import Table

    from t2vu.core.evaluate import compare

    rows, differ = compare(a, b)
    table = Table(title=f"A: {a}   B: {b}")
    for col in ("metric", "A before", "A after", "B before", "B after"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    if differ:
        diff = Table(title="settings that differ")
        for col in ("setting", "A", "B"):
            diff.add_column(col)
        for row in differ:
            diff.add_row(*row)
        console.print(diff)
    else:
        console.print("same settings and eraser metadata")
