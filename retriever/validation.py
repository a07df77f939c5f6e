"""Checks of caller input against the configured limits. Each failure names the field."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from datetime import UTC, datetime

from retriever.config import Settings
from retriever.domain import Document, SearchQuery
from retriever.errors import InvalidArgument

NAMESPACE_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
MAX_DOC_ID_BYTES = 1024
MAX_REVISION_BYTES = 256
MAX_METADATA_ENTRIES = 64
MAX_METADATA_KEY_BYTES = 128
MAX_METADATA_VALUE_BYTES = 1024
MAX_FILTER_DOC_IDS = 1024
MAX_FILTER_ENTRIES = 64  # languages, metadata pairs
MAX_CHUNK_ID_BYTES = 128
MAX_PATH_BYTES = 1024
# Source times the catalog stores as float epoch seconds. Below 2^33 s (year 2242) a float
# holds them to better than half a microsecond, so they read back exactly, and staleness
# arithmetic on them cannot overflow. (9999-12-31T23:59:59.999999Z, a valid Timestamp,
# rounds to year 10000 as a float and could not be read back at all.)
MIN_SOURCE_TIME = datetime(1970, 1, 1, tzinfo=UTC)
MAX_SOURCE_TIME = datetime(2200, 1, 1, tzinfo=UTC)  # exclusive


def _utf8_len(text: str, field: str) -> int:
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidArgument(f"{field} is not valid UTF-8 text (it holds lone surrogates)",
                              field=field) from None


def namespace_name(name: str, field: str = "namespace") -> str:
    if not name:
        raise InvalidArgument(f"{field} is required", field=field)
    if not NAMESPACE_RE.fullmatch(name):
        raise InvalidArgument(
            f"{field} {name[:80]!r} is invalid: use 1-63 characters of lowercase letters, "
            "digits, '-' and '_', starting with a letter or digit", field=field)
    return name


def documents(docs: Sequence[Document], settings: Settings, field: str = "documents") -> None:
    if not docs:
        raise InvalidArgument(f"{field} is empty: send at least one document", field=field)
    if len(docs) > settings.max_batch_documents:
        raise InvalidArgument(
            f"{field} has {len(docs)} documents; at most {settings.max_batch_documents} "
            "(max_batch_documents) per message: split the batch", field=field)
    seen: set[str] = set()
    moved: set[str] = set()
    limit, limit_name = document_limit(settings)
    for i, d in enumerate(docs):
        f = f"{field}[{i}]"
        doc_id(d.doc_id, f"{f}.doc_id")
        if d.doc_id in seen:
            raise InvalidArgument(f"{f}.doc_id {d.doc_id!r} appears twice in one message",
                                  field=f"{f}.doc_id")
        seen.add(d.doc_id)
        if d.moved_from:
            doc_id(d.moved_from, f"{f}.moved_from")
            if d.moved_from in moved:
                raise InvalidArgument(f"{f}.moved_from {d.moved_from!r} appears twice in one "
                                      "message: a document moves to one place",
                                      field=f"{f}.moved_from")
            moved.add(d.moved_from)
        size = _utf8_len(d.content, f"{f}.content")
        if size > limit:
            raise InvalidArgument(
                f"{f}.content is {size} bytes; the limit is {limit} bytes ({limit_name})",
                field=f"{f}.content")
        if "\x00" in d.content:
            raise InvalidArgument(f"{f}.content holds NUL bytes: send text, not binary data",
                                  field=f"{f}.content")
        path(d.path, f"{f}.path")
        if d.source_updated_at is not None:
            source_time(d.source_updated_at, f"{f}.source_updated_at")
        if _utf8_len(d.revision, f"{f}.revision") > MAX_REVISION_BYTES:
            raise InvalidArgument(f"{f}.revision must be at most {MAX_REVISION_BYTES} bytes",
                                  field=f"{f}.revision")
        if len(d.metadata) > MAX_METADATA_ENTRIES:
            raise InvalidArgument(
                f"{f}.metadata has {len(d.metadata)} entries; at most {MAX_METADATA_ENTRIES}",
                field=f"{f}.metadata")
        for k, v in d.metadata.items():
            if not k or _utf8_len(k, f"{f}.metadata") > MAX_METADATA_KEY_BYTES:
                raise InvalidArgument(
                    f"{f}.metadata key {k[:40]!r} must be 1-{MAX_METADATA_KEY_BYTES} bytes",
                    field=f"{f}.metadata")
            if _utf8_len(v, f"{f}.metadata") > MAX_METADATA_VALUE_BYTES:
                raise InvalidArgument(
                    f"{f}.metadata[{k!r}] must be at most {MAX_METADATA_VALUE_BYTES} bytes",
                    field=f"{f}.metadata")
            # (A search filter refuses NUL: a document holding one could never be selected.)
            if "\x00" in k or "\x00" in v:
                raise InvalidArgument(f"{f}.metadata[{k[:40]!r}] holds a NUL character",
                                      field=f"{f}.metadata")
        if len(d.language) > 32:
            raise InvalidArgument(f"{f}.language must be at most 32 characters",
                                  field=f"{f}.language")
        if any(unicodedata.category(c) == "Cc" for c in d.language):
            raise InvalidArgument(f"{f}.language holds a control character (NUL, newline...): "
                                  "name a language such as 'python'", field=f"{f}.language")
    for i, d in enumerate(docs):
        if d.moved_from and d.moved_from in seen:
            f = f"{field}[{i}].moved_from"
            raise InvalidArgument(
                f"{f} {d.moved_from!r} is itself a document of this message: a move removes "
                "the document it comes from; upsert that id in another message", field=f)


def document_limit(settings: Settings) -> tuple[int, str]:
    """The most bytes of content a document may hold, and what sets it: max_document_bytes,
    or half of grpc_max_message_bytes when that is smaller (a document is read back whole in
    one message, with its chunk ids: a larger one was stored and then could not be read)."""
    half = settings.grpc_max_message_bytes // 2
    if half < settings.max_document_bytes:
        return half, "half of grpc_max_message_bytes"
    return settings.max_document_bytes, "max_document_bytes"


def doc_ids(ids: Sequence[str], settings: Settings, field: str = "doc_ids") -> None:
    if not ids:
        raise InvalidArgument(f"{field} is empty: name at least one document", field=field)
    if len(ids) > settings.max_batch_documents:
        raise InvalidArgument(
            f"{field} has {len(ids)} ids; at most {settings.max_batch_documents} "
            "(max_batch_documents) per request", field=field)
    for i, d in enumerate(ids):
        doc_id(d, f"{field}[{i}]")


# One check per kind of identifier, used wherever one comes in (upsert, delete, get, list,
# search filters), so a value is rejected the same way everywhere rather than, say, refused
# by Upsert but merely not found by GetDocument.
def doc_id(value: str, field: str = "doc_id") -> None:
    if not value:
        raise InvalidArgument(f"{field} is required", field=field)
    if _utf8_len(value, field) > MAX_DOC_ID_BYTES or "\x00" in value:
        raise InvalidArgument(
            f"{field} must be 1-{MAX_DOC_ID_BYTES} UTF-8 bytes without NUL", field=field)


def chunk_id(value: str, field: str = "chunk_id") -> None:
    if not value:
        raise InvalidArgument(f"{field} is required", field=field)
    if _utf8_len(value, field) > MAX_CHUNK_ID_BYTES or "\x00" in value:
        raise InvalidArgument(
            f"{field} must be 1-{MAX_CHUNK_ID_BYTES} UTF-8 bytes without NUL", field=field)


def path(value: str, field: str = "path") -> None:
    """A document path or a path prefix; empty is allowed (it means "none")."""
    if _utf8_len(value, field) > MAX_PATH_BYTES or "\x00" in value:
        raise InvalidArgument(f"{field} must be at most {MAX_PATH_BYTES} UTF-8 bytes without "
                              "NUL", field=field)


def source_time(value: datetime, field: str = "source_updated_at") -> None:
    if value.tzinfo is None:
        raise InvalidArgument(f"{field} has no time zone: give an aware datetime (UTC)",
                              field=field)
    if not MIN_SOURCE_TIME <= value < MAX_SOURCE_TIME:
        raise InvalidArgument(
            f"{field} {_iso(value)} is out of range: it must be at or after "
            f"{_iso(MIN_SOURCE_TIME)} and before {_iso(MAX_SOURCE_TIME)}", field=field)


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def search(q: SearchQuery, settings: Settings, prefix: str = "") -> None:
    namespace_name(q.namespace, f"{prefix}namespace")
    f = f"{prefix}query"
    if not q.query or not q.query.strip():
        raise InvalidArgument(f"{f} is empty: send the text to search for", field=f)
    if "\x00" in q.query:
        raise InvalidArgument(f"{f} holds a NUL character: send text", field=f)
    size = _utf8_len(q.query, f)
    if size > settings.max_query_bytes:
        raise InvalidArgument(
            f"{f} is {size} bytes; the limit is {settings.max_query_bytes} (max_query_bytes)",
            field=f)
    f = f"{prefix}top_k"
    if not 1 <= q.top_k <= settings.max_top_k:
        raise InvalidArgument(
            f"{f} is {q.top_k}; it must be between 1 and {settings.max_top_k} (max_top_k)",
            field=f)
    flt = q.filter
    if len(flt.doc_ids) > MAX_FILTER_DOC_IDS:
        raise InvalidArgument(
            f"{prefix}filter.doc_ids has {len(flt.doc_ids)} ids; at most {MAX_FILTER_DOC_IDS}",
            field=f"{prefix}filter.doc_ids")
    for i, d in enumerate(flt.doc_ids):
        doc_id(d, f"{prefix}filter.doc_ids[{i}]")
    path(flt.path_prefix, f"{prefix}filter.path_prefix")
    for name, items in (("languages", flt.languages), ("metadata", flt.metadata),
                        ("kinds", flt.kinds)):
        if len(items) > MAX_FILTER_ENTRIES:
            raise InvalidArgument(
                f"{prefix}filter.{name} has {len(items)} entries; at most "
                f"{MAX_FILTER_ENTRIES}", field=f"{prefix}filter.{name}")
        values = [x for item in items for x in (item if isinstance(item, tuple) else (item,))]
        if any("\x00" in v for v in values):
            raise InvalidArgument(f"{prefix}filter.{name} holds a NUL character: no "
                                  f"{name} has one", field=f"{prefix}filter.{name}")


def page_size(value: int, settings: Settings, default: int = 100) -> int:
    if value < 0:
        raise InvalidArgument(f"page_size is {value}; it must be 0 (default {default}) or "
                              f"positive", field="page_size")
    if value > settings.max_page_size:
        raise InvalidArgument(
            f"page_size is {value}; at most {settings.max_page_size} (max_page_size)",
            field="page_size")
    return value or default
