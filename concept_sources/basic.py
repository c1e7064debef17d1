"""Built-in preserved-concept sources: ``list`` and ``file``."""

from __future__ import annotations

from pydantic import Field

from t2vu.core.hookspecs import hookimpl
from t2vu.core.spec import ConceptSourceOptions, SpecPath


class ListOptions(ConceptSourceOptions):
    """Concepts or prompts written inline in the spec."""

    concepts: list[str] = Field(min_length=1)


class FileOptions(ConceptSourceOptions):
    """One concept or prompt a line; '#' comments and blank lines ignored, duplicates dropped."""

    path: SpecPath


def _dedupe(items):
    seen, out = set(), []
    for item in items:
        item = item.strip()
        if item and item not in seen:
            seen.add(item)
            out.append(item)
    return out


class ListSource:
    def __init__(self, options: ListOptions):
        self.options = options

    def concepts(self, target: str) -> list[str]:
        return _dedupe(self.options.concepts)[: self.options.count]


class FileSource:
    def __init__(self, options: FileOptions):
        self.options = options

    def concepts(self, target: str) -> list[str]:
        from t2vu.core.errors import T2VUError
        from t2vu.core.spec import read_lines_file

        try:
            items = read_lines_file(self.options.path)
        except OSError as exc:
            raise T2VUError(f"cannot read preserved concepts file {self.options.path}: {exc}") from None
        if not items:
            raise T2VUError(f"preserved concepts file {self.options.path} has no concepts")
        return items[: self.options.count]


@hookimpl
def register_concept_sources(register):
    register("list", ListSource, options=ListOptions, summary="Concepts written inline in the spec")
    register("file", FileSource, options=FileOptions, summary="Concepts from a text file, one a line")
