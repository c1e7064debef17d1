"""The bad-input catalogue (docs/bad-input.md): every row triggered through the CLI.

Each case builds its bad input in a fresh folder, runs one ``t2vu`` command in-process, and checks that the
command exits with the catalogue's code, prints one message naming the setting and the fix, prints no Python
traceback, and leaves every file that was already on disk as it was (nothing written, nothing replaced).
Model folders are fakes made of the real configs' keys and safetensors files whose headers are real (the
checks read only configs and headers), or the toy model that ships with t2vu-toy; no case loads a weight.
"""

from __future__ import annotations

import errno
import json
import re
import struct
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from typer.testing import CliRunner

from t2vu.core.cli import app

runner = CliRunner()
DOCS = Path(__file__).resolve().parent.parent / "docs" / "bad-input.md"
TOY_CONFIG = json.loads((Path(__import__("t2vu_toy").__file__).parent / "base/transformer/config.json").read_text())

TOY = """\
backbone: {{name: toy}}
concept: {{target: red, prompts: {prompts}}}
{extra}losses: [{{name: negative_guidance, eta: 3.0}}]
training: {{steps: 2, num_frames: {frames}, height: {height}, width: {width}}}
output: {{dir: {out}}}
"""


def toy_spec(folder: Path, *, prompts="[a red circle moving left]", extra="", frames=4, height=32, width=32,
             out="out", backbone=None, name="spec.yaml", eval_=False) -> Path:
    """A valid toy spec in ``folder`` (``backbone``: another backbone line; ``eval_``: with an eval section)."""
    text = TOY.format(prompts=prompts, extra=extra, frames=frames, height=height, width=width, out=out)
    if backbone is not None:
        text = text.replace("backbone: {name: toy}", backbone)
    if eval_:
        text += "eval: {prompts: [a red circle moving left], judges: [toy_color]}\n"
    path = folder / name
    path.write_text(text)
    return path


# -- fake model folders: real configs' keys, real safetensors headers ------------------------------------------
def st_bytes(tensors: dict, metadata: dict | None = None) -> bytes:
    """A safetensors file: ``{name: shape}`` float32 zeros, optional ``__metadata__``."""
    header: dict = {}
    offset = 0
    for name, shape in tensors.items():
        n = 4
        for d in shape:
            n *= d
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata is not None:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + b"\0" * offset


def _write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(json.dumps(data))


def fake_cogvideox(path: Path, layers: int = 2) -> Path:
    """A CogVideoX folder as ``CogVideoXPipeline.save_pretrained`` lays it out (VAE 8x, patch 2)."""
    _write(path / "model_index.json", {"_class_name": "CogVideoXPipeline", "_diffusers_version": "0.42.1"})
    _write(path / "transformer/config.json", {
        "_class_name": "CogVideoXTransformer3DModel", "num_layers": layers, "num_attention_heads": 2,
        "attention_head_dim": 16, "in_channels": 4, "patch_size": 2, "patch_size_t": None, "sample_frames": 9,
        "sample_height": 4, "sample_width": 4, "temporal_compression_ratio": 4, "max_text_seq_length": 16,
        "use_rotary_positional_embeddings": True, "use_learned_positional_embeddings": False})
    _write(path / "transformer/diffusion_pytorch_model.safetensors", st_bytes({"proj.weight": [4, 4]}))
    _write(path / "scheduler/scheduler_config.json", {"_class_name": "CogVideoXDDIMScheduler",
                                                      "prediction_type": "v_prediction"})
    _write(path / "text_encoder/config.json", {"_class_name": "T5EncoderModel"})
    _write(path / "text_encoder/model.safetensors", st_bytes({"shared.weight": [8, 4]}))
    _write(path / "tokenizer/tokenizer_config.json", {})
    _write(path / "vae/config.json", {"_class_name": "AutoencoderKLCogVideoX", "block_out_channels": [8, 8, 8, 8],
                                      "temporal_compression_ratio": 4})
    _write(path / "vae/diffusion_pytorch_model.safetensors", st_bytes({"conv.weight": [2, 2]}))
    return path


def fake_hunyuanvideo(path: Path, kind: str = "HunyuanVideoPipeline") -> Path:
    """A HunyuanVideo folder as ``HunyuanVideoPipeline.save_pretrained`` lays it out (VAE 8x/4x, patch 2)."""
    _write(path / "model_index.json", {"_class_name": kind})
    _write(path / "transformer/config.json", {
        "_class_name": "HunyuanVideoTransformer3DModel", "num_layers": 1, "num_single_layers": 2,
        "patch_size": 2, "patch_size_t": 1, "in_channels": 4, "guidance_embeds": True})
    _write(path / "transformer/diffusion_pytorch_model.safetensors", st_bytes({"x_embedder.weight": [4, 4]}))
    _write(path / "scheduler/scheduler_config.json", {"_class_name": "FlowMatchEulerDiscreteScheduler",
                                                      "shift": 7.0})
    for sub in ("text_encoder", "text_encoder_2"):
        _write(path / sub / "config.json", {})
        _write(path / sub / "model.safetensors", st_bytes({"embed.weight": [4, 4]}))
    for sub in ("tokenizer", "tokenizer_2"):
        _write(path / sub / "tokenizer_config.json", {})
    _write(path / "vae/config.json", {"temporal_compression_ratio": 4, "spatial_compression_ratio": 8})
    _write(path / "vae/diffusion_pytorch_model.safetensors", st_bytes({"conv.weight": [2, 2]}))
    return path


def cog_spec(folder: Path, **kw) -> Path:
    fake_cogvideox(folder / "cog")
    kw.setdefault("frames", 9)
    return toy_spec(folder, backbone="backbone: {name: cogvideox, model_path: ./cog, dtype: float32}", **kw)


def hunyuan_spec(folder: Path, kind: str = "HunyuanVideoPipeline", **kw) -> Path:
    fake_hunyuanvideo(folder / "hy", kind)
    kw.setdefault("frames", 9)
    return toy_spec(folder, backbone="backbone: {name: hunyuanvideo, model_path: ./hy, dtype: float32}", **kw)


def eraser_bytes(*, backbone="toy", config=None, sites=("transformer_blocks.0.attn1",), version="1",
                 fmt="t2vu-eraser", dim=64, rank=2) -> bytes:
    """A t2vu eraser file (adapter tensors of zeros) with the metadata ``t2vu run`` writes."""
    config = TOY_CONFIG if config is None else config
    from t2vu.core.eraser_file import config_hash

    meta = {"format": fmt, "format_version": version, "backbone": backbone,
            "backbone_config_hash": config_hash(config), "backbone_config": json.dumps(config),
            "eraser_type": "adapter", "rank": str(rank), "eraser_options": "{}", "sites": json.dumps(list(sites)),
            "target": "red"}
    tensors = {}
    for s in sites:
        tensors.update({f"{s}.down.weight": [rank, dim], f"{s}.down.bias": [rank], f"{s}.up.weight": [dim, rank],
                        f"{s}.up.bias": [dim]})
    return st_bytes(tensors, meta)


def eval_with_eraser(tmp: Path, data: bytes) -> list[str]:
    (tmp / "out").mkdir()
    (tmp / "out/eraser.safetensors").write_bytes(data)
    return ["eval", toy_spec(tmp, eval_=True)]


def unwritable_folder(tmp: Path) -> Path:
    """A folder this process cannot create files in (root ignores permission bits; /sys refuses it too)."""
    import os
    import tempfile

    if os.geteuid() != 0:
        locked = tmp / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        return locked
    try:
        fd, name = tempfile.mkstemp(dir="/sys")
    except OSError:
        return Path("/sys")
    os.close(fd)
    os.unlink(name)
    pytest.skip("running as root where even /sys accepts writes: no folder on this machine refuses a write, "
                "so an unwritable output.dir cannot be made")


def fake_engine(mp, exc: BaseException) -> None:
    """``t2vu run`` reaches the engine (after every pre-load check), which fails with ``exc``."""
    def run(*args, **kwargs):
        raise exc

    mp.setitem(sys.modules, "t2vu.core.engine", types.SimpleNamespace(run=run))


# -- the catalogue -----------------------------------------------------------------------------------------------
@dataclass
class Case:
    id: str
    code: int
    expect: tuple[str, ...]
    setup: Callable  # (tmp_path, monkeypatch) -> CLI arguments
    traceback: bool = False  # the row is about --debug showing one


CASES: list[Case] = []


def case(id: str, code: int, *expect: str, traceback: bool = False):
    def register(fn):
        CASES.append(Case(id, code, expect, fn, traceback))
        return fn
    return register


# spec files
@case("spec-missing", 2, "spec file not found")
def _(tmp, mp):
    return ["spec", "validate", tmp / "nope.yaml"]


@case("spec-folder", 2, "is a folder", "YAML file")
def _(tmp, mp):
    (tmp / "dir.yaml").mkdir()
    return ["spec", "validate", tmp / "dir.yaml"]


@case("spec-binary", 2, "binary file", "UTF-8")
def _(tmp, mp):
    (tmp / "spec.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00")
    return ["spec", "validate", tmp / "spec.yaml"]


@case("spec-latin1", 2, "not UTF-8", "line 2", "save it as UTF-8")
def _(tmp, mp):
    spec = toy_spec(tmp)
    spec.write_bytes(spec.read_bytes().replace(b"concept:", "# caf\u00e9\nconcept:".encode("latin-1")))
    return ["run", spec, "--dry-run"]


@case("yaml-syntax", 2, "not valid YAML", "line")
def _(tmp, mp):
    (tmp / "spec.yaml").write_text("backbone: {name: toy\nconcept: [\n")
    return ["spec", "validate", tmp / "spec.yaml"]


@case("spec-not-mapping", 2, "must be a YAML mapping")
def _(tmp, mp):
    (tmp / "spec.yaml").write_text("- backbone\n- concept\n")
    return ["spec", "validate", tmp / "spec.yaml"]


@case("duplicate-key", 2, "duplicate key 'losses'")
def _(tmp, mp):
    spec = toy_spec(tmp)
    spec.write_text(spec.read_text() + "losses: []\n")
    return ["spec", "validate", spec]


@case("unknown-key", 2, "trainig", "did you mean 'training'")
def _(tmp, mp):
    spec = toy_spec(tmp)
    spec.write_text(spec.read_text().replace("training:", "trainig:"))
    return ["spec", "validate", spec]


@case("unknown-plugin", 2, "losses[0].name", "did you mean 'negative_guidance'")
def _(tmp, mp):
    spec = toy_spec(tmp)
    spec.write_text(spec.read_text().replace("negative_guidance", "negative_guidence"))
    return ["spec", "validate", spec]


@case("unknown-backbone", 2, "backbone.name", "unknown backbone 'cogvidex'", "did you mean 'cogvideox'")
def _(tmp, mp):
    return ["spec", "validate", toy_spec(tmp, backbone="backbone: {name: cogvidex, model_path: ./m}")]


@case("bad-option-value", 2, "losses[0].eta", "greater than or equal to 0")
def _(tmp, mp):
    return ["run", toy_spec(tmp), "--set", "losses[0].eta=-1"]


@case("missing-section", 2, "output", "Field required")
def _(tmp, mp):
    spec = toy_spec(tmp)
    spec.write_text(spec.read_text().replace("output: {dir: out}\n", ""))
    return ["spec", "validate", spec]


@case("set-malformed", 2, "--set 'training.steps'", "expected KEY=VALUE")
def _(tmp, mp):
    return ["spec", "validate", toy_spec(tmp), "--set", "training.steps"]


@case("set-wrong-type", 2, "training.steps (from --set)", "integer")
def _(tmp, mp):
    return ["run", toy_spec(tmp), "--dry-run", "--set", "training.steps=zero"]


@case("loss-twice", 2, "appears twice")
def _(tmp, mp):
    spec = toy_spec(tmp)
    spec.write_text(spec.read_text().replace("eta: 3.0}]", "eta: 3.0}, {name: negative_guidance}]"))
    return ["spec", "validate", spec]


@case("needs-preserved", 2, "losses[1]", "needs preserved concepts", "add a 'preserved:' section")
def _(tmp, mp):
    spec = toy_spec(tmp)
    spec.write_text(spec.read_text().replace("eta: 3.0}]", "eta: 3.0}, {name: preservation}]"))
    return ["spec", "validate", spec]


# text files the spec names
@case("prompts-missing", 2, "concept.prompts", "prompts file not found")
def _(tmp, mp):
    return ["spec", "validate", toy_spec(tmp, prompts="prompts.txt")]


@case("prompts-binary", 2, "concept.prompts", "binary file", "UTF-8 text file")
def _(tmp, mp):
    (tmp / "prompts.txt").write_bytes(bytes(range(256)))
    return ["spec", "validate", toy_spec(tmp, prompts="prompts.txt")]


@case("prompts-latin1", 2, "concept.prompts", "not UTF-8", "save it as UTF-8")
def _(tmp, mp):
    (tmp / "prompts.txt").write_bytes("a red circle\na r\u00e9d square\n".encode("latin-1"))
    return ["spec", "validate", toy_spec(tmp, prompts="prompts.txt")]


@case("prompts-latin1-spec-only", 2, "concept.prompts", "not UTF-8")
def _(tmp, mp):
    (tmp / "prompts.txt").write_bytes("caf\u00e9\n".encode("latin-1"))
    return ["spec", "validate", toy_spec(tmp, prompts="prompts.txt"), "--spec-only"]


@case("preserved-file-latin1", 2, "preserved.path", "not UTF-8")
def _(tmp, mp):
    (tmp / "keep.txt").write_bytes("a blue square\nna\u00efve\n".encode("latin-1"))
    return ["run", toy_spec(tmp, extra="preserved: {source: file, path: keep.txt}\n"), "--dry-run"]


@case("eval-csv-latin1", 2, "eval.prompts", "not UTF-8")
def _(tmp, mp):
    (tmp / "eval.csv").write_bytes("prompt\na r\u00e9d circle\n".encode("latin-1"))
    spec = toy_spec(tmp)
    spec.write_text(spec.read_text() + "eval: {prompts: eval.csv, judges: [toy_color]}\n")
    return ["spec", "validate", spec]


@case("concepts-file-latin1", 1, "not UTF-8", "keep.txt")
def _(tmp, mp):
    (tmp / "keep.txt").write_bytes("na\u00efve\n".encode("latin-1"))
    return ["concepts", "dog", "--source", "file", "--set", f"path={tmp / 'keep.txt'}"]


# output.dir
@case("output-is-file", 2, "output.dir", "is a file")
def _(tmp, mp):
    (tmp / "out").write_text("keep me")
    return ["spec", "validate", toy_spec(tmp)]


@case("output-under-file", 2, "output.dir", "cannot be created", "is a file, not a folder")
def _(tmp, mp):
    (tmp / "out").write_text("keep me")
    return ["run", toy_spec(tmp, out="out/run"), "--dry-run"]


@case("output-unwritable", 2, "output.dir", "cannot write to", "choose a folder you can write to")
def _(tmp, mp):
    return ["run", toy_spec(tmp, out=str(unwritable_folder(tmp) / "run"))]


@case("output-finished-run", 1, "already holds a finished run", "output.overwrite")
def _(tmp, mp):
    (tmp / "out").mkdir()
    (tmp / "out/eraser.safetensors").write_bytes(eraser_bytes())
    (tmp / "out/metrics.jsonl").write_text('{"step": 1}\n')
    return ["run", toy_spec(tmp)]


@case("dry-run-finished-run", 1, "already holds a finished run", "output.overwrite")
def _(tmp, mp):
    (tmp / "out").mkdir()
    (tmp / "out/eraser.safetensors").write_bytes(eraser_bytes())
    return ["run", toy_spec(tmp), "--dry-run"]


@case("output-unfinished-run", 1, "unfinished run", "step 2", "--resume", "output.overwrite")
def _(tmp, mp):
    from t2vu.core import checkpoint

    (tmp / "out").mkdir()
    (tmp / "out/metrics.jsonl").write_text('{"step": 1}\n')
    checkpoint.save(tmp / "out", 2, state={}, keep=2, write_eraser=lambda p: p.write_bytes(eraser_bytes()))
    return ["run", toy_spec(tmp)]


@case("resume-without-checkpoint", 1, "nothing to resume", "output.overwrite", "checkpoint_every")
def _(tmp, mp):
    (tmp / "out").mkdir()
    (tmp / "out/metrics.jsonl").write_text('{"step": 1}\n')
    return ["run", toy_spec(tmp), "--resume"]


@case("generate-out-unwritable", 2, "--out", "cannot write to")
def _(tmp, mp):
    (tmp / "out").mkdir()
    (tmp / "out/eraser.safetensors").write_bytes(eraser_bytes())
    return ["generate", toy_spec(tmp), "--prompt", "a red circle", "--out", unwritable_folder(tmp) / "v"]


# the model folder
@case("model-missing", 2, "backbone.model_path", "does not exist", "hf download THUDM/CogVideoX-5b")
def _(tmp, mp):
    return ["spec", "validate", toy_spec(tmp, frames=9, backbone="backbone: {name: cogvideox, model_path: ./m}")]


@case("model-is-file", 2, "backbone.model_path", "is a file")
def _(tmp, mp):
    (tmp / "m").write_text("not a folder")
    return ["spec", "validate", toy_spec(tmp, frames=9, backbone="backbone: {name: cogvideox, model_path: ./m}")]


@case("model-incomplete", 2, "backbone.model_path", "missing transformer/config.json", "download the whole model")
def _(tmp, mp):
    spec = cog_spec(tmp)
    (tmp / "cog/transformer/config.json").unlink()
    return ["run", spec, "--dry-run"]


@case("config-corrupt", 2, "backbone.model_path", "model_index.json", "damaged")
def _(tmp, mp):
    spec = cog_spec(tmp)
    (tmp / "cog/model_index.json").write_text('{"_class_name": "CogVideoXPipeline",')
    return ["spec", "validate", spec]


@case("model-wrong-kind", 2, "backbone.model_path", "HunyuanVideoPipeline", "not a CogVideoX pipeline")
def _(tmp, mp):
    fake_hunyuanvideo(tmp / "cog")
    return ["spec", "validate", toy_spec(tmp, frames=9, backbone="backbone: {name: cogvideox, model_path: ./cog}")]


@case("hunyuan-1.5", 2, "backbone.model_path", "HunyuanVideo 1.5", "a backbone of its own")
def _(tmp, mp):
    return ["spec", "validate", hunyuan_spec(tmp, kind="HunyuanVideo15Pipeline")]


@case("weights-missing", 2, "backbone.model_path", "holds no weights file", "download the model again")
def _(tmp, mp):
    spec = cog_spec(tmp)
    (tmp / "cog/transformer/diffusion_pytorch_model.safetensors").unlink()
    return ["run", spec]


@case("weights-truncated", 2, "backbone.model_path", "is truncated", "download the model again")
def _(tmp, mp):
    spec = cog_spec(tmp)
    weights = tmp / "cog/text_encoder/model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-16])
    return ["run", spec]


@case("weights-garbage", 2, "backbone.model_path", "is damaged", "safetensors header")
def _(tmp, mp):
    spec = cog_spec(tmp)
    (tmp / "cog/transformer/diffusion_pytorch_model.safetensors").write_bytes(b"<html>404 Not Found</html>" * 4)
    return ["spec", "validate", spec]


@case("weights-shard-missing", 2, "backbone.model_path", "shard(s)", "are missing")
def _(tmp, mp):
    spec = cog_spec(tmp)
    folder = tmp / "cog/transformer"
    (folder / "diffusion_pytorch_model.safetensors").rename(folder / "diffusion_pytorch_model-00001-of-00002.safetensors")
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "diffusion_pytorch_model-00001-of-00002.safetensors",
        "b": "diffusion_pytorch_model-00002-of-00002.safetensors"}}))
    return ["spec", "validate", spec]


@case("vae-missing-generate", 2, "backbone.model_path", "missing vae/config.json")
def _(tmp, mp):
    spec = cog_spec(tmp)
    import shutil

    shutil.rmtree(tmp / "cog/vae")
    (tmp / "out").mkdir()
    (tmp / "out/eraser.safetensors").write_bytes(eraser_bytes(backbone="cogvideox"))
    return ["generate", spec, "--prompt", "a red circle"]


# clip sizes the model cannot take
@case("cogvideox-frames", 2, "training.num_frames", "48 frames", "4k+1", "use 45 or 49")
def _(tmp, mp):
    return ["run", cog_spec(tmp, frames=48)]


@case("cogvideox-size", 2, "training.height", "multiples of 16", "use 96 or 112")
def _(tmp, mp):
    return ["spec", "validate", cog_spec(tmp, height=100)]


@case("hunyuan-frames", 2, "training.num_frames", "HunyuanVideo takes 4k+1 frames", "use 29 or 33")
def _(tmp, mp):
    return ["run", hunyuan_spec(tmp, frames=32), "--dry-run"]


@case("hunyuan-size", 2, "training.width", "multiples of 16", "use 496 or 512")
def _(tmp, mp):
    return ["spec", "validate", hunyuan_spec(tmp, width=500)]


@case("toy-shape", 2, "training.num_frames", "4 frames of 32x32", "set num_frames 4")
def _(tmp, mp):
    return ["run", toy_spec(tmp, frames=5)]


@case("eval-frames", 2, "eval.num_frames", "4k+1", "use 9 or 13")
def _(tmp, mp):
    spec = cog_spec(tmp)
    spec.write_text(spec.read_text() + "eval: {prompts: [a red car], num_frames: 10}\n")
    return ["spec", "validate", spec]


# eraser sites
@case("sites-match-nothing", 2, "eraser.sites[0]", "'transformer_blocks.9.attn1' matches no attention module",
      "it has 4: transformer_blocks.0.attn1 ... transformer_blocks.3.attn1")
def _(tmp, mp):
    return ["run", toy_spec(tmp), "--set", "eraser.sites=[transformer_blocks.9.attn1]"]


@case("sites-preset-other-model", 2, "eraser.sites[0]", "'single' matches no attention module", "presets: ['all']")
def _(tmp, mp):
    return ["spec", "validate", cog_spec(tmp, extra="eraser: {name: adapter, sites: [single]}\n")]


# the eraser file generate and eval use
@case("eraser-missing", 1, "no eraser at", "t2vu run")
def _(tmp, mp):
    return ["eval", toy_spec(tmp, eval_=True)]


@case("eraser-not-safetensors", 2, "output.dir", "is not a safetensors file")
def _(tmp, mp):
    return eval_with_eraser(tmp, "caf\u00e9 au lait".encode("latin-1") * 10)


@case("eraser-foreign-safetensors", 2, "not a t2vu eraser", "t2vu eraser import")
def _(tmp, mp):
    return eval_with_eraser(tmp, st_bytes({"lora.weight": [2, 2]}, {"format": "pt"}))


@case("eraser-other-backbone", 2, "--eraser", "trained for backbone 'cogvideox'", "the spec's backbone is 'toy'")
def _(tmp, mp):
    (tmp / "e.safetensors").write_bytes(eraser_bytes(backbone="cogvideox"))
    return ["generate", toy_spec(tmp), "--prompt", "a red circle", "--eraser", tmp / "e.safetensors"]


@case("eraser-other-config", 2, "output.dir", "different transformer", "num_layers: eraser 6, model 4")
def _(tmp, mp):
    return eval_with_eraser(tmp, eraser_bytes(config={**TOY_CONFIG, "num_layers": 6}))


@case("eraser-sites-not-in-model", 2, "output.dir", "not in this model", "transformer_blocks.7.attn1")
def _(tmp, mp):
    return eval_with_eraser(tmp, eraser_bytes(sites=("transformer_blocks.7.attn1",)))  # same config, other sites


@case("eraser-newer-format", 2, "format_version '9'", "upgrade t2vu")
def _(tmp, mp):
    return eval_with_eraser(tmp, eraser_bytes(version="9"))


# t2vu eraser ...
@case("eraser-info-missing", 1, "eraser file not found")
def _(tmp, mp):
    return ["eraser", "info", tmp / "missing.safetensors"]


@case("eraser-info-text", 1, "is not a safetensors file")
def _(tmp, mp):
    (tmp / "notes.safetensors").write_bytes("na\u00efve\n".encode("latin-1"))
    return ["eraser", "info", tmp / "notes.safetensors"]


@case("eraser-import-pickled-code", 1, "refused to unpickle", "pickled code", "will not run code",
      "safetensors")
def _(tmp, mp):
    import torch

    class Payload:
        def __reduce__(self):
            return (open, (str(tmp / "pwned"), "w"))

    (tmp / "up").mkdir()
    torch.save({"transformer_blocks.0.attn1.adapter": Payload()}, tmp / "up/eraser_weights.pt")
    (tmp / "up/eraser_config.json").write_text(json.dumps({"eraser_type": "adapter", "eraser_rank": 2}))
    return ["eraser", "import", tmp / "up", "--out", tmp / "e.safetensors", "--backbone", "cogvideox"]


@case("eraser-import-out-exists", 1, "already exists", "--force")
def _(tmp, mp):
    (tmp / "up").mkdir()
    (tmp / "up/eraser_weights.pt").write_bytes(b"not read")
    (tmp / "up/eraser_config.json").write_text("{}")
    (tmp / "e.safetensors").write_bytes(eraser_bytes())
    return ["eraser", "import", tmp / "up", "--out", tmp / "e.safetensors", "--backbone", "toy"]


@case("eraser-export-exists", 1, "already holds eraser_weights.pt", "--force")
def _(tmp, mp):
    (tmp / "e.safetensors").write_bytes(eraser_bytes(dim=64))
    (tmp / "up").mkdir()
    (tmp / "up/eraser_weights.pt").write_bytes(b"an earlier export")
    return ["eraser", "export", tmp / "e.safetensors", "--out", tmp / "up"]


# faults during a run: one message, no traceback
@case("disk-full", 1, "no space left on the device", "metrics.jsonl", "--set output.dir")
def _(tmp, mp):
    fake_engine(mp, OSError(errno.ENOSPC, "No space left on device", str(tmp / "out/metrics.jsonl")))
    return ["run", toy_spec(tmp)]


@case("permission-denied-during-run", 1, "permission denied", "fix its permissions")
def _(tmp, mp):
    fake_engine(mp, PermissionError(errno.EACCES, "Permission denied", str(tmp / "out/spec.yaml")))
    return ["run", toy_spec(tmp)]


@case("out-of-memory", 1, "out of memory", "training.batch_size", "gradient_checkpointing")
def _(tmp, mp):
    fake_engine(mp, RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB"))
    return ["run", toy_spec(tmp)]


@case("interrupted", 130, "interrupted")
def _(tmp, mp):
    fake_engine(mp, KeyboardInterrupt())
    return ["run", toy_spec(tmp)]


@case("bug", 1, "unexpected ZeroDivisionError", "This is a bug", "t2vu --debug")
def _(tmp, mp):
    fake_engine(mp, ZeroDivisionError("division by zero"))
    return ["run", toy_spec(tmp)]


@case("debug-traceback", 2, "Traceback", "training.num_frames", traceback=True)
def _(tmp, mp):
    return ["--debug", "run", toy_spec(tmp, frames=5)]


# other commands
@case("concepts-unknown-source", 2, "--source", "did you mean 'wordnet'")
def _(tmp, mp):
    return ["concepts", "dog", "--source", "wordnte"]


@case("spec-init-unknown-backbone", 2, "did you mean 'cogvideox'")
def _(tmp, mp):
    return ["spec", "init", "--backbone", "cogvidex"]


def _snapshot(root: Path) -> dict:
    """Every file and folder under ``root``: a file's bytes and modification time (a folder's own mtime
    changes when the writability probe adds and removes its temporary file, so folders count by name)."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes()) if p.is_file() else "folder"
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_bad_input(c: Case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [str(a) for a in c.setup(tmp_path, monkeypatch)]
    before = _snapshot(tmp_path)
    r = runner.invoke(app, args)
    out = r.output
    assert r.exit_code == c.code, out
    for text in c.expect:
        assert text in out, f"{text!r} not in:\n{out}"
    if not c.traceback:
        assert "Traceback" not in out, out
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "weights_only=False" not in out
    after = _snapshot(tmp_path)
    assert after == before, "files on disk changed: " + ", ".join(sorted(set(after) ^ set(before)) or
                                                                  [k for k in after if after[k] != before.get(k)])


BASELINES = {
    "toy": lambda tmp: toy_spec(tmp, eval_=True),
    "cogvideox": lambda tmp: cog_spec(tmp),
    "hunyuanvideo": lambda tmp: hunyuan_spec(tmp, extra="eraser: {name: adapter, sites: [double]}\n"),
}


@pytest.mark.parametrize("name", list(BASELINES))
def test_the_good_input_each_case_spoils_passes(name, tmp_path):
    """The specs the cases start from pass every check: each case fails for its one bad input."""
    r = runner.invoke(app, ["spec", "validate", str(BASELINES[name](tmp_path))])
    assert r.exit_code == 0 and "valid" in r.output, r.output
    r = runner.invoke(app, ["run", str(BASELINES[name](tmp_path)), "--dry-run"])
    assert r.exit_code == 0 and "dry run" in r.output, r.output
    assert not (tmp_path / "out").exists()


def test_catalogue_documents_every_case():
    """docs/bad-input.md has one table row per case (same ids, same exit codes) and at least 40 of them."""
    rows = re.findall(r"^\| `([\w.-]+)` \|(.*)\|\s*$", DOCS.read_text(), flags=re.M)
    documented = {row_id: cells.split("|")[-1].strip() for row_id, cells in rows}
    assert set(documented) == {c.id for c in CASES}
    for c in CASES:
        assert documented[c.id] == str(c.code), c.id
    assert len(CASES) >= 40
