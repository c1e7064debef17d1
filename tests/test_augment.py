"""Prompt augmenters (templates, synonyms, paraphrase) and how a spec chains them."""

import json
import textwrap

import nltk.data
import pytest
import yaml

from chat_server import ChatServer, free_port
from t2vu.core import plugins
from t2vu.core.concepts import augment_prompts
from t2vu.core.errors import T2VUError
from t2vu.core.spec import SpecError, load_spec
from t2vu.plugins.augment_impl import substitute

PROMPTS = ["a nude person on a beach", "nudity in a painting"]


@pytest.fixture(autouse=True)
def env(monkeypatch, tmp_path_factory):
    # the same converted WordNet copy as tests/test_concept_sources.py (made once per session)
    monkeypatch.setattr(nltk.data, "path", [])
    monkeypatch.setenv("T2VU_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "t2vu-wordnet-cache"))
    monkeypatch.setenv("T2VU_TEST_LLM_KEY", "sk-augment-key")
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)


def resolve(write_spec, augment_yaml, prompts=PROMPTS, target="nudity"):
    spec = {
        "backbone": {"name": "cogvideox", "model_path": "./m"},
        "concept": {"target": target, "prompts": prompts},
        "augment": yaml.safe_load(textwrap.dedent(augment_yaml)),
        "losses": [{"name": "negative_guidance"}],
        "output": {"dir": "out"},
    }
    return load_spec(write_spec(yaml.safe_dump(spec, sort_keys=False)), plugins.get_registry())


def run(resolved):
    return augment_prompts(resolved.augment, resolved.spec.concept.target, resolved.spec.concept.prompts)


def test_templates(write_spec):
    r = resolve(write_spec, """\
        - name: templates
          templates: ["A video of {prompt}.", "a video of {target}", "{prompt}"]
        """)
    assert run(r) == PROMPTS + ["A video of a nude person on a beach.", "A video of nudity in a painting.",
                                "a video of nudity"]
    r = resolve(write_spec, "- {name: templates, max_new: 2}")
    out = run(r)
    assert out[:2] == PROMPTS and len(out) == 4 and out == run(r)  # default templates, capped, deterministic
    assert out[2] == "A video of a nude person on a beach."


@pytest.mark.parametrize("template, message", [
    ("A video of {subject}", "only {prompt} and {target} exist"),
    ("A video of nothing", "has neither {prompt} nor {target}"),
    ("A video of {prompt", "write literal braces"),
])
def test_templates_are_validated(write_spec, template, message):
    with pytest.raises(SpecError) as exc:
        resolve(write_spec, f"- {{name: templates, templates: [{json.dumps(template)}]}}")
    assert "augment[0].templates" in str(exc.value) and message in str(exc.value)


def test_substitute_whole_words_and_plurals():
    assert substitute("Two dogs and a dog", ["dog"], "hound") == "Two hounds and a hound"
    assert substitute("a hotdog stand", ["dog"], "hound") is None
    assert substitute("a Domestic  Dog runs", ["dog", "domestic dog"], "pooch") == "a pooch runs"


def test_synonyms_from_wordnet(write_spec):
    r = resolve(write_spec, "- {name: synonyms}")
    out = run(r)
    assert out[:2] == PROMPTS
    assert set(out[2:]) == {"nakedness", "nudeness", "nakedness in a painting", "nudeness in a painting"}
    r = resolve(write_spec, "- {name: synonyms, bare: false, extra: [bare skin], max_new: 2}")
    assert run(r)[2:] == ["bare skin in a painting", "nakedness in a painting"]


def test_synonyms_without_wordnet_and_errors(write_spec, monkeypatch):
    r = resolve(write_spec, "- {name: synonyms, wordnet: false, extra: [hound], bare: false}",
                prompts=["two dogs playing", "a cat"], target="dog")
    assert run(r) == ["two dogs playing", "a cat", "two hounds playing"]
    r = resolve(write_spec, "- {name: synonyms}", prompts=["Pikachu dancing"], target="Pikachu")
    with pytest.raises(T2VUError, match=r"augment\[0\] \(synonyms\): WordNet has no entry for 'Pikachu'"):
        run(r)
    r = resolve(write_spec, "- {name: synonyms, wordnet: false}")
    with pytest.raises(T2VUError, match="no synonyms for 'nudity'"):
        run(r)


def test_paraphrase_with_an_llm_server(write_spec, tmp_path):
    replies = [json.dumps({"prompts": ["an unclothed person at the seaside", "a naked figure on sand",
                                       "a nude person on a beach", "extra one"]}),
               "```json\n{\"prompts\": [\"a painting showing nakedness\", \"a canvas of a bare body\"]}\n```"]
    block = {"name": "paraphrase", "model": "qwen", "api_key_env": "T2VU_TEST_LLM_KEY", "per_prompt": 2,
             "style": "paraphrase", "retries": 0}
    with ChatServer(replies) as server:
        r = resolve(write_spec, json.dumps([{**block, "base_url": server.url}]))
        out = run(r)
        assert out == PROMPTS + ["an unclothed person at the seaside", "a naked figure on sand",
                                 "a painting showing nakedness", "a canvas of a bare body"]
        assert server.calls == 2  # one request per prompt
        first = server.requests[0]["body"]["messages"][-1]["content"]
        assert "a nude person on a beach" in first and "2 paraphrases" in first and '"nudity"' in first
        assert run(r) == out and server.calls == 2  # cached: a rerun is free
    down = {**block, "base_url": f"http://127.0.0.1:{free_port()}/v1", "max_prompts": 1, "cache": False}
    r = resolve(write_spec, json.dumps([down]))
    with pytest.raises(T2VUError, match=r"augment\[0\] \(paraphrase\): cannot reach the LLM server"):
        run(r)


def test_chained_augmenters_keep_originals_first(write_spec):
    r = resolve(write_spec, """\
        - {name: synonyms, wordnet: false, extra: [nakedness], bare: false}
        - {name: templates, templates: ["A video of {prompt}."]}
        """)
    out = run(r)
    assert out == PROMPTS + ["nakedness in a painting", "A video of a nude person on a beach.",
                             "A video of nudity in a painting.", "A video of nakedness in a painting."]
    assert augment_prompts([], "nudity", ["a", "a ", "A", "b"]) == ["a", "b"]
    assert [a["name"] for a in r.to_dict()["augment"]] == ["synonyms", "templates"]  # in the run's spec.yaml
