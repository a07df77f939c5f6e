"""The data directory: its layout, who owns it, and room on its disk for deletes.

A full disk must not stop the service from freeing space. ``SpaceGuard`` keeps a reserve
file; the first write that fails because the disk is full deletes it, so deletes (which
need a little room for the catalog's journal) can still run, and refuses writes that add
data until there is room again. Nothing acknowledged is at risk meanwhile: a write that
failed was not acknowledged, and the catalog's transaction rolled back.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from retriever.errors import FailedPrecondition, StorageFull, disk_full, translate
from retriever.slo.metrics import Metrics

log = logging.getLogger(__name__)
T = TypeVar("T")

CATALOG_FILE = "catalog.sqlite3"
INDEX_DIR = "indexes"
RESERVE_FILE = "space-reserve"
LOCK_FILE = "lock"
QUARANTINE_DIR = "quarantine"


def catalog_path(data_dir: Path) -> Path:
    return Path(data_dir) / CATALOG_FILE


def index_root(data_dir: Path) -> Path:
    return Path(data_dir) / INDEX_DIR


class DataDirLock:
    """An exclusive lock on the data directory (flock on its ``lock`` file): one server, or
    one `retriever repair`, at a time. The kernel releases it when the process dies, so a
    killed server never leaves it stale."""

    def __init__(self, data_dir: Path) -> None:
        self._path = Path(data_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise FailedPrecondition naming the process that holds it."""
        if self._fd is not None:
            return
        self._path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise FailedPrecondition(
                f"the data directory {self._path.parent} is in use by another retriever "
                f"process (pid {holder}): stop it first, or use another --data-dir") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode("ascii"), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(translate(exc), StorageFull)


class SpaceGuard:
    """Writes and deletes of the service go through it (see the module docstring).

    ``reserve_bytes`` 0 turns the reserve off: writes are then never refused up front, and a
    delete on a full disk may fail like any write. ``compact`` gives the file system back
    space that deletes freed inside the catalog; it is called after deletes while the disk
    is full."""

    def __init__(self, data_dir: Path, reserve_bytes: int, compact: Callable[[], object],
                 metrics: Metrics) -> None:
        self._path = Path(data_dir) / RESERVE_FILE
        self._size = reserve_bytes
        self._compact = compact
        self._metrics = metrics
        self._full = False
        self._lock = threading.Lock()

    @property
    def full(self) -> bool:
        return self._full

    @property
    def reserve_path(self) -> Path:
        return self._path

    def start(self) -> None:
        """Create the reserve when there is room (twice its size free)."""
        with self._lock:
            if not self._make_reserve():
                log.warning(
                    "not enough free space in %s for the %d-byte reserve that keeps deletes "
                    "possible on a full disk; it is created once space allows",
                    self._path.parent, self._size)

    def write(self, fn: Callable[[], T]) -> T:
        """Run a write that adds data; StorageFull at once while the disk is full."""
        if self._full and not self.recover():
            raise disk_full()
        try:
            return fn()
        except Exception as exc:
            if is_disk_full(exc):
                self._disk_full()
            raise

    def delete(self, fn: Callable[[], T]) -> T:
        """Run a write that frees data. When the disk is full it runs in the reserve's
        space, and afterwards the catalog gives freed space back to the file system."""
        try:
            result = fn()
        except Exception as exc:
            if not (is_disk_full(exc) and self._disk_full()):
                raise
            result = fn()  # once more, now with the reserve's space
        if self._full:
            try:
                self._compact()
            except Exception as exc:
                log.warning("could not give the space deletes freed back to the file system "
                            "(%s); it is reused by later writes", exc)
            self.recover()
        return result

    def recover(self) -> bool:
        """Re-create the reserve when there is room again; True when writes may go on."""
        with self._lock:
            if not self._full:
                return True
            if not self._make_reserve():
                return False
            self._full = False
            self._metrics.storage_full.set(0)
            log.warning("space was freed in %s: the reserve is back, writes are accepted "
                        "again", self._path.parent)
            return True

    def _disk_full(self) -> bool:
        """Enter the full state; True when this call freed the reserve (so a retry of the
        failed operation may now fit)."""
        with self._lock:
            freed = False
            if self._path.exists():
                self._path.unlink()
                freed = True
            if not self._full:
                self._full = True
                self._metrics.storage_full.set(1)
                log.warning("the disk of %s is full: %s; writes are refused until space is "
                            "freed", self._path.parent,
                            f"released the {self._size}-byte reserve so deletes can run"
                            if freed else "there was no reserve to release")
            return freed

    def _make_reserve(self) -> bool:
        """Call under ``_lock``. True when the reserve is in place (or turned off)."""
        if self._size <= 0:
            return True
        try:
            if self._path.stat().st_size == self._size:
                return True
        except FileNotFoundError:
            pass
        self._path.unlink(missing_ok=True)  # a partial one, from a crash while creating it
        if shutil.disk_usage(self._path.parent).free < 2 * self._size:
            return False
        try:
            fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                _allocate(fd, self._size)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            self._path.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                return False
            raise
        return True


def _allocate(fd: int, size: int) -> None:
    """Really take ``size`` bytes of disk (a sparse file would hold nothing back)."""
    try:
        os.posix_fallocate(fd, 0, size)
        return
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    block = b"\xff" * (1 << 20)  # not zeros: some file systems store zero blocks sparsely
    left = size
    while left > 0:
        n = os.write(fd, block[: min(left, len(block))])
        left -= n


def quarantine_dir(data_dir: Path, stamp: str) -> Path:
    """Where `retriever repair` moves files it replaces: ``<data_dir>/quarantine/<stamp>``."""
    path = Path(data_dir) / QUARANTINE_DIR / stamp
    path.mkdir(parents=True, exist_ok=True)
    return path
