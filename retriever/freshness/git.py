"""The git engine under source syncing: what a commit holds, what changed, how far behind.

A pure library over git plumbing (no checkout, no work tree, no grpc). A source is a local
repository used in place or a URL mirrored as a bare repository in a cache directory; either
way it is read at commits, so uncommitted edits of a local work tree are never seen.

Which files count follows `retriever index` (`retriever.ingest.walk`): regular files only
(no symlinks, no submodules), none over a size limit, none binary (a NUL byte) or not UTF-8;
plus the source's include/exclude globs and a fixed list of vendored/generated paths. Path,
type and size rules are decided from the tree alone; binary and UTF-8 only when a blob is
read (`read_text`), so the caller records those skips.

History questions (`last_changes`, `pending`) follow the first-parent line of the tracked
ref: a change that a merge brought in dates from the merge, which is when the tracked branch
got it, not from when it was written on a side branch.

Safety: git runs without a shell, every user value sits after `--end-of-options` or `--` (or
is validated first), prompts are off, and the system and user's global git config are
ignored so that results do not depend on the machine.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import NamedTuple, Self

import pathspec

from retriever.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    RetrieverError,
    Unavailable,
)

__all__ = [
    "BINARY_PROBE_BYTES", "DEFAULT_MAX_FILE_BYTES", "VENDORED_PATTERNS", "Changes", "Entry",
    "GitRepo", "Pending", "Rename", "Revision", "Snapshot", "SourceSpec", "commit_time",
    "diff", "fetch", "has_commit", "is_ancestor", "is_url", "last_changes", "open_source",
    "pending", "read_text", "resolve", "snapshot",
]

DEFAULT_MAX_FILE_BYTES = 1024 * 1024

#: A NUL byte within this many leading bytes makes a blob binary (git's own heuristic).
BINARY_PROBE_BYTES = 8000

#: Vendored and generated paths, gitignore-style: never indexed, whatever the globs say.
VENDORED_PATTERNS: tuple[str, ...] = (
    "vendor/", "node_modules/", "third_party/", ".git/",
    "*.min.js", "*.min.css", "*.lock", "package-lock.json", "*.pb.go", "*_pb2.py",
)

_VENDORED = pathspec.GitIgnoreSpec.from_lines(VENDORED_PATTERNS)

_REGULAR_PREFIX = "100"  # 100644, 100755 (and the odd 100664 of old repositories)
_SYMLINK = "120000"
_SUBMODULE = "160000"

_OID = re.compile(r"[0-9a-f]{40}(?:[0-9a-f]{24})?")  # SHA-1 or SHA-256, full length
_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_SCP = re.compile(r"[\w.-]+@[\w.-]+:")  # user@host:path, git's scp-like ssh syntax
_SCHEMES = frozenset({"file", "http", "https", "ssh", "git", "git+ssh", "ssh+git"})
_USERINFO = re.compile(r"(://)[^/@\s]+@")

# Variables that would point git at another repository than `-C` names, or inject config.
_SCRUBBED_ENV = (
    "GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY", "GIT_COMMON_DIR",
    "GIT_ALTERNATE_OBJECT_DIRECTORIES", "GIT_NAMESPACE", "GIT_CEILING_DIRECTORIES",
    "GIT_CONFIG", "GIT_CONFIG_PARAMETERS", "GIT_CONFIG_COUNT", "GIT_QUARANTINE_PATH",
    "GIT_REPLACE_REF_BASE", "GIT_GRAFT_FILE", "GIT_SHALLOW_FILE",
)
# Command-line config wins over a repository's own: output formats stay parseable and no
# transport can run a command.
_CONFIG = ("-c", "color.ui=never", "-c", "log.showSignature=false",
           "-c", "core.quotePath=false", "-c", "protocol.ext.allow=never",
           "-c", "core.fsmonitor=false")


def _git_env() -> dict[str, str]:
    # The child's environment, not configuration: inherit PATH, HOME and credential
    # helpers' variables (GIT_SSH_COMMAND...), minus what would change which repo is read.
    env = {k: v for k, v in os.environ.items()
           if k not in _SCRUBBED_ENV and not k.startswith("GIT_CONFIG_KEY_")
           and not k.startswith("GIT_CONFIG_VALUE_")}
    env.update(GIT_TERMINAL_PROMPT="0", GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL="/dev/null",
               GIT_OPTIONAL_LOCKS="0", LC_ALL="C")
    return env


class GitRepo:
    """Plumbing over one repository: commands through `git -C <path>`, objects through one
    long-lived `git cat-file --batch` (thread-safe). Close it, or use it as a context manager.

    ``error`` builds the exception a failed command raises (FailedPrecondition unless the
    caller says otherwise), so each user keeps the status its callers expect."""

    def __init__(self, path: str | Path,
                 *, error: Callable[[str], RetrieverError] = FailedPrecondition,
                 trusted: bool = False) -> None:
        """``trusted``: read the repository whoever owns it (git's safe.directory for this
        path; the global config that would say so is ignored here): for local sources, which
        lie under the admin's sync roots."""
        self.path = Path(path)
        self._trust = ("-c", f"safe.directory={self.path}") if trusted else ()
        self._error = error
        self._env = _git_env()
        self._batch: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    def _argv(self, args: Sequence[str]) -> list[str]:
        return ["git", "-C", str(self.path), *_CONFIG, *self._trust, *args]

    def run(self, *args: str, input: bytes | None = None,
            timeout: float | None = None) -> bytes:
        """stdout of `git <args>`; a non-zero exit raises ``error`` with git's message."""
        proc = self.call(*args, input=input, timeout=timeout)
        if proc.returncode != 0:
            raise self._failed(args, proc.stderr)
        return proc.stdout

    def try_run(self, *args: str) -> bytes | None:
        """stdout of `git <args>`, or None when it exits non-zero (a question answered no)."""
        proc = self.call(*args)
        return proc.stdout if proc.returncode == 0 else None

    def call(self, *args: str, input: bytes | None = None,
             timeout: float | None = None) -> subprocess.CompletedProcess[bytes]:
        """`git <args>` run to the end, whatever its exit status; Unavailable past
        ``timeout`` seconds."""
        try:
            return subprocess.run(self._argv(args), input=input, capture_output=True,
                                  stdin=None if input is not None else subprocess.DEVNULL,
                                  env=self._env, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            raise Unavailable(f"git {' '.join(args[:3])} in {self.path} took over "
                              f"{timeout:g} s; retry later") from exc
        except FileNotFoundError as exc:
            raise FailedPrecondition("git is not installed (no `git` on PATH)") from exc

    def _failed(self, args: Sequence[str], stderr: bytes) -> RetrieverError:
        return self._error(f"git {' '.join(args[:3])} failed in {self.path}: "
                           f"{stderr.decode(errors='replace').strip()}")

    def stream(self, *args: str, chunk: int = 1 << 16) -> Generator[bytes, None, None]:
        """stdout of `git <args>` in chunks as it comes. Closing the iterator early stops
        git; a non-zero exit after reading everything raises ``error``."""
        proc = subprocess.Popen(self._argv(args), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self._env)
        assert proc.stdout is not None and proc.stderr is not None
        finished = False
        try:
            while data := proc.stdout.read(chunk):
                yield data
            stderr = proc.stderr.read()
            finished = True
            if proc.wait() != 0:
                raise self._failed(args, stderr)
        finally:
            if not finished:
                proc.kill()
            proc.stdout.close()
            proc.stderr.close()
            proc.wait()

    def object(self, oid: str) -> bytes:
        """The raw content of an object (any name `cat-file --batch` takes)."""
        if not oid or any(c.isspace() for c in oid):  # one request per line
            raise self._error(f"git object {oid!r} is missing in {self.path}")
        with self._lock:
            if self._batch is None:
                self._batch = subprocess.Popen(
                    self._argv(["cat-file", "--batch"]), stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=self._env)
            batch = self._batch
            assert batch.stdin is not None and batch.stdout is not None
            try:
                batch.stdin.write(oid.encode() + b"\n")
                batch.stdin.flush()
                header = batch.stdout.readline().split()
                if len(header) != 3:
                    if not header:  # the process died: start a fresh one next time
                        self._stop_batch()
                    raise self._error(f"git object {oid} is missing in {self.path}")
                size = int(header[2])
                data = batch.stdout.read(size)
                batch.stdout.read(1)  # the newline after the object
                if len(data) != size:
                    self._stop_batch()
                    raise self._error(f"git cat-file stopped while reading {oid} in "
                                      f"{self.path}")
            except (OSError, ValueError) as exc:  # a broken pipe, a garbled header
                self._stop_batch()
                raise self._error(f"git cat-file failed in {self.path}: {exc}") from exc
            return data

    def sizes(self, oids: Iterable[str]) -> dict[str, int]:
        """Object sizes in bytes, in one `cat-file --batch-check`; missing objects are left
        out."""
        wanted = sorted(set(oids))
        if not wanted:
            return {}
        out = self.run("cat-file", "--batch-check=%(objectname) %(objectsize)",
                       input="".join(o + "\n" for o in wanted).encode())
        sizes: dict[str, int] = {}
        for line in out.decode().splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1].isdigit():
                sizes[parts[0]] = int(parts[1])
        return sizes

    def _stop_batch(self) -> None:
        batch, self._batch = self._batch, None
        if batch is None:
            return
        assert batch.stdin is not None and batch.stdout is not None
        with contextlib.suppress(OSError):  # a dead process's pipe
            batch.stdin.close()
        batch.stdout.close()
        try:
            batch.wait(timeout=5)
        except subprocess.TimeoutExpired:
            batch.kill()
            batch.wait()

    def close(self) -> None:
        """Stop the `cat-file` process; the repository stays usable (a read restarts it)."""
        with self._lock:
            self._stop_batch()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GitRepo({str(self.path)!r})"


# -- sources -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceSpec:
    """Where a namespace's documents come from and which of its files count.

    ``location``: a local repository path (used in place) or a URL (file, http(s), ssh,
    git schemes, or ssh's ``user@host:path``). ``ref``: a branch, tag or commit.
    ``include``/``exclude``: gitignore-style globs over repository-relative paths; an empty
    include means every path. ``max_file_bytes``: larger files are skipped."""

    location: str
    ref: str = "HEAD"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    _include: pathspec.PathSpec | None = field(init=False, repr=False, compare=False,
                                               default=None)
    _exclude: pathspec.PathSpec | None = field(init=False, repr=False, compare=False,
                                               default=None)

    def __post_init__(self) -> None:
        for name, value in (("location", self.location), ("ref", self.ref)):
            if not value or "\0" in value or "\n" in value:
                raise InvalidArgument(f"{name} must be a non-empty single line",
                                      field=name)
            if value.startswith("-"):
                raise InvalidArgument(f"{name} {value!r} looks like a command-line option",
                                      field=name)
        if self.max_file_bytes < 1:
            raise InvalidArgument(f"max_file_bytes must be >= 1, got {self.max_file_bytes}",
                                  field="max_file_bytes")
        for name in ("include", "exclude"):
            patterns = getattr(self, name)
            if isinstance(patterns, str):
                raise InvalidArgument(f"{name} must be a sequence of globs, not one string",
                                      field=name)
            patterns = tuple(patterns)
            object.__setattr__(self, name, patterns)
            try:
                compiled = pathspec.GitIgnoreSpec.from_lines(patterns) if patterns else None
            except (ValueError, TypeError, re.error) as exc:  # re.error: e.g. "[z-a]"
                bad = next((p for p in patterns if not _compiles(p)), None)
                shown = f"{bad!r} " if bad is not None else ""
                raise InvalidArgument(f"{name} has an invalid glob {shown}({exc}): fix or "
                                      "drop it", field=name) from exc
            object.__setattr__(self, "_" + name, compiled)

    def excluded(self, path: str) -> bool:
        """Whether the globs leave ``path`` out."""
        if self._include is not None and not self._include.match_file(path):
            return True
        return self._exclude is not None and self._exclude.match_file(path)


def _compiles(pattern: str) -> bool:
    try:
        pathspec.GitIgnoreSpec.from_lines([pattern])
    except (ValueError, TypeError, re.error):
        return False
    return True


def is_url(location: str) -> bool:
    """Whether ``location`` names a remote (mirrored) rather than a local path."""
    return bool(_URL.match(location) or _SCP.match(location))


def open_source(spec: SourceSpec, cache_dir: str | Path,
                *, timeout_s: float | None = 600.0) -> GitRepo:
    """The repository of a source: a local path as it is (it must be the top of a git
    repository, bare or not), a URL as a bare mirror under ``cache_dir/<sha256 of url>``,
    cloned on first use (refresh it with `fetch`).

    Raises InvalidArgument for a location that is no repository or an unsupported URL,
    Unavailable when the clone fails or times out."""
    if not is_url(spec.location):
        return _open_local(spec.location)
    scheme = _URL.match(spec.location)
    if scheme and scheme.group(1).lower() not in _SCHEMES:
        raise InvalidArgument(f"unsupported URL scheme {scheme.group(1)!r} in "
                              f"{redact(spec.location)}", field="location")
    cache = Path(cache_dir)
    target = mirror_path(cache, spec.location)
    if not (target / "HEAD").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        _clone(spec, cache, target, timeout_s)
    return GitRepo(target)


def fetched_stamp(mirror: str | Path) -> Path:
    """The file whose mtime is a mirror's last successful fetch (absent: its clone)."""
    return Path(mirror) / "retriever-fetched"


def mirror_path(cache_dir: str | Path, location: str) -> Path:
    """Where the bare mirror of the URL ``location`` lives under ``cache_dir``."""
    return Path(cache_dir) / hashlib.sha256(location.encode()).hexdigest()


def _open_local(location: str) -> GitRepo:
    path = Path(location)
    try:
        if not path.is_dir():
            raise InvalidArgument(f"source {location!r} is not a directory", field="location")
        real = path.resolve()
    except (OSError, RuntimeError) as exc:  # a name too long, a symlink loop
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise InvalidArgument(f"source {location!r} cannot be opened ({reason})",
                              field="location") from None

    def error(message: str) -> RetrieverError:
        return InvalidArgument(f"source {location!r} is not a usable git repository "
                               f"({message})", field="location")

    probe = GitRepo(real, error=error, trusted=True)
    out = probe.run("rev-parse", "--absolute-git-dir", "--is-inside-work-tree")
    git_dir, inside = out.decode("utf-8", "surrogateescape").splitlines()[:2]
    if Path(git_dir).resolve() == real:  # a bare repository, or a .git directory
        return GitRepo(real, trusted=True)
    top = probe.try_run("rev-parse", "--show-toplevel") if inside == "true" else None
    if top is not None and Path(top.decode("utf-8", "surrogateescape").strip()) == real:
        return GitRepo(real, trusted=True)
    # (Not naming that repository: it may lie outside what the caller may sync.)
    raise InvalidArgument(f"source {location!r} lies inside a git repository, not at its top: "
                          "name the repository's top directory", field="location")


def _clone(spec: SourceSpec, cache: Path, target: Path, timeout_s: float | None) -> None:
    # Built in a scratch directory and renamed into place, so that a crash leaves no half
    # mirror and two concurrent first syncs cannot collide (the loser's copy is dropped).
    scratch = Path(tempfile.mkdtemp(prefix=target.name + ".", suffix=".tmp", dir=cache))
    try:
        repo = GitRepo(scratch, error=_fetch_error(spec))
        # A bare clone copies branches and tags (not refs/pull/* and such, as --mirror
        # would) and points HEAD at the remote's default branch.
        repo.run("clone", "--bare", "--quiet", "--end-of-options",
                 spec.location, str(scratch), timeout=timeout_s)
        repo.run("config", "--replace-all", "remote.origin.fetch",
                 "+refs/heads/*:refs/heads/*")
        repo.run("config", "--add", "remote.origin.fetch", "+refs/tags/*:refs/tags/*")
        try:
            scratch.rename(target)
        except OSError:
            if not (target / "HEAD").is_file():
                raise
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)


def redact(text: str) -> str:
    """``text`` without the user:password part of URLs."""
    return _USERINFO.sub(r"\1***@", text)


def _fetch_error(spec: SourceSpec) -> Callable[[str], RetrieverError]:
    def error(message: str) -> RetrieverError:
        return Unavailable(f"cannot fetch {redact(spec.location)}: {redact(message)}")
    return error


def fetch(repo: GitRepo, spec: SourceSpec, *, timeout_s: float | None = 600.0) -> None:
    """Bring a URL source's mirror up to date: every branch and tag, force-updated (a
    force-push upstream rewrites them here too) and pruned; for ``ref`` HEAD also the
    remote's default branch. A local source is read in place and needs no fetch.

    Two fetches of one mirror must not run at once (git's ref locks would fail one).
    Raises Unavailable when git cannot reach the remote or takes over ``timeout_s``."""
    if not is_url(spec.location):
        return
    remote = GitRepo(repo.path, error=_fetch_error(spec))
    # Branches and tags rather than only `ref`: any of them, or a commit on them, resolves
    # afterwards without knowing what kind of name `ref` is.
    remote.run("fetch", "--prune", "--force", "--quiet", "--no-write-fetch-head", "origin",
               timeout=timeout_s)
    # When the mirror was last current (git writes nothing on a fetch that brings nothing,
    # and FETCH_HEAD is off): what a URL source's checked_at and staleness are measured from.
    fetched_stamp(repo.path).touch()
    if spec.ref == "HEAD":
        out = remote.run("ls-remote", "--symref", "origin", "HEAD", timeout=timeout_s)
        for line in out.decode("utf-8", "surrogateescape").splitlines():
            target, _, name = line.removeprefix("ref: ").partition("\t")
            if line.startswith("ref: ") and name == "HEAD" \
                    and target.startswith("refs/heads/"):
                repo.run("symbolic-ref", "HEAD", target)


# -- commits -----------------------------------------------------------------------------


def resolve(repo: GitRepo, ref: str) -> str:
    """The full sha of the commit ``ref`` names; NotFound (field "ref") when none."""
    out = repo.try_run("rev-parse", "--verify", "--quiet", "--end-of-options",
                       ref + "^{commit}")
    if out is None or not out.strip():
        raise NotFound(f"ref {ref!r} does not name a commit in {repo.path}", field="ref")
    return out.decode().strip()


def has_commit(repo: GitRepo, sha: str) -> bool:
    """Whether the repository holds commit ``sha`` (a force-push upstream, then a gc, can
    drop one that was indexed)."""
    _check_oid(sha)
    return repo.try_run("rev-parse", "--verify", "--quiet", "--end-of-options",
                        sha + "^{commit}") is not None


def is_ancestor(repo: GitRepo, old: str, new: str) -> bool:
    """Whether ``new`` descends from (or is) ``old``. False when ``old`` is unknown, so the
    caller that indexed ``old`` knows to reconcile in full rather than by diff."""
    _check_oid(old)
    _check_oid(new)
    if not has_commit(repo, old):
        return False
    args = ("merge-base", "--is-ancestor", "--end-of-options", old, new)
    proc = repo.call(*args)
    if proc.returncode not in (0, 1):  # 1: not an ancestor; more: an unknown ``new``
        raise NotFound(f"commit {new} is not in {repo.path}", field="commit")
    return proc.returncode == 0


def commit_time(repo: GitRepo, sha: str) -> datetime:
    """The committer time of ``sha``, in UTC: when the commit reached its branch, as near as
    git records it."""
    _check_oid(sha)
    for line in repo.object(sha).split(b"\n"):
        if not line:  # the end of the headers
            break
        if line.startswith(b"committer "):
            return datetime.fromtimestamp(int(line.rsplit(b" ", 2)[1]), UTC)
    raise InvalidArgument(f"{sha} is not a commit in {repo.path}", field="commit")


def _check_oid(sha: str) -> None:
    if not _OID.fullmatch(sha):
        raise InvalidArgument(f"{sha!r} is not a full commit sha", field="commit")


# -- trees -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """A file at a commit: its repository-relative posix path, blob id, git mode and size in
    bytes."""

    path: str
    blob_oid: str
    mode: str
    size: int


@dataclass(frozen=True)
class Snapshot:
    """The files of a commit that pass the rules, by path, and the paths left out with the
    reason ("excluded", "vendored", "submodule", "symlink", "not-a-file", "too-large",
    "not-utf8" for a file name; `read_text` adds "binary" and "not-utf8" for content)."""

    entries: dict[str, Entry]
    skipped: dict[str, str]


def _display(raw: bytes) -> tuple[str, bool]:
    """(path, whether the name is valid UTF-8); an invalid one is shown with escapes."""
    try:
        return raw.decode("utf-8"), True
    except UnicodeDecodeError:
        return raw.decode("utf-8", "backslashreplace"), False


def _skip_reason(spec: SourceSpec, path: str, mode: str, size: int | None,
                 utf8_name: bool) -> str | None:
    """Why a tree entry is no document, or None. User globs first, then the fixed vendored
    list, then the entry's type and size."""
    if not utf8_name:
        return "not-utf8"
    if spec.excluded(path):
        return "excluded"
    if _VENDORED.match_file(path):
        return "vendored"
    if mode == _SUBMODULE:
        return "submodule"
    if mode == _SYMLINK:
        return "symlink"
    if not mode.startswith(_REGULAR_PREFIX):
        return "not-a-file"
    if size is None or size > spec.max_file_bytes:
        return "too-large"
    return None


def snapshot(repo: GitRepo, commit: str, spec: SourceSpec) -> Snapshot:
    """Every file at ``commit`` that passes the path, type and size rules (one
    `ls-tree -r -z --long`)."""
    _check_oid(commit)
    entries: dict[str, Entry] = {}
    skipped: dict[str, str] = {}
    for rec in repo.run("ls-tree", "-r", "-z", "--long", "--end-of-options",
                        commit).split(b"\0"):
        if not rec:
            continue
        meta, _, raw = rec.partition(b"\t")
        mode, _kind, oid, size = meta.decode().split()
        path, utf8 = _display(raw)
        reason = _skip_reason(spec, path, mode, int(size) if size.isdigit() else None, utf8)
        if reason:
            skipped[path] = reason
        else:
            entries[path] = Entry(path, oid, mode, int(size))
    return Snapshot(entries, skipped)


def _classify(data: bytes) -> tuple[str | None, str]:
    """(text, "") of a blob, or (None, why not: "binary" or "not-utf8") by `retriever
    index`'s content rules: a NUL early on, or anywhere in valid UTF-8, means binary."""
    if b"\0" in data[:BINARY_PROBE_BYTES]:
        return None, "binary"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None, "not-utf8"
    if "\0" in text:
        return None, "binary"
    return text, ""


def read_text(repo: GitRepo, entry: Entry,
              skipped: dict[str, str] | None = None) -> str | None:
    """The text of ``entry``'s blob, or None when it is binary (a NUL byte) or not UTF-8;
    the reason then goes into ``skipped`` when given (a `Snapshot.skipped`, say)."""
    text, reason = _classify(repo.object(entry.blob_oid))
    if text is None and skipped is not None:
        skipped[entry.path] = reason
    return text


# -- changes -----------------------------------------------------------------------------


class Rename(NamedTuple):
    old_path: str
    new_path: str
    similarity: int  # percent, as git scores it


@dataclass(frozen=True)
class Changes:
    """What turned ``old`` into ``new``, as the caller's index sees it: only paths in scope
    on a side count, so moving a file out of scope is a delete and into scope an add.

    ``entries`` holds the new side of every added, modified and renamed path (to read its
    text: one that now reads as binary or not UTF-8 must leave the index). ``skipped``:
    new-side paths out of scope, with the reason. Paths are sorted."""

    added: list[str]
    modified: list[str]
    deleted: list[str]
    renamed: list[Rename]
    entries: dict[str, Entry]
    skipped: dict[str, str]

    def __bool__(self) -> bool:
        return bool(self.added or self.modified or self.deleted or self.renamed)


class _Raw(NamedTuple):
    status: str
    score: int
    old_mode: str
    new_mode: str
    old_oid: str
    new_oid: str
    old_path: bytes
    new_path: bytes


def _parse_raw(out: bytes) -> list[_Raw]:
    """Records of `diff-tree -r -z --raw`: ":old new oldoid newoid status" NUL path NUL
    (NUL new-path, for renames and copies)."""
    fields = out.split(b"\0")
    records: list[_Raw] = []
    i = 0
    while i < len(fields) and fields[i].startswith(b":"):
        old_mode, new_mode, old_oid, new_oid, status = fields[i][1:].decode().split()
        score = int(status[1:]) if status[1:].isdigit() else 0
        if status[0] in "RC":
            records.append(_Raw(status[0], score, old_mode, new_mode, old_oid, new_oid,
                                fields[i + 1], fields[i + 2]))
            i += 3
        else:
            records.append(_Raw(status[0], score, old_mode, new_mode, old_oid, new_oid,
                                fields[i + 1], fields[i + 1]))
            i += 2
    return records


def diff(repo: GitRepo, old: str, new: str, spec: SourceSpec) -> Changes:
    """The changes from commit ``old`` to ``new`` (`diff-tree -r -z --raw -M`), filtered by
    the same rules as `snapshot`: a path is in scope on a side when `snapshot` of that side
    would list it."""
    _check_oid(old)
    _check_oid(new)
    records = _parse_raw(repo.run("diff-tree", "-r", "-z", "--raw", "-M", "--no-commit-id",
                                  "--no-abbrev", "--end-of-options", old, new))
    null = "0" * len(old)
    sizes = repo.sizes(oid for r in records for oid, mode in
                       ((r.old_oid, r.old_mode), (r.new_oid, r.new_mode))
                       if oid != null and mode.startswith(_REGULAR_PREFIX))
    added: list[str] = []
    modified: list[str] = []
    deleted: list[str] = []
    renamed: list[Rename] = []
    entries: dict[str, Entry] = {}
    skipped: dict[str, str] = {}
    for r in records:
        old_path, old_utf8 = _display(r.old_path)
        new_path, new_utf8 = _display(r.new_path)
        old_in = r.status != "A" and _skip_reason(
            spec, old_path, r.old_mode, sizes.get(r.old_oid), old_utf8) is None
        new_reason = None if r.status == "D" else _skip_reason(
            spec, new_path, r.new_mode, sizes.get(r.new_oid), new_utf8)
        new_in = r.status != "D" and new_reason is None
        if new_reason:
            skipped[new_path] = new_reason
        if new_in:
            entries[new_path] = Entry(new_path, r.new_oid, r.new_mode, sizes[r.new_oid])
        if r.status == "R" and old_in and new_in:
            renamed.append(Rename(old_path, new_path, r.score))
        elif old_in and new_in:
            modified.append(new_path)
        else:
            if old_in:
                deleted.append(old_path)
            if new_in:
                added.append(new_path)
    return Changes(sorted(added), sorted(modified), sorted(deleted), sorted(renamed),
                   entries, skipped)


# -- history -----------------------------------------------------------------------------


class Revision(NamedTuple):
    """The commit that last changed a path, and its committer time (UTC)."""

    commit: str
    time: datetime


@dataclass(frozen=True)
class Pending:
    """Commits of the tracked ref after the indexed one: how many, the committer time of
    the oldest (None when caught up), and per path the committer time of the oldest of them
    that touched it — the moment the indexed version of that path went stale."""

    count: int
    oldest_time: datetime | None
    by_path: dict[str, datetime]
    #: ``indexed`` is no ancestor of ``head`` (a force-push, a branch moved back): the index
    #: then also holds changes the ref no longer has, in these paths.
    diverged: bool = False
    withdrawn: frozenset[str] = frozenset()


# An empty field precedes each commit's header, which no path can be; a commit's first
# path follows its header after a newline.
_LOG_FORMAT = "--format=%x00%H %ct"
_LOG_ARGS = ("log", "-z", _LOG_FORMAT, "--name-only", "--no-renames", "--root",
             "--first-parent", "--diff-merges=first-parent", "--no-show-signature")


def _log(repo: GitRepo, *args: str) -> Generator[tuple[str, datetime, list[str]], None, None]:
    """(sha, committer time, paths it changed) per commit of `git log <args>`, streamed:
    stopping early stops git. Merges count by their diff to the first parent."""
    buffer = b""
    current: tuple[str, datetime] | None = None
    paths: list[str] = []
    header_next = False
    chunks = repo.stream(*_LOG_ARGS, *args)
    try:
        for chunk in chunks:
            buffer += chunk
            *fields, buffer = buffer.split(b"\0")
            for raw in fields:
                if header_next:
                    if current is not None:
                        yield current[0], current[1], paths
                    sha, _, stamp = raw.decode().partition(" ")
                    current, paths, header_next = (sha, datetime.fromtimestamp(
                        int(stamp), UTC)), [], False
                elif not raw:
                    header_next = True
                else:
                    if not paths and raw.startswith(b"\n"):
                        raw = raw[1:]
                    paths.append(raw.decode("utf-8", "backslashreplace"))
        if current is not None:
            yield current[0], current[1], paths
    finally:
        chunks.close()


def last_changes(repo: GitRepo, commit: str, paths: Iterable[str]) -> dict[str, Revision]:
    """For each path, the commit at or before ``commit`` on its first-parent line that last
    changed it: the revision of the document, whose content at that commit is the content at
    ``commit``. One `git log` pass that stops once every path is found; a path missing from
    the history is left out. A rename counts as a change of the new path."""
    _check_oid(commit)
    wanted = set(paths)
    found: dict[str, Revision] = {}
    if not wanted:
        return found
    log = _log(repo, "--end-of-options", commit, "--")
    try:
        for sha, when, changed in log:
            for path in changed:
                if path in wanted and path not in found:
                    found[path] = Revision(sha, when)
            if len(found) == len(wanted):
                break
    finally:
        log.close()
    return found


def commit_times(repo: GitRepo, old: str, new: str, limit: int = 1000) -> list[datetime]:
    """Committer times of the first-parent commits of ``old..new`` (all of ``new``'s when
    ``old`` is empty), newest first, at most ``limit``."""
    _check_oid(new)
    if old:
        _check_oid(old)
    out = repo.run("log", "--first-parent", "--format=%ct", f"--max-count={limit}",
                   "--end-of-options", f"{old}..{new}" if old else new, "--")
    return [datetime.fromtimestamp(int(x), UTC) for x in out.split()]


def pending(repo: GitRepo, indexed: str, head: str) -> Pending:
    """The commits after ``indexed`` up to ``head`` (first-parent commits of
    ``indexed..head``), in one `git log` pass. When ``indexed`` is no ancestor of ``head``
    (a force-push), that is every commit of ``head`` not reachable from it.

    Only paths whose content differs between the two commits are pending (a change undone
    later, a rebase that rewrote commits but not files, leaves the indexed version current),
    each with the earliest committer time of the pending commits that touched it: commit
    times need not follow the graph (rebased or cherry-picked commits, skewed clocks), so
    the earliest is taken, not the first in history order. ``oldest_time`` is the earliest
    of those. NotFound when either commit is unknown."""
    _check_oid(indexed)
    _check_oid(head)
    for sha in (indexed, head):
        if not has_commit(repo, sha):
            raise NotFound(f"commit {sha} is not in {repo.path}", field="commit")
    if indexed == head:
        return Pending(0, None, {})
    differ = set(_changed_paths(repo, indexed, head))
    count = 0
    by_path: dict[str, datetime] = {}
    for _sha, when, changed in _log(repo, "--end-of-options", f"{indexed}..{head}", "--"):
        count += 1
        for path in changed:
            if path in differ and (path not in by_path or when < by_path[path]):
                by_path[path] = when
    oldest = min(by_path.values()) if by_path else None
    if is_ancestor(repo, indexed, head):
        return Pending(count, oldest, by_path)
    withdrawn: set[str] = set()
    for _sha, _when, changed in _log(repo, "--end-of-options", f"{head}..{indexed}", "--"):
        withdrawn.update(p for p in changed if p in differ)
    return Pending(count, oldest, by_path, True, frozenset(withdrawn))


def _changed_paths(repo: GitRepo, old: str, new: str) -> list[str]:
    """The paths whose content or mode differs between two commits (renames as a delete
    and an add, as `_log` reports them)."""
    out = repo.run("diff-tree", "-r", "-z", "--name-only", "--no-renames", "--no-commit-id",
                   "--end-of-options", old, new)
    return [p.decode("utf-8", "backslashreplace") for p in out.split(b"\0") if p]
