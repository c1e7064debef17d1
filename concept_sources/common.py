"""Light helpers shared by concept sources and augmenters.

Imported by the registering modules, so nothing heavy here: pydantic only.
Holds the cache folder, the text normalisation used to compare concepts,
and option models that several plugins share (an LLM endpoint, embedding
ranking).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Literal, Optional

from pydantic import Field, field_validator, model_validator

from t2vu.core.registry import Options
from t2vu.core.spec import SpecPath

CACHE_ENV = "T2VU_CACHE_DIR"


def cache_root() -> Path:
    """``$T2VU_CACHE_DIR``, else ``$XDG_CACHE_HOME/t2vu``, else ``~/.cache/t2vu``."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "t2vu"


_ARTICLE = re.compile(r"^(a|an|the)\s+", re.I)
_NON_WORD = re.compile(r"[^\w\s'-]+")


def normalize(text: str) -> str:
    """Comparison form of a concept: case-folded, no leading article, single spaces,
    underscores as spaces, naive singular ("dogs", "foxes", "puppies" == "dog", "fox", "puppy")."""
    text = _NON_WORD.sub(" ", text.replace("_", " ")).casefold()
    text = " ".join(text.split())
    text = _ARTICLE.sub("", text)
    words = text.split(" ")
    last = words[-1] if words else ""
    if len(last) > 4 and last.endswith("ies"):
        last = last[:-3] + "y"
    elif len(last) > 4 and last.endswith(("xes", "ches", "shes", "sses", "zes")):
        last = last[:-2]
    elif len(last) > 3 and last.endswith("s") and not last.endswith(("ss", "us", "is")):
        last = last[:-1]
    words[-1:] = [last]
    return " ".join(words).strip()


def dedupe(items: Iterable[str]) -> list[str]:
    """Strip, drop empties and duplicates (by :func:`normalize`), keep the first spelling."""
    seen: set[str] = set()
    out: list[str] = []
    for item in items:
        item = " ".join(str(item).split())
        key = normalize(item)
        if item and key and key not in seen:
            seen.add(key)
            out.append(item)
    return out


def contains_phrase(text: str, phrase: str) -> bool:
    """True if ``phrase`` occurs in ``text`` as whole words (after :func:`normalize`)."""
    p = normalize(phrase)
    if not p:
        return False
    return re.search(rf"(?<!\w){re.escape(p)}(?!\w)", normalize(text)) is not None


# -- shared option models ----------------------------------------------------------
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class LLMOptions(Options):
    """An OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, llama.cpp, Ollama, ...)."""

    base_url: str = Field("https://api.openai.com/v1",
                          description="Server URL up to and including /v1, e.g. http://127.0.0.1:8000/v1.")
    model: str = Field(min_length=1, description="Model name as the server knows it.")
    api_key_env: Optional[str] = Field(
        "OPENAI_API_KEY",
        description="Name of the environment variable holding the API key (never the key itself); "
                    "null for servers that need no key.")
    temperature: float = Field(0.0, ge=0, le=2)
    max_tokens: int = Field(1024, gt=0)
    json_mode: bool = Field(False, description="Send response_format=json_object (not every server supports it).")
    timeout: float = Field(60.0, gt=0, description="Seconds to wait for one reply.")
    retries: int = Field(2, ge=0, le=10, description="Extra tries after a timeout, 429/5xx or unusable content.")
    retry_backoff: float = Field(1.0, ge=0, description="Seconds before the first retry; doubles each time.")
    cache: bool = Field(True, description="Cache replies on disk, keyed by the request (a rerun is free).")
    cache_dir: Optional[SpecPath] = Field(None, description="Default: $T2VU_CACHE_DIR/llm (~/.cache/t2vu/llm).")

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not re.match(r"^https?://", value):
            raise ValueError("base_url must start with http:// or https://, e.g. http://127.0.0.1:8000/v1")
        return value.rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not _ENV_NAME.match(value):
            raise ValueError("api_key_env names an environment variable (e.g. OPENAI_API_KEY); "
                             "never put the key itself in the spec")
        return value


class EmbeddingRankOptions(Options):
    """Optional ranking of candidates by text-embedding similarity to the target."""

    rank_by: Optional[Literal["embedding"]] = Field(
        None, description="'embedding': drop candidates too close to the target, most similar first.")
    embedding_model: Optional[SpecPath] = Field(
        None, description="Local folder: a sentence-embedding/encoder model, or a diffusers pipeline "
                          "folder with text_encoder/ and tokenizer/ (e.g. ./CogVideoX-5b).")
    max_similarity: float = Field(0.9, ge=-1, le=1,
                                  description="Drop candidates whose cosine similarity to the target is at least this.")

    @model_validator(mode="after")
    def _needs_model(self):
        if self.rank_by == "embedding" and self.embedding_model is None:
            raise ValueError("rank_by: embedding needs embedding_model: a local model folder "
                             "(e.g. ./CogVideoX-5b, whose text_encoder/ and tokenizer/ are used)")
        return self


def rank_if_asked(options: EmbeddingRankOptions, target: str, candidates: list[str]) -> list[str]:
    """Apply ``rank_by`` when set (imports torch only then)."""
    if getattr(options, "rank_by", None) != "embedding" or not candidates:
        return candidates
    from t2vu.concept_sources.embedding import rank_by_embedding

    return rank_by_embedding(target, candidates, options.embedding_model, options.max_similarity)
