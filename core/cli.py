"""The ``t2vu`` command line (Typer + rich).

Light commands (``--help``, ``plugins list``, ``spec ...``) import neither
torch nor diffusers: heavy modules are imported inside the commands that
train or generate.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer
from rich.console import Console
from rich.table import Table

from t2vu import __version__
from t2vu.core import plugins as plugin_manager
from t2vu.core.eraser_cli import eraser_app
from t2vu.core.eval_cli import eval_command, generate_command
from t2vu.core.errors import T2VUError, describe
from t2vu.core.registry import KINDS, ComponentUnavailable
from t2vu.core.spec import SpecError

console = Console()
err_console = Console(stderr=True)

app = typer.Typer(
    name="t2vu",
    help="Erase concepts from text-to-video diffusion transformers by training small eraser adapters.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="Examples:\n\n  t2vu run examples/cogvideox-5b-nudity.yaml --set training.steps=10\n\n"
           "  t2vu plugins list --kind loss\n\n  t2vu spec init --backbone cogvideox > spec.yaml\n\n"
           "  t2vu eraser info runs/nudity/eraser.safetensors",
)
plugins_app = typer.Typer(help="Inspect installed plugins.", no_args_is_help=True)
spec_app = typer.Typer(help="Validate, export and start run specs.", no_args_is_help=True)
app.add_typer(plugins_app, name="plugins")
app.add_typer(spec_app, name="spec")
app.add_typer(eraser_app, name="eraser")
app.command("generate", epilog="Example: t2vu generate spec.yaml --prompt 'a red circle moving left' --compare")(
    generate_command)
app.command("eval", epilog="Example: t2vu eval examples/toy-erase-red.yaml")(eval_command)

SET_HELP = "Override a spec field, e.g. --set training.steps=10 --set losses[0].eta=3 (value parsed as YAML)."


def _version(value: bool) -> None:
    if value:
        console.print(f"t2vu {__version__}")
        raise typer.Exit()


#: ``t2vu --debug`` (or ``T2VU_DEBUG=1``): show the traceback of every error, not only of bugs
_debug = False


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", envvar="T2VU_DEBUG",
                               help="On an error, also print the Python traceback (for bug reports)."),
) -> None:
    """Erase concepts from text-to-video models. See 't2vu COMMAND --help'."""
    global _debug
    _debug = debug


def fail(message: str, code: int = 1) -> None:
    from rich.markup import escape

    err_console.print(f"[bold red]error:[/] {escape(message)}", markup=True, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def report(exc: BaseException) -> None:
    """Print one message for ``exc`` and exit non-zero: a spec problem list (exit 2), a user error's message
    with its fix (:func:`t2vu.core.errors.describe`), or, for anything else, a note that it is a bug. With
    ``--debug`` the traceback comes first."""
    if _debug:
        import traceback

        err_console.print("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
                          markup=False, highlight=False, soft_wrap=True)
    if isinstance(exc, SpecError):
        err_console.print(str(exc), markup=False, highlight=False, soft_wrap=True)
        plugin_manager.warn_failed()
        raise typer.Exit(2)
    if isinstance(exc, ComponentUnavailable):
        fail(str(exc), 1)
    described = describe(exc)
    if described is not None:
        fail(*described)
    hint = "" if _debug else " (rerun with `t2vu --debug ...` for the traceback)"
    fail(f"unexpected {type(exc).__name__}: {exc}\nThis is a bug in t2vu or one of its plugins, not a problem with "
         f"your input; please report it{hint}.", 1)


def _guarded(fn: Callable) -> Callable:
    """``fn`` (a command) with every exception it raises turned into one message and an exit code."""
    if getattr(fn, "_t2vu_guarded", False):
        return fn

    @functools.wraps(fn)
    def command(*args, **kwargs):
        import click

        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, click.exceptions.Exit, click.exceptions.Abort, click.ClickException,
                SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - every error ends in one message, none in a traceback
            report(exc)

    command._t2vu_guarded = True  # type: ignore[attr-defined]
    return command


def guard_commands(cli: typer.Typer) -> None:
    """Wrap every command of ``cli`` and its sub-apps (plugin commands too) with :func:`_guarded`."""
    for info in cli.registered_commands:
        if info.callback is not None:
            info.callback = _guarded(info.callback)
    for group in cli.registered_groups:
        if group.typer_instance is not None:
            guard_commands(group.typer_instance)


def preflight(resolved, command: str, eraser: Any = None, eraser_setting: str = "--eraser") -> None:
    """The pre-load checks (:mod:`t2vu.core.preflight`); on problems print them all and exit 2."""
    from t2vu.core.preflight import check

    try:
        check(resolved, command, eraser, eraser_setting)
    except SpecError as exc:
        report(exc)


def load_resolved(spec_path: Path, overrides: Optional[List[str]] = None):
    """Load and validate a spec; on error print every problem and exit 2."""
    from t2vu.core.spec import load_spec

    registry = plugin_manager.get_registry()
    try:
        return load_spec(spec_path, registry, overrides or [])
    except SpecError as exc:
        report(exc)


# -- run --------------------------------------------------------------------------
@app.command(epilog="Example: t2vu run spec.yaml --set training.steps=10 --set eraser.rank=64")
def run(
    spec: Path = typer.Argument(..., help="The run spec (YAML)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate, resolve plugins and print the plan; load nothing heavy."),
    resume: bool = typer.Option(False, "--resume", help="Continue the unfinished run in output.dir from its newest "
                                "complete checkpoint (same spec; the result equals an uninterrupted run)."),
) -> None:
    """Train an eraser from a run spec."""
    resolved = load_resolved(spec, set_)
    preflight(resolved, "validate" if dry_run else "run")
    main_process = os.environ.get("RANK", "0") == "0"  # torchrun / accelerate launch: one process reports
    if main_process:
        print_plan(resolved)
    if dry_run:
        from t2vu.core.run_folder import plan

        try:  # would the run be allowed to write there (a finished or unfinished run in output.dir)?
            plan(Path(resolved.spec.output.dir), overwrite=resolved.spec.output.overwrite, resume=resume,
                 spec_hint=str(spec), dry=True)
        except T2VUError as exc:
            fail(str(exc))
        console.print("[green]dry run:[/] spec valid, model folder, clip size, sites and output.dir checked; "
                      "nothing loaded or written.")
        return
    try:
        from t2vu.core.engine import run as run_engine

        result = run_engine(resolved, console=console, resume=resume)
    except (T2VUError, ComponentUnavailable) as exc:
        fail(str(exc), getattr(exc, "exit_code", 1))
    else:
        if main_process:
            console.print(f"[green]eraser written:[/] {result}")


def print_plan(resolved) -> None:
    table = Table(title="Run plan", show_lines=False)
    table.add_column("section")
    table.add_column("component")
    table.add_column("plugin")
    table.add_column("options")
    for item in resolved.components():
        opts = item.options.model_dump(mode="json")
        table.add_row(item.path, item.name, item.component.plugin,
                      ", ".join(f"{k}={v}" for k, v in opts.items()))
    console.print(table)
    s = resolved.spec
    prompts = s.concept.prompts
    prompts_text = f"{len(prompts)} inline prompts" if isinstance(prompts, list) else (str(prompts) if prompts else "the bare concept")
    anchor = s.concept.anchor
    anchor_text = "" if anchor is None or isinstance(anchor, dict) else f", anchor {anchor!r}"
    console.print(f"concept: [bold]{s.concept.target}[/] ({prompts_text}{anchor_text})")
    t = s.training
    console.print(f"training: {t.steps} steps, batch {t.batch_size}, lr {t.learning_rate}, "
                  f"{t.num_frames}x{t.height}x{t.width}, seed {t.seed}")
    console.print(f"output: {s.output.dir}")


# -- estimate ----------------------------------------------------------------------
@app.command(epilog="Examples: t2vu estimate spec.yaml --gpu-memory 24\n\n  t2vu estimate spec.yaml --json "
                    "--set training.num_frames=25")
def estimate(
    spec: Path = typer.Argument(..., help="The run spec (YAML)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (peak_gb, breakdown, phases, iteration, ...)."),
    gpu_memory: Optional[float] = typer.Option(None, "--gpu-memory", min=1, help="A card's memory in GB (2^30 "
                                               "bytes): say whether the run fits and which settings make it fit."),
) -> None:
    """Predict the peak training memory and per-iteration cost of a spec without loading weights (the model
    folder's configs are enough), with a breakdown and, with --gpu-memory, the settings that fit a card."""
    resolved = load_resolved(spec, set_)
    from t2vu.core.estimate import estimate as estimate_spec
    from t2vu.core.estimate import render

    result = estimate_spec(resolved, gpu_memory=gpu_memory)
    if as_json:
        sys.stdout.write(json.dumps(result.to_dict(), indent=2) + "\n")
    else:
        render(result, console)


# -- plugins ---------------------------------------------------------------------
def _plugin_rows(kind: Optional[str]) -> list[dict[str, Any]]:
    registry = plugin_manager.get_registry()
    rows: list[dict[str, Any]] = []
    for comp in registry:
        if kind and comp.kind != kind:
            continue
        rows.append({"kind": comp.kind, "name": comp.name, "plugin": comp.plugin,
                     "distribution": comp.distribution, "version": comp.version,
                     "summary": comp.summary, "status": "ok"})
    if not kind:
        for failed in registry.failed:
            rows.append({"kind": None, "name": None, "plugin": failed.name,
                         "distribution": failed.distribution, "version": failed.version,
                         "summary": failed.first_line, "status": "failed", "error": failed.first_line})
    return rows


@plugins_app.command("list", epilog="Example: t2vu plugins list --kind loss --json")
def plugins_list(
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list of objects."),
    kind: Optional[str] = typer.Option(None, "--kind", help=f"Only this kind: {', '.join(KINDS)}."),
) -> None:
    """List every backbone, eraser, loss, concept source, augmenter and evaluator installed."""
    if kind is not None and kind not in KINDS:
        import difflib

        close = difflib.get_close_matches(kind, list(KINDS), n=1)
        fail(f"unknown kind {kind!r}" + (f"; did you mean {close[0]!r}?" if close else f" (kinds: {', '.join(KINDS)})"), 2)
    rows = _plugin_rows(kind)
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    table = Table(title="t2vu plugins")
    for col in ("kind", "name"):
        table.add_column(col, no_wrap=True)
    table.add_column("plugin", overflow="fold")
    table.add_column("version", no_wrap=True)
    table.add_column("summary", overflow="fold", ratio=1)
    for row in rows:
        if row["status"] == "failed":
            table.add_row("[red]failed[/]", "", row["plugin"], row["version"] or "", f"[red]{row['error']}[/]")
        else:
            table.add_row(row["kind"], row["name"], row["plugin"], row["version"] or "", row["summary"])
    console.print(table)


# -- spec -----------------------------------------------------------------------------
@spec_app.command("validate", epilog="Example: t2vu spec validate spec.yaml --set training.steps=10")
def spec_validate(
    spec: Path = typer.Argument(..., help="The run spec (YAML)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
    spec_only: bool = typer.Option(False, "--spec-only", help="Check the spec alone (structure, options, "
                                   "files it names); skip the model folder and output.dir, e.g. before the "
                                   "model is downloaded."),
) -> None:
    """Validate a spec and everything knowable before loading: the structure and every plugin's options, the
    text files it names, output.dir, the model folder's configs and weights headers, clip sizes and eraser
    sites. Exit 2 with every problem if invalid."""
    resolved = load_resolved(spec, set_)
    preflight(resolved, "spec" if spec_only else "validate")
    checked = "spec only" if spec_only else "model folder, clip size, sites and output.dir checked"
    console.print(f"[green]valid:[/] {spec} ({len(resolved.losses)} loss terms, backbone {resolved.backbone.name}; "
                  f"{checked})")



@spec_app.command("schema", epilog="Example: t2vu spec schema > t2vu-spec.schema.json")
def spec_schema() -> None:
    """Print the JSON Schema of the spec, every installed plugin's options included."""
    from t2vu.core.spec import json_schema

    sys.stdout.write(json.dumps(json_schema(plugin_manager.get_registry()), indent=2) + "\n")


@spec_app.command("init", epilog="Example: t2vu spec init --backbone cogvideox > spec.yaml")
def spec_init(
    backbone: str = typer.Option(..., "--backbone", help="Backbone plugin name (`t2vu plugins list --kind backbone`)."),
) -> None:
    """Print a commented starter spec."""
    from t2vu.core.starter import starter_spec

    registry = plugin_manager.get_registry()
    if backbone not in registry.components["backbone"]:
        fail(registry.unknown_message("backbone", backbone), 2)
    sys.stdout.write(starter_spec(registry.components["backbone"][backbone]))


# -- concepts ----------------------------------------------------------------------------
@app.command(epilog="Examples: t2vu concepts dog --source wordnet --count 10\n\n"
                    "  t2vu concepts nudity --source llm --set base_url=http://127.0.0.1:8000/v1 "
                    "--set model=qwen --set api_key_env=MY_KEY --json")
def concepts(
    target: str = typer.Argument(..., help="The concept to erase, e.g. 'nudity'."),
    source: str = typer.Option(..., "--source", help="Concept source: file, list, wordnet, llm, ..."),
    count: Optional[int] = typer.Option(None, "--count", min=1, help="Keep at most this many."),
    set_: Optional[List[str]] = typer.Option(
        None, "--set", help="A source option as in the spec's preserved block, e.g. --set model=qwen "
                            "(value parsed as YAML)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list of strings."),
) -> None:
    """Preview the preserved concepts a source yields for TARGET."""
    from t2vu.core.concepts import collect_preserved, resolve_source

    try:
        block = resolve_source(plugin_manager.get_registry(), source, set_ or [], count)
    except SpecError as exc:
        from t2vu.core.spec import format_path

        lines = [f"invalid options for concept source {source!r}:"]
        for problem in exc.problems:
            where = format_path(problem.path)
            label = "--source" if where == "source" else (f"--set {where}" if where else "options")
            lines.append(f"  {label}: {problem.message}")
        err_console.print("\n".join(lines), markup=False, highlight=False, soft_wrap=True)
        plugin_manager.warn_failed()
        raise typer.Exit(2)
    try:
        found = collect_preserved([block], target)
    except (T2VUError, ComponentUnavailable) as exc:
        fail(str(exc), getattr(exc, "exit_code", 1))
    if as_json:
        sys.stdout.write(json.dumps(found, ensure_ascii=False) + "\n")
        return
    err_console.print(f"{len(found)} preserved concepts for {target!r} from {source}:", highlight=False)
    for item in found:
        console.print(item, markup=False, highlight=False, soft_wrap=True)


guard_commands(app)


def main(argv: Optional[List[str]] = None) -> None:
    """Console-script entry point: add plugin commands, then run."""
    global _debug
    _debug = os.environ.get("T2VU_DEBUG", "").lower() in ("1", "true", "yes")
    try:
        plugin_manager.get_plugin_manager().add_commands(app)
        guard_commands(app)
    except Exception as exc:  # noqa: BLE001 - a broken plugin's command must not end in a traceback
        err_console.print(f"[yellow]warning:[/] a plugin's commands could not be added: {exc}", highlight=False)
    app(args=argv, prog_name="t2vu")


if __name__ == "__main__":  # pragma: no cover
    main()
