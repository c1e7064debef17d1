"""The ``llm`` preserved-concept source (registration and options; light).

Any OpenAI-compatible chat-completions server works (OpenAI, vLLM, llama.cpp,
Ollama, LM Studio). The spec names the environment variable that holds the
key (``api_key_env``), never the key. The client code lives in
:mod:`t2vu.concept_sources.llm_client`, imported only when the source is built.
"""

from __future__ import annotations

from typing import Optional

from pydantic import Field

from t2vu.concept_sources.common import EmbeddingRankOptions, LLMOptions
from t2vu.core.hookspecs import hookimpl
from t2vu.core.spec import ConceptSourceOptions


class LLMSourceOptions(ConceptSourceOptions, LLMOptions, EmbeddingRankOptions):
    """Preserved concepts proposed by an LLM, validated, de-duplicated and cached."""

    count: Optional[int] = Field(20, gt=0, description="Keep at most this many concepts.")
    instructions: Optional[str] = Field(None, description="Extra guidance appended to the request, e.g. "
                                                          "'prefer everyday scenes with people'.")
    exclude: list[str] = Field(default_factory=list, description="Never return these (besides the target "
                                                                 "and the synonyms the model names).")
    drop_containing_target: bool = Field(True, description="Drop answers that contain the target as a word "
                                                           "('partial nudity' for 'nudity').")


@hookimpl
def register_concept_sources(register):
    register("llm", "t2vu.concept_sources.llm_client:LLMSource", options=LLMSourceOptions,
             summary="Preserved concepts proposed by an LLM (any OpenAI-compatible server), cached on disk")
