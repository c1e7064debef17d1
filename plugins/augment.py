"""Built-in prompt augmenters (registration and options; light).

They expand the target prompts before training so the eraser also fires on
rephrased and LLM-refined prompts (T2VUnlearning's robustness):

- ``templates``: wrap each prompt (or the bare target) in templates that
  imitate prompt refiners ("A cinematic shot of {prompt}, ...");
- ``synonyms``: swap the target word for its WordNet synonyms (and your own);
- ``paraphrase``: ask an LLM (OpenAI-compatible, like the ``llm`` concept
  source) for paraphrases and refined rewrites, cached on disk.

Implementations live in :mod:`t2vu.plugins.augment_impl`.
"""

from __future__ import annotations

import string
from typing import Literal, Optional

from pydantic import Field, field_validator

from t2vu.concept_sources.common import LLMOptions
from t2vu.core.hookspecs import hookimpl
from t2vu.core.registry import Options
from t2vu.core.spec import SpecPath

DEFAULT_TEMPLATES = (
    "A video of {prompt}.",
    "A cinematic shot of {prompt}, highly detailed, natural lighting, smooth camera motion.",
    "{prompt}. The camera slowly pans across the scene; warm colours, shallow depth of field, 4K.",
    "Handheld footage showing {prompt}",
    "An animated clip of {prompt}",
    "a video of {target}",
)


class TemplatesOptions(Options):
    """Wrap the prompts in templates; ``{prompt}`` is each prompt, ``{target}`` the target concept."""

    templates: list[str] = Field(default_factory=lambda: list(DEFAULT_TEMPLATES), min_length=1,
                                 description="Each has {prompt} (applied to every prompt) or only {target} "
                                             "(applied once).")
    max_new: Optional[int] = Field(None, gt=0, description="Add at most this many prompts.")

    @field_validator("templates")
    @classmethod
    def _placeholders(cls, value: list[str]) -> list[str]:
        for template in value:
            try:
                fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
            except ValueError as exc:
                raise ValueError(f"template {template!r}: {exc} (write literal braces as {{{{ }}}})") from None
            unknown = fields - {"prompt", "target"}
            if unknown:
                raise ValueError(f"template {template!r} uses {', '.join(sorted(unknown))}; "
                                 f"only {{prompt}} and {{target}} exist")
            if not fields:
                raise ValueError(f"template {template!r} has neither {{prompt}} nor {{target}}")
        return value


class SynonymsOptions(Options):
    """Swap the target word in each prompt for its synonyms (WordNet and/or your own)."""

    wordnet: bool = Field(True, description="Take synonyms from WordNet (offline, see the wordnet source).")
    extra: list[str] = Field(default_factory=list, description="Your own synonyms, used first.")
    senses: int = Field(1, gt=0, description="WordNet senses of the target to take synonyms from.")
    synset: Optional[str] = Field(None, description="Pin the WordNet sense, e.g. 'nakedness.n.01'.")
    pos: Literal["n", "v", "a", "r", "any"] = "n"
    bare: bool = Field(True, description="Also add each synonym alone as a prompt.")
    max_new: Optional[int] = Field(None, gt=0, description="Add at most this many prompts.")
    data: Optional[SpecPath] = Field(None, description="An nltk_data folder holding corpora/wordnet.")


class ParaphraseOptions(LLMOptions):
    """Paraphrases and LLM-refined rewrites of each prompt from an OpenAI-compatible server."""

    per_prompt: int = Field(3, gt=0, le=20, description="New prompts asked for per prompt.")
    style: Literal["paraphrase", "refine", "mixed"] = Field(
        "mixed", description="paraphrase: same length, new wording; refine: detailed rewrites like a "
                             "prompt extender's; mixed: both.")
    max_prompts: Optional[int] = Field(None, gt=0, description="Rewrite only the first N prompts.")
    instructions: Optional[str] = Field(None, description="Extra guidance appended to each request.")


@hookimpl
def register_augmenters(register):
    register("templates", "t2vu.plugins.augment_impl:TemplatesAugmenter", options=TemplatesOptions,
             summary="Wrap target prompts in refiner-style templates")
    register("synonyms", "t2vu.plugins.augment_impl:SynonymsAugmenter", options=SynonymsOptions,
             summary="Swap the target word for its WordNet (or listed) synonyms")
    register("paraphrase", "t2vu.plugins.augment_impl:ParaphraseAugmenter", options=ParaphraseOptions,
             summary="Paraphrases and refined rewrites of the target prompts from an LLM")
