"""A git work tree for tests whose commits are made at exact times (commit n at T0 + n
minutes), with git's system and global config ignored so results do not depend on the
machine."""

from __future__ import annotations

import os
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

T0 = datetime(2024, 1, 1, tzinfo=UTC)
GIT_ENV = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null",
           "GIT_TERMINAL_PROMPT": "0", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
for _k in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE"):
    GIT_ENV.pop(_k, None)


class TimedRepo:
    def __init__(self, root: Path, branch: str = "main") -> None:
        self.root = root
        self.n = 0
        self.times: dict[str, datetime] = {}  # commit sha -> its author/committer time
        root.mkdir(parents=True, exist_ok=True)
        self.git("init", "-q", "-b", branch)

    def raw(self, *args: str) -> str:
        stamp = (T0 + timedelta(minutes=self.n)).strftime("%Y-%m-%dT%H:%M:%SZ")
        env = {**GIT_ENV, "GIT_AUTHOR_DATE": stamp, "GIT_COMMITTER_DATE": stamp}
        return subprocess.run(
            ["git", "-C", str(self.root), "-c", "commit.gpgsign=false",
             "-c", "protocol.file.allow=always", *args],
            check=True, capture_output=True, text=True, env=env).stdout

    def git(self, *args: str) -> str:
        return self.raw(*args).strip()

    def write(self, rel: str, content: str | bytes) -> None:
        p = self.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content)

    def rm(self, rel: str) -> None:
        self.git("rm", "-q", "--", rel)

    def mv(self, old: str, new: str) -> None:
        (self.root / new).parent.mkdir(parents=True, exist_ok=True)
        self.git("mv", "--", old, new)

    def commit(self, message: str = "change") -> str:
        self.n += 1
        self.git("add", "-A")
        self.git("commit", "-q", "--allow-empty", "-m", message)
        sha = self.git("rev-parse", "HEAD")
        self.times[sha] = T0 + timedelta(minutes=self.n)
        return sha

    def blob(self, commit: str, path: str) -> str:
        return self.git("rev-parse", f"{commit}:{path}")

    def show(self, commit: str, path: str) -> str:
        return self.raw("show", f"{commit}:{path}")

    def last_change(self, commit: str, path: str) -> str:
        return self.git("log", "-1", "--format=%H", commit, "--", path)
