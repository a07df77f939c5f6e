"""Which files of a directory to index: what git would track, as text.

Inside a git work tree the file list is git's own (`git ls-files --cached --others
--exclude-standard`: tracked plus untracked-but-not-ignored), so every .gitignore,
.git/info/exclude and global excludes file counts exactly as git reads them. Outside one,
git is asked the same question through a throwaway empty repository whose work tree is the
directory, so .gitignore files still mean exactly what they mean to git. The same holds for
a directory that its enclosing repository ignores. Only where git is not installed is the
directory walked with pathspec's gitignore rules (close to git's, not identical in every
corner).
Binary, oversized and non-UTF-8 files are skipped and reported, never sent. So are symbolic
links that lead out of the tree (a link to /etc/passwd), to a directory, to a file the
listing leaves out (an ignored .env), or nowhere: git tracks a link, not what it points to,
so only a link to a file that is itself indexed is read (under the link's own path).
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pathspec


@dataclass(frozen=True, slots=True)
class SourceFile:
    rel_path: str  # posix, relative to the root: the doc_id
    content: str
    modified_at: datetime
    revision: str


@dataclass(slots=True)
class WalkReport:
    files: int = 0
    bytes: int = 0
    skipped: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, path: str) -> None:
        self.skipped.setdefault(reason, []).append(path)


# git's warning for a directory it could not list (ls-files --others goes on without it).
_UNOPENED_DIR = re.compile(r"^warning: could not open directory '(.*)': ", re.MULTILINE)


def _git(root: Path, *args: str, unreadable: list[str] | None = None) -> str | None:
    """git's stdout; the directories it warned it could not open go to ``unreadable``."""
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    if unreadable is not None:
        unreadable.extend(_UNOPENED_DIR.findall(out.stderr.decode("utf-8", "surrogateescape")))
    return out.stdout.decode("utf-8", "surrogateescape")


def list_files(root: Path, unreadable: list[str] | None = None,
               repos: dict[str, str] | None = None) -> tuple[list[str], str]:
    """Relative posix paths of the files to consider, and the git HEAD sha ("" outside git
    or before the first commit). Directories that could not be listed (relative, ending in
    "/") are appended to ``unreadable``: their files are unknown, not gone. Git
    repositories inside (checkouts under a plain directory, nested or submodule ones) are
    listed by their own rules, their files under their directory; ``repos`` receives each
    one's directory (ending in "/") and HEAD sha."""
    root = Path(root)
    if unreadable is None:
        unreadable = []
    found, nested = _list_files(root, unreadable)
    if repos is None:
        repos = {}
    paths, head = found
    for n in nested:
        inner_unreadable: list[str] = []
        inner_repos: dict[str, str] = {}
        inner, inner_head = list_files(root / n, inner_unreadable, inner_repos)
        paths = paths + [n + p for p in inner]
        unreadable.extend(n + d for d in inner_unreadable)
        repos[n] = inner_head
        repos.update({n + k: v for k, v in inner_repos.items()})
    return sorted(paths), head


def _nested(root: Path, entries: Iterable[str]) -> list[str]:
    """The entries that are git repositories of their own (ending in "/")."""
    out = []
    for e in entries:
        d = e.rstrip("/")
        try:
            if d and (root / d).is_dir() and not (root / d).is_symlink() \
                    and (root / d / ".git").exists():
                out.append(d + "/")
        except OSError:
            continue
    return sorted(set(out))


def _list_files(root: Path, unreadable: list[str]) -> tuple[tuple[list[str], str], list[str]]:
    """(files, HEAD sha) of ``root`` by its own rules, and its nested repositories."""
    inside = _git(root, "rev-parse", "--is-inside-work-tree")
    # A directory that its enclosing repository ignores (a virtualenv, a vendored tree) was
    # named on purpose: list it as a tree of its own rather than as nothing.
    ignored_by_parent = _git(root, "check-ignore", "-q", ".") is not None
    if inside is not None and inside.strip() == "true" and not ignored_by_parent:
        listing = _git(root, "ls-files", "-z", "--cached", "--others", "--exclude-standard",
                       unreadable=unreadable)
        if listing is not None:
            head = (_git(root, "rev-parse", "--verify", "-q", "HEAD") or "").strip()
            entries = [p for p in listing.split("\0") if p]
            paths = sorted({p for p in entries if _listable(root / p)})
            return (paths, head), _nested(root, entries)
    with tempfile.TemporaryDirectory(prefix="retriever-walk-") as scratch:
        if _git(Path(scratch), "init", "-q", "--bare", scratch) is not None:
            listing = _git(root, f"--git-dir={scratch}", f"--work-tree={root}", "ls-files",
                           "-z", "--others", "--exclude-standard", unreadable=unreadable)
            if listing is not None:
                entries = [p for p in listing.split("\0") if p]
                return (sorted(p for p in entries if _listable(root / p)), ""), \
                    _nested(root, entries)
    return (sorted(_walk_gitignore(root, unreadable)), ""), []


def _differ_from(root: Path, head: str) -> set[str] | None:
    """Paths (relative to ``root``) whose content is not ``head``'s: modified, staged or
    not, and untracked. None when git cannot say (then no file gets ``head``)."""
    changed = _git(root, "diff", "--name-only", "--relative", "-z", head, "--")
    others = _git(root, "ls-files", "-z", "--others", "--exclude-standard")
    if changed is None or others is None:
        return None
    return {p for p in (changed + "\0" + others).split("\0") if p}


def _listable(path: Path) -> bool:
    """A regular file, or a symbolic link (which read_sources checks and reports), or an
    entry that cannot be examined (a tracked file in an unreadable directory: read_sources
    reports it unreadable)."""
    try:
        return path.is_symlink() or path.is_file()
    except OSError:
        return True


def _walk_gitignore(root: Path, unreadable: list[str]) -> Iterator[str]:
    specs: list[tuple[str, pathspec.PathSpec]] = []  # (dir prefix, spec)

    def not_listed(exc: OSError) -> None:
        if exc.filename is not None:
            unreadable.append(Path(exc.filename).relative_to(root).as_posix() + "/")

    for dirpath, dirnames, filenames in os.walk(root, onerror=not_listed):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        specs = [(p, s) for p, s in specs if rel_dir.startswith(p)]
        gi = Path(dirpath) / ".gitignore"
        if gi.is_file():
            lines = gi.read_text("utf-8", "replace").splitlines()
            specs.append((rel_dir, pathspec.GitIgnoreSpec.from_lines(lines)))

        def ignored(rel: str, is_dir: bool,
                    specs: list[tuple[str, pathspec.PathSpec]] = specs) -> bool:
            verdict = False
            for prefix, spec in specs:
                sub = rel[len(prefix):] + ("/" if is_dir else "")
                result = spec.check_file(sub)
                if result.include is not None:
                    verdict = bool(result.include)
            return verdict

        # A link to a directory is an entry like a file (git does not descend into one
        # either); read_sources reports it.
        links = [d for d in dirnames if (Path(dirpath) / d).is_symlink()]
        dirnames[:] = sorted(d for d in dirnames
                             if d != ".git" and d not in links
                             and not ignored(rel_dir + d, True))
        for name in [*filenames, *links]:
            rel = rel_dir + name
            if not ignored(rel, False):
                yield rel


def read_sources(root: Path, max_bytes: int, report: WalkReport) -> Iterator[SourceFile]:
    """Yield the text files under ``root``; skipped ones are recorded in ``report``."""
    root = Path(root)
    real_root = root.resolve()
    unreadable: list[str] = []
    repos: dict[str, str] = {}
    paths, head = list_files(root, unreadable, repos)
    for d in unreadable:
        report.skip("unreadable directory", d)
    # HEAD names a file's content only when the file is as HEAD has it: a modified or
    # untracked one gets no revision (lineage must not name a commit without its text).
    # Each repository inside has its own HEAD.
    heads = {"": head, **repos}
    differs = {prefix: (_differ_from(root / prefix, h) if h else set())
               for prefix, h in heads.items()}
    prefixes = sorted(heads, key=len, reverse=True)
    listed = set(paths)
    for rel in paths:
        try:
            rel.encode("utf-8")
        except UnicodeEncodeError:  # a file name git gave us as raw bytes
            report.skip("name not UTF-8", rel.encode("utf-8", "surrogateescape").decode(
                "utf-8", "backslashreplace"))
            continue
        path = root / rel
        reason, real = _resolve(path, real_root, listed)
        if reason:
            report.skip(reason, rel)
            continue
        try:
            # What was checked is what is read: the resolved path, opened without following
            # a link swapped in meanwhile, and never blocking on a FIFO.
            fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
                         | getattr(os, "O_NONBLOCK", 0))
            with os.fdopen(fd, "rb") as fh:
                st = os.fstat(fh.fileno())
                if not stat.S_ISREG(st.st_mode):
                    report.skip("not a regular file", rel)
                    continue
                if st.st_size > max_bytes:
                    report.skip("too large", rel)
                    continue
                data = fh.read(max_bytes + 1)
        except OSError:
            report.skip("unreadable", rel)
            continue
        if len(data) > max_bytes:  # grew since fstat
            report.skip("too large", rel)
            continue
        if b"\x00" in data[:8192]:
            report.skip("binary", rel)
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            report.skip("not UTF-8", rel)
            continue
        if "\x00" in text:
            report.skip("binary", rel)
            continue
        report.files += 1
        report.bytes += len(data)
        prefix = next(p for p in prefixes if rel.startswith(p))
        differ = differs[prefix]
        revision = (heads[prefix] if differ is not None and rel[len(prefix):] not in differ
                    else "")
        yield SourceFile(rel, text, datetime.fromtimestamp(st.st_mtime, tz=UTC), revision)


def _resolve(path: Path, real_root: Path, listed: set[str]) -> tuple[str, Path]:
    """(reason to skip or "", the real path to read) of a listed entry."""
    try:
        link = path.is_symlink()
    except OSError:  # its directory cannot be searched
        return "unreadable", path
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError):  # missing, or a loop of links
        return ("broken symlink" if link else "unreadable"), path
    if not real.is_relative_to(real_root):
        # A link, or a path through a linked directory, that leads out of the tree.
        return "symlink out of the tree", real
    if real.is_dir():
        return "symlink to a directory", real
    if link and real.relative_to(real_root).as_posix() not in listed:
        return "symlink to an unlisted file", real
    return "", real
