"""The git engine under source syncing, driven through real repositories built here."""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
from collections.abc import Generator
from datetime import timedelta
from pathlib import Path

import pytest
from gitrepo import GIT_ENV, T0
from gitrepo import TimedRepo as _Repo

from retriever.errors import InvalidArgument, NotFound, Unavailable
from retriever.freshness.git import (
    VENDORED_PATTERNS,
    Changes,
    Entry,
    GitRepo,
    Pending,
    Rename,
    Revision,
    SourceSpec,
    commit_time,
    diff,
    fetch,
    has_commit,
    is_ancestor,
    last_changes,
    open_source,
    pending,
    read_text,
    resolve,
    snapshot,
)


def _lines(n: int, tag: str = "") -> str:
    return "".join(f"line {i} of a text file {tag}\n" for i in range(n))


@pytest.fixture
def repo(tmp_path: Path) -> _Repo:
    return _Repo(tmp_path / "repo")


# -- snapshots -----------------------------------------------------------------------------


def test_snapshot_applies_every_rule(tmp_path: Path, repo: _Repo) -> None:
    child = _Repo(tmp_path / "child")
    child.write("x.txt", "x\n")
    child.commit()

    repo.write("README.md", "# Repo\n")
    repo.write("src/app.py", "print('app')\n")
    repo.write("src/deep/util.py", "X = 1\n")
    repo.write("src/secret.py", "KEY = 1\n")
    repo.write("docs/guide.md", "# Guide\n")
    repo.write("notes.txt", "not included\n")
    repo.write("src/blob.bin", b"head\x00tail\n")
    repo.write("src/latin.py", "s = 'caf\xe9'\n".encode("latin-1"))
    repo.write("src/late_nul.py", "x = 1\n" * 2000 + "\x00")  # a NUL past the probe
    repo.write("src/big.py", "x = 1\n" * 30)  # 180 bytes, over the limit below
    repo.write("src/edge.py", "x = 1\n" * 20)  # 120 bytes: exactly the limit
    os.symlink("app.py", repo.root / "src" / "link.py")
    vendored = ["src/vendor/lib.py", "web/node_modules/x/index.js", "third_party/a.py",
                "src/app.min.js", "src/app.min.css", "src/poetry.lock",
                "src/package-lock.json", "src/api.pb.go", "src/api_pb2.py"]
    for path in vendored:
        repo.write(path, "generated\n")
    (repo.root / os.fsdecode(b"src/caf\xe9.py")).write_bytes(b"x = 1\n")
    repo.git("submodule", "add", "-q", str(child.root), "src/sub")
    head = repo.commit("everything")

    spec = SourceSpec(str(repo.root), include=("src/", "*.md", "web/", "third_party/"),
                      exclude=("src/secret.py", "docs/"), max_file_bytes=120)
    with GitRepo(repo.root) as git:
        snap = snapshot(git, head, spec)
        assert sorted(snap.entries) == [
            "README.md", "src/app.py", "src/blob.bin", "src/deep/util.py", "src/edge.py",
            "src/latin.py"]
        assert snap.skipped == {
            ".gitmodules": "excluded", "notes.txt": "excluded", "docs/guide.md": "excluded",
            "src/secret.py": "excluded", "src/big.py": "too-large",
            "src/late_nul.py": "too-large", "src/link.py": "symlink",
            "src/sub": "submodule", "src/caf\\xe9.py": "not-utf8",
            **{p: "vendored" for p in vendored}}
        assert snap.entries["src/app.py"] == Entry(
            "src/app.py", repo.blob(head, "src/app.py"), "100644", len("print('app')\n"))
        assert snap.entries["src/edge.py"].size == 120

        # Content rules apply when reading, and report into the snapshot's skips.
        skipped = dict(snap.skipped)
        texts = {p: read_text(git, e, skipped) for p, e in snap.entries.items()}
        assert texts["src/app.py"] == "print('app')\n"
        assert texts["src/blob.bin"] is None and texts["src/latin.py"] is None
        assert skipped["src/blob.bin"] == "binary" and skipped["src/latin.py"] == "not-utf8"
        assert len(skipped) == len(snap.skipped) + 2

        # A NUL past the first 8000 bytes of UTF-8 text is binary too (as `retriever index`).
        wide = snapshot(git, head, SourceSpec(str(repo.root), include=("src/late_nul.py",)))
        assert read_text(git, wide.entries["src/late_nul.py"]) is None

        # No globs: everything but the fixed rules; the vendored list is one constant.
        everything = snapshot(git, head, SourceSpec(str(repo.root)))
        assert {"notes.txt", "docs/guide.md", ".gitmodules", "src/big.py"} <= set(
            everything.entries)
        assert everything.skipped["src/app.min.js"] == "vendored"
        assert "*.min.js" in VENDORED_PATTERNS


def test_spec_validates_its_values() -> None:
    with pytest.raises(InvalidArgument) as bad:
        SourceSpec("/x", max_file_bytes=0)
    assert bad.value.field == "max_file_bytes"
    with pytest.raises(InvalidArgument) as bad:
        SourceSpec("/x", include="src/")  # type: ignore[arg-type]
    assert bad.value.field == "include"
    with pytest.raises(InvalidArgument) as bad:
        SourceSpec("")
    assert bad.value.field == "location"
    spec = SourceSpec("/x", include=["a/"])  # type: ignore[arg-type]
    assert spec.include == ("a/",) and spec == SourceSpec("/x", include=("a/",))


# -- diffs ---------------------------------------------------------------------------------


def test_diff_through_a_sequence_of_changes(repo: _Repo) -> None:
    spec = SourceSpec(str(repo.root), exclude=("private/",), max_file_bytes=2000)
    repo.write("a.py", _lines(10, "a"))
    repo.write("b.py", _lines(10, "b"))
    repo.write("gone.py", _lines(5, "gone"))
    repo.write("pkg/mod.py", _lines(20, "mod"))
    repo.write("keep.py", _lines(20, "keep"))
    repo.write("private/p.py", _lines(20, "private"))
    repo.write("out.py", _lines(20, "out"))
    repo.write("grow.py", _lines(3, "grow"))
    repo.write("link_target.py", _lines(10, "target"))
    c1 = repo.commit("start")

    repo.write("a.py", _lines(11, "a"))                 # modified
    repo.rm("gone.py")                                  # deleted
    repo.mv("b.py", "c.py")                             # pure rename
    repo.mv("pkg/mod.py", "lib/mod.py")                 # moved between dirs, and edited
    repo.write("lib/mod.py", _lines(20, "mod") + "one more line\n")
    repo.mv("private/p.py", "p.py")                     # out of scope -> in: added
    repo.mv("out.py", "private/out.py")                 # in scope -> out: deleted
    repo.write("grow.py", "x" * 3000)                   # now too large: deleted
    repo.rm("link_target.py")                           # a file becomes a symlink
    os.symlink("a.py", repo.root / "link_target.py")
    repo.write("new.py", "NEW = 1\n")                   # added
    repo.write("data.bin", b"\x00\x01")                 # added; binary shows when read
    repo.write("node_modules/x/index.js", "x\n")        # vendored: nothing
    repo.write("private/other.py", "hidden\n")          # excluded: nothing
    c2 = repo.commit("many")

    with GitRepo(repo.root) as git:
        changes = diff(git, c1, c2, spec)
        assert changes.added == ["data.bin", "new.py", "p.py"]
        assert changes.modified == ["a.py"]
        assert changes.deleted == ["gone.py", "grow.py", "link_target.py", "out.py"]
        assert changes.renamed == [Rename("b.py", "c.py", 100),
                                   Rename("pkg/mod.py", "lib/mod.py", 97)]  # git: R097
        assert set(changes.entries) == {"a.py", "c.py", "data.bin", "lib/mod.py", "new.py",
                                        "p.py"}
        assert changes.entries["lib/mod.py"] == Entry(
            "lib/mod.py", repo.blob(c2, "lib/mod.py"), "100644",
            len(_lines(20, "mod") + "one more line\n"))
        assert changes.entries["c.py"].blob_oid == repo.blob(c1, "b.py")
        assert changes.skipped == {
            "grow.py": "too-large", "link_target.py": "symlink",
            "private/out.py": "excluded", "private/other.py": "excluded",
            "node_modules/x/index.js": "vendored"}
        assert read_text(git, changes.entries["data.bin"]) is None
        assert read_text(git, changes.entries["new.py"]) == "NEW = 1\n"

        # The same state reached by diff as by snapshot: apply the changes to c1's entries.
        before = set(snapshot(git, c1, spec).entries)
        after = (before - set(changes.deleted) - {r.old_path for r in changes.renamed}) | set(
            changes.added) | {r.new_path for r in changes.renamed}
        assert after == set(snapshot(git, c2, spec).entries)

        # Back the other way: the symlink turns into a file again (an add), and nothing
        # between identical commits.
        repo.rm("link_target.py")
        repo.write("link_target.py", "real again\n")
        c3 = repo.commit("unlink")
        assert diff(git, c2, c3, spec) == Changes(
            ["link_target.py"], [], [], [], {"link_target.py": Entry(
                "link_target.py", repo.blob(c3, "link_target.py"), "100644", 11)}, {})
        assert not diff(git, c3, c3, spec)


def test_diff_submodule_added_and_file_replaced_by_submodule(tmp_path: Path,
                                                             repo: _Repo) -> None:
    child = _Repo(tmp_path / "child")
    child.write("x.txt", "x\n")
    child.commit()
    repo.write("dep/README", "placeholder\n")
    c1 = repo.commit()
    repo.rm("dep/README")
    repo.git("submodule", "add", "-q", str(child.root), "dep")
    c2 = repo.commit("vendor a submodule")
    with GitRepo(repo.root) as git:
        changes = diff(git, c1, c2, SourceSpec(str(repo.root)))
    assert changes.added == [".gitmodules"]
    assert changes.deleted == ["dep/README"]
    assert changes.skipped == {"dep": "submodule"}


# -- history -------------------------------------------------------------------------------


def test_last_changes_and_pending(repo: _Repo) -> None:
    repo.write("a.md", "a1\n")
    repo.write("b.md", "b1\n")
    repo.write("c.md", "c1\n")
    c1 = repo.commit("one")
    repo.write("a.md", "a2\n")
    c2 = repo.commit("two")
    repo.mv("c.md", "docs/c.md")
    c3 = repo.commit("three: move")
    c4 = repo.commit("four: empty")
    repo.write("a.md", "a3\n")
    repo.write("b.md", "b2\n")
    c5 = repo.commit("five")

    with GitRepo(repo.root) as git:
        assert commit_time(git, c3) == T0 + timedelta(minutes=3)
        assert last_changes(git, c5, ["a.md", "b.md", "docs/c.md", "nope.md"]) == {
            "a.md": Revision(c5, repo.times[c5]), "b.md": Revision(c5, repo.times[c5]),
            "docs/c.md": Revision(c3, repo.times[c3])}
        # At an older commit: what that commit held.
        assert last_changes(git, c4, ["a.md", "b.md", "c.md", "docs/c.md"]) == {
            "a.md": (c2, T0 + timedelta(minutes=2)), "b.md": (c1, T0 + timedelta(minutes=1)),
            "c.md": (c3, T0 + timedelta(minutes=3)), "docs/c.md": (c3, repo.times[c3])}
        assert last_changes(git, c5, []) == {}

        assert pending(git, c5, c5) == Pending(0, None, {})
        assert pending(git, c1, c5) == Pending(4, repo.times[c2], {
            "a.md": repo.times[c2], "c.md": repo.times[c3], "docs/c.md": repo.times[c3],
            "b.md": repo.times[c5]})
        # The empty commit c4 changed nothing: the index went stale with c5.
        assert pending(git, c3, c5) == Pending(2, repo.times[c5], {
            "a.md": repo.times[c5], "b.md": repo.times[c5]})
        with pytest.raises(NotFound):
            pending(git, "1" * 40, c5)


def test_pending_takes_the_earliest_commit_time_not_the_first_in_history(repo: _Repo
                                                                          ) -> None:
    """Commit times need not follow the graph (a rebase keeps author order but a skewed
    clock or a cherry-pick can date a child before its parent): the oldest pending change is
    the earliest time, per path and overall."""
    repo.write("a.md", "a1\n")
    indexed = repo.commit("base")                       # minute 1
    repo.n = 9
    repo.write("a.md", "a2\n")
    repo.commit("dated later")                          # minute 10
    repo.n = 4
    repo.write("a.md", "a3\n")
    repo.write("b.md", "b1\n")
    head = repo.commit("dated earlier, made after")     # minute 5
    with GitRepo(repo.root) as git:
        five = T0 + timedelta(minutes=5)
        assert pending(git, indexed, head) == Pending(2, five, {"a.md": five, "b.md": five})


def test_only_paths_that_differ_are_pending(repo: _Repo) -> None:
    """A change undone before the next sync, and a rebase that rewrote commits but not
    files, leave the indexed version of those paths current."""
    def change_then_undo(tag: str) -> str:
        repo.write("a.md", "a2\n")
        repo.commit(f"change a{tag}")
        repo.write("a.md", "a1\n")
        repo.write("b.md", "b2\n")
        return repo.commit(f"undo a, change b{tag}")

    repo.write("a.md", "a1\n")
    repo.write("b.md", "b1\n")
    base = repo.commit("base")
    undone = change_then_undo("")
    with GitRepo(repo.root) as git:
        assert pending(git, base, undone) == Pending(
            2, repo.times[undone], {"b.md": repo.times[undone]})
    # Rewrite history: the same two changes as new commits (new times) on base.
    repo.git("reset", "-q", "--hard", base)
    rewritten = change_then_undo(", again")
    with GitRepo(repo.root) as git:
        assert not is_ancestor(git, undone, rewritten)
        assert pending(git, undone, rewritten) == Pending(2, None, {}, True, frozenset())
        # Against the base, b.md differs either way.
        assert pending(git, base, rewritten).by_path == {"b.md": repo.times[rewritten]}


def test_last_changes_stops_once_every_path_is_found(repo: _Repo) -> None:
    repo.write("old.md", "old\n")
    for i in range(30):
        repo.write("churn.md", f"{i}\n")
        repo.commit(f"churn {i}")
    head = repo.commit("empty")
    read: list[int] = []

    class Counting(GitRepo):
        def stream(self, *args: str, chunk: int = 1 << 16) -> Generator[bytes, None, None]:
            for data in super().stream(*args, chunk=64):
                read.append(len(data))
                yield data

    with Counting(repo.root) as git:
        total = len(git.run("log", "-z", "--format=%x00%H %ct", "--name-only", "--no-renames",
                            "--root", "--first-parent", head))
        assert last_changes(git, head, ["churn.md"]) == {
            "churn.md": Revision(repo.git("rev-parse", "HEAD~1"), T0 + timedelta(minutes=30))}
        assert sum(read) < total / 4  # the newest commits only, then git was stopped
        read.clear()
        assert last_changes(git, head, ["old.md"])["old.md"].time == T0 + timedelta(minutes=1)
        assert sum(read) == total  # the whole history, to the root


def test_merges_date_from_when_the_branch_got_them(repo: _Repo) -> None:
    repo.write("main.md", "m1\n")
    repo.write("side.md", "s1\n")
    c1 = repo.commit("base")
    repo.git("checkout", "-q", "-b", "side")
    repo.write("side.md", "s2\n")
    side = repo.commit("side work")                         # minute 2
    repo.git("checkout", "-q", "main")
    repo.write("main.md", "m2\n")
    c3 = repo.commit("main work")                           # minute 3: indexed
    repo.n += 1
    repo.git("merge", "-q", "--no-ff", "-m", "merge side", "side")
    merge = repo.git("rev-parse", "HEAD")                   # minute 4
    with GitRepo(repo.root) as git:
        assert commit_time(git, merge) == T0 + timedelta(minutes=4)
        # The side commit is older than the indexed one, yet main.md's index went stale
        # only when the merge brought side.md in.
        assert pending(git, c3, merge) == Pending(1, T0 + timedelta(minutes=4),
                                                  {"side.md": T0 + timedelta(minutes=4)})
        assert last_changes(git, merge, ["side.md", "main.md"]) == {
            "side.md": Revision(merge, T0 + timedelta(minutes=4)),
            "main.md": Revision(c3, repo.times[c3])}
        assert is_ancestor(git, side, merge) and is_ancestor(git, c1, merge)
        assert not is_ancestor(git, merge, c3)


def test_force_push_rewrite(repo: _Repo) -> None:
    repo.write("a.md", "1\n")
    c1 = repo.commit()
    repo.write("a.md", "2\n")
    c2 = repo.commit()
    repo.write("b.md", "b\n")
    c3 = repo.commit()  # indexed
    repo.git("reset", "-q", "--hard", c1)
    repo.write("a.md", "rewritten\n")
    c4 = repo.commit("rewrite")
    with GitRepo(repo.root) as git:
        assert resolve(git, "main") == c4
        assert has_commit(git, c3) and has_commit(git, c2)  # still in the object store
        assert not is_ancestor(git, c3, c4)
        assert is_ancestor(git, c1, c4) and is_ancestor(git, c4, c4)
        assert not has_commit(git, "0123456789" * 4)
        assert not is_ancestor(git, "0123456789" * 4, c4)
        with pytest.raises(NotFound):
            is_ancestor(git, c1, "0123456789" * 4)
        # What c4 has that c3 lacks: only the rewrite (c1 is shared).
        # ... and the index holds what c2 and c3 changed, which the ref no longer has.
        assert pending(git, c3, c4) == Pending(1, repo.times[c4], {"a.md": repo.times[c4]},
                                               True, frozenset({"a.md", "b.md"}))
        # A branch moved back: nothing new, but b.md (from c3) is no longer in the source.
        assert pending(git, c3, c2) == Pending(0, None, {}, True, frozenset({"b.md"}))
        # The diff across the rewrite is still exact; the caller reconciles by content.
        spec = SourceSpec(str(repo.root))
        assert diff(git, c3, c4, spec).deleted == ["b.md"]
        assert diff(git, c3, c4, spec).modified == ["a.md"]
        with pytest.raises(InvalidArgument):
            has_commit(git, "main")


# -- sources -------------------------------------------------------------------------------


def test_url_source_is_mirrored_and_fetched(tmp_path: Path) -> None:
    upstream = _Repo(tmp_path / "upstream")
    upstream.write("a.md", "one\n")
    c1 = upstream.commit()
    upstream.git("tag", "v1")
    upstream.git("branch", "feature")
    url = upstream.root.as_uri()
    cache = tmp_path / "cache"
    spec = SourceSpec(url)

    git = open_source(spec, cache)
    try:
        assert git.path == cache / hashlib.sha256(url.encode()).hexdigest()
        assert git.run("rev-parse", "--is-bare-repository").strip() == b"true"
        assert resolve(git, "HEAD") == resolve(git, "main") == resolve(git, "v1") == c1
        assert [p.name for p in cache.iterdir()] == [git.path.name]  # no scratch left
        assert set(snapshot(git, c1, spec).entries) == {"a.md"}

        upstream.write("a.md", "two\n")
        c2 = upstream.commit()
        assert resolve(git, "HEAD") == c1  # until fetched
        assert not has_commit(git, c2)
        stamp = git.path / "retriever-fetched"
        assert not stamp.exists()  # as of the clone: dated by the mirror's HEAD
        fetch(git, spec)
        assert resolve(git, "HEAD") == c2
        # What a URL source's checked_at is dated by: the last fetch that succeeded (git
        # writes nothing when a fetch brings nothing, and FETCH_HEAD is off).
        fetched = stamp.stat().st_mtime
        os.utime(stamp, (fetched - 100, fetched - 100))
        fetch(git, spec)  # nothing new: still a successful read of the remote
        assert stamp.stat().st_mtime >= fetched - 1
        assert commit_time(git, c2) == upstream.times[c2]
        assert diff(git, c1, c2, spec).modified == ["a.md"]

        # A force-push upstream and a deleted branch: the mirror follows both.
        upstream.git("reset", "-q", "--hard", c1)
        upstream.write("b.md", "other\n")
        c3 = upstream.commit("rewrite")
        upstream.git("branch", "-D", "feature")
        fetch(git, spec)
        assert resolve(git, "HEAD") == c3
        assert not is_ancestor(git, c2, c3)
        with pytest.raises(NotFound):
            resolve(git, "feature")

        # The default branch moves: HEAD follows it.
        upstream.git("checkout", "-q", "-b", "trunk")
        c4 = upstream.commit("on trunk")
        fetch(git, spec)
        assert resolve(git, "HEAD") == c4 and resolve(git, "trunk") == c4

        # Opening again reuses the mirror as it is.
        again = open_source(spec, cache)
        assert again.path == git.path and resolve(again, "HEAD") == c4
        again.close()
    finally:
        git.close()


def test_unreachable_url_is_unavailable(tmp_path: Path) -> None:
    spec = SourceSpec("https://user:s3cret@127.0.0.1:1/none.git")
    with pytest.raises(Unavailable) as err:
        open_source(spec, tmp_path / "cache", timeout_s=20)
    assert "s3cret" not in err.value.message and "***" in err.value.message
    assert list((tmp_path / "cache").iterdir()) == []
    with pytest.raises(InvalidArgument):
        open_source(SourceSpec("gopher://example.org/repo"), tmp_path / "cache")


def test_local_source_checks(tmp_path: Path, repo: _Repo) -> None:
    repo.write("sub/a.md", "a\n")
    head = repo.commit()
    spec = SourceSpec(str(repo.root))
    with open_source(spec, tmp_path / "unused") as git:
        assert git.path == repo.root.resolve()
        assert resolve(git, spec.ref) == head
        fetch(git, spec)  # nothing to fetch for a local repository
    assert not (tmp_path / "unused").exists()

    bare = tmp_path / "bare.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(repo.root), str(bare)], check=True,
                   env=GIT_ENV, capture_output=True)
    with open_source(SourceSpec(str(bare)), tmp_path / "unused") as git:
        assert resolve(git, "main") == head

    (tmp_path / "plain").mkdir()
    for location in (str(tmp_path / "plain"), str(tmp_path / "missing"),
                     str(repo.root / "sub")):
        with pytest.raises(InvalidArgument) as err:
            open_source(SourceSpec(location), tmp_path / "unused")
        assert err.value.field == "location"


def test_values_that_look_like_options_never_run(tmp_path: Path, repo: _Repo) -> None:
    repo.write("a.md", "a\n")
    repo.commit()
    marker = tmp_path / "pwned"
    payload = f"--upload-pack=touch {marker}"
    with pytest.raises(InvalidArgument) as err:
        SourceSpec(payload)
    assert err.value.field == "location"
    with pytest.raises(InvalidArgument) as err:
        SourceSpec(str(repo.root), ref=f"--output={marker}")
    assert err.value.field == "ref"

    with GitRepo(repo.root) as git:
        for ref in (payload, f"--output={marker}", "--all"):
            with pytest.raises(NotFound) as missing:
                resolve(git, ref)
            assert ref in missing.value.message
    # A transport that would run a command, and a URL carrying an option, stay inert.
    for location in (f"ext::sh -c touch% {marker}",
                     f"file://{tmp_path}/none --upload-pack=touch {marker}"):
        with pytest.raises((InvalidArgument, Unavailable)):
            open_source(SourceSpec(location), tmp_path / "cache")
    assert not marker.exists()


def test_missing_ref_names_it(repo: _Repo) -> None:
    repo.write("a.md", "a\n")
    repo.commit()
    with GitRepo(repo.root) as git, pytest.raises(NotFound) as err:
        resolve(git, "no-such-branch")
    assert "no-such-branch" in err.value.message and err.value.field == "ref"


def test_object_reads_are_thread_safe(repo: _Repo) -> None:
    contents = {f"f{i}.md": f"file {i}\n" * (i + 1) for i in range(16)}
    for path, text in contents.items():
        repo.write(path, text)
    head = repo.commit()
    errors: list[BaseException] = []
    with GitRepo(repo.root) as git:
        snap = snapshot(git, head, SourceSpec(str(repo.root)))

        def reader() -> None:
            try:
                for _ in range(20):
                    for path, entry in snap.entries.items():
                        assert read_text(git, entry) == contents[path]
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=reader) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        with pytest.raises(Exception, match="missing"):
            git.object("0" * 40)
        assert read_text(git, snap.entries["f0.md"]) == "file 0\n"  # still in step
    git.close()  # idempotent
    assert read_text(git, snap.entries["f1.md"]) == contents["f1.md"]  # restarts
    git.close()


@pytest.mark.parametrize("field", ["include", "exclude"])
@pytest.mark.parametrize("glob", ["[z-a]", "*.[9-0]"])
def test_a_glob_that_does_not_compile_is_invalid_argument_naming_it(field: str, glob: str
                                                                    ) -> None:
    with pytest.raises(InvalidArgument) as info:
        SourceSpec("/repo", **{field: ["*.py", glob]})
    assert info.value.field == field and repr(glob) in str(info.value)
