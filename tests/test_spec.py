"""The run spec: structure, plugin options, paths, overrides, errors with lines."""

import json
from pathlib import Path

import pytest

from t2vu.core import plugins
from t2vu.core.spec import SpecError, json_schema, load_spec, parse_path, read_lines_file


def load(path, overrides=None):
    return load_spec(path, plugins.get_registry(), overrides)


def problems_of(path, overrides=None):
    with pytest.raises(SpecError) as exc:
        load(path, overrides)
    return [str(p) for p in exc.value.problems]


def test_valid_spec_resolves_components_and_paths(write_spec, tmp_path):
    r = load(write_spec())
    assert r.backbone.name == "cogvideox"
    assert r.backbone.options.model_path == tmp_path / "model"  # relative to the spec's folder
    assert r.spec.output.dir == tmp_path / "runs/out"
    assert [loss.name for loss in r.losses] == ["negative_guidance", "preservation", "localization"]
    assert r.losses[0].options.eta == 7.0 and r.losses[2].options.threshold == 0.1
    assert r.eraser.options.rank == 8
    assert [p.name for p in r.preserved] == ["list"]
    d = r.to_dict()
    assert d["losses"][1] == {"name": "preservation", "weight": 0.5, "unconditional": False}
    assert d["preserved"][0]["source"] == "list"
    assert d["training"]["steps"] == 3


def test_every_problem_listed_with_path_line_and_suggestion(write_spec):
    spec = write_spec("""\
        backbone: {name: cogvideox, model_path: ./m}
        concept: {target: nudity}
        losses:
          - {name: negative_guidence, eta: 7}
          - {name: preservation, wieght: 0.5}
          - name: localization
            threshold: high
        trainig: {steps: 3}
        preserved: {source: list, concepts: [a]}
        output: {dir: out}
        """)
    problems = problems_of(spec)
    text = "\n".join(problems)
    assert "losses[0].name (line 4): unknown loss 'negative_guidence'; did you mean 'negative_guidance'?" in text
    assert "losses[1].wieght (line 5): unknown key 'wieght'; did you mean 'weight'?" in text
    assert any(p.startswith("losses[2].threshold (line 7):") for p in problems)
    assert "trainig (line 8): unknown key 'trainig'; did you mean 'training'?" in text
    assert len(problems) == 4


def test_nested_structural_errors(write_spec):
    spec = write_spec("""\
        backbone: {name: cogvideox, model_path: ./m, dtype: bf16}
        concept: {target: nudity}
        losses: [{name: negative_guidance}]
        training: {steps: -1, batch_sise: 2}
        output: {dir: out}
        """)
    text = "\n".join(problems_of(spec))
    assert "training.steps (line 4)" in text
    assert "training.batch_sise (line 4): unknown key 'batch_sise'; did you mean 'batch_size'?" in text
    assert "backbone.dtype (line 1)" in text


def test_missing_sections_and_names(write_spec):
    spec = write_spec("""\
        backbone: {model_path: ./m}
        concept: {target: x}
        preserved: {name: list, concepts: [a]}
        losses: []
        """)
    text = "\n".join(problems_of(spec))
    assert "output" in text and "Field required" in text
    assert "missing 'name:' naming a backbone" in text
    assert "naming a concept source (preserved-concept blocks name their plugin with 'source:'" in text
    assert "losses" in text


def test_preservation_requires_preserved(write_spec):
    spec = write_spec("""\
        backbone: {name: cogvideox, model_path: ./m}
        concept: {target: x}
        losses: [{name: negative_guidance}, {name: preservation}]
        output: {dir: out}
        """)
    assert any("needs preserved concepts" in p for p in problems_of(spec))


def test_overrides_are_validated(write_spec):
    spec = write_spec()
    r = load(spec, ["training.steps=10", "eraser.rank=64", "losses[0].eta=3.5",
                    "concept.prompts=[a red car, a red apple]"])
    assert r.spec.training.steps == 10 and r.eraser.options.rank == 64
    assert r.losses[0].options.eta == 3.5
    assert r.spec.concept.prompts == ["a red car", "a red apple"]
    problems = problems_of(spec, ["training.steps=ten", "eraser.rnak=3"])
    assert any(p.startswith("training.steps (from --set):") for p in problems)
    assert any("eraser.rnak (from --set): unknown key 'rnak'; did you mean 'rank'?" in p for p in problems)
    assert problems_of(spec, ["nonsense"])[0].endswith("expected KEY=VALUE, e.g. training.steps=10")


def test_prompts_file_resolved_and_checked(write_spec, tmp_path):
    spec = write_spec(Path(write_spec()).read_text().replace(
        "prompts: [a nude person on a beach, a naked man]", "prompts: prompts/n.txt"))
    assert any("prompts file not found" in p for p in problems_of(spec))
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts/n.txt").write_text("# comment\na nude person\n\na nude person\nnaked # inline\n")
    r = load(spec)
    assert r.spec.concept.prompts == tmp_path / "prompts/n.txt"
    assert read_lines_file(r.spec.concept.prompts) == ["a nude person", "naked"]


def test_yaml_errors_have_lines(write_spec):
    problems = problems_of(write_spec("backbone: {name: x\nconcept: [\n"))
    assert "not valid YAML" in problems[0] and "(line" in problems[0]
    problems = problems_of(write_spec("a: 1\na: 2\n"))
    assert "duplicate key 'a'" in problems[0]
    assert "spec file not found" in problems_of(Path("/nonexistent/spec.yaml"))[0]


def test_third_party_options_validate(write_spec):
    spec = write_spec("""\
        backbone: {name: example_backbone, model_path: ./m, frames: 8}
        eraser: {name: example_eraser, factor: 0.25}
        concept: {target: red}
        preserved: [{source: example_colours, count: 1}, {source: list, concepts: [a dog]}]
        augment: [{name: example_repeat, times: 3}]
        losses: [{name: example_l1, margin: 0.1}]
        output: {dir: out}
        """)
    r = load(spec)
    assert r.backbone.options.frames == 8
    assert [p.build().concepts("red") for p in r.preserved] == [["blue"], ["a dog"]]
    bad = write_spec(Path(spec).read_text().replace("frames: 8", "frame: 8"))
    assert any("backbone.frame (line 1): unknown key 'frame'; did you mean 'frames'?" in p for p in problems_of(bad))


def test_parse_path():
    assert parse_path("losses[2].eta") == ("losses", 2, "eta")
    assert parse_path("losses.2.eta") == ("losses", 2, "eta")


def test_json_schema_includes_plugin_options():
    schema = json_schema(plugins.get_registry())
    text = json.dumps(schema)
    assert schema["title"] == "t2vu run spec"
    for needle in ('"eta"', '"threshold"', '"rank"', '"example_l1"', '"margin"', '"negative_guidance"', '"concepts"'):
        assert needle in text
    assert "losses" in schema["required"] and "backbone" in schema["required"]
