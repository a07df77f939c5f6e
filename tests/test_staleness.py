"""How stale each namespace and each hit is against its git source: status, hits, /metrics,
max_staleness, an unreadable source, commit-to-searchable and the poller. Real git
repositories and the real server."""

from __future__ import annotations

import os
import re
import shutil
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import make_settings, running_server
from gitrepo import TimedRepo
from google.protobuf.duration_pb2 import Duration

from retriever.client import RetrieverClient
from retriever.v1 import retriever_pb2 as pb

SLACK_S = 30.0  # between a computation of "now" here and one in the server


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("repos")


@pytest.fixture(scope="module")
def server(roots: Path, embedder, tmp_path_factory: pytest.TempPathFactory  # noqa: ANN001
           ) -> Iterator[object]:
    # A refresh interval longer than any test: what searches see changes only through a
    # sync (which forgets the cached lag) or GetIndexStatus (which reads afresh).
    settings = make_settings(tmp_path_factory.mktemp("data") / "d", sync_roots=[roots],
                             staleness_refresh_s=3600)
    with running_server(settings, embedder) as st:
        yield st


@pytest.fixture(scope="module")
def client(server) -> Iterator[RetrieverClient]:  # noqa: ANN001
    with RetrieverClient(server.address, timeout=120) as c:
        yield c


def metrics(server) -> str:  # noqa: ANN001
    port = server.info["metrics_port"]
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def metric(text: str, name: str, namespace: str) -> float | None:
    m = re.search(rf'^{name}\{{namespace="{re.escape(namespace)}"\}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else None


def age(t: datetime) -> float:
    return (datetime.now(UTC) - t).total_seconds()


def hits_by_path(client: RetrieverClient, ns: str, **kw: object) -> dict[str, pb.Hit]:
    req = pb.SearchRequest(namespace=ns, query="compute the values", top_k=50,
                           mode=pb.LEXICAL, **kw)  # type: ignore[arg-type]
    out: dict[str, pb.Hit] = {}
    for h in client.stub.Search(req, timeout=60).hits:
        out.setdefault(h.chunk.path, h)
    return out


def make_repo(root: Path) -> TimedRepo:
    repo = TimedRepo(root)
    repo.write("src/alpha.py", "def alpha(values):\n    return [2 * v for v in values]\n")
    repo.write("src/beta.py", "def beta(values):\n    return sum(values)  # compute the values\n")
    repo.commit("two modules")
    return repo


def test_staleness_rises_with_a_commit_and_returns_to_zero_after_a_sync(
        client: RetrieverClient, server, roots: Path) -> None:  # noqa: ANN001
    repo = make_repo(roots / "rise")
    ns = "rise"
    first = client.sync_source(ns, str(repo.root), wait=True, timeout=120)
    assert first.state == pb.SYNC_STATE_SUCCEEDED

    status = client.status(ns)
    src = status.source
    assert src.indexed_commit == src.head_commit == first.commit
    assert (src.commits_behind, src.error, src.never_synced) == (0, "", False)
    assert src.staleness.ToTimedelta().total_seconds() == 0
    assert status.last_sync.sync_id == first.sync_id
    assert status.last_sync.state == pb.SYNC_STATE_SUCCEEDED
    assert status.last_sync.commit == first.commit and not status.HasField("running_sync")
    hits = hits_by_path(client, ns)
    assert set(hits) == {"src/alpha.py", "src/beta.py"}
    for h in hits.values():
        assert (h.staleness_basis, h.staleness.ToTimedelta().total_seconds()) == ("source", 0)

    # A commit touching alpha only: the namespace and alpha's hits lag from its time on.
    repo.write("src/alpha.py", "def alpha(values):\n    return [3 * v for v in values]\n")
    second = repo.commit("triple")
    src = client.status(ns).source  # reads the local ref afresh
    assert (src.head_commit, src.indexed_commit, src.commits_behind) == (
        second, first.commit, 1)
    lag = src.staleness.ToTimedelta().total_seconds()
    assert abs(lag - age(repo.times[second])) < SLACK_S
    hits = hits_by_path(client, ns)
    assert abs(hits["src/alpha.py"].staleness.ToTimedelta().total_seconds() - lag) < SLACK_S
    assert hits["src/beta.py"].staleness.ToTimedelta().total_seconds() == 0
    text = metrics(server)
    assert metric(text, "retriever_namespace_commits_behind", ns) == 1
    assert abs(metric(text, "retriever_namespace_staleness_seconds", ns) - lag) < SLACK_S
    assert metric(text, "retriever_source_readable", ns) == 1
    # GetChunk says the same of alpha's chunk.
    chunk = client.get_chunk(ns, hits["src/alpha.py"].chunk.chunk_id)
    assert abs(chunk.staleness.ToTimedelta().total_seconds() - lag) < SLACK_S

    # max_staleness drops alpha's hits, or flags them.
    bound = Duration(seconds=3600)
    assert set(hits_by_path(client, ns, max_staleness=bound)) == {"src/beta.py"}
    flagged = hits_by_path(client, ns, max_staleness=bound, flag_stale=True)
    assert flagged["src/alpha.py"].stale and not flagged["src/beta.py"].stale
    assert set(hits_by_path(client, ns, max_staleness=Duration(seconds=int(lag) + 3600))) == {
        "src/alpha.py", "src/beta.py"}

    # Sync: back to zero everywhere, and the commit's commit-to-searchable is recorded.
    before = metric(metrics(server), "retriever_commit_to_searchable_seconds_count", ns) or 0
    assert client.sync_source(ns, wait=True, timeout=120).commit == second
    src = client.status(ns).source
    assert (src.indexed_commit, src.commits_behind) == (second, 0)
    assert src.staleness.ToTimedelta().total_seconds() == 0
    for h in hits_by_path(client, ns).values():
        assert h.staleness.ToTimedelta().total_seconds() == 0
    text = metrics(server)
    assert metric(text, "retriever_namespace_staleness_seconds", ns) == 0
    assert metric(text, "retriever_commit_to_searchable_seconds_count", ns) == before + 1
    total = metric(text, "retriever_commit_to_searchable_seconds_sum", ns)
    assert total is not None and total >= age(repo.times[second]) - SLACK_S


def test_an_unreadable_source_is_reported_and_its_staleness_keeps_growing(
        client: RetrieverClient, server, roots: Path) -> None:  # noqa: ANN001
    repo = make_repo(roots / "gone")
    ns = "gone"
    client.sync_source(ns, str(repo.root), wait=True, timeout=120)
    repo.write("src/beta.py", "def beta(values):\n    return max(values)  # compute\n")
    pending_commit = repo.commit("max")
    lag_before = client.status(ns).source.staleness.ToTimedelta().total_seconds()
    assert lag_before > 0
    shutil.move(str(repo.root), str(roots / "gone-moved"))
    time.sleep(1.1)
    src = client.status(ns).source
    assert src.error and "gone" in src.error
    assert src.commits_behind == 1 and src.head_commit == pending_commit  # last known
    assert src.staleness.ToTimedelta().total_seconds() >= lag_before + 1
    assert metric(metrics(server), "retriever_source_readable", ns) == 0
    # Searches still answer, with the last known lag.
    assert hits_by_path(client, ns)["src/beta.py"].staleness.ToTimedelta().total_seconds() > 0


def test_a_namespace_without_a_source_uses_the_document_rule(client: RetrieverClient) -> None:
    client.upsert("plain", [pb.Document(doc_id="a", path="a.py", content="def compute(): ...")])
    status = client.status("plain")
    assert not status.HasField("source") and not status.HasField("last_sync")
    hit = client.stub.Search(pb.SearchRequest(namespace="plain", query="compute", top_k=1),
                             timeout=60).hits[0]
    assert hit.staleness_basis == "document" and not hit.HasField("staleness")


def test_negative_max_staleness_is_invalid(client: RetrieverClient) -> None:
    import grpc

    with pytest.raises(grpc.RpcError) as e:
        client.stub.Search(pb.SearchRequest(namespace="plain", query="x", top_k=1,
                                            max_staleness=Duration(seconds=-5)), timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_staleness" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:  # not a Duration: nanos carry no whole seconds
        client.stub.Search(pb.SearchRequest(namespace="plain", query="x", top_k=1,
                                            max_staleness=Duration(nanos=2_000_000_000)),
                           timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "nanos" in e.value.details()


def test_the_poller_syncs_a_source_whose_ref_moved(roots: Path, embedder,  # noqa: ANN001
                                                     tmp_path: Path) -> None:
    repo = make_repo(roots / "polled")
    settings = make_settings(tmp_path / "data", sync_roots=[roots], sync_poll_interval_s=0.3)
    with running_server(settings, embedder) as st, \
            RetrieverClient(st.address, timeout=120) as c:
        c.sync_source("polled", str(repo.root), wait=True, timeout=120)
        repo.write("src/gamma.py", "def gamma(values):\n    return min(values)  # compute\n")
        head = repo.commit("gamma")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            src = c.status("polled").source
            if src.indexed_commit == head:
                break
            time.sleep(0.2)
        assert src.indexed_commit == head and src.commits_behind == 0
        assert "src/gamma.py" in {d.doc_id for d in c.list_documents("polled").documents}
        last = c.status("polled").last_sync
        assert last.commit == head and last.files_added == 1


def test_namespaces_past_the_metrics_cap_share_the_other_series(roots: Path, embedder,  # noqa: ANN001
                                                                 tmp_path: Path) -> None:
    first, second = make_repo(roots / "capped-a"), make_repo(roots / "capped-b")
    settings = make_settings(tmp_path / "data", sync_roots=[roots], metrics_max_namespaces=1)
    with running_server(settings, embedder) as st, \
            RetrieverClient(st.address, timeout=120) as c:
        c.sync_source("capped-a", str(first.root), wait=True, timeout=120)
        c.sync_source("capped-b", str(second.root), wait=True, timeout=120)
        second.write("src/beta.py", "def beta(values):\n    return len(values)\n")
        pending_commit = second.commit("len")
        lag = c.status("capped-b").source.staleness.ToTimedelta().total_seconds()
        text = metrics(st)
        assert metric(text, "retriever_namespace_staleness_seconds", "capped-a") == 0
        assert metric(text, "retriever_namespace_commits_behind", "_other") == 1
        assert abs(metric(text, "retriever_namespace_staleness_seconds", "_other") - lag) < SLACK_S
        assert metric(text, "retriever_namespace_staleness_seconds", "capped-b") is None
        assert abs(lag - age(second.times[pending_commit])) < SLACK_S


def synced_then_moved_back(client: RetrieverClient, roots: Path, ns: str
                           ) -> tuple[TimedRepo, str, str]:
    """A repository synced at its second commit (which adds src/gamma.py), whose branch is
    then moved back to the first: (repo, first, second)."""
    repo = make_repo(roots / ns)
    first = repo.git("rev-parse", "HEAD")
    repo.write("src/gamma.py", "def gamma(values):\n    return min(values)  # compute\n")
    second = repo.commit("gamma")
    assert client.sync_source(ns, str(repo.root), wait=True, timeout=120).commit == second
    repo.git("reset", "-q", "--hard", first)
    return repo, first, second


def test_a_branch_moved_back_leaves_what_it_dropped_stale(client: RetrieverClient, server,  # noqa: ANN001
                                                         roots: Path) -> None:
    """A force-push of an older commit (the ref moved off the indexed commit's line): the
    index still serves a file the source no longer has, so it is stale from when that was
    first seen, not "caught up" because nothing is newer than the index."""
    ns = "moved-back"
    _repo, first, second = synced_then_moved_back(client, roots, ns)
    seen = client.status(ns).source
    assert (seen.indexed_commit, seen.head_commit, seen.commits_behind) == (second, first, 0)
    time.sleep(1.1)
    src = client.status(ns).source
    assert src.staleness.ToTimedelta().total_seconds() >= 1.0  # counts from the first read
    hits = hits_by_path(client, ns)
    assert hits["src/gamma.py"].staleness.ToTimedelta().total_seconds() >= 1.0
    assert hits["src/alpha.py"].staleness.ToTimedelta().total_seconds() == 0
    # A sync reconciles: gamma is gone, nothing is stale.
    assert client.sync_source(ns, wait=True, timeout=120).commit == first
    assert client.status(ns).source.staleness.ToTimedelta().total_seconds() == 0
    assert "src/gamma.py" not in hits_by_path(client, ns)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the repository away")
def test_a_repository_owned_by_another_user_under_the_roots_is_synced(
        client: RetrieverClient, roots: Path) -> None:
    """The sync roots are the admin's word that repositories there may be read (git's own
    "dubious ownership" guard would otherwise refuse, and the global config that could
    allow it is not read by the service)."""
    repo = make_repo(roots / "foreign")
    for path in [repo.root, *repo.root.rglob("*")]:
        os.lchown(path, 65534, 65534)  # nobody
    result = client.sync_source("foreign", str(repo.root), wait=True, timeout=120)
    assert result.state == pb.SYNC_STATE_SUCCEEDED
    assert set(hits_by_path(client, "foreign")) == {"src/alpha.py", "src/beta.py"}


def test_a_scrape_refreshes_a_namespace_nobody_queries(roots: Path, embedder,  # noqa: ANN001
                                                        tmp_path: Path) -> None:
    """The freshness gauges move on by themselves: a namespace no one searches still shows
    its source moving on (the scrape starts the read; a later scrape sees it)."""
    repo = make_repo(roots / "unqueried")
    settings = make_settings(tmp_path / "data", sync_roots=[roots], staleness_refresh_s=0.2)
    with running_server(settings, embedder) as st, \
            RetrieverClient(st.address, timeout=120) as c:
        c.sync_source("unqueried", str(repo.root), wait=True, timeout=120)
        assert metric(metrics(st), "retriever_namespace_commits_behind", "unqueried") == 0
        repo.write("src/gamma.py", "def gamma(values):\n    return min(values)  # compute\n")
        repo.commit("gamma")
        deadline = time.monotonic() + 30
        behind = None
        while time.monotonic() < deadline and behind != 1:
            time.sleep(0.3)
            behind = metric(metrics(st), "retriever_namespace_commits_behind", "unqueried")
        assert behind == 1
        assert metric(metrics(st), "retriever_namespace_staleness_seconds", "unqueried") > 0


def test_an_indexed_commit_collected_after_a_rewrite_leaves_every_path_stale(
        client: RetrieverClient, roots: Path) -> None:
    """Rewritten, then garbage-collected: the indexed commit is gone, so which paths differ
    is unknown. The source still reads (no error, the real head) and every hit counts as
    stale from when that was first seen, until a sync reconciles."""
    ns = "collected"
    repo, first, second = synced_then_moved_back(client, roots, ns)
    repo.git("reflog", "expire", "--expire=now", "--all")
    repo.git("gc", "-q", "--prune=now")
    seen = client.status(ns).source
    assert (seen.error, seen.head_commit, seen.indexed_commit) == ("", first, second)
    time.sleep(1.1)
    assert client.status(ns).source.staleness.ToTimedelta().total_seconds() >= 1.0
    hits = hits_by_path(client, ns)
    assert set(hits) == {"src/alpha.py", "src/beta.py", "src/gamma.py"}
    for h in hits.values():
        assert h.staleness.ToTimedelta().total_seconds() >= 1.0
    assert client.sync_source(ns, wait=True, timeout=120).commit == first
    assert client.status(ns).source.staleness.ToTimedelta().total_seconds() == 0


def test_staleness_known_before_the_indexed_commit_was_collected_does_not_drop(
        client: RetrieverClient, roots: Path) -> None:
    """Rewritten with a new (old-dated) commit on top, then garbage-collected: before the
    collection the namespace was as stale as that commit; after it, with nothing left to
    compare, it must not read younger (it fell to seconds) nor fewer commits behind."""
    ns = "collected-late"
    repo, _first, _second = synced_then_moved_back(client, roots, ns)
    repo.write("src/beta.py", "def beta(values):\n    return max(values)\n")
    repo.commit("beta, rewritten")
    before = client.status(ns).source
    assert before.commits_behind == 1
    lag = before.staleness.ToTimedelta().total_seconds()
    assert lag > 3600  # the commit's own (old) time
    repo.git("reflog", "expire", "--expire=now", "--all")
    repo.git("gc", "-q", "--prune=now")
    after = client.status(ns).source
    assert after.staleness.ToTimedelta().total_seconds() >= lag
    assert after.commits_behind >= 1
    for h in hits_by_path(client, ns).values():  # every path: which differ is unknown
        assert h.staleness.ToTimedelta().total_seconds() >= lag


def test_a_bound_path_swapped_for_a_link_out_of_the_roots_is_not_read(
        client: RetrieverClient, roots: Path, tmp_path: Path) -> None:
    repo = make_repo(roots / "swapped")
    ns = "swapped"
    synced = client.sync_source(ns, str(repo.root), wait=True, timeout=120).commit
    elsewhere = make_repo(tmp_path / "outside-the-roots")
    elsewhere.write("secret.py", "def secret(values):\n    return values\n")
    outside_head = elsewhere.commit("secret")
    shutil.move(str(repo.root), str(roots / "swapped-away"))
    (roots / "swapped").symlink_to(elsewhere.root, target_is_directory=True)
    src = client.status(ns).source
    assert src.error, "the link out of the roots was read"
    assert src.head_commit != outside_head and src.indexed_commit == synced


def test_a_diverged_index_stays_stale_from_when_it_was_first_seen(
        roots: Path, embedder, tmp_path: Path) -> None:  # noqa: ANN001
    """Divergence dates from the first read that found the indexed commit off the ref, for
    that indexed commit: the ref moving again (a new commit on the moved-back branch) and a
    restart do not reset it to "just now"."""
    settings = make_settings(tmp_path / "data", sync_roots=[roots], staleness_refresh_s=3600)
    with running_server(settings, embedder) as st, \
            RetrieverClient(st.address, timeout=120) as c:
        repo, first, second = synced_then_moved_back(c, roots, "diverged")
        assert c.status("diverged").source.head_commit == first  # first seen now
        time.sleep(1.5)
        repo.write("src/delta.py", "def delta(values):\n    return max(values)  # compute\n")
        moved = repo.commit("delta, on the moved-back branch")
        src = c.status("diverged").source
        assert (src.head_commit, src.indexed_commit) == (moved, second)
        assert src.staleness.ToTimedelta().total_seconds() >= 1.5
        assert hits_by_path(c, "diverged")["src/gamma.py"].staleness.ToTimedelta(
        ).total_seconds() >= 1.5
    with running_server(settings, embedder) as st, \
            RetrieverClient(st.address, timeout=120) as c:
        src = c.status("diverged").source
        assert src.indexed_commit == second
        assert src.staleness.ToTimedelta().total_seconds() >= 1.5
        # A sync reconciles, and the record of the divergence goes with it.
        assert c.sync_source("diverged", wait=True, timeout=120).commit == moved
        assert c.status("diverged").source.staleness.ToTimedelta().total_seconds() == 0


def test_writes_outside_syncs_are_put_back_by_the_next_sync(
        roots: Path, embedder, tmp_path: Path) -> None:  # noqa: ANN001
    """A bound namespace holds exactly its source's files: an upsert or delete a caller
    sends it is applied, and the next sync (here the poller's, with no new commit) compares
    the whole tree and puts the namespace back."""
    repo = make_repo(roots / "outside")
    settings = make_settings(tmp_path / "data", sync_roots=[roots], sync_poll_interval_s=0.3)
    with running_server(settings, embedder) as st, \
            RetrieverClient(st.address, timeout=120) as c:
        c.sync_source("outside", str(repo.root), wait=True, timeout=120)
        synced = c.status("outside").last_sync.sync_id

        def ids() -> set[str]:
            return {d.doc_id for d in c.list_documents("outside").documents}

        assert ids() == {"src/alpha.py", "src/beta.py"}
        alpha = c.get_document("outside", "src/alpha.py").document
        c.upsert("outside", [pb.Document(doc_id="scratch.py",
                                         content="def scratch():\n    return 'not in git'\n")])
        c.delete("outside", ["src/beta.py"])
        # The same text and revision, with the fields only a caller's upsert sets otherwise.
        tampered = pb.Document(doc_id="src/alpha.py", content=alpha.content,
                               revision=alpha.revision, path="zzz/evil.md", language="markdown",
                               metadata={"owner": "mallory"})
        tampered.source_updated_at.FromSeconds(0)
        c.upsert("outside", [tampered])
        deadline = time.monotonic() + 60
        # The sync's record is written after its last document: wait for both.
        while time.monotonic() < deadline and (
                ids() != {"src/alpha.py", "src/beta.py"}
                or c.get_document("outside", "src/alpha.py").document.path != alpha.path
                or c.status("outside").last_sync.sync_id == synced):
            time.sleep(0.2)
        assert ids() == {"src/alpha.py", "src/beta.py"}
        back = c.get_document("outside", "src/alpha.py").document
        assert (back.path, back.language, dict(back.metadata), back.source_updated_at) == (
            alpha.path, alpha.language, {}, alpha.source_updated_at)
        last = c.status("outside").last_sync
        assert last.sync_id != synced and last.state == pb.SYNC_STATE_SUCCEEDED
        # Back in step: nothing more to do, so the poller lets it be. (One more compare may
        # run: a sync that began between a write's commit and its second mark keeps the
        # mark, by design; on a loaded machine that window is wide. It finds nothing to do,
        # and then the poller stops.)
        seen, settle = last.sync_id, time.monotonic() + 30
        while True:
            time.sleep(1.0)
            now = c.status("outside").last_sync
            if now.sync_id == seen:
                break
            assert time.monotonic() < settle, "the poller keeps syncing a namespace in step"
            assert now.state != pb.SYNC_STATE_FAILED, now.error
            seen = now.sync_id
        assert ids() == {"src/alpha.py", "src/beta.py"}
        beta = c.get_document("outside", "src/beta.py")
        assert "compute the values" in beta.document.content


def test_a_rewrite_that_changed_no_file_leaves_nothing_stale(client: RetrieverClient,
                                                             roots: Path) -> None:
    """An amended commit message (a new commit, the same tree): the ref no longer holds the
    indexed commit, but no file differs, so neither the namespace nor any hit is stale."""
    repo = make_repo(roots / "amended")
    client.sync_source("amended", str(repo.root), wait=True, timeout=120)
    repo.git("commit", "-q", "--amend", "-m", "same files, new message")
    assert client.status("amended").source.head_commit != client.status(
        "amended").source.indexed_commit
    time.sleep(1.1)
    assert client.status("amended").source.staleness.ToTimedelta().total_seconds() == 0
    for h in hits_by_path(client, "amended").values():
        assert h.staleness.ToTimedelta().total_seconds() == 0


def test_a_write_outside_syncs_that_a_sync_overlaps_is_still_put_back(
        roots: Path, embedder, tmp_path: Path) -> None:  # noqa: ANN001
    """The mark an outside write makes wakes the poller, whose sync may list the namespace
    before that write commits: the write marks the source again once it is in, so the
    sync that overlapped it does not clear the compare, and the next one removes it."""
    repo = make_repo(roots / "overlap")
    settings = make_settings(tmp_path / "data", sync_roots=[roots], sync_poll_interval_s=0.2)
    with running_server(settings, embedder) as st, \
            RetrieverClient(st.address, timeout=300) as c:
        c.sync_source("overlap", str(repo.root), wait=True, timeout=120)
        body = "\n".join(f"def f{i}(x):\n    return x * {i}  # words to embed here {i}"
                         for i in range(12))
        c.upsert("overlap", [pb.Document(doc_id=f"scratch{n}.py", content=f"{body}\n# {n}\n")
                             for n in range(16)])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and c.status("overlap").document_count != 2:
            time.sleep(0.2)
        assert c.status("overlap").document_count == 2
