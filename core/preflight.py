"""Pre-load checks ("preflight"): everything knowable before a weight loads.

``t2vu spec validate``, ``t2vu run --dry-run`` and the start of ``t2vu run``, ``generate`` and ``eval``
call :func:`check`. It reads only the spec, the text files it names, JSON configs in the model folder
and safetensors headers (never a tensor), and imports neither torch nor diffusers:

- text files the spec names (``concept.prompts``, ``eval.prompts``, a ``file`` source's ``path``, ...)
  exist and are UTF-8 text;
- ``output.dir`` is a folder (or can become one) this user can write to: a temporary file is created
  and removed there, nothing that exists is touched;
- the backbone's own checks (:meth:`t2vu.core.spec.BackboneOptions.preflight`): the model folder holds
  the files the backbone needs, their configs parse, weights files are present with readable, complete
  headers, and the clip sizes the command will ask for are ones the model can take;
- ``eraser.sites`` / ``eraser.streams`` select sites the model has (from the backbone's site names);
- for ``generate`` and ``eval``, the eraser file's header matches the model (backbone, config, sites).

Every problem names the setting (its YAML path, with its line) and the fix; :func:`check` raises them
together as a :class:`~t2vu.core.spec.SpecError` (exit code 2). This module also holds the small helpers
backbone plugins use for their own checks (:func:`read_json`, :func:`check_weights`, ...).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

from t2vu.core.spec import Problem, ResolvedSpec, SpecError, not_text, parse_path

#: suffixes of files the spec's options name that t2vu reads as text
TEXT_SUFFIXES = (".txt", ".csv", ".tsv", ".json", ".jsonl", ".yaml", ".yml", ".md", ".list")
#: suffixes of weights files
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


# -- what a backbone reports -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Clip:
    """A clip size a command will ask the backbone for, with the spec setting each number came from
    (``settings``: ``{"num_frames": "training.num_frames", ...}``; eval clips inherit training's)."""

    num_frames: int
    height: int
    width: int
    settings: tuple[tuple[str, str], ...] = (
        ("num_frames", "training.num_frames"), ("height", "training.height"), ("width", "training.width"))

    def setting(self, key: str) -> str:
        """The spec path of ``key`` (``num_frames``, ``height`` or ``width``) for this clip."""
        return dict(self.settings)[key]


@dataclass(frozen=True)
class SiteName:
    """An eraser site as the model's configs describe it: its name (the backbone's string name, with a
    ``.text`` suffix for a text site), its attention module's name (what ``eraser.sites`` patterns match) and its stream."""

    name: str
    attention: str
    stream: str = "video"


@dataclass
class ModelFacts:
    """What a backbone's :meth:`~t2vu.core.spec.BackboneOptions.preflight` found out.

    ``problems``: ``(setting, message)`` pairs, the setting a spec path such as ``backbone.model_path`` or
    ``training.num_frames``; ``sites``: every eraser site of the model (``None``: not known without loading);
    ``config``: the transformer config as eraser files record it (``None``: not known); ``experts``: how many
    transformers the model's forwards choose from by timestep (Wan 2.2 A14B: 2).
    """

    problems: list[tuple[str, str]] = field(default_factory=list)
    sites: Optional[list[SiteName]] = None
    config: Optional[dict] = None
    experts: int = 1

    def problem(self, setting: str, message: str) -> None:
        """Record a problem with ``setting`` (a spec path)."""
        self.problems.append((setting, message))


# -- helpers for backbones ----------------------------------------------------------------------------------
def read_json(path: Path, setting: str, facts: ModelFacts) -> Optional[dict]:
    """The JSON object in ``path``, or ``None`` with a problem recorded (missing, unreadable, not JSON)."""
    path = Path(path)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        facts.problem(setting, f"{path} is missing; the model folder is incomplete: download the whole model again")
        return None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        facts.problem(setting, f"cannot read {path} ({type(exc).__name__}: {exc}); the file is damaged: "
                               "download the model again")
        return None
    if not isinstance(data, dict):
        facts.problem(setting, f"{path} holds JSON but not an object; the file is damaged: download it again")
        return None
    return data


def read_diffusers_folder(path: Path, facts: ModelFacts, required: Sequence[str], family: str,
                          hint: str) -> Optional[tuple[dict, dict, dict]]:
    """``(model_index, transformer config, scheduler config)`` of a diffusers pipeline folder, or ``None`` with a
    problem recorded for ``backbone.model_path``: missing, a file, ``required`` files absent (``family``,
    the model family's name, and ``hint``, how to get the model, word the message), or a config that does not
    parse."""
    setting = "backbone.model_path"
    if not path.exists():
        facts.problem(setting, f"{path} does not exist. Download the model first, e.g. {hint}")
        return None
    if not path.is_dir():
        facts.problem(setting, f"{path} is a file; point it at the diffusers {family} folder (the one with "
                               "model_index.json)")
        return None
    missing = [r for r in required if not (path / r).exists()]
    if missing:
        facts.problem(setting, f"{path} is not a complete diffusers {family} folder (missing "
                               f"{', '.join(missing)}); download the whole model, e.g. {hint}")
        return None
    index = read_json(path / "model_index.json", setting, facts)
    cfg = read_json(path / "transformer/config.json", setting, facts)
    sched = read_json(path / "scheduler/scheduler_config.json", setting, facts)
    if index is None or cfg is None or sched is None:
        return None
    return index, cfg, sched


def vae_config(path: Path, facts: ModelFacts) -> dict:
    """``vae/config.json`` of a pipeline folder, ``{}`` when the folder has no VAE (training needs none); a
    damaged one is recorded as a problem."""
    if not (Path(path) / "vae/config.json").is_file():
        return {}
    return read_json(Path(path) / "vae/config.json", "backbone.model_path", facts) or {}


def safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file (no tensor is read); ``ValueError`` saying what is wrong,
    including a file shorter than its header says (a truncated download)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError(f"it has {size} bytes, too few for a safetensors header")
        (length,) = struct.unpack("<Q", head)
        if length < 2 or length > size - 8 or length > 100_000_000:
            raise ValueError("its first 8 bytes are not a safetensors header length")
        raw = fh.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ValueError("its header is not the JSON a safetensors file starts with") from None
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    end = 0
    for key, value in header.items():
        if key == "__metadata__":
            continue
        offsets = value.get("data_offsets") if isinstance(value, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise ValueError(f"its header entry {key!r} has no valid data_offsets")
        end = max(end, offsets[1])
    if 8 + length + end > size:
        raise ValueError(f"it is truncated: its header describes {8 + length + end} bytes, the file has {size}")
    return header


def check_weights(folder: Path, setting: str, facts: ModelFacts) -> None:
    """Record a problem unless ``folder`` holds weights whose headers are readable: a sharded safetensors
    index with every shard present, else ``*.safetensors`` files, else ``.bin``/``.pt`` files (not empty)."""
    folder = Path(folder)
    redownload = "download the model again (a partial download leaves such files)"
    if not folder.is_dir():
        facts.problem(setting, f"{folder} is missing; the model folder is incomplete: {redownload}")
        return
    files: list[Path] = []
    for index in sorted(folder.glob("*.safetensors.index.json")):
        data = read_json(index, setting, facts)
        if data is None:
            return
        shards = sorted(set((data.get("weight_map") or {}).values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            facts.problem(setting, f"{folder}: shard(s) {', '.join(missing[:3])} named in {index.name} are "
                                   f"missing; {redownload}")
            return
        files += [folder / s for s in shards]
    if not files:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        others = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES)
        if not others:
            facts.problem(setting, f"{folder} holds no weights file (*.safetensors or *.bin); {redownload}")
        for other in others:
            if other.stat().st_size == 0:
                facts.problem(setting, f"{other} is empty; {redownload}")
        return
    for file in files:
        try:
            safetensors_header(file)
        except OSError as exc:
            facts.problem(setting, f"cannot read the weights file {file} ({exc.strerror or exc})")
        except ValueError as exc:
            facts.problem(setting, f"the weights file {file} is damaged: {exc}; {redownload}")


def frames_rule(clip: Clip, step: int, model: str, why: str, facts: ModelFacts) -> None:
    """Record a problem unless ``clip.num_frames`` is ``step``k+1 (a video VAE's temporal compression)."""
    n = clip.num_frames
    if step > 1 and (n - 1) % step:
        lower = max(1, (n - 1) // step * step + 1)
        facts.problem(clip.setting("num_frames"),
                      f"{n} frames: {model} takes {step}k+1 frames ({why}); use {lower} or {lower + step}")


def size_rule(clip: Clip, step: int, model: str, why: str, facts: ModelFacts) -> None:
    """Record a problem for each of ``clip.height``/``width`` that is not a multiple of ``step``."""
    for key in ("height", "width"):
        v = getattr(clip, key)
        if v % step:
            lower, upper = v // step * step, (v // step + 1) * step
            fix = f"{lower} or {upper}" if lower else str(upper)
            facts.problem(clip.setting(key), f"{v}: {model} takes {key}s that are multiples of {step} ({why}); "
                                             f"use {fix}")


# -- text files ---------------------------------------------------------------------------------------------------
def text_problem(path: Path) -> Optional[str]:
    """Why ``path`` is not a readable UTF-8 text file, or ``None`` when it is one."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return f"file not found: {path}"
    except IsADirectoryError:
        return f"{path} is a folder; name a text file"
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror or exc}"
    return not_text(data, path)


# -- the checks -----------------------------------------------------------------------------------------------
def _clips(resolved: ResolvedSpec, command: str) -> list[Clip]:
    """The clip sizes ``command`` asks the backbone for: training's (``run``, ``validate``, ``generate``)
    and eval's (``eval``, and ``validate`` when the spec has an ``eval:`` section)."""
    tr, ev = resolved.spec.training, resolved.spec.eval
    clips = []
    if command != "eval" and None not in (tr.num_frames, tr.height, tr.width):
        clips.append(Clip(tr.num_frames, tr.height, tr.width))
    if ev is not None and command in ("eval", "validate"):
        settings, values = [], {}
        for key in ("num_frames", "height", "width"):
            own = getattr(ev, key)
            values[key] = own if own is not None else getattr(tr, key)
            settings.append((key, f"eval.{key}" if own is not None else f"training.{key}"))
        if None not in values.values():
            clip = Clip(**values, settings=tuple(settings))
            if clip not in clips and (command == "eval" or any(s.startswith("eval.") for _, s in settings)):
                clips.append(clip)
    return clips


def _option_paths(value: Any, path: tuple) -> Iterable[tuple[tuple, Path]]:
    if isinstance(value, Path):
        yield path, value
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _option_paths(item, path + (i,))
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _option_paths(item, path + (key,))


def text_file_problems(resolved: ResolvedSpec) -> list[tuple[tuple, str]]:
    """Problems with the text files the spec names: ``concept.prompts``, ``eval.prompts`` and every option of
    a component (other than the backbone) whose value is a path with a text suffix."""
    problems = []
    wanted: list[tuple[tuple, Path]] = []
    if isinstance(resolved.spec.concept.prompts, Path):
        wanted.append((("concept", "prompts"), resolved.spec.concept.prompts))
    if resolved.spec.eval is not None and isinstance(resolved.spec.eval.prompts, Path):
        wanted.append((("eval", "prompts"), resolved.spec.eval.prompts))
    for block in resolved.components()[1:] + list(resolved.judges) + (
            [resolved.eval_prompts] if resolved.eval_prompts is not None else []):
        base = parse_path(block.path) if block.path else ()
        for key in type(block.options).model_fields:
            for where, p in _option_paths(getattr(block.options, key), base + (key,)):
                if p.suffix.lower() in TEXT_SUFFIXES:
                    wanted.append((where, p))
    for where, p in wanted:
        message = text_problem(p)
        if message is not None:
            problems.append((where, message))
    return problems


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def writable_problem(folder: Path, setting: str = "output.dir") -> Optional[str]:
    """Why this user cannot write into ``folder`` (or create it), or ``None``. Creates and removes one
    temporary file in ``folder`` or, when it does not exist yet, in its nearest existing parent."""
    import tempfile

    folder = Path(folder).absolute()
    if folder.exists() and not folder.is_dir():
        return f"{folder} is a file; choose a folder for the run's outputs"
    probe = _nearest_existing(folder)
    if not probe.is_dir():
        return f"{folder} cannot be created: {probe} is a file, not a folder; choose another {setting}"
    try:
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".t2vu-write-test-")
    except OSError as exc:
        what = "" if probe == folder else f" (it does not exist yet and its parent {probe} is not writable)"
        where = f"another {setting}" if setting.startswith("--") else f"--set {setting}=..."
        return (f"cannot write to {folder}{what}: {exc.strerror or exc}; choose a folder you can write to "
                f"({where}) or fix its permissions")
    os.close(fd)
    os.unlink(tmp)
    return None


def _expand(wanted: Sequence[str], presets: dict) -> list[str]:
    out: list[str] = []
    for item in wanted:
        out += presets.get(item, [item])
    return list(dict.fromkeys(out))


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _site_problems(resolved: ResolvedSpec, sites: list[SiteName]) -> list[tuple[tuple, str]]:
    """``eraser.sites`` patterns or presets that match no attention module, ``eraser.streams`` the model lacks
    (for eraser options that have these two fields, as the built-in adapter's do)."""
    options = resolved.eraser.options
    opts_cls = type(resolved.backbone.options)
    presets = getattr(opts_cls, "site_presets", {}) or {}
    problems: list[tuple[tuple, str]] = []
    streams = getattr(options, "streams", None)
    chosen = list(sites)
    if streams is not None:
        have = sorted({s.stream for s in sites})
        for i, stream in enumerate(streams):
            if stream not in have:
                problems.append((("eraser", "streams", i), f"this model has no {stream!r} sites (it has {have})"))
        chosen = [s for s in sites if s.stream in streams]
    raw = getattr(options, "sites", None)
    default = getattr(opts_cls, "default_sites", None)
    if raw is None and not hasattr(options, "sites"):
        return problems
    wanted = raw if raw is not None else ([default] if default else None)
    if wanted is None:
        return problems
    names = sorted({s.attention for s in sites}, key=_natural)
    span = f"{len(names)}: {names[0]} ... {names[-1]}" if names else "none"
    for i, item in enumerate(wanted):
        patterns = presets.get(item, [item])
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                where = ("eraser", "sites", i) if raw is not None else ("eraser", "sites")
                kind = f"preset {item!r} ({pattern!r})" if item in presets else repr(pattern)
                problems.append((where, f"{kind} matches no attention module of this model (it has {span}; "
                                        f"presets: {sorted(presets)})"))
    patterns = _expand(wanted, presets)
    if not problems and not [s for s in chosen if any(fnmatch.fnmatchcase(s.attention, p) for p in patterns)]:
        problems.append((("eraser",), "eraser.sites and eraser.streams together select no site of this model"))
    return problems


def _eraser_problems(resolved: ResolvedSpec, eraser: Path, facts: ModelFacts,
                     setting: str) -> list[tuple[tuple, str]]:
    """The eraser file's header against the model: readable, for this backbone, this config and these sites."""
    from t2vu.core.eraser_file import UNKNOWN, _public_config, config_hash, read_eraser_metadata
    from t2vu.core.errors import T2VUError

    where = parse_path(setting)
    if not eraser.is_file():
        if not eraser.exists():
            hint = f"train one with `t2vu run {resolved.source or 'SPEC'}` or pass --eraser FILE"
            return [(where, f"no eraser at {eraser}: {hint}")]
        return [(where, f"{eraser} is a folder, not an eraser file (.safetensors)")]
    try:
        meta = read_eraser_metadata(eraser)
    except T2VUError as exc:
        return [(where, str(exc))]
    except OSError as exc:
        return [(where, f"cannot read {eraser}: {exc.strerror or exc}")]
    problems = []
    name = resolved.backbone.name
    if meta.get("backbone") and meta.get("backbone") != name:
        problems.append((where, f"{eraser} was trained for backbone {meta.get('backbone')!r}, but the spec's "
                                f"backbone is {name!r}; use the spec it was trained with"))
        return problems
    stored_hash = meta.get("backbone_config_hash") or UNKNOWN
    stored = meta.get("backbone_config")
    if facts.config is not None and stored_hash != UNKNOWN and config_hash(facts.config) != stored_hash \
            and isinstance(stored, dict):
        a, b = _public_config(stored), _public_config(facts.config)
        diffs = [f"{k}: eraser {json.dumps(a[k])}, model {json.dumps(b[k])}" for k in sorted(set(a) & set(b))
                 if a[k] != b[k]]
        if diffs:
            shown = "; ".join(diffs[:5]) + (f" (and {len(diffs) - 5} more)" if len(diffs) > 5 else "")
            problems.append((where, f"{eraser} was trained for a different transformer than "
                                    f"{resolved.backbone.options.model_path} ({shown}); point backbone.model_path "
                                    "at the model it was trained for"))
    sites = meta.get("sites")
    if facts.sites is not None and isinstance(sites, list):
        have = {s.name for s in facts.sites}
        missing = [s for s in sites if s not in have]
        if missing:
            problems.append((where, f"{len(missing)} of the eraser's sites are not in this model ({missing[0]}"
                                    f"{' ...' if len(missing) > 1 else ''}); it has {len(facts.sites)} sites: "
                                    "use the model the eraser was trained for"))
    return problems


#: why fp8 weight storage is refused without checkpointing every block
FP8_NEEDS_CHECKPOINTING = ("fp8 weight storage casts each layer's weights up for its forward, and a block that is not "
                           "checkpointed keeps those up-cast copies for the backward pass: with "
                           "training.gradient_checkpointing false or k it holds more weight memory than no fp8 at all; "
                           "set training.gradient_checkpointing: true, or drop storage_dtype")
#: why trajectory states are refused on a model with several experts
TRAJECTORY_EXPERTS = ("this model switches between expert transformers by timestep (Wan 2.2 A14B), and the states "
                      "of a sampled trajectory straddle the switch, so one training step would need both experts; "
                      "use training.states: noise (its timesteps are drawn for one expert per step)")


def preflight(resolved: ResolvedSpec, command: str = "run", eraser: Union[Path, Sequence[Path], None] = None,
              eraser_setting: str = "--eraser") -> list[Problem]:
    """Every problem found before loading (see the module docstring), as spec problems with YAML lines.

    ``command``: ``spec`` (the text files only), ``validate`` (training and eval clips, output folder), ``run``
    (training clip, output folder), ``generate`` (training clip, the VAE, ``eraser``), ``eval`` (eval clip, the
    VAE, ``eraser``). ``eraser``: the eraser file (or files) to check; ``eraser_setting`` names it in problems.
    """
    found: list[tuple[tuple, str]] = list(text_file_problems(resolved))
    if command == "spec":
        return _problems(resolved, found)
    decode = command in ("generate", "eval")
    if command in ("validate", "run", "generate", "eval"):
        message = writable_problem(Path(resolved.spec.output.dir))
        if message is not None:
            found.append((("output", "dir"), message))
    options = resolved.backbone.options
    check_model = getattr(options, "preflight", None)
    facts = check_model(_clips(resolved, command), decode=decode) if callable(check_model) else ModelFacts()
    found += [(parse_path(setting), message) for setting, message in facts.problems]
    if facts.sites is not None:
        found += _site_problems(resolved, facts.sites)
    if facts.experts > 1 and command in ("validate", "run") and resolved.spec.training.states != "noise":
        found.append((("training", "states"), TRAJECTORY_EXPERTS))
    if (command in ("validate", "run") and getattr(options, "storage_dtype", None)
            and resolved.spec.training.gradient_checkpointing is not True):
        found.append((("backbone", "storage_dtype"), FP8_NEEDS_CHECKPOINTING))
    for path in ([eraser] if isinstance(eraser, (str, Path)) else list(eraser or [])):
        found += _eraser_problems(resolved, Path(path), facts, eraser_setting)
    return _problems(resolved, found)


def _problems(resolved: ResolvedSpec, found: list[tuple[tuple, str]]) -> list[Problem]:
    """``(path, message)`` pairs as :class:`Problem` s with the YAML line of each path, duplicates dropped."""
    doc = resolved.document
    problems, seen = [], set()
    for path, message in found:
        if (path, message) in seen:
            continue
        seen.add((path, message))
        line = doc.line(path) if doc is not None else None
        origin = doc.origin(path) if doc is not None else ""
        problems.append(Problem(path, message, line, origin))
    return problems


def check(resolved: ResolvedSpec, command: str = "run", eraser: Union[Path, Sequence[Path], None] = None,
          eraser_setting: str = "--eraser") -> None:
    """:func:`preflight`; raise every problem found as one :class:`SpecError` (exit code 2)."""
    problems = preflight(resolved, command, eraser, eraser_setting)
    if problems:
        raise SpecError(problems, resolved.source)
