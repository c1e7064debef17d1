"""Talking to an OpenAI-compatible chat-completions server: requests, parsing, cache.

:class:`ChatClient` sends one request with bounded retries and caches the reply
text on disk, keyed by the request (URL, model, messages, sampling settings;
never the key), so a rerun is free and gives the same answer. :func:`parse_list`
reads a list out of what models actually reply: JSON, JSON inside a fenced
code block, JSON after some prose, or a numbered/bulleted list.

The API key is read from the environment variable the spec names; it is never
written to the spec, the cache, logs or error messages.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

from t2vu.concept_sources.common import cache_root, contains_phrase, dedupe, normalize, rank_if_asked
from t2vu.core.errors import T2VUError

log = logging.getLogger("t2vu.llm")
T = TypeVar("T")

PROTOCOL_VERSION = 1  # bump when the request layout changes: old cache entries stop matching


class ContentError(ValueError):
    """The reply arrived but holds no usable list."""


# -- parsing ---------------------------------------------------------------------------
_FENCE = re.compile(r"```[\w+-]*[ \t]*\n?(.*?)```", re.S)
_LIST_LINE = re.compile(r"^\s*(?:[-*+\u2022]|\(?\d{1,3}[.):]|\(?[a-zA-Z][.)])\s+(.*\S)\s*$")
_NAME_KEYS = ("name", "concept", "text", "prompt", "paraphrase", "value")


def _json_candidates(text: str):
    """JSON values found in ``text``: the whole text, else every value starting at a '[' or '{'."""
    try:
        yield json.loads(text)
        return
    except ValueError:
        pass
    decoder = json.JSONDecoder()
    for match in re.finditer(r"[\[{]", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except ValueError:
            continue
        yield value


def _as_text(item: Any) -> Optional[str]:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        for key in _NAME_KEYS:
            if isinstance(item.get(key), str):
                return item[key]
    return None


def _items_from_json(value: Any, key: str) -> Optional[tuple[list[str], list[str]]]:
    """(items, synonyms) from a JSON value, or None if it holds no list of strings."""
    synonyms: list[str] = []
    if isinstance(value, dict):
        if isinstance(value.get("synonyms"), list):
            synonyms = [s for s in (_as_text(x) for x in value["synonyms"]) if s]
        lists = [value[key]] if isinstance(value.get(key), list) else [
            v for k, v in value.items() if k != "synonyms" and isinstance(v, list)]
        if not lists:
            return None
        value = lists[0]
    if not isinstance(value, list):
        return None
    items = [t for t in (_as_text(x) for x in value) if t is not None]
    if not items and value:
        return None
    return items, synonyms


def _clean(item: str, max_chars: int, split_explanations: bool) -> Optional[str]:
    text = " ".join(item.split())
    text = re.sub(r"^(?:\d{1,3}[.):]\s+|[-*+\u2022]\s+)", "", text)
    text = text.strip().strip("*_`").strip().strip("\"'\u201c\u201d\u2018\u2019").strip()
    if split_explanations:
        text = re.split(r"\s+[-\u2013\u2014]\s+|:\s+|\s+\(", text, maxsplit=1)[0]
        text = text.strip().strip("*_`\"'").strip()
    text = text.rstrip(".,;:").strip()
    if not text or len(text) > max_chars:
        return None
    return text


def parse_list(content: Optional[str], key: str = "concepts", *, max_chars: int = 100,
               split_explanations: bool = True) -> tuple[list[str], list[str]]:
    """Items and synonyms from a model's reply; raise :class:`ContentError` if there are none.

    Accepts ``{"<key>": [...], "synonyms": [...]}``, a bare JSON list (of strings
    or of objects with a ``name``), either inside a fenced code block or after
    prose, and numbered or bulleted lists. Items are trimmed, stripped of
    markdown and quotes, and dropped when empty or longer than ``max_chars``.
    """
    text = (content or "").strip()
    if not text:
        raise ContentError("the reply is empty")
    found: Optional[tuple[list[str], list[str]]] = None
    chunks = [m.group(1).strip() for m in _FENCE.finditer(text)] + [text]
    for chunk in chunks:
        for value in _json_candidates(chunk):
            found = _items_from_json(value, key)
            if found is not None:
                break
        if found is not None:
            break
    if found is None:
        lines = [m.group(1) for m in map(_LIST_LINE.match, text.splitlines()) if m]
        if lines:
            found = (lines, [])
    if found is None:
        raise ContentError(f"neither JSON nor a numbered list: {text[:160]!r}")
    raw_items, synonyms = found
    items = dedupe(c for c in (_clean(x, max_chars, split_explanations) for x in raw_items) if c)
    if not items:
        raise ContentError(f"the list in the reply has no usable entries: {text[:160]!r}")
    synonyms = [c for c in (_clean(x, max_chars, True) for x in synonyms) if c]
    return items, synonyms


# -- the client ------------------------------------------------------------------------------
def read_api_key(env_name: Optional[str]) -> Optional[str]:
    """The key from the environment variable ``env_name`` (None: the server needs no key)."""
    if env_name is None:
        return None
    value = os.environ.get(env_name, "").strip()
    if not value:
        raise T2VUError(
            f"the environment variable {env_name} (api_key_env) is not set: export {env_name}=<your key>, "
            f"name another variable with api_key_env, or set api_key_env: null for a server that needs no key")
    return value


class ChatClient:
    """One OpenAI-compatible endpoint, with retries and an on-disk reply cache."""

    def __init__(self, options):
        self.options = options
        self._key = read_api_key(options.api_key_env)
        self.cache_dir = Path(options.cache_dir) if options.cache_dir else cache_root() / "llm"
        self.where = f"the LLM server at {options.base_url} (model {options.model!r})"
        self.calls = 0  # HTTP requests made (tests and logs)

    # -- helpers --------------------------------------------------------------
    def redact(self, text: str) -> str:
        if self._key and len(self._key) >= 4:
            text = text.replace(self._key, "***")
        return text

    def _request(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        o = self.options
        return {"protocol": PROTOCOL_VERSION, "base_url": o.base_url, "model": o.model,
                "messages": messages, "temperature": o.temperature, "max_tokens": o.max_tokens,
                "json_mode": o.json_mode}

    def cache_path(self, request: dict[str, Any]) -> Path:
        digest = hashlib.sha256(json.dumps(request, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
        return self.cache_dir / f"{digest}.json"

    def _read_cache(self, path: Path) -> Optional[str]:
        if not self.options.cache:
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        content = data.get("content") if isinstance(data, dict) else None
        return content if isinstance(content, str) else None

    def _write_cache(self, path: Path, request: dict[str, Any], content: str) -> None:
        if not self.options.cache:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump({"request": request, "content": content}, fh, ensure_ascii=False, indent=1)
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("cannot write the LLM cache %s: %s", path, exc)

    def _client(self):
        try:
            import openai
        except ImportError:  # pragma: no cover - openai is a dependency
            raise T2VUError("the llm source needs the openai package: pip install openai") from None
        return openai, openai.OpenAI(api_key=self._key or "not-needed", base_url=self.options.base_url,
                                     timeout=self.options.timeout, max_retries=0)

    # -- the call ---------------------------------------------------------------------
    def ask(self, messages: list[dict[str, str]], parse: Callable[[str], T]) -> T:
        """Send ``messages`` (or reuse the cached reply) and return ``parse(reply)``.

        Retries (at most ``retries`` more times, waiting ``retry_backoff`` seconds,
        doubled each time) after timeouts, failed connections, HTTP 408/409/429/5xx
        and replies ``parse`` rejects with :class:`ContentError`. Raises
        :class:`T2VUError` with what went wrong last.
        """
        o = self.options
        request = self._request(messages)
        path = self.cache_path(request)
        cached = self._read_cache(path)
        if cached is not None:
            try:
                result = parse(cached)
            except ContentError:
                log.info("ignoring an unusable cached reply %s", path)
            else:
                log.info("LLM reply from the cache %s", path)
                return result

        openai, client = self._client()
        extra: dict[str, Any] = {"response_format": {"type": "json_object"}} if o.json_mode else {}
        attempts = o.retries + 1
        kind, last = "", ""
        for attempt in range(attempts):
            if attempt:
                time.sleep(o.retry_backoff * 2 ** (attempt - 1))
            log.info("asking %s (try %d of %d)", self.where, attempt + 1, attempts)
            self.calls += 1
            try:
                reply = client.chat.completions.create(model=o.model, messages=messages, temperature=o.temperature,
                                                       max_tokens=o.max_tokens, **extra)
            except openai.APITimeoutError:
                kind, last = "timeout", f"no reply within {o.timeout:g} s (raise 'timeout' if the model is slow)"
                continue
            except openai.APIConnectionError as exc:
                cause = exc.__cause__ or exc
                kind, last = "connection", f"cannot connect ({type(cause).__name__}: {self.redact(str(cause))})"
                continue
            except openai.APIStatusError as exc:
                status = exc.status_code
                body = self.redact(_short(getattr(exc, "body", None) or exc.message))
                if status in (401, 403):
                    raise T2VUError(f"{self.where} refused the request (HTTP {status}): check the key in "
                                    f"${o.api_key_env}. Server said: {body}") from None
                if status == 404:
                    raise T2VUError(f"{self.where} answered HTTP 404: check base_url (it usually ends in /v1) "
                                    f"and that the server serves model {o.model!r}. Server said: {body}") from None
                if status in (408, 409, 429) or status >= 500:
                    kind, last = "status", f"HTTP {status}: {body}"
                    continue
                raise T2VUError(f"{self.where} rejected the request (HTTP {status}): {body}") from None
            except openai.OpenAIError as exc:
                raise T2VUError(f"{self.where}: {self.redact(str(exc))}") from None
            if not getattr(reply, "choices", None):
                raise T2VUError(f"{self.where} did not answer with a chat completion ({_short(reply, 120)!r}): "
                                f"is base_url an OpenAI-compatible endpoint (usually ending in /v1)?")
            content = _content_of(reply)
            try:
                result = parse(content or "")
            except ContentError as exc:
                kind, last = "content", f"the reply was unusable: {self.redact(str(exc))}"
                continue
            self._write_cache(path, request, content or "")
            return result

        tries = f"{attempts} tr{'y' if attempts == 1 else 'ies'}"
        if kind == "connection":
            raise T2VUError(f"cannot reach {self.where} after {tries}: {last}. Is the server running, and is "
                            f"base_url right?")
        raise T2VUError(f"{self.where} gave no usable answer after {tries}; last problem: {last}")


def _content_of(reply: Any) -> Optional[str]:
    try:
        return reply.choices[0].message.content
    except (AttributeError, IndexError, TypeError):
        return None


def _short(body: Any, limit: int = 200) -> str:
    if isinstance(body, dict):
        err = body.get("error", body)
        body = err.get("message", err) if isinstance(err, dict) else err
    text = " ".join(str(body).split())
    return text if len(text) <= limit else text[:limit] + "..."


# -- the concept source ---------------------------------------------------------------------
SYSTEM = ("You help choose concepts for concept erasure in text-to-video diffusion models. "
          "Answer with JSON only, no prose.")


def concept_messages(target: str, n: int, instructions: Optional[str]) -> list[dict[str, str]]:
    user = (
        f'A text-to-video model will be fine-tuned to stop generating "{target}". List {n} other concepts '
        f'the model must keep generating exactly as before: related to "{target}" or easily confused with it '
        f"(same category, shared settings, similar appearance) but clearly distinct from it. Do not list "
        f'"{target}" itself, its synonyms, kinds of it, or anything that depicts it. Use short noun phrases '
        f"(1 to 4 words), most important first.\n"
        f'Reply with one JSON object: {{"synonyms": [synonyms of "{target}"], "concepts": [the {n} concepts]}}'
    )
    if instructions:
        user += f"\nAlso: {instructions.strip()}"
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def filter_concepts(target: str, items: list[str], synonyms: list[str], exclude: list[str],
                    drop_containing_target: bool) -> list[str]:
    """Drop the target, its synonyms, excluded items (and, if asked, items containing the target)."""
    banned = {normalize(x) for x in [target, *synonyms, *exclude]}
    contained = [target, *synonyms] if drop_containing_target else []
    out = []
    for item in dedupe(items):
        if normalize(item) in banned or any(contains_phrase(item, word) for word in contained):
            continue
        out.append(item)
    return out


class LLMSource:
    """Built from :class:`t2vu.concept_sources.llm.LLMSourceOptions`."""

    def __init__(self, options):
        self.options = options
        self.client = ChatClient(options)

    def concepts(self, target: str) -> list[str]:
        o = self.options
        count = o.count or 20
        n = min(100, count + max(2, count // 4))  # some slack for what filtering drops
        messages = concept_messages(target, n, o.instructions)
        items, synonyms = self.client.ask(messages, lambda text: parse_list(text, "concepts"))
        kept = filter_concepts(target, items, synonyms, o.exclude, o.drop_containing_target)
        kept = rank_if_asked(o, target, kept)
        if not kept:
            raise T2VUError(f"{self.client.where} proposed no usable concepts for {target!r} (it named "
                            f"{len(items)}, all the target, its synonyms or excluded). Try other "
                            f"instructions or another model.")
        return kept[: o.count]
