"""Which files get indexed: git's own listing inside a work tree, the same answer from the
.gitignore walk elsewhere, and the text-only filter of read_sources."""

from __future__ import annotations

import os
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from retriever.ingest.walk import WalkReport, list_files, read_sources

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs the git binary")

GITIGNORE_ROOT = """\
# comments and blank lines are ignored

*.log
!keep.log
build/
/secret.txt
*.tmp
"""
GITIGNORE_SUB = """\
!important.tmp
local/
/anchored.txt
"""
GITIGNORE_DEEP = """\
keep.log
"""

# path -> whether it is to be indexed
TREE: dict[str, bool] = {
    ".gitignore": True,
    "a.py": True,
    "README.md": True,
    "debug.log": False,
    "keep.log": True,
    "secret.txt": False,
    "x.tmp": False,
    "build/out.js": False,
    "src/build/gen.py": False,  # "build/" matches at any depth
    "src/main.py": True,
    "src/secret.txt": True,  # "/secret.txt" is anchored to the root
    "src/build.py": True,  # a file, not the "build/" directory
    "sub/.gitignore": True,
    "sub/x.tmp": False,
    "sub/important.tmp": True,  # re-included by sub/.gitignore
    "sub/anchored.txt": False,
    "sub/more/anchored.txt": True,  # anchored to sub/, not below it
    "sub/local/y.py": False,
    "sub/keep.log": True,
    "sub/deep/.gitignore": True,
    "sub/deep/keep.log": False,  # the deeper .gitignore wins
    "sub/deep/z.py": True,
    "other/important.tmp": False,  # sub's negation does not reach here
    "dir with space/f.txt": True,
    "ünïcode/naïve.py": True,
}
CONTENT = {".gitignore": GITIGNORE_ROOT, "sub/.gitignore": GITIGNORE_SUB,
           "sub/deep/.gitignore": GITIGNORE_DEEP}
EXPECTED = sorted(p for p, keep in TREE.items() if keep)


@pytest.fixture(autouse=True)
def isolated_git(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No user or system git config (global excludes would change the answer), and no
    repository above tmp_path."""
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(tmp_path / "no-gitconfig"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    for var in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE"):
        monkeypatch.delenv(var, raising=False)


def git(root: Path, *args: str) -> str:
    out = subprocess.run(
        ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t",
         "-c", "commit.gpgsign=false", "-c", "init.defaultBranch=main", *args],
        capture_output=True, check=True, text=True,
    )
    return out.stdout


def build(root: Path, tree: dict[str, bool] = TREE) -> None:
    for rel in tree:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(CONTENT.get(rel, f"content of {rel}\n"), encoding="utf-8")


def make_repo(root: Path) -> str:
    """A git repo of TREE: part committed, part left untracked. Returns the HEAD sha."""
    root.mkdir()
    git(root, "init", "-q")
    build(root)
    git(root, "add", ".gitignore", "a.py", "src", "sub/.gitignore", "sub/deep")
    git(root, "commit", "-q", "-m", "first")
    return git(root, "rev-parse", "HEAD").strip()


def test_git_lists_tracked_and_untracked_but_not_ignored(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    head = make_repo(root)
    paths, revision = list_files(root)
    assert paths == EXPECTED
    assert revision == head and len(head) == 40
    assert not any(p == ".git" or p.startswith(".git/") for p in paths)
    untracked = set(git(root, "ls-files", "-z", "--others", "--exclude-standard").split("\0"))
    untracked.discard("")
    assert untracked and untracked <= set(paths)  # untracked files are listed too


def test_plain_directory_walk_gives_the_same_answer(tmp_path: Path) -> None:
    repo, plain = tmp_path / "repo", tmp_path / "plain"
    make_repo(repo)
    plain.mkdir()
    build(plain)
    git_paths, _ = list_files(repo)
    walk_paths, revision = list_files(plain)
    assert walk_paths == git_paths == EXPECTED
    assert revision == ""


def test_git_dir_is_never_listed(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    build(plain, {"a.py": True, "pkg/b.py": True})
    # A .git directory that is not a repository (a stray copy): still never indexed.
    for junk in (".git/config", "pkg/.git/HEAD"):
        (plain / junk).parent.mkdir(parents=True, exist_ok=True)
        (plain / junk).write_text("junk\n")
    paths, _ = list_files(plain)
    assert paths == ["a.py", "pkg/b.py"]

    repo = tmp_path / "repo"
    head = make_repo(repo)
    paths, revision = list_files(repo)
    assert revision == head
    assert all(".git/" not in f"/{p}" for p in paths)


def test_git_repo_before_the_first_commit(tmp_path: Path) -> None:
    root = tmp_path / "fresh"
    root.mkdir()
    git(root, "init", "-q")
    build(root)
    paths, revision = list_files(root)
    assert paths == EXPECTED
    assert revision == ""


def test_tracked_file_deleted_from_disk_is_not_listed(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    make_repo(root)
    (root / "src" / "main.py").unlink()
    paths, _ = list_files(root)
    assert "src/main.py" not in paths
    assert paths == [p for p in EXPECTED if p != "src/main.py"]


def test_subdirectory_of_a_repo_is_listed_relative_to_itself(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    head = make_repo(root)
    paths, revision = list_files(root / "sub")
    assert paths == sorted(p[len("sub/"):] for p in EXPECTED if p.startswith("sub/"))
    assert revision == head


# (.gitignore files, files) -> what git lists; the walk must agree.
EDGE_CASES: dict[str, tuple[dict[str, str], list[str], list[str]]] = {
    "double-star": ({".gitignore": "doc/**/*.txt\n**/tmp\na/**/b\n"},
                    ["doc/x.txt", "doc/y/z.txt", "x/tmp/f", "tmp/g", "a/b", "a/q/r/b", "a/c"],
                    ["a/c"]),
    "trailing-space-and-escapes": ({".gitignore": "foo.txt \n\\#hash\n\\!bang\n"},
                                   ["foo.txt", "#hash", "!bang", "ok"], ["ok"]),
    "slash-in-the-middle-anchors": ({".gitignore": "sub/x\n"}, ["sub/x", "y/sub/x", "sub/y"],
                                    ["sub/y", "y/sub/x"]),
    "nested-negation-and-override": (
        {".gitignore": "*.py\n", "d/.gitignore": "!*.py\n", "d/e/.gitignore": "x.py\n"},
        ["a.py", "d/b.py", "d/e/x.py", "d/e/y.py"], ["d/b.py", "d/e/y.py"]),
    "no-re-include-below-an-excluded-dir": (
        {".gitignore": "logs/\n!logs/keep.txt\n"}, ["logs/keep.txt", "logs/a.txt", "b"], ["b"]),
    "re-include-from-dir-contents": (
        {".gitignore": "logs/*\n!logs/keep.txt\n"},
        ["logs/keep.txt", "logs/a.txt", "logs/sub/keep.txt"], ["logs/keep.txt"]),
    "gitignore-inside-an-ignored-dir": ({".gitignore": "build\n", "build/.gitignore": "!x\n"},
                                        ["build/x", "a"], ["a"]),
    "ranges-and-wildcards": ({".gitignore": "file[0-2].txt\n?.md\n"},
                             ["file1.txt", "file5.txt", "a.md", "ab.md"], ["ab.md", "file5.txt"]),
    "crlf-lines": ({".gitignore": "a.txt\r\nb.txt\r\n"}, ["a.txt", "b.txt", "c.txt"],
                   ["c.txt"]),
    "dir-only-pattern-spares-files": ({".gitignore": "foo/\n"}, ["foo", "bar/foo/x", "baz"],
                                      ["baz", "foo"]),
    "anchored-in-a-subdir": ({"sub/.gitignore": "/*.log\n"}, ["sub/a.log", "sub/d/b.log", "a.log"],
                             ["a.log", "sub/d/b.log"]),
    "last-match-wins": ({".gitignore": "*.txt\n!a.txt\na.txt\n"}, ["a.txt", "b.txt", "c.md"],
                        ["c.md"]),
    # The whitelist idiom: ignore everything, then re-include directories and *.py.
    "whitelist": ({".gitignore": "*\n!*/\n!*.py\n"}, ["a.py", "b.txt", "d/c.py", "d/e.md",
                                                       "d/f/g.py"],
                  ["a.py", "d/c.py", "d/f/g.py"]),
    # "!keep/" names the directory only; files in it still match the root's "*.tmp".
    "negated-dir-pattern-does-not-re-include-files": (
        {".gitignore": "*.tmp\n", "sub/.gitignore": "!keep/\n"},
        ["sub/keep/a.tmp", "sub/keep/b.py", "sub/a.tmp"], ["sub/keep/b.py"]),
}


@pytest.mark.parametrize("case", sorted(EDGE_CASES))
def test_walk_agrees_with_git_on_gitignore_rules(tmp_path: Path, case: str) -> None:
    ignores, files, expected_files = EDGE_CASES[case]
    trees = {}
    for kind in ("repo", "plain"):
        root = tmp_path / kind
        for rel, text in {**ignores, **{f: f"{f}\n" for f in files}}.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(text.encode())
        if kind == "repo":
            git(root, "init", "-q")
        trees[kind] = list_files(root)[0]
    visible_ignores = [g for g in ignores if g in trees["repo"]]
    assert trees["repo"] == sorted(expected_files + visible_ignores), "git itself disagrees"
    assert trees["plain"] == trees["repo"]


# -- read_sources ------------------------------------------------------------------------------
MAX = 10_000


def write_inputs(root: Path) -> None:
    root.mkdir(exist_ok=True)
    (root / "ok.py").write_text("print('héllo')\n", encoding="utf-8")
    (root / "empty.txt").write_bytes(b"")
    (root / "binary.dat").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00IHDR")
    (root / "late_nul.txt").write_bytes(b"a" * 9000 + b"\x00" + b"b" * 10)
    (root / "latin1.txt").write_bytes("café".encode("latin-1"))
    (root / "big.txt").write_bytes(b"x" * (MAX + 1))
    (root / "limit.txt").write_bytes(b"y" * MAX)
    (root / "emoji.md").write_text("# 😀 中文\n", encoding="utf-8")


def test_read_sources_skips_binary_large_and_non_utf8(tmp_path: Path) -> None:
    root = tmp_path / "plain"
    write_inputs(root)
    report = WalkReport()
    files = {f.rel_path: f for f in read_sources(root, MAX, report)}
    assert sorted(files) == ["emoji.md", "empty.txt", "limit.txt", "ok.py"]
    assert files["ok.py"].content == "print('héllo')\n"
    assert files["emoji.md"].content == "# 😀 中文\n"
    assert files["empty.txt"].content == ""
    assert {k: sorted(v) for k, v in report.skipped.items()} == {
        "binary": ["binary.dat", "late_nul.txt"],
        "too large": ["big.txt"],
        "not UTF-8": ["latin1.txt"],
    }
    assert report.files == 4
    assert report.bytes == sum(len((root / p).read_bytes()) for p in files)
    for f in files.values():
        assert f.revision == ""
        assert f.modified_at.tzinfo is not None
        mtime = datetime.fromtimestamp((root / f.rel_path).stat().st_mtime, tz=UTC)
        assert f.modified_at == mtime


def test_read_sources_in_git_carries_the_head_revision(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    head = make_repo(root)
    write_inputs(root)
    report = WalkReport()
    files = {f.rel_path: f for f in read_sources(root, MAX, report)}
    assert set(files) == set(EXPECTED) | {"emoji.md", "empty.txt", "limit.txt", "ok.py"}
    tracked = set(git(root, "ls-files", "-z").split("\0")) - {""}
    # HEAD's sha for what HEAD holds as it is; none for what it does not (untracked).
    assert {p for p, f in files.items() if f.revision == head} == tracked & set(files)
    assert {f.revision for p, f in files.items() if p not in tracked} == {""}
    assert files["src/main.py"].content == "content of src/main.py\n"
    assert sorted(report.skipped["binary"]) == ["binary.dat", "late_nul.txt"]
    assert report.skipped["not UTF-8"] == ["latin1.txt"]
    assert report.skipped["too large"] == ["big.txt"]


def test_directory_ignored_by_its_repository_is_listed_as_its_own_tree(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "vendor" / "lib").mkdir(parents=True)
    (repo / "vendor" / "lib" / "mod.py").write_text("x = 1\n")
    (repo / "vendor" / "skip.log").write_text("log\n")
    (repo / "vendor" / ".gitignore").write_text("*.log\n")
    (repo / ".gitignore").write_text("vendor/\n")
    (repo / "main.py").write_text("print()\n")
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    paths, head = list_files(repo / "vendor")
    assert paths == [".gitignore", "lib/mod.py"]
    assert head == ""
    assert list_files(repo)[0] == [".gitignore", "main.py"]


def test_file_name_that_is_not_utf8_is_skipped_not_fatal(tmp_path: Path) -> None:
    root = tmp_path / "names"
    root.mkdir()
    (root / "ok.txt").write_text("fine\n")
    with open(os.path.join(os.fsencode(root), b"caf\xe9.txt"), "wb") as fh:
        fh.write(b"latin-1 name\n")
    report = WalkReport()
    files = list(read_sources(root, 1 << 20, report))
    assert [f.rel_path for f in files] == ["ok.txt"]
    assert list(report.skipped) == ["name not UTF-8"]
    assert report.skipped["name not UTF-8"][0].startswith("caf")


# -- symbolic links ----------------------------------------------------------------------------
def link_tree(tmp_path: Path, name: str) -> Path:
    """A tree with links of every kind; a secret outside it that must never be read."""
    outside = tmp_path / "outside"
    outside.mkdir(exist_ok=True)
    (outside / "secret.txt").write_text("TOP SECRET\n")
    root = tmp_path / name
    (root / "d").mkdir(parents=True)
    (root / "ok.txt").write_text("fine\n")
    (root / "d" / "a.txt").write_text("in the tree\n")
    (root / ".gitignore").write_text(".env\n")
    (root / ".env").write_text("PASSWORD=hunter2\n")
    (root / "passwd").symlink_to(outside / "secret.txt")  # a file out of the tree
    (root / "rel_escape").symlink_to(Path("..") / "outside" / "secret.txt")
    (root / "outdir").symlink_to(outside, target_is_directory=True)  # a directory out of it
    (root / "dlink").symlink_to("d", target_is_directory=True)  # a directory in it
    (root / "broken").symlink_to("nowhere")
    (root / "inlink").symlink_to(Path("d") / "a.txt")  # a listed file in the tree
    (root / "envlink").symlink_to(".env")  # a file the listing leaves out
    return root


LINK_SKIPS = {
    "symlink out of the tree": ["outdir", "passwd", "rel_escape"],
    "symlink to a directory": ["dlink"],
    "broken symlink": ["broken"],
    "symlink to an unlisted file": ["envlink"],
}


@pytest.mark.parametrize("kind", ["repo", "plain", "no-git"])
def test_symlinks_out_of_the_tree_or_to_directories_are_skipped_and_listed(
        tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    root = link_tree(tmp_path, kind)
    if kind == "repo":
        git(root, "init", "-q")
        git(root, "add", ".")
        git(root, "commit", "-q", "-m", "links")
    if kind == "no-git":  # the pathspec walk, used where git is not installed
        import retriever.ingest.walk as walk

        monkeypatch.setattr(walk, "_git", lambda root, *args: None)
    paths, _ = list_files(root)
    assert paths == sorted([".gitignore", "d/a.txt", "ok.txt", "inlink",
                            *(p for ps in LINK_SKIPS.values() for p in ps)])
    report = WalkReport()
    files = {f.rel_path: f.content for f in read_sources(root, MAX, report)}
    assert files == {".gitignore": ".env\n", "d/a.txt": "in the tree\n", "ok.txt": "fine\n",
                     "inlink": "in the tree\n"}
    assert {k: sorted(v) for k, v in report.skipped.items()} == LINK_SKIPS
    assert report.files == 4


def test_root_given_through_a_symlink_is_read(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (real / "a.txt").write_text("a\n")
    (real / "b.txt").symlink_to("a.txt")
    alias = tmp_path / "alias"
    alias.symlink_to(real, target_is_directory=True)
    report = WalkReport()
    assert {f.rel_path for f in read_sources(alias, MAX, report)} == {"a.txt", "b.txt"}
    assert report.skipped == {}


_NOCAP = ["setpriv", "--bounding-set=-dac_override,-dac_read_search",
          "--inh-caps=-dac_override,-dac_read_search"]


def _walk_without_root_powers(root: Path) -> dict:
    """read_sources in a process that obeys file modes even as root (run as root, as CI
    is, the test would otherwise read everything)."""
    import json
    import sys

    code = ("import json, sys; from pathlib import Path; "
            "from retriever.ingest.walk import WalkReport, read_sources; "
            "r = WalkReport(); files = [f.rel_path for f in read_sources(Path(sys.argv[1]), "
            "1 << 20, r)]; print(json.dumps({'files': files, 'skipped': r.skipped}))")
    prefix = _NOCAP if os.geteuid() == 0 else []
    out = subprocess.run([*prefix, sys.executable, "-c", code, str(root)], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(os.geteuid() == 0 and shutil.which("setpriv") is None,
                    reason="as root, needs setpriv to drop the powers that ignore file modes")
@pytest.mark.parametrize("in_git", [True, False])
def test_an_unreadable_directory_is_reported_not_silently_dropped(tmp_path: Path,
                                                                   in_git: bool) -> None:
    """Its files are unknown, not gone: listed as skipped (so `index --prune` keeps their
    documents), and no traceback for a tracked file inside it."""
    root = tmp_path / "tree"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("apples\n")
    (root / "sub" / "b.txt").write_text("pears\n")
    if in_git:
        git(root, "init", "-q")
        git(root, "add", ".")
        git(root, "commit", "-qm", "init")
    (root / "sub").chmod(0)
    try:
        seen = _walk_without_root_powers(root)
    finally:
        (root / "sub").chmod(0o755)
    assert seen["files"] == ["a.txt"]
    assert seen["skipped"]["unreadable directory"] == ["sub/"]
    if in_git:  # tracked, so listed by git, and then found unreadable
        assert seen["skipped"]["unreadable"] == ["sub/b.txt"]


def test_only_files_as_head_has_them_carry_its_revision(tmp_path: Path) -> None:
    """A modified or untracked file was given HEAD's sha as its revision, though no commit
    holds its text: lineage must not name one."""
    root = tmp_path / "repo"
    head = make_repo(root)
    (root / "src" / "main.py").write_text("print('edited, not committed')\n")
    (root / "sub" / "new.txt").parent.mkdir(exist_ok=True)
    (root / "sub" / "new.txt").write_text("untracked\n")
    got = {f.rel_path: f.revision for f in read_sources(root, 1 << 20, WalkReport())}
    assert got["src/main.py"] == "" and got["sub/new.txt"] == ""
    assert got["a.py"] == head  # committed and unchanged
    sub = {f.rel_path: f.revision for f in read_sources(root / "sub", 1 << 20, WalkReport())}
    tracked = set(git(root / "sub", "ls-files", "-z").split("\0")) - {""}
    assert sub["new.txt"] == "" and tracked and all(sub[p] == head for p in tracked)


def test_repositories_inside_are_listed_with_their_own_rules_and_revisions(
        tmp_path: Path) -> None:
    """Checkouts under a plain directory (the "index my ~/src" case) and a repository
    nested in another were skipped without a word; each is listed by its own .gitignore,
    its files carrying its own HEAD."""
    top = tmp_path / "src"
    top.mkdir()
    (top / "notes.md").write_text("# notes\n")
    heads = {}
    for name in ("one", "two"):
        (top / name).mkdir()
        git(top / name, "init", "-q")
        (top / name / ".gitignore").write_text("*.log\n")
        (top / name / "f.md").write_text(f"# {name}\n")
        (top / name / "x.log").write_text("ignored\n")
        git(top / name, "add", ".")
        git(top / name, "commit", "-q", "-m", "first")
        heads[name] = git(top / name, "rev-parse", "HEAD").strip()
    inner = top / "one" / "inner"  # a repository inside a repository
    inner.mkdir()
    git(inner, "init", "-q")
    (inner / "g.md").write_text("# inner\n")
    git(inner, "add", ".")
    git(inner, "commit", "-q", "-m", "first")
    (inner / "h.md").write_text("# untracked\n")
    repos: dict[str, str] = {}
    paths, head = list_files(top, repos=repos)
    assert paths == ["notes.md", "one/.gitignore", "one/f.md", "one/inner/g.md",
                     "one/inner/h.md", "two/.gitignore", "two/f.md"]
    assert head == "" and repos["one/"] == heads["one"] and repos["two/"] == heads["two"]
    got = {f.rel_path: f.revision for f in read_sources(top, 1 << 20, WalkReport())}
    assert got["one/f.md"] == heads["one"] and got["two/f.md"] == heads["two"]
    assert got["one/inner/g.md"] == repos["one/inner/"] != ""
    assert got["one/inner/h.md"] == "" and got["notes.md"] == ""
