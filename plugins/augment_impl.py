"""Implementations of the built-in prompt augmenters (see :mod:`t2vu.plugins.augment`).

Each ``augment(target, prompts)`` returns only the prompts it adds, in a
deterministic order; :func:`t2vu.core.concepts.augment_prompts` puts the
originals first and removes duplicates.
"""

from __future__ import annotations

import re
from typing import Optional

from t2vu.concept_sources.common import dedupe, normalize
from t2vu.core.errors import T2VUError


def _key(text: str) -> str:
    return " ".join(text.split()).casefold()


def _cap(items: list[str], prompts: list[str], max_new: Optional[int]) -> list[str]:
    """The items not already among ``prompts`` (or earlier items), at most ``max_new``."""
    seen = {_key(p) for p in prompts}
    new = []
    for item in items:
        item = " ".join(item.split())
        if item and _key(item) not in seen:
            seen.add(_key(item))
            new.append(item)
    return new[:max_new] if max_new else new


class TemplatesAugmenter:
    def __init__(self, options):
        self.options = options

    def augment(self, target: str, prompts: list[str]) -> list[str]:
        out: list[str] = []
        for template in self.options.templates:
            if "{prompt}" in template:
                out.extend(template.format(prompt=p, target=target) for p in prompts)
            else:
                out.append(template.format(target=target, prompt=target))
        return _cap(out, prompts, self.options.max_new)


def _word_pattern(words: list[str]) -> re.Pattern:
    """Whole-word, case-insensitive match of any of ``words`` (longest first), plural -s/-es allowed."""
    alternatives = sorted({w.strip() for w in words if w.strip()}, key=len, reverse=True)
    body = "|".join(r"\s+".join(map(re.escape, w.split())) for w in alternatives)
    return re.compile(rf"(?<!\w)(?:{body})(?P<plural>e?s)?(?!\w)", re.I)


def substitute(prompt: str, words: list[str], replacement: str) -> Optional[str]:
    """``prompt`` with each whole-word occurrence of ``words`` replaced, or None if none occurs."""
    pattern = _word_pattern(words)
    if not pattern.search(prompt):
        return None
    return pattern.sub(lambda m: replacement + (m.group("plural") or ""), prompt)


class SynonymsAugmenter:
    def __init__(self, options):
        self.options = options

    def synonyms(self, target: str) -> list[str]:
        o = self.options
        found = list(o.extra)
        if o.wordnet:
            from t2vu.concept_sources import wordnet_data

            wn = wordnet_data.load_reader(o.data)
            pos = None if o.pos == "any" else o.pos
            if o.synset:
                start = wordnet_data.target_synsets(wn, target, pos, o.senses, o.synset)
                found += [n.replace("_", " ") for s in start for n in s.lemma_names()]
            elif wn.synsets(wordnet_data._lookup_key(target), pos=pos):
                found += wordnet_data.synonyms(wn, target, pos, o.senses)
            elif not o.extra:
                raise T2VUError(f"WordNet has no entry for {target!r}: list synonyms with 'extra:' "
                                f"or pin a sense with 'synset:'")
        syns = [s for s in dedupe(found) if normalize(s) != normalize(target)]
        if not syns:
            raise T2VUError(f"no synonyms for {target!r}: list some with 'extra:'")
        return syns

    def augment(self, target: str, prompts: list[str]) -> list[str]:
        syns = self.synonyms(target)
        out: list[str] = list(syns) if self.options.bare else []
        for syn in syns:
            for prompt in prompts:
                changed = substitute(prompt, [target, *[s for s in syns if s != syn]], syn)
                if changed is not None:
                    out.append(changed)
        return _cap(out, prompts, self.options.max_new)


_STYLE = {
    "paraphrase": "{n} paraphrases: the same scene in new words, about as long as the original",
    "refine": ("{n} refined versions, the way a prompt-enhancing LLM rewrites prompts for a text-to-video "
               "model: two to four sentences that add setting, lighting, camera motion and style"),
    "mixed": ("{half} paraphrases (the same scene in new words, about as long as the original) and "
              "{rest} refined versions (two to four sentences adding setting, lighting, camera motion "
              "and style, like a prompt-enhancing LLM)"),
}


def paraphrase_messages(target: str, prompt: str, n: int, style: str,
                        instructions: Optional[str]) -> list[dict[str, str]]:
    what = _STYLE[style].format(n=n, half=(n + 1) // 2, rest=n // 2)
    user = (
        f"Text-to-video prompt: {prompt!r}\n"
        f"Write {what}. Every rewrite must still show everything the original shows, including "
        f'"{target}", which may be described in other words instead of named.\n'
        f'Reply with one JSON object: {{"prompts": [the {n} rewrites]}}'
    )
    if instructions:
        user += f"\nAlso: {instructions.strip()}"
    return [{"role": "system", "content": "You rewrite prompts for text-to-video models. Answer with JSON only."},
            {"role": "user", "content": user}]


class ParaphraseAugmenter:
    def __init__(self, options):
        from t2vu.concept_sources.llm_client import ChatClient

        self.options = options
        self.client = ChatClient(options)

    def augment(self, target: str, prompts: list[str]) -> list[str]:
        from t2vu.concept_sources.llm_client import parse_list

        o = self.options
        out: list[str] = []
        chosen = prompts[: o.max_prompts] if o.max_prompts else prompts
        for prompt in chosen:
            messages = paraphrase_messages(target, prompt, o.per_prompt, o.style, o.instructions)
            items, _ = self.client.ask(
                messages, lambda text: parse_list(text, "prompts", max_chars=1500, split_explanations=False))
            out.extend(items[: o.per_prompt])
        return _cap(out, prompts, None)
