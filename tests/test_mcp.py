"""`retriever mcp` driven by the MCP SDK's own client, over stdio and streamable HTTP,
against a real server (real model, real index) that requires a token."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import make_settings, running_server
from gitrepo import TimedRepo

pytest.importorskip("mcp")
from mcp import Client, StdioServerParameters  # noqa: E402
from mcp.types import CallToolResult  # noqa: E402

from retriever.client import RetrieverClient  # noqa: E402
from retriever.v1 import retriever_pb2 as pb  # noqa: E402

pytestmark = pytest.mark.integration

TOKEN = "mcp-s3cret"
NS = "agent"
ROOT = Path(__file__).resolve().parents[1]
SOURCE_TIME = datetime(2024, 1, 1, tzinfo=UTC)

CORPUS = {
    "src/retry.py": ('"""Retry helpers."""\nimport random\n\n\n'
                     "def backoff_delay(attempt: int, base: float = 0.1) -> float:\n"
                     '    """Exponential backoff with full jitter before retry number attempt."""\n'
                     "    return random.uniform(0, base * 2 ** attempt)\n"),
    "docs/oven.md": ("# Baking bread\n\nPreheat the oven to 230 degrees. Bake the sourdough "
                     "loaf for 40 minutes until the crust is dark and hollow-sounding.\n"),
    "notes/soup.txt": "Tomato soup: simmer tomatoes with garlic and basil, then blend.\n",
}


@pytest.fixture(scope="module")
def service(embedder, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:  # noqa: ANN001
    """A real server with a token, a namespace of three documents, and a second namespace
    bound to a git repository (for the sync tool)."""
    roots = tmp_path_factory.mktemp("roots")
    repo = TimedRepo(roots / "repo")
    repo.write("README.md", "# Repo\n\nA repository the service syncs.\n")
    head = repo.commit("first")
    settings = make_settings(tmp_path_factory.mktemp("data"), auth_token=TOKEN,
                             sync_roots=[roots])
    with running_server(settings, embedder) as st, \
            RetrieverClient(st.address, token=TOKEN) as client:
        docs = []
        for path, content in CORPUS.items():
            doc = pb.Document(doc_id=path, path=path, content=content, revision="rev-1")
            doc.source_updated_at.FromDatetime(SOURCE_TIME)
            docs.append(doc)
        assert client.upsert(NS, docs).documents_created == 3
        assert client.sync_source("synced", str(repo.root), wait=True).commit == head
        # Bound to a repository that is then moved away: its syncs fail (the sync tool
        # must pass the service's reason on).
        moved = TimedRepo(roots / "moved")
        moved.write("a.md", "# A\n\nA file.\n")
        moved.commit("first")
        client.sync_source("moved", str(moved.root), wait=True)
        shutil.rmtree(moved.root)
        yield {"address": st.address, "client": client, "head": head}


def _env() -> dict[str, str]:
    return {**os.environ, "RETRIEVER_AUTH_TOKEN": TOKEN}


def _stdio(address: str) -> StdioServerParameters:
    return StdioServerParameters(command=sys.executable,
                                 args=["-m", "retriever.cli", "mcp", "--address", address],
                                 env=_env(), cwd=str(ROOT))


def _text(result: CallToolResult) -> str:
    return "\n".join(getattr(c, "text", "") for c in result.content)


def _ok(result: CallToolResult) -> dict[str, Any]:
    assert not result.is_error, _text(result)
    assert isinstance(result.structured_content, dict)
    return result.structured_content


def test_every_tool_over_stdio(service: dict[str, Any]) -> None:
    client: RetrieverClient = service["client"]

    async def main() -> None:
        async with Client(_stdio(service["address"]), read_timeout_seconds=60) as mcp:
            # -- the tools, described for a model
            tools = {t.name: t for t in (await mcp.list_tools()).tools}
            assert set(tools) == {"search", "get_chunk", "get_document", "list_namespaces",
                                  "index_status", "sync", "feedback"}
            assert all(t.description and t.output_schema for t in tools.values())
            schema = tools["search"].input_schema
            assert set(schema["required"]) == {"namespace", "query"}
            props = schema["properties"]
            assert {"top_k", "mode", "path_prefix", "languages", "kinds", "doc_ids", "rerank",
                    "collapse"} <= set(props)
            assert all(p.get("description") for p in props.values())
            assert "lexical" in str(props["mode"]) and "hybrid" in str(props["mode"])
            assert tools["search"].annotations.read_only_hint is True
            assert tools["sync"].annotations.read_only_hint is False

            # -- search: the indexed chunk, with its identity, staleness and lineage
            res = _ok(await mcp.call_tool("search", {
                "namespace": NS, "query": "exponential backoff with jitter", "top_k": 3}))
            top = res["hits"][0]
            assert top["path"] == "src/retry.py" and top["doc_id"] == "src/retry.py"
            assert "def backoff_delay" in top["text"]
            assert 1 <= top["start_line"] <= top["end_line"] <= 7
            assert top["revision"] == "rev-1" and top["rank"] == 1 and top["score"] > 0
            assert top["staleness_seconds"] == 0.0  # source time known, nothing newer
            lineage = res["lineage"]
            assert lineage["request_id"] and lineage["namespace"] == NS
            assert "MiniLM" in lineage["embedder"] and lineage["embedder_revision"]
            assert lineage["backend"] and lineage["index_generation"] >= 1
            assert lineage["mode"] == "hybrid"  # the server's default
            assert "def backoff_delay" in _text(await mcp.call_tool("search", {
                "namespace": NS, "query": "backoff"}))  # text content mirrors the result
            # The same chunk the service itself returns.
            direct = client.search(NS, "exponential backoff with jitter", top_k=3)
            assert top["chunk_id"] == direct.hits[0].chunk.chunk_id

            # -- filters, mode, collapse, locations only
            res = _ok(await mcp.call_tool("search", {
                "namespace": NS, "query": "bake bread in the oven", "mode": "lexical",
                "path_prefix": "docs/", "collapse": True, "include_text": False}))
            assert [h["path"] for h in res["hits"]] == ["docs/oven.md"]
            assert res["hits"][0]["text"] is None and res["lineage"]["mode"] == "lexical"
            res = _ok(await mcp.call_tool("search", {
                "namespace": NS, "query": "tomato", "languages": ["python"], "mode": "dense"}))
            assert {h["path"] for h in res["hits"]} == {"src/retry.py"}
            res = _ok(await mcp.call_tool("search", {
                "namespace": NS, "query": "garlic", "doc_ids": ["notes/soup.txt"]}))
            assert [h["doc_id"] for h in res["hits"]] == ["notes/soup.txt"]

            # -- get_chunk and get_document
            chunk = _ok(await mcp.call_tool("get_chunk", {
                "namespace": NS, "chunk_id": top["chunk_id"]}))
            assert chunk["chunk_id"] == top["chunk_id"] and chunk["text"] == top["text"]
            assert chunk["path"] == "src/retry.py" and chunk["staleness_seconds"] == 0.0
            doc = _ok(await mcp.call_tool("get_document", {
                "namespace": NS, "doc_id": "src/retry.py", "start_line": 5, "end_line": 6}))
            assert doc["content"] == "".join(CORPUS["src/retry.py"].splitlines(True)[4:6])
            assert doc["total_lines"] == 7 and (doc["start_line"], doc["end_line"]) == (5, 6)
            assert top["chunk_id"] in doc["chunk_ids"] and doc["revision"] == "rev-1"
            doc = _ok(await mcp.call_tool("get_document", {
                "namespace": NS, "doc_id": "docs/oven.md", "max_chars": 10}))
            assert doc["content"] == "# Baking b" and doc["truncated"] is True
            for lines, says in (({"start_line": 6, "end_line": 5}, "before start_line"),
                                ({"start_line": 100}, "past the end of src/retry.py (7")):
                bad_range = await mcp.call_tool("get_document", {
                    "namespace": NS, "doc_id": "src/retry.py", **lines})
                assert bad_range.is_error and "INVALID_ARGUMENT" in _text(bad_range)
                assert says in _text(bad_range), _text(bad_range)

            # -- namespaces and status
            listed = {n["name"]: n for n in _ok(await mcp.call_tool(
                "list_namespaces", {}))["namespaces"]}
            assert set(listed) == {NS, "synced", "moved"} and listed[NS]["document_count"] == 3
            status = _ok(await mcp.call_tool("index_status", {"namespace": NS}))
            assert status["document_count"] == 3 and status["chunk_count"] >= 3
            assert status["vector_count"] == status["chunk_count"]
            assert status["last_indexed_at"] and status["embedder"] == lineage["embedder"]

            # -- sync of the namespace's configured source
            synced = _ok(await mcp.call_tool("sync", {"namespace": "synced", "wait": True}))
            assert synced["state"] == "SUCCEEDED" and synced["commit"] == service["head"]
            assert synced["previous_commit"] == service["head"]
            assert synced["documents_upserted"] == 0
            unbound = await mcp.call_tool("sync", {"namespace": NS})
            assert unbound.is_error and "NOT_FOUND" in _text(unbound)
            # What an agent can act on: no repository to give this tool, an operator's job.
            assert "bound to no git repository" in _text(unbound)
            assert "give repo" not in _text(unbound)
            missing = await mcp.call_tool("sync", {"namespace": "nope"})
            assert "NOT_FOUND: namespace 'nope' does not exist" in _text(missing)
            # Bound, but the repository is gone: the service's own reason, passed on.
            gone = await mcp.call_tool("sync", {"namespace": "moved", "wait": True})
            assert gone.is_error and "FAILED_PRECONDITION" in _text(gone)
            assert "is bound to" in _text(gone) and "not a directory" in _text(gone)

            # -- errors: the service's status and message, never a traceback
            bad = await mcp.call_tool("search", {"namespace": "nope", "query": "bread"})
            assert bad.is_error
            assert "NOT_FOUND: namespace 'nope' does not exist" in _text(bad)
            assert "Traceback" not in _text(bad)
            gone = await mcp.call_tool("get_chunk", {"namespace": NS, "chunk_id": "c" * 32})
            assert gone.is_error and "NOT_FOUND" in _text(gone)
            invalid = await mcp.call_tool("search", {"namespace": NS, "query": "   "})
            assert invalid.is_error and "INVALID_ARGUMENT" in _text(invalid)
            assert (await mcp.call_tool("search", {
                "namespace": NS, "query": "x", "top_k": 0})).is_error  # schema: ge=1
            assert (await mcp.call_tool("search", {
                "namespace": NS, "query": "x", "mode": "fuzzy"})).is_error

            # -- feedback: whatever the service answers, relayed
            args = {"namespace": NS, "request_id": lineage["request_id"],
                    "relevant": [top["chunk_id"]], "not_relevant": [res["hits"][0]["chunk_id"]]}
            fb = await mcp.call_tool("feedback", args)
            try:
                client.stub.RecordFeedback(pb.RecordFeedbackRequest(
                    namespace=NS, request_id=lineage["request_id"], feedback=[
                        pb.ChunkFeedback(chunk_id=top["chunk_id"], relevant=True)]),
                    timeout=10)
            except grpc.RpcError as exc:
                assert fb.is_error, "the service refused feedback; the tool must say so"
                assert f"{exc.code().name}: {exc.details()}" in _text(fb)
            else:
                assert _ok(fb) == {"recorded": 2}
            assert (await mcp.call_tool("feedback", {
                "namespace": NS, "request_id": "r"})).is_error  # nothing judged

            # -- the server is still serving after every error
            assert _ok(await mcp.call_tool("index_status", {"namespace": NS}))

    asyncio.run(main())


def test_without_the_token_every_call_is_unauthenticated(service: dict[str, Any]) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RETRIEVER_AUTH_TOKEN"}
    params = StdioServerParameters(command=sys.executable, args=[
        "-m", "retriever.cli", "mcp", "--address", service["address"]], env=env, cwd=str(ROOT))

    async def main() -> None:
        async with Client(params, read_timeout_seconds=60) as mcp:
            res = await mcp.call_tool("list_namespaces", {})
            assert res.is_error and "UNAUTHENTICATED" in _text(res)

    asyncio.run(main())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_streamable_http_round_trip(service: dict[str, Any]) -> None:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "retriever.cli", "mcp", "--address", service["address"],
         "--transport", "http", "--port", str(port)],
        env=_env(), cwd=str(ROOT), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "MCP HTTP server did not listen"
                time.sleep(0.1)

        async def main() -> None:
            async with Client(f"http://127.0.0.1:{port}/mcp") as mcp:
                assert "search" in {t.name for t in (await mcp.list_tools()).tools}
                res = _ok(await mcp.call_tool("search", {
                    "namespace": NS, "query": "sourdough crust", "top_k": 1}))
                assert res["hits"][0]["path"] == "docs/oven.md"
                assert "sourdough" in res["hits"][0]["text"] and res["lineage"]["request_id"]
                bad = await mcp.call_tool("index_status", {"namespace": "nope"})
                assert bad.is_error and "NOT_FOUND" in _text(bad)

        asyncio.run(main())
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


def test_initialize_is_answered_while_the_service_still_loads() -> None:
    """An MCP host times `initialize` out in seconds; a server still loading (health
    NOT_SERVING, as during a first start's model build) must not hold it up for the CLI's
    10-minute wait: the tools answer, each call saying the service is not ready."""
    from concurrent import futures

    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    loading = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    checker = health.HealthServicer()
    checker.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checker, loading)
    port = loading.add_insecure_port("127.0.0.1:0")
    loading.start()

    async def main() -> None:
        async with Client(_stdio(f"127.0.0.1:{port}"), read_timeout_seconds=60) as mcp:
            tools = {t.name for t in (await mcp.list_tools()).tools}
            assert "search" in tools
            res = await mcp.call_tool("list_namespaces", {})
            assert res.is_error and "UNIMPLEMENTED" in _text(res), _text(res)

    try:
        asyncio.run(asyncio.wait_for(main(), timeout=90))
    finally:
        loading.stop(None)
