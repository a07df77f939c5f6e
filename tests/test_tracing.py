"""OpenTelemetry tracing: RPC and stage spans exported over OTLP/gRPC to a real receiver on a
loopback port, children of the caller's span; the caller's trace id in Lineage, with tracing
on and off."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from conftest import make_settings, running_server
from opentelemetry.proto.collector.trace.v1 import (
    trace_service_pb2,
    trace_service_pb2_grpc,
)
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import format_span_id, format_trace_id
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from retriever import tracing
from retriever.models.embedder import Embedder
from retriever.slo.feedback import FeedbackLog
from retriever.v1 import retriever_pb2 as pb
from retriever.v1 import retriever_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration

NS = "traced"
DOCS = {
    "bread.md": "# Bread\n\nKnead the dough for ten minutes, then let it rise in a warm place.",
    "tea.md": "# Tea\n\nSteep green tea at eighty degrees for two minutes; longer turns it bitter.",
    "net.py": "def connect(host, port):\n    \"\"\"Open a TCP connection.\"\"\"\n"
              "    return socket.create_connection((host, port))\n",
}
SEARCH = "/retriever.v1.Retriever/Search"
UPSERT = "/retriever.v1.Retriever/UpsertDocuments"
FEEDBACK = "/retriever.v1.Retriever/RecordFeedback"
SEARCH_STAGES = {"retriever.search", "retriever.search.embed", "retriever.search.ann",
                 "retriever.search.lexical", "retriever.search.fuse",
                 "retriever.search.fetch"}
UPSERT_STAGES = {"retriever.upsert.chunk", "retriever.upsert.embed",
                 "retriever.upsert.index_write", "retriever.upsert.commit"}
MALFORMED = ("00-0123456789ABCDEF0123456789ABCDEF-0123456789abcdef-01",  # upper-case
             "00-00000000000000000000000000000000-0123456789abcdef-01",  # zero trace id
             "ff-0123456789abcdef0123456789abcdef-0123456789abcdef-01",  # version ff
             "not a traceparent")


# -- an OTLP/gRPC receiver --------------------------------------------------------------------
class _Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self._lock = threading.Lock()

    def Export(self, request: Any, context: Any) -> Any:  # noqa: N802
        with self._lock:
            self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[tuple[dict[str, Any], Any]]:
        """(resource attributes, span) of every span received."""
        out = []
        with self._lock:
            for req in self.requests:
                for rs in req.resource_spans:
                    resource = _attrs(rs.resource.attributes)
                    for ss in rs.scope_spans:
                        out.extend((resource, s) for s in ss.spans)
        return out


def _attrs(kvs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in kvs:
        v = kv.value
        out[kv.key] = getattr(v, v.WhichOneof("value")) if v.WhichOneof("value") else None
    return out


@pytest.fixture(scope="module")
def receiver() -> Iterator[tuple[_Receiver, int]]:
    rec = _Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(rec, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield rec, port
    server.stop(0)


# -- the caller ------------------------------------------------------------------------------
_CALLER = TracerProvider().get_tracer("agent")  # its own provider: its spans stay here


@dataclass(frozen=True)
class Caller:
    """A span of the calling agent, and the metadata that carries it to the server."""

    trace_id: str
    span_id: str
    metadata: tuple[tuple[str, str], ...]


def _caller_span(name: str) -> Caller:
    carrier: dict[str, str] = {}
    with _CALLER.start_as_current_span(name) as span:
        TraceContextTextMapPropagator().inject(carrier)
    ctx = span.get_span_context()
    return Caller(format_trace_id(ctx.trace_id), format_span_id(ctx.span_id),
                  (("traceparent", carrier["traceparent"]),))


def _upsert(stub: pb_grpc.RetrieverStub, metadata: Any = None) -> None:
    req = pb.UpsertDocumentsRequest(namespace=NS, documents=[
        pb.Document(doc_id=k, content=v, revision="r1") for k, v in DOCS.items()])
    stub.UpsertDocuments(iter([req]), metadata=metadata, timeout=60)


def _search(stub: pb_grpc.RetrieverStub, metadata: Any = None) -> pb.SearchResponse:
    return stub.Search(pb.SearchRequest(namespace=NS, query="how long to knead bread dough",
                                        top_k=2, mode=pb.HYBRID),
                       metadata=metadata, timeout=30)


# -- tracing on ------------------------------------------------------------------------------
@dataclass
class TracedRun:
    upsert: Caller
    search: Caller
    feedback: Caller
    missing: Caller  # its Search named a namespace that does not exist
    found: pb.SearchResponse
    no_header: pb.SearchResponse
    malformed: list[pb.SearchResponse]
    spans: list[tuple[dict[str, Any], Any]]
    enabled_after_stop: bool


@pytest.fixture(scope="module")
def traced(receiver: tuple[_Receiver, int], embedder: Embedder,
           tmp_path_factory: pytest.TempPathFactory) -> TracedRun:
    """One traced server's whole life: calls with and without a caller's span, then stop
    (which exports what is queued) and the spans the receiver got."""
    rec, port = receiver
    settings = make_settings(tmp_path_factory.mktemp("traced"),
                             otlp_endpoint=f"http://127.0.0.1:{port}")
    up, se, fb, nf = (_caller_span(n) for n in ("agent.index", "agent.tool", "agent.feedback",
                                                  "agent.miss"))
    with running_server(settings, embedder) as st, grpc.insecure_channel(st.address) as ch:
        stub = pb_grpc.RetrieverStub(ch)
        _upsert(stub, up.metadata)
        found = _search(stub, se.metadata)
        stub.RecordFeedback(pb.RecordFeedbackRequest(
            request_id=found.lineage.request_id,
            feedback=[pb.ChunkFeedback(chunk_id=found.hits[0].chunk.chunk_id, relevant=True)]),
            metadata=fb.metadata, timeout=30)
        with pytest.raises(grpc.RpcError) as err:
            stub.Search(pb.SearchRequest(namespace="nowhere", query="q", top_k=1),
                        metadata=nf.metadata, timeout=30)
        assert err.value.code() is grpc.StatusCode.NOT_FOUND
        no_header = _search(stub)
        malformed = [_search(stub, (("traceparent", m),)) for m in MALFORMED]
    return TracedRun(up, se, fb, nf, found, no_header, malformed, rec.spans(), tracing.enabled())


def _trace(run: TracedRun, trace_id: str) -> dict[str, Any]:
    """span id -> span, of one trace."""
    return {s.span_id.hex(): s for _, s in run.spans if s.trace_id.hex() == trace_id}


def _assert_children(run: TracedRun, caller: Caller, rpc: str, stages: set[str]) -> None:
    spans = _trace(run, caller.trace_id)
    by_name = {s.name: s for s in spans.values()}
    assert stages | {rpc} <= set(by_name), sorted(by_name)
    root = by_name[rpc]
    assert root.parent_span_id.hex() == caller.span_id  # a child of the caller's span
    assert root.kind == root.SPAN_KIND_SERVER
    for name in stages:
        s, hops = by_name[name], 0
        while s.span_id != root.span_id:  # up the parent chain to the RPC's span
            s, hops = spans[s.parent_span_id.hex()], hops + 1
        assert hops >= 1, name


def test_search_spans_are_children_of_the_callers_span(traced: TracedRun) -> None:
    _assert_children(traced, traced.search, SEARCH, SEARCH_STAGES)
    spans = {s.name: s for s in _trace(traced, traced.search.trace_id).values()}
    q = _attrs(spans["retriever.search"].attributes)
    assert q["retriever.namespace"] == NS and q["retriever.mode"] == "hybrid"
    assert q["retriever.top_k"] == 2 and q["retriever.hits"] == len(traced.found.hits)
    assert _attrs(spans["retriever.search.ann"].attributes)["retriever.candidates"] >= 1
    rpc = _attrs(spans[SEARCH].attributes)
    assert rpc["retriever.request_id"] == traced.found.lineage.request_id
    assert rpc["rpc.grpc.status_code"] == 0


def test_a_failed_rpc_span_has_its_status_code(traced: TracedRun) -> None:
    spans = {s.name: s for s in _trace(traced, traced.missing.trace_id).values()}
    rpc = spans[SEARCH]
    assert rpc.parent_span_id.hex() == traced.missing.span_id
    assert _attrs(rpc.attributes)["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert rpc.status.code == rpc.status.STATUS_CODE_UNSET  # the caller's error, not ours


def test_upsert_spans_are_children_of_the_callers_span(traced: TracedRun) -> None:
    _assert_children(traced, traced.upsert, UPSERT, UPSERT_STAGES)


def test_spans_name_the_service(traced: TracedRun) -> None:
    resource = traced.spans[0][0]
    assert resource["service.name"] == "retriever"
    assert resource["service.version"]


def test_lineage_carries_the_callers_trace_id(traced: TracedRun) -> None:
    assert traced.found.lineage.trace_id == traced.search.trace_id


def test_feedback_span_names_the_trace_of_the_judged_search(traced: TracedRun) -> None:
    spans = {s.name: s for s in _trace(traced, traced.feedback.trace_id).values()}
    attrs = _attrs(spans[FEEDBACK].attributes)
    assert attrs["retriever.feedback.trace_id"] == traced.search.trace_id


def test_without_a_callers_span_lineage_has_the_servers_own_trace(traced: TracedRun) -> None:
    for resp in (traced.no_header, *traced.malformed):  # a malformed one is ignored
        trace_id = resp.lineage.trace_id
        assert len(trace_id) == 32 and int(trace_id, 16)
        spans = {s.name: s for s in _trace(traced, trace_id).values()}
        assert spans[SEARCH].parent_span_id == b""  # a root: the server's own trace
    ids = {r.lineage.trace_id for r in (traced.no_header, *traced.malformed)}
    assert len(ids) == 1 + len(MALFORMED)


def test_shutdown_uninstalls_tracing(traced: TracedRun) -> None:
    assert not traced.enabled_after_stop
    assert not tracing.enabled()


# -- tracing off -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def untraced(embedder: Embedder, tmp_path_factory: pytest.TempPathFactory,
             ) -> Iterator[pb_grpc.RetrieverStub]:
    settings = make_settings(tmp_path_factory.mktemp("untraced"))
    assert not settings.otlp_endpoint  # off by default
    with running_server(settings, embedder) as st, grpc.insecure_channel(st.address) as ch:
        stub = pb_grpc.RetrieverStub(ch)
        _upsert(stub)
        yield stub


def test_tracing_off_lineage_still_carries_the_callers_trace_id(
        untraced: pb_grpc.RetrieverStub) -> None:
    caller = _caller_span("agent.tool")
    assert _search(untraced, caller.metadata).lineage.trace_id == caller.trace_id
    assert _search(untraced).lineage.trace_id == ""
    for m in MALFORMED:
        assert _search(untraced, (("traceparent", m),)).lineage.trace_id == ""


# -- units -----------------------------------------------------------------------------------
def test_parse_traceparent() -> None:
    tid = "0af7651916cd43dd8448eb211c80319c"
    assert tracing.parse_traceparent(f"00-{tid}-b7ad6b7169203331-01") == tid
    assert tracing.parse_traceparent(f"00-{tid}-b7ad6b7169203331-00".encode()) == tid
    for bad in (*MALFORMED, "", None, f"00-{tid}-0000000000000000-01"):
        assert tracing.parse_traceparent(bad) == ""


def test_feedback_log_keeps_the_trace_id() -> None:
    log = FeedbackLog(size=4, window_s=60)
    log.record("r1", [("ns", ["c1"])], trace_id="ab" * 16)
    log.record("r2", [("ns", ["c1"])])  # outside any trace: none
    token = tracing.CALLER_TRACE_ID.set("cd" * 16)
    try:
        log.record("r3", [("ns", ["c1"])])  # the current one
    finally:
        tracing.CALLER_TRACE_ID.reset(token)
    assert [log.trace_id(r) for r in ("r1", "r2", "r3", "r4")] == ["ab" * 16, "", "cd" * 16,
                                                                  None]
