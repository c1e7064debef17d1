"""``t2vu eraser ...``: inspect eraser files and convert from/to the upstream format.

Light at import: torch is imported inside ``import`` and ``export`` only;
``info`` reads the safetensors header without torch.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from t2vu.core.errors import T2VUError, describe_os_error

console = Console()
err_console = Console(stderr=True)

eraser_app = typer.Typer(
    help="Use and exchange eraser files: show their metadata, import/export the upstream T2VUnlearning format.",
    no_args_is_help=True,
    epilog="Examples:\n\n  t2vu eraser info runs/nudity/eraser.safetensors\n\n"
           "  t2vu eraser import ./t2vu-erasers/nudity --out nudity.safetensors --model ./CogVideoX-5b "
           "--target nudity\n\n  t2vu eraser export nudity.safetensors --out ./nudity-upstream",
)


def _fail(message: str, code: int = 1) -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}", markup=True, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _print_warnings(caught) -> None:
    for w in caught:
        err_console.print(f"[yellow]warning:[/] {w.message}", markup=True, highlight=False, soft_wrap=True)


@eraser_app.command(
    "import",
    epilog="Example: t2vu eraser import ./t2vu-erasers/nudity --out nudity.safetensors "
           "--backbone cogvideox --model ./CogVideoX-5b --target nudity",
)
def import_cmd(
    path: Path = typer.Argument(..., help="Upstream eraser folder (eraser_weights.pt + eraser_config.json)."),
    out: Path = typer.Option(..., "--out", "-o", help="The t2vu eraser file to write (.safetensors)."),
    model: Optional[Path] = typer.Option(
        None, "--model", help="Diffusers model folder the eraser was trained for; only "
                              "transformer/config.json is read, so loading can check the model."),
    target: Optional[str] = typer.Option(None, "--target", help="The erased concept, recorded in the file."),
    backbone: Optional[str] = typer.Option(
        None, "--backbone", help="Backbone plugin the eraser belongs to, e.g. cogvideox or hunyuanvideo (needed "
                                 "unless t2vu exported the folder)."),
    strength: Optional[float] = typer.Option(
        None, "--strength", help="The factor upstream scales each adapter's output by (HunyuanVideo's "
                                 "eraser_weight); folded into the weights. Default: the folder's eraser_weight, else 1."),
    force: bool = typer.Option(False, "--force", help="Overwrite OUT if it exists."),
) -> None:
    """Convert an upstream T2VUnlearning eraser folder into a t2vu eraser file."""
    from t2vu.core.eraser_file import read_eraser_metadata
    from t2vu.core.upstream import import_upstream

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            written = import_upstream(path, out, backbone=backbone, model_path=model, target=target,
                                      overwrite=force, strength=strength)
        _print_warnings(caught)
        meta = read_eraser_metadata(written)
    except T2VUError as exc:
        _fail(str(exc), exc.exit_code)
    except OSError as exc:
        _fail(describe_os_error(exc))
    console.print(f"[green]eraser written:[/] {written} ({len(meta['sites'])} sites, rank {meta['rank']}, "
                  f"config {meta['backbone_config_hash']})", highlight=False)


@eraser_app.command("export", epilog="Example: t2vu eraser export nudity.safetensors --out ./nudity-upstream")
def export_cmd(
    file: Path = typer.Argument(..., help="A t2vu eraser file (.safetensors)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write eraser_weights.pt and eraser_config.json to."),
    force: bool = typer.Option(False, "--force", help="Overwrite the files if the folder already has them."),
) -> None:
    """Write an eraser in the upstream T2VUnlearning folder format."""
    from t2vu.core.upstream import export_upstream

    try:
        folder = export_upstream(file, out, overwrite=force)
    except T2VUError as exc:
        _fail(str(exc), exc.exit_code)
    except OSError as exc:
        _fail(describe_os_error(exc))
    console.print(f"[green]upstream eraser written:[/] {folder}/eraser_weights.pt, eraser_config.json",
                  highlight=False)


def _count(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit} ({n:,})"
    return str(n)


@eraser_app.command("info", epilog="Example: t2vu eraser info runs/nudity/eraser.safetensors --json")
def info_cmd(
    file: Path = typer.Argument(..., help="A t2vu eraser file (.safetensors)."),
    as_json: bool = typer.Option(False, "--json", help="Print the metadata as JSON."),
) -> None:
    """Show what an eraser file is for: backbone, config hash, type, rank, sites, target."""
    from t2vu.core.eraser_file import read_eraser_metadata

    try:
        meta = read_eraser_metadata(file)
    except T2VUError as exc:
        _fail(str(exc), exc.exit_code)
    except OSError as exc:
        _fail(describe_os_error(exc))
    parameters = meta.pop("parameters", 0)
    if as_json:
        sys.stdout.write(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return
    sites = meta.get("sites") or []
    config = meta.get("backbone_config") if isinstance(meta.get("backbone_config"), dict) else {}
    model = config.get("_class_name", "")
    table = Table(title=escape(str(file)), show_header=False, title_justify="left")
    table.add_column("field", style="bold", no_wrap=True)
    table.add_column("value", overflow="fold")
    table.add_row("target", escape(meta.get("target") or "") or "[dim](not recorded)[/]")
    table.add_row("backbone", escape(f"{meta.get('backbone', '')}" + (f" ({model})" if model else "")))
    hash_ = meta.get("backbone_config_hash", "")
    table.add_row("config hash", hash_ if hash_ != "unknown" else "[yellow]unknown[/] (only sites and widths "
                                                                 "are checked when loading)")
    table.add_row("eraser type", str(meta.get("eraser_type", "")))
    table.add_row("rank", str(meta.get("rank", "")))
    span = f": {sites[0]} ... {sites[-1]}" if len(sites) > 1 else (f": {sites[0]}" if sites else "")
    table.add_row("sites", escape(f"{len(sites)}{span}"))
    table.add_row("parameters", _count(int(parameters)))
    table.add_row("format version", str(meta.get("format_version", "")))
    shown = {"format", "format_version", "backbone", "backbone_config_hash", "backbone_config", "eraser_type",
             "rank", "sites", "target", "eraser_options", "spec"}
    if meta.get("spec") is not None:
        table.add_row("spec", "recorded (see --json)")
    for key in sorted(set(meta) - shown):
        value = meta[key]
        table.add_row(escape(key), escape(value if isinstance(value, str) else json.dumps(value)))
    console.print(table)
