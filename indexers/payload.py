"""What an engine stores beside each vector so that filters run inside the engine.

The service filters hits on a chunk's document id, path (a character prefix), language,
chunk kind and the document's metadata (key = value). Every engine stores a ``Payload``
with each vector and evaluates a ``Filter`` with exactly the semantics of
``Filter.matches`` (the reference the conformance tests hold each engine to): the
criteria are ANDed, an empty criterion does not restrict, a tuple criterion matches any
of its values, and metadata pairs must all be present with equal values.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Payload:
    """The filterable fields of one chunk. Strings may hold any Unicode except NUL (the
    service refuses NUL in every field on the way in)."""

    doc_id: str
    path: str
    language: str = ""
    kind: str = ""
    metadata: tuple[tuple[str, str], ...] = ()  # the document's, sorted by key

    def meta(self) -> dict[str, str]:
        return dict(self.metadata)


@dataclass(frozen=True, slots=True)
class Filter:
    """A conjunction of criteria over Payload fields."""

    doc_ids: tuple[str, ...] = ()  # doc_id is one of these
    path_prefix: str = ""  # path starts with these characters (not a directory match)
    languages: tuple[str, ...] = ()  # language is one of these
    kinds: tuple[str, ...] = ()  # kind is one of these
    metadata: tuple[tuple[str, str], ...] = ()  # every key present with this value

    @property
    def empty(self) -> bool:
        return not (self.doc_ids or self.path_prefix or self.languages or self.kinds
                    or self.metadata)

    def matches(self, p: Payload) -> bool:
        """The reference semantics every engine implements."""
        if self.doc_ids and p.doc_id not in self.doc_ids:
            return False
        if self.path_prefix and not p.path.startswith(self.path_prefix):
            return False
        if self.languages and p.language not in self.languages:
            return False
        if self.kinds and p.kind not in self.kinds:
            return False
        if self.metadata:
            meta = p.meta()
            if any(meta.get(k) != v for k, v in self.metadata):
                return False
        return True
