"""The Quick start's toy-world erasure, with a shortened evaluation: red drops, other colours hold."""

import pytest
import torch
from typer.testing import CliRunner

from t2vu.core import plugins
from t2vu.core.cli import app

torch.set_num_threads(1)
torch.set_flush_denormal(True)
runner = CliRunner()

SPEC = "examples/toy-erase-red.yaml"
SHAPE_SPEC = "examples/toy-erase-circle.yaml"
ANY_SPEC = "examples/toy-erase-any.yaml"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from pathlib import Path

    from t2vu.core.engine import train
    from t2vu.core.evaluate import evaluate
    from t2vu.core.spec import load_spec

    out = tmp_path_factory.mktemp("toy") / "red"
    spec = Path(__file__).resolve().parent.parent / SPEC
    plugins.reset()
    resolved = load_spec(spec, plugins.get_registry(), [f"output.dir={out}", "eval.steps=12"])
    train(resolved)
    return evaluate(resolved), out


def test_short_toy_erasure_erases_red_and_keeps_other_colours(report):
    rep, out = report
    s = rep["summary"]
    assert set(s) == {"target_rate", "synonym_rate", "other_accuracy", "shape_accuracy", "motion_accuracy",
                      "other_pixel_change"}
    assert s["target_rate"]["before"] >= 0.9
    assert s["target_rate"]["after"] <= 0.2
    assert s["synonym_rate"]["after"] <= 0.5
    assert s["other_accuracy"]["after"] >= 0.8 * s["other_accuracy"]["before"]
    assert s["motion_accuracy"]["after"] >= 0.9 * s["motion_accuracy"]["before"]
    assert s["other_pixel_change"]["before"] == 0.0 and 0 < s["other_pixel_change"]["after"] < 0.1
    assert (out / "eval" / "report.md").exists() and (out / "eval" / "report.json").exists()


def test_eval_prompts_hold_out_the_erasers_training_prompts(report):
    rep, out = report
    trained = {"a red circle moving left", "a red square moving up", "a red triangle moving right"}
    target = [r["prompt"] for r in rep["rows"] if r["group"] == "target"]
    assert target and not trained & set(target)
    assert all("red" in p for p in target)
    synonyms = {r["prompt"].split()[1] for r in rep["rows"] if r["group"] == "synonym"}
    assert synonyms == {"crimson", "scarlet"}
    others = {r["expect"]["color"] for r in rep["rows"] if r["group"] == "other"}
    assert others == {"orange", "yellow", "green", "blue", "magenta"}


@pytest.mark.parametrize("spec, target, prompt, siblings", [
    (SPEC, "blue", "a blue circle moving up", ["red", "orange", "yellow", "green", "magenta"]),
    (SHAPE_SPEC, "square", "a blue square moving up", ["circle", "triangle"]),
    (ANY_SPEC, "red", "a red circle moving left", ["orange", "yellow", "green", "blue", "magenta"]),
    (ANY_SPEC, "triangle", "a red triangle moving left", ["circle", "square"]),
])
def test_another_concept_needs_only_target_and_prompts(tmp_path, spec, target, prompt, siblings):
    r = runner.invoke(app, ["run", spec, "--dry-run", "--set", f"concept.target={target}", "--set",
                            f"concept.prompts=[{prompt}]", "--set", f"output.dir={tmp_path}"])
    assert r.exit_code == 0, r.output
    from t2vu_toy.sources import ToySiblings

    assert ToySiblings(plugins.get_registry().get("concept_source", "toy_siblings").options()).concepts(target) \
        == siblings


def test_shape_spec_uses_text_stream_adapters_and_an_anchor(tmp_path):
    """The shape recipe's differences from the colour one (docs/toy-world.md, "Erasing a shape")."""
    from t2vu.core.engine import gather_prompts
    from t2vu.core.spec import load_spec

    resolved = load_spec(SHAPE_SPEC, plugins.get_registry(), [f"output.dir={tmp_path}"])
    spec = resolved.spec
    assert spec.eraser["streams"] == ["video", "text"] and spec.concept.condition == "prompts"
    assert spec.losses[0]["push_limit"] == 0.15 and spec.losses[1]["unconditional"] is True
    assert spec.losses[1]["weight"] == 3.0  # a lighter hold than the colours' 10
    assert spec.training.states == "erased_trajectory"
    prompts = gather_prompts(resolved)
    assert prompts.anchors["a red circle moving left"] == "a red square moving left"  # the first sibling
    assert set(prompts.unlearn) == set(spec.concept.prompt_list())  # no bare word
    assert len(spec.concept.prompt_list()) == 12 and len(spec.eval.seeds) == 4
    # the anchor follows the target: another shape changes only concept.target and concept.prompts
    square = load_spec(SHAPE_SPEC, plugins.get_registry(), [
        f"output.dir={tmp_path}", "concept.target=square", "concept.prompts=[a blue square moving up]"])
    assert gather_prompts(square).anchors == {"a blue square moving up": "a blue circle moving up"}


def test_any_spec_is_the_shape_spec_with_late_text_adapters(tmp_path):
    """examples/toy-erase-any.yaml: the shape recipe, text adapters from step 100 of 500, evaluated at 15
    sampler steps (not 25); a colour target takes its anchor from the other colours."""
    from t2vu.core.engine import gather_prompts
    from t2vu.core.spec import load_spec

    registry = plugins.get_registry()
    shape = load_spec(SHAPE_SPEC, registry, [f"output.dir={tmp_path}"]).spec.model_dump()
    any_ = load_spec(ANY_SPEC, registry, [f"output.dir={tmp_path}"]).spec.model_dump()
    assert any_["training"].pop("stream_start") == {"text": 100} and not shape["training"].pop("stream_start")
    assert any_["eval"].pop("steps") == 15 and shape["eval"].pop("steps") == 25
    assert any_["training"].pop("steps") == 500 and shape["training"].pop("steps") == 400
    assert any_ == shape
    red = load_spec(ANY_SPEC, registry, [f"output.dir={tmp_path}", "concept.target=red",
                                         "concept.prompts=[a red circle moving left]"])
    assert gather_prompts(red).anchors == {"a red circle moving left": "a orange circle moving left"}


def test_shape_target_metrics_do_not_count_erasing_as_shape_damage():
    """Erasing "triangle": target prompts that turn into circles lower target_rate, not shape_accuracy."""
    from t2vu.core.evaluate import EvalPrompt, EvalResult
    from t2vu_toy.evaluation import ToyPromptSet

    def result(group, shape, after_shape, motion="left", after_motion="left"):
        expect = {"color": "red", "shape": shape, "motion": motion}
        before = dict(expect)
        after = {"color": "red", "shape": after_shape, "motion": after_motion}
        return EvalResult(EvalPrompt(f"a red {shape} moving {motion}", 0, group, expect), before, after, 0.01)

    ps = ToyPromptSet(None)
    ps.target, ps.attribute = "triangle", "shape"
    rs = [result("target", "triangle", "circle"), result("target", "triangle", "triangle", after_motion="up"),
          result("other", "circle", "circle"), result("other", "square", "circle")]
    s = ps.summarize(rs)
    assert s["target_rate"] == {"before": 1.0, "after": 0.5, "n": 2}
    assert s["other_accuracy"] == {"before": 1.0, "after": 0.5, "n": 2}
    assert s["shape_accuracy"] == s["other_accuracy"]  # the other shapes' prompts only
    assert s["motion_accuracy"] == {"before": 1.0, "after": 0.75, "n": 4}  # every prompt
    assert "synonym_rate" not in s and s["other_pixel_change"]["after"] == pytest.approx(0.01)
