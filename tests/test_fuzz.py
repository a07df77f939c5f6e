"""Fuzzing every RPC of retriever.v1.Retriever against one real server.

Two kinds of input reach every method listed in the service descriptor:

- well-formed requests, generated generically from the request messages' descriptors (every
  field type, extreme and unknown values, long lists and maps, nested messages, extreme
  Timestamps and Durations). Half of them are "valid" where a field has known-good values
  (real namespace names, doc ids, chunk ids, page tokens and queries of the seeded namespace),
  so that they get past validation and reach real data; a quarter mix in values at and past
  the documented limits; a quarter are wild;
- malformed bytes, sent through a generic call without serializers: random bytes, truncated
  or corrupted valid messages, invalid UTF-8 in string fields, wrong wire types, bad lengths.

Every call must answer within its deadline with a status a client can act on (never INTERNAL
or UNKNOWN), and health must stay SERVING. Runs are derandomized, without an example
database, so CI sees the same examples every time.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import make_settings
from corpus import CORPUS, QUERIES
from google.protobuf import message_factory, text_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from retriever.models.embedder import Embedder
from retriever.server.app import ServerThread
from retriever.v1 import retriever_pb2 as pb

pytestmark = pytest.mark.integration

SERVICE = pb.DESCRIPTOR.services_by_name["Retriever"]
METHODS: list[MethodDescriptor] = list(SERVICE.methods)
SEED_NS = "fuzz"
# A few short documents of the shared corpus, one chunk each: cheap to restore after a write.
SEED = {k: CORPUS[k] for k in ("docs/bread.md", "notes/astronomy.txt", "notes/garden.txt",
                               "src/config.py")}
EMPTY_NS = "fuzz-empty"
DEADLINE_S = 30.0
# Statuses a client can act on. INTERNAL and UNKNOWN are bugs; DEADLINE_EXCEEDED means the
# call did not answer within DEADLINE_S; UNAVAILABLE, DATA_LOSS, CANCELLED... are not expected
# from a healthy, idle server either.
ALLOWED = frozenset({
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.OUT_OF_RANGE,
    # SyncSource: a location outside the sync roots (none are set here); a second sync.
    grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.ABORTED,
})
# RPCs that can change the seeded data: the seed is restored after each of their examples.
WRITES = frozenset({"UpsertDocuments", "DeleteDocuments", "DeleteNamespace", "CreateNamespace"})

FUZZ = settings(max_examples=35, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])
RAW_FUZZ = settings(FUZZ, max_examples=25)


# -- the server and its seed -------------------------------------------------------------------
class LogTap(logging.Handler):
    """Keeps the server's warnings and errors (with tracebacks) for failure messages."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s [%(threadName)s] "
                                            "%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def mark(self) -> int:
        return len(self.lines)

    def since(self, mark: int) -> list[str]:
        return self.lines[mark:]


@dataclass
class Seed:
    doc_ids: list[str]
    chunk_ids: list[str]
    page_tokens: list[str]


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    seconds: float
    log: list[str] = field(default_factory=list)


def _seed_documents() -> list[pb.Document]:
    docs = []
    for doc_id, content in SEED.items():
        d = pb.Document(doc_id=doc_id, content=content, revision="r1",
                        metadata={"kind": doc_id.split("/")[0]})
        d.source_updated_at.FromDatetime(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
        docs.append(d)
    return docs


class Harness:
    """One channel to the server: typed and raw callables for every method, health, seed."""

    def __init__(self, address: str, tap: LogTap) -> None:
        self.tap = tap
        self.channel = grpc.insecure_channel(address, options=[
            ("grpc.max_receive_message_length", 64 * 1024 * 1024)])
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.typed: dict[str, Callable[..., Any]] = {}
        self.raw: dict[str, Callable[..., Any]] = {}
        for m in METHODS:
            path = f"/{SERVICE.full_name}/{m.name}"
            make = self.channel.stream_unary if m.client_streaming else self.channel.unary_unary
            self.typed[m.name] = make(
                path, request_serializer=_cls(m.input_type).SerializeToString,
                response_deserializer=_cls(m.output_type).FromString)
            # No serializers: the bytes go on the wire as they are, whatever they hold.
            self.raw[m.name] = make(path, request_serializer=None, response_deserializer=None)
        self.seed = Seed([], [], [])

    def close(self) -> None:
        self.channel.close()

    def call(self, method: MethodDescriptor, request: Any, *, raw: bool,
             metadata: Sequence[tuple[str, str]] | None = None) -> Outcome:
        fn = (self.raw if raw else self.typed)[method.name]
        arg = iter(request) if method.client_streaming else request
        mark = self.tap.mark()
        t0 = time.monotonic()
        try:
            fn(arg, timeout=DEADLINE_S, metadata=metadata)
            code, details = grpc.StatusCode.OK, ""
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""
        seconds = time.monotonic() - t0
        if code not in ALLOWED:
            time.sleep(0.2)  # let the server finish logging the failure
        return Outcome(code, details, seconds, self.tap.since(mark))

    def health(self) -> dict[str, str]:
        out = {}
        for service in ("", SERVICE.full_name):
            try:
                status = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service),
                                                timeout=10).status
                out[service or "(server)"] = health_pb2.HealthCheckResponse.ServingStatus.Name(
                    status)
            except grpc.RpcError as exc:
                out[service or "(server)"] = f"{exc.code().name}: {exc.details()}"
        return out

    def restore_seed(self) -> None:
        """Put the seed namespaces back as they were: the seed documents (an unchanged upsert
        embeds nothing) and no others."""
        stub = self.typed
        stub["UpsertDocuments"](iter([pb.UpsertDocumentsRequest(
            namespace=SEED_NS, documents=_seed_documents())]), timeout=120)
        listed = stub["ListDocuments"](pb.ListDocumentsRequest(namespace=SEED_NS,
                                                               page_size=1000), timeout=30)
        extra = [d.doc_id for d in listed.documents if d.doc_id not in SEED]
        if extra:
            stub["DeleteDocuments"](pb.DeleteDocumentsRequest(namespace=SEED_NS, doc_ids=extra),
                                    timeout=30)
        try:
            stub["CreateNamespace"](pb.CreateNamespaceRequest(name=EMPTY_NS), timeout=30)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise

    def load_seed(self) -> None:
        self.restore_seed()
        doc_ids = sorted(SEED)
        chunk_ids: list[str] = []
        for doc_id in doc_ids:
            got = self.typed["GetDocument"](pb.GetDocumentRequest(namespace=SEED_NS,
                                                                  doc_id=doc_id), timeout=30)
            chunk_ids += list(got.chunk_ids)
        tokens = [
            self.typed["ListDocuments"](pb.ListDocumentsRequest(namespace=SEED_NS, page_size=2),
                                        timeout=30).next_page_token,
            self.typed["ListNamespaces"](pb.ListNamespacesRequest(page_size=1),
                                         timeout=30).next_page_token,
        ]
        assert all(tokens) and chunk_ids
        self.seed = Seed(doc_ids, chunk_ids, tokens)

    def assert_serving_and_seed_searchable(self) -> None:
        health = self.health()
        assert set(health.values()) == {"SERVING"}, f"health after fuzzing: {health}"
        self.restore_seed()
        query, expected = next((q, d) for q, d in QUERIES.items() if d in SEED)
        hits = self.typed["Search"](pb.SearchRequest(namespace=SEED_NS, query=query, top_k=3),
                                    timeout=DEADLINE_S).hits
        assert hits and hits[0].chunk.doc_id == expected, [h.chunk.doc_id for h in hits]


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory, embedder: Embedder) -> Iterator[Harness]:
    tap = LogTap()
    root = logging.getLogger()
    root.addHandler(tap)
    data_dir: Path = tmp_path_factory.mktemp("fuzz") / "data"
    server = ServerThread(make_settings(data_dir), embedder).start()
    h = Harness(server.address, tap)
    try:
        h.load_seed()
        yield h
    finally:
        h.close()
        server.stop()
        root.removeHandler(tap)


# -- well-formed requests, from the descriptors ------------------------------------------------
def _cls(desc: Descriptor) -> type[Message]:
    return message_factory.GetMessageClass(desc)


INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
# Limits of the API and of Timestamp/Duration, each with its neighbours.
INT_EDGES = [0, 1, -1, 2, 63, 64, 65, 100, 101, 255, 256, 257, 1000, 1001, 1024, 1025, 8192,
             8193, 999_999_999, 1_000_000_000, -999_999_999, -1_000_000_000,
             253_402_300_799, 253_402_300_800, -62_135_596_800, -62_135_596_801,
             315_576_000_000, 315_576_000_001, -315_576_000_000, -315_576_000_001]
LONG_LENGTHS = [65, 257, 1025]
HUGE_SIZES = [129, 257, 1025, 8193, 65_537, 1024 * 1024 + 1]
# Single "words" stay a token or two however long they are, so huge accepted content is cheap
# to embed; multi-token patterns are kept to moderate sizes.
HUGE_CHARS = ["x", "é", "€", "😀", "\x00"]
LONG_PATTERNS = ["a b ", "x\n", "é\r\n", "\t", "<", "日本"]
SPECIAL_STRINGS = [
    "", " ", "\x00", "a\x00b", "\n", "\r\n", "\ufeff", "\u202e", "\U0010ffff", "😀", "é",
    ".", "..", "../../etc/passwd", "/", "\\", "%", "_", "*", "?", "%s%n", "'", "\"",
    "'; DROP TABLE documents; --", "null", "NaN", "-1", "0", "a" * 63, "a" * 64,
]


def _int_strategy(lo: int, hi: int) -> st.SearchStrategy[int]:
    edges = sorted({e for e in (*INT_EDGES, lo, lo + 1, hi - 1, hi) if lo <= e <= hi}, key=abs)
    return st.one_of(st.sampled_from(edges), st.integers(lo, hi))


def _huge_string() -> st.SearchStrategy[str]:
    return st.one_of(
        st.builds(lambda c, n: c * n, st.sampled_from(HUGE_CHARS), st.sampled_from(HUGE_SIZES)),
        st.builds(lambda p, n: (p * n)[:n], st.sampled_from(LONG_PATTERNS),
                  st.sampled_from(HUGE_SIZES[:4])))


Hint = tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]  # (valid values, edge values)
# How close to valid a generated request stays: "valid" uses only valid values where a field
# has them (so calls reach the seeded data), "near" adds values at and past the limits,
# "wild" adds anything the field's type can hold.
MODES = ("valid", "near", "wild")
MODE_MIX = st.sampled_from(["valid", "valid", "near", "wild"])


@dataclass(frozen=True)
class Ctx:
    mode: str
    hints: dict[str, Hint]
    lists: int = 0  # lists and maps around this value: huge strings at one level at most
    small: bool = False  # inside a long list: no huge strings, no long lists
    depth: int = 0

    def inside(self, *, long: bool = False) -> Ctx:
        return Ctx(self.mode, self.hints, self.lists + 1, self.small or long, self.depth)

    def deeper(self) -> Ctx:
        return Ctx(self.mode, self.hints, self.lists, self.small, self.depth + 1)

    @property
    def huge_ok(self) -> bool:
        return not self.small and self.lists <= 1

    @property
    def long_ok(self) -> bool:
        return self.mode != "valid" and not self.small and self.lists == 0


def _hint(f: FieldDescriptor, ctx: Ctx) -> Hint | None:
    hint = ctx.hints.get(f.full_name)
    if hint is not None:
        return hint
    # A map entry's "key"/"value" hints are for string maps (metadata): an int32 map value
    # (golden-set grades) keeps its type's generic values.
    entry = f.containing_type is not None and f.containing_type.GetOptions().map_entry
    if entry and f.type != FieldDescriptor.TYPE_STRING:
        return None
    return ctx.hints.get(f.name)


def _generic_scalar(f: FieldDescriptor, ctx: Ctx) -> st.SearchStrategy[Any]:
    t = f.type
    if t == FieldDescriptor.TYPE_STRING:
        text = st.one_of(st.sampled_from(SPECIAL_STRINGS), st.text(max_size=40))
        return st.one_of(text, _huge_string()) if ctx.huge_ok else text
    if t == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_ENUM:
        known = [v.number for v in f.enum_type.values]
        return st.one_of(st.sampled_from(known), _int_strategy(-(2**31), 2**31 - 1))
    if t == FieldDescriptor.TYPE_FLOAT:
        return st.floats(width=32)
    if t == FieldDescriptor.TYPE_DOUBLE:
        return st.floats()
    lo, hi = INT_RANGES[t]
    return _int_strategy(lo, hi)


def _scalar(f: FieldDescriptor, ctx: Ctx) -> st.SearchStrategy[Any]:
    hint = _hint(f, ctx)
    generic = _generic_scalar(f, ctx)
    if hint is None:
        return generic
    valid, edge = hint
    if ctx.mode == "valid":
        return valid
    if ctx.mode == "near":
        return st.one_of(valid, edge)
    return st.one_of(valid, edge, generic)


def _is_map(f: FieldDescriptor) -> bool:
    return (f.type == FieldDescriptor.TYPE_MESSAGE and f.is_repeated
            and f.message_type.GetOptions().map_entry)


def _nth(value: Any, i: int) -> Any:
    """The i-th distinct variant of a list element (strings and ints; others repeat)."""
    if isinstance(value, str):
        return f"{value}{i}"
    if isinstance(value, int) and not isinstance(value, bool):
        return value + i if value < 2**31 - 1 - 2000 else value - i
    return value


def _draw_value(draw: st.DrawFn, f: FieldDescriptor, ctx: Ctx) -> Any:
    if f.type == FieldDescriptor.TYPE_MESSAGE:
        return _draw_message(draw, f.message_type, ctx.deeper())
    return draw(_scalar(f, ctx))


def _set_field(draw: st.DrawFn, msg: Message, f: FieldDescriptor, ctx: Ctx) -> None:
    inner, long_inner = ctx.inside(), ctx.inside(long=True)
    sizes = st.integers(1, 3) if ctx.mode == "valid" else st.integers(0, 4)
    if _is_map(f):
        kf, vf = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
        container = getattr(msg, f.name)
        if ctx.long_ok and draw(st.integers(0, 5)) == 0:  # past the entry limits
            n = draw(st.sampled_from(LONG_LENGTHS))
            key, value = draw(_scalar(kf, long_inner)), _draw_value(draw, vf, long_inner)
            entries = {_nth(key, i): value for i in range(n)}
        else:
            entries = {}
            for _ in range(draw(sizes)):
                entries[draw(_scalar(kf, inner))] = _draw_value(draw, vf, inner)
        for k, v in entries.items():
            if vf.type == FieldDescriptor.TYPE_MESSAGE:
                container[k].CopyFrom(v)
            else:
                container[k] = v
        return
    if f.is_repeated:
        container = getattr(msg, f.name)
        if ctx.long_ok and draw(st.integers(0, 5)) == 0:  # past the list limits
            n = draw(st.sampled_from(LONG_LENGTHS))
            first = _draw_value(draw, f, long_inner)
            container.extend([_nth(first, i) for i in range(n)])
            return
        values = [_draw_value(draw, f, inner) for _ in range(draw(sizes))]
        if ctx.mode == "valid" and f.type == FieldDescriptor.TYPE_MESSAGE:
            _unique_ids(values)
        container.extend(values)
        return
    if f.type == FieldDescriptor.TYPE_MESSAGE:
        getattr(msg, f.name).CopyFrom(_draw_value(draw, f, ctx))
    else:
        setattr(msg, f.name, _draw_value(draw, f, ctx))


def _unique_ids(values: list[Any]) -> None:
    """Valid requests name each document once (ids unique within a message)."""
    seen: set[str] = set()
    for i, v in enumerate(values):
        if "doc_id" in v.DESCRIPTOR.fields_by_name:
            if v.doc_id in seen:
                v.doc_id = f"{v.doc_id}~{i}"
            seen.add(v.doc_id)


def _draw_message(draw: st.DrawFn, desc: Descriptor, ctx: Ctx) -> Message:
    msg = _cls(desc)()
    if ctx.depth > 4:
        return msg
    for f in desc.fields:
        if _hint(f, ctx) is not None and ctx.mode == "valid":
            present = True
        elif (ctx.mode == "near" and _hint(f, ctx) is not None) or (
                ctx.mode == "valid" and f.type == FieldDescriptor.TYPE_MESSAGE):
            present = draw(st.integers(0, 9)) > 0  # nearly always
        else:
            present = draw(st.booleans())
        if present:
            _set_field(draw, msg, f, ctx)
    return msg


def hints_for(seed: Seed) -> dict[str, Hint]:
    """Valid and edge values by field name (or full name), from the seeded corpus."""

    def pools(valid: list[Any], edge: list[Any]) -> Hint:
        return st.sampled_from(valid), st.sampled_from(edge)

    new_names = st.from_regex(r"[a-z0-9][a-z0-9_-]{0,20}", fullmatch=True)
    names = (st.one_of(st.just(SEED_NS), st.just(SEED_NS),
                       st.sampled_from([EMPTY_NS, "fuzz-scratch", "a" * 63]), new_names),
             st.sampled_from(["", " ", "Bad Name!", "UPPER", "a" * 64, "-lead", "x\n", "ns\x00",
                              "fuzz ", "é"]))
    doc_ids = pools([*seed.doc_ids, "no/such/doc", "x" * 1024, "é" * 512, "docs/", "%", "_"],
                    ["", " ", "a\x00b", "x" * 1025, "é" * 513])
    c0 = seed.chunk_ids[0]
    chunk_ids = pools([*seed.chunk_ids, "0" * 32, "z" * 32, c0.upper(), c0[:-1], "%"],
                      ["", "\x00", "x" * 10_000])
    real = seed.page_tokens
    tokens = (st.one_of(st.just(""), st.sampled_from(real)),
              st.sampled_from([*(t[:-1] for t in real), *(t + "=" for t in real),
                               *(t[::-1] for t in real), "%%%", "AAAA", "eyJ9", "0", "-1",
                               "\x00", "x" * 5000]))
    queries = pools([*QUERIES, "bread", "😀", "q" * 8192, "%"],
                    ["   ", "", "\x00", "q" * 8193, "é" * 4097, "\n\n"])
    paths = pools(["", "docs/", "src/", "notes/garden.txt", "%", "_", "docs/%", "é", "/"],
                  ["../", "\x00", "x" * 5000])
    languages = pools(["python", "markdown", "text"], ["", "klingon", "PYTHON", "\x00"])
    text = st.characters(exclude_categories=("Cs",), exclude_characters="\x00")
    contents = (st.one_of(st.sampled_from([*SEED.values(), "", "x", "hello world",
                                           "line\n" * 50, "\ufeffBOM", "\r\n\r\n", "é" * 100]),
                          st.text(text, max_size=200)),
                st.sampled_from(["bin\x00ary", "\x00"]))
    return {
        "namespace": names, "name": names,
        "doc_id": doc_ids, "doc_ids": doc_ids, "relevant_doc_ids": doc_ids,
        "chunk_id": chunk_ids, "page_token": tokens, "query": queries,
        "path": paths, "path_prefix": paths, "language": languages, "languages": languages,
        "backend": pools(["", "faiss"], ["nosuch", "FAISS", "faiss\x00"]),
        "top_k": (st.one_of(st.integers(1, 10), st.just(100)),
                  st.sampled_from([0, 101, -1, 2**31 - 1])),
        "page_size": (st.one_of(st.integers(0, 5), st.just(1000)),
                      st.sampled_from([-1, 1001, 2**31 - 1])),
        "k": (st.integers(1, 20), st.integers(-5, 0)),
        "mode": pools([0, 1, 2, 3], [4, -1, 2**31 - 1]),
        "dense_weight": (st.floats(0, 1), st.sampled_from([-0.0, -0.01, 1.01, math.nan, math.inf,
                                                           -math.inf, 3.4e38])),
        "min_score": (st.floats(-1, 1), st.sampled_from([math.nan, math.inf, -math.inf, 1e30])),
        "rerank_candidates": (st.integers(0, 100), st.sampled_from([-1, 101, 2**31 - 1])),
        "max_hits_per_path": (st.integers(0, 5), st.sampled_from([-1, 2**31 - 1, -(2**31)])),
        "content": contents,
        "revision": pools(["r1", "", "x" * 256, "é" * 128], ["x" * 257, "é" * 129]),
        "key": pools(["kind", "k", "x" * 128], ["", "x" * 129, "\x00"]),
        "value": pools(["src", "docs", "", "x" * 1024], ["x" * 1025, "\x00"]),
        "rerank": pools([False], [True]),
        # The server keeps source times in [1970, 2200); Timestamp itself spans 0001..9999.
        "google.protobuf.Timestamp.seconds": (
            st.integers(0, 7_258_118_399),
            st.one_of(st.integers(-62_135_596_800, 253_402_300_799),
                      st.sampled_from([-1, 7_258_118_400, -62_135_596_801, 253_402_300_800,
                                       -(2**63), 2**63 - 1]))),
        "google.protobuf.Timestamp.nanos": (
            st.integers(0, 999_999_999),
            st.sampled_from([-1, 1_000_000_000, -(2**31), 2**31 - 1])),
        "google.protobuf.Duration.seconds": (
            st.integers(-315_576_000_000, 315_576_000_000),
            st.sampled_from([315_576_000_001, -315_576_000_001, -(2**63), 2**63 - 1])),
        "google.protobuf.Duration.nanos": (
            st.integers(-999_999_999, 999_999_999),
            st.sampled_from([1_000_000_000, -1_000_000_000, -(2**31), 2**31 - 1])),
    }


_LONG_STRING = re.compile(r'"((?:[^"\\]|\\.){120,})"')


def _show_message(msg: Message) -> str:
    text = text_format.MessageToString(msg, as_utf8=True, as_one_line=True)
    text = _LONG_STRING.sub(lambda m: f'"{m.group(1)[:40]}..." (+{len(m.group(1)) - 40} chars)',
                            text)
    return f"{type(msg).__name__}({text[:4000]}{'...' if len(text) > 4000 else ''})"


def _show_bytes(raw: bytes) -> str:
    return f"bytes[{len(raw)}]({raw[:400]!r}{'...' if len(raw) > 400 else ''})"


class Call:
    """One generated call; its repr (in Hypothesis' falsifying example) stays readable.
    Not a dataclass: Hypothesis would print its fields in full, huge strings included."""

    def __init__(self, method: str, request: Any,
                 metadata: tuple[tuple[str, str], ...] | None = None) -> None:
        self.method = method
        self.request = request  # a message or bytes; a list of them for client streaming
        self.metadata = metadata

    def show_request(self) -> str:
        def one(r: Any) -> str:
            return _show_bytes(r) if isinstance(r, bytes) else _show_message(r)

        if isinstance(self.request, list):
            return f"stream of {len(self.request)}: [" + ", ".join(map(one, self.request)) + "]"
        return one(self.request)

    def __repr__(self) -> str:
        md = f", metadata={self.metadata!r}" if self.metadata else ""
        return f"Call({self.method}: {self.show_request()}{md})"


_request_ids = st.one_of(st.none(), st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e),
                                            max_size=200))


@st.composite
def well_formed_calls(draw: st.DrawFn, method: MethodDescriptor, hints: dict[str, Hint]
                      ) -> Call:
    ctx = Ctx(mode=draw(MODE_MIX), hints=hints)
    if method.client_streaming:
        msgs = [_draw_message(draw, method.input_type, ctx)
                for _ in range(draw(st.integers(0, 3)))]
        # One namespace per stream, as required (always when valid, sometimes when near).
        if msgs and (ctx.mode == "valid" or (ctx.mode == "near" and draw(st.booleans()))):
            for m in msgs[1:]:
                m.namespace = msgs[0].namespace  # type: ignore[attr-defined]
        request: Any = msgs
    else:
        request = _draw_message(draw, method.input_type, ctx)
    rid = draw(_request_ids)
    return Call(method.name, request, (("x-request-id", rid),) if rid is not None else None)


# -- malformed bytes ---------------------------------------------------------------------------
WIRE_VARINT, WIRE_I64, WIRE_LEN, WIRE_SGROUP, WIRE_EGROUP, WIRE_I32 = 0, 1, 2, 3, 4, 5
INVALID_UTF8 = [b"\xff", b"\xc3", b"caf\xe9", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
                b"\xc0\x80", b"\xe2\x82", b"ok\xfe\xfeok", b"\x80"]


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1 if n < 0 else (1 << 70) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _key(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


def _wire_of(f: FieldDescriptor) -> int:
    if f.type in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES,
                  FieldDescriptor.TYPE_MESSAGE):
        return WIRE_LEN
    if f.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FIXED64,
                  FieldDescriptor.TYPE_SFIXED64):
        return WIRE_I64
    if f.type in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_FIXED32,
                  FieldDescriptor.TYPE_SFIXED32):
        return WIRE_I32
    return WIRE_VARINT


def _payload(draw: st.DrawFn, wire: int) -> bytes:
    if wire == WIRE_VARINT:
        return draw(st.one_of(st.builds(_varint, st.integers(-(2**63), 2**64 - 1)),
                              st.sampled_from([b"\xff" * 11, b"\x80", b"\xff" * 10 + b"\x01"])))
    if wire == WIRE_I64:
        return draw(st.binary(min_size=0, max_size=8))  # possibly short
    if wire == WIRE_I32:
        return draw(st.binary(min_size=0, max_size=4))
    if wire == WIRE_LEN:
        body = draw(st.binary(max_size=32))
        length = draw(st.one_of(st.just(len(body)),
                                st.sampled_from([len(body) + 1, 2**31, 2**63, -1])))
        return _varint(length) + body
    return b""  # groups and invalid wire types carry no payload of their own


def _draw_raw_fields(draw: st.DrawFn, desc: Descriptor, depth: int) -> bytes:
    """A field soup for ``desc``: right and wrong wire types, invalid UTF-8, bad lengths,
    unknown and invalid field numbers, nested messages that are malformed in turn."""
    fields = list(desc.fields)
    out = bytearray()
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["typed", "typed", "wrong_wire", "unknown", "bad_number"]))
        if kind == "unknown" or not fields:
            out += _key(draw(st.integers(100, 2**29 - 1)), draw(st.sampled_from([0, 1, 2, 5])))
            out += _payload(draw, WIRE_LEN)
            continue
        if kind == "bad_number":  # field number 0, past 2**29 - 1, wire types 6 and 7
            number = draw(st.sampled_from([0, 2**29, 2**32]))
            out += _key(number, draw(st.integers(0, 7)))
            out += _payload(draw, WIRE_VARINT)
            continue
        f = draw(st.sampled_from(fields))
        if kind == "wrong_wire":
            wire = draw(st.sampled_from([w for w in range(8) if w != _wire_of(f)]))
            out += _key(f.number, wire) + _payload(draw, wire)
            continue
        wire = _wire_of(f)
        if f.type == FieldDescriptor.TYPE_STRING:
            text = draw(st.one_of(st.sampled_from(INVALID_UTF8),
                                  st.text(max_size=20).map(str.encode)))
            out += _key(f.number, wire) + _varint(len(text)) + text
        elif f.type == FieldDescriptor.TYPE_MESSAGE and depth < 3:
            body = _draw_raw_fields(draw, f.message_type, depth + 1)
            out += _key(f.number, wire) + _varint(len(body)) + body
        else:
            out += _key(f.number, wire) + _payload(draw, wire)
    return bytes(out)


def _valid_bytes(draw: st.DrawFn, method: MethodDescriptor, hints: dict[str, Hint]) -> bytes:
    """A valid or near-valid request, serialized: the raw material for truncation etc."""
    ctx = Ctx(mode=draw(st.sampled_from(MODES[:2])), hints=hints)
    return _draw_message(draw, method.input_type, ctx).SerializeToString()


@st.composite
def raw_requests(draw: st.DrawFn, method: MethodDescriptor,
                 hints: dict[str, Hint]) -> bytes:
    kind = draw(st.sampled_from(["fields", "truncated", "corrupted", "random", "valid+junk"]))
    if kind == "fields":
        return _draw_raw_fields(draw, method.input_type, 0)
    if kind == "random":
        return draw(st.binary(max_size=256))
    valid = _valid_bytes(draw, method, hints)
    if kind == "truncated" and valid:
        return valid[:draw(st.integers(0, len(valid) - 1))]
    if kind == "corrupted" and valid:
        i = draw(st.integers(0, len(valid) - 1))
        return valid[:i] + bytes([draw(st.integers(0, 255))]) + valid[i + 1:]
    return valid + _draw_raw_fields(draw, method.input_type, 0)


@st.composite
def malformed_calls(draw: st.DrawFn, method: MethodDescriptor,
                    hints: dict[str, Hint]) -> Call:
    if method.client_streaming:
        # 0-3 messages, malformed and well-formed mixed.
        parts: list[bytes] = []
        for _ in range(draw(st.integers(0, 3))):
            if draw(st.booleans()):
                parts.append(draw(raw_requests(method, hints)))
            else:
                parts.append(_valid_bytes(draw, method, hints))
        return Call(method.name, parts)
    return Call(method.name, draw(raw_requests(method, hints)))


# -- the checks --------------------------------------------------------------------------------
def check(h: Harness, method: MethodDescriptor, call: Call, *, raw: bool) -> None:
    out = h.call(method, call.request, raw=raw, metadata=call.metadata)
    event(out.code.name)  # the spread of codes: --hypothesis-show-statistics
    problems = []
    if out.code not in ALLOWED:
        problems.append(f"answered {out.code.name}")
    if out.seconds > DEADLINE_S:
        problems.append(f"took {out.seconds:.1f}s (deadline {DEADLINE_S:.0f}s)")
    health = h.health()
    if set(health.values()) != {"SERVING"}:
        problems.append(f"health afterwards: {health}")
    if problems:
        log = "\n".join(out.log) or "(nothing logged)"
        raise AssertionError(
            f"{method.name}: {'; '.join(problems)}\n"
            f"  code:     {out.code.name}\n"
            f"  details:  {out.details!r}\n"
            f"  request:  {call.show_request()}\n"
            f"  metadata: {call.metadata!r}\n"
            f"  seconds:  {out.seconds:.2f}\n"
            f"  server log:\n{log}")
    if method.name in WRITES:
        h.restore_seed()


@pytest.mark.parametrize("method", METHODS, ids=[m.name for m in METHODS])
def test_well_formed_requests_never_get_internal_or_unknown(harness: Harness,
                                                            method: MethodDescriptor) -> None:
    @FUZZ
    @given(call=well_formed_calls(method, hints_for(harness.seed)))
    def fuzz(call: Call) -> None:
        check(harness, method, call, raw=False)

    fuzz()
    harness.assert_serving_and_seed_searchable()


@pytest.mark.parametrize("method", METHODS, ids=[m.name for m in METHODS])
def test_malformed_bytes_never_get_internal_or_unknown(harness: Harness,
                                                       method: MethodDescriptor) -> None:
    @RAW_FUZZ
    @given(call=malformed_calls(method, hints_for(harness.seed)))
    def fuzz(call: Call) -> None:
        check(harness, method, call, raw=True)

    fuzz()
    harness.assert_serving_and_seed_searchable()
