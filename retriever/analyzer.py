"""The lexical analyzer: one function turns documents and queries into index terms.

Code queries mix prose with identifiers (``parse_config``, ``HTTPError``, ``urllib.parse``).
A prose analyzer splits ``parse_config`` into nothing useful and a dense model blurs it, so:

- identifiers are kept whole (lower-cased: ``parse_config``, ``httperror``,
  ``urllib.parse``) *and* split into their parts at ``_``, ``.``, ``-``, ``/`` and camelCase
  boundaries (``parse``, ``config``, ``http``, ``error``, ``urllib``), so a query naming the
  identifier matches it exactly and a query in words matches its parts;
- parts are stemmed (Snowball English, PyStemmer) and English stop words dropped, so prose
  ("configs parsed") meets code ("parse_config");
- the same analyzer runs on documents and queries (``ANALYZER`` names it; an index built by
  another analyzer version is rebuilt).

Terms are ASCII-safe words of ``[a-z0-9_.]`` and other Unicode letters, never FTS5 syntax.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from functools import lru_cache

ANALYZER = "code-v1"

# Runs of word characters joined by . _ - (identifiers, dotted names, file names), or numbers.
_RAW = re.compile(r"[^\W_]+(?:[._-]*[^\W_]+)*|_+[^\W_]+(?:[._-]*[^\W_]+)*", re.UNICODE)
_SEP = re.compile(r"[._-]+")
# camelCase / PascalCase / acronym boundaries: HTTPError -> HTTP Error, parseJSON2x ->
# parse JSON 2 x.
_CAMEL = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+|[^\W\d_]+", re.UNICODE)
MAX_TERM = 64  # longer terms (hashes, base64) are cut: they match themselves only anyway

_STOP = """
a about above after again against all am an and any are as at be because been before being
below between both but by can could did do does doing down during each few for from further
had has have having he her here hers herself him himself his how i if in into is it its
itself just me more most my myself no nor not now of off on once only or other our ours
ourselves out over own same she should so some such than that the their theirs them
themselves then there these they this those through to too under until up very was we were
what when where which while who whom why will with would you your yours yourself yourselves
"""
STOP_WORDS = frozenset(_STOP.split())


@lru_cache(maxsize=1)
def _stemmer():  # noqa: ANN202
    import Stemmer  # PyStemmer

    return Stemmer.Stemmer("english")


@lru_cache(maxsize=65536)
def _stem(word: str) -> str:
    return str(_stemmer().stemWord(word))


def _fold(text: str) -> str:
    """Accents removed (café -> cafe), case kept, so both sides fold the same way."""
    if text.isascii():
        return text
    text = unicodedata.normalize("NFKD", text)
    return "".join(c for c in text if not unicodedata.combining(c))


def _parts(raw: str) -> list[str]:
    """The words inside an identifier: split at separators, then camelCase boundaries."""
    out: list[str] = []
    for piece in _SEP.split(raw):
        if piece:
            out.extend(_CAMEL.findall(piece) or [piece])
    return out


def terms(text: str) -> list[str]:
    """Index terms of ``text`` in order, with repeats (term frequency counts)."""
    out: list[str] = []
    for m in _RAW.finditer(text):
        raw = _fold(m.group(0).strip("_.-"))
        if not raw:
            continue
        parts = _parts(raw)
        folded = [p.lower() for p in parts]
        words = [w[:MAX_TERM] for w in folded if w and w not in STOP_WORDS]
        out.extend(_stem(w) if w.isalpha() else w for w in words)
        # The whole identifier too, when it is more than one word (parse_config, HTTPError,
        # urllib.parse, main.py): an exact mention is stronger evidence than its parts.
        if len(parts) > 1:
            out.append(raw.lower()[:MAX_TERM])
    return out


def chunk_terms(path: str, symbol: str, text: str) -> str:
    """What the lexical index holds for a chunk: the terms of its path, symbol path and
    text, space-separated (written at upsert, rebuilt the same way by the reconcile)."""
    return " ".join(terms(f"{path}\n{symbol}\n{text}"))


def query_terms(text: str, limit: int = 64) -> list[str]:
    """Distinct terms of a query, in order, at most ``limit`` (a pasted file is not a
    query)."""
    return list(dict.fromkeys(terms(text)))[:limit]


def analyze_all(texts: Iterable[str]) -> list[str]:
    """Each text as its terms joined by spaces: what the lexical index stores."""
    return [" ".join(terms(t)) for t in texts]
