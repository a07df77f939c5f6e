"""One exception tree for the core. The server maps each leaf to a gRPC status in one table."""

from __future__ import annotations

import re


class RetrieverError(Exception):
    """Base of every error the core raises on purpose."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidArgument(RetrieverError):
    """The request is malformed or over a limit; ``field`` names the offending field."""


class NotFound(RetrieverError):
    """A namespace, document or chunk that the request names does not exist."""


class AlreadyExists(RetrieverError):
    """Creating something whose name is taken."""


class PermissionDenied(RetrieverError):
    """The caller may not do this here: e.g. sync a source outside the configured roots."""


class Aborted(RetrieverError):
    """The operation conflicts with one already running (a second sync of a namespace);
    retry once that one has finished."""


class FailedPrecondition(RetrieverError):
    """The system is not in a state the request needs (e.g. an engine is not installed)."""


class ModelMismatch(FailedPrecondition):
    """A namespace was built by another embedder / dimension / backend than is loaded."""


class Overloaded(RetrieverError):
    """Too much work in flight; retry later."""


class NotReady(RetrieverError):
    """The service is still loading or already draining."""


class Unavailable(RetrieverError):
    """A transient condition (a busy database, an engine server that is down): retry."""


class StorageFull(RetrieverError):
    """The data directory's disk is full. No retry helps until space is freed; deletes
    still work (the service keeps a reserve for them)."""


class DataLoss(RetrieverError):
    """A file the service cannot rebuild (the catalog) is damaged; an operator must act."""


class Cancelled(RetrieverError):
    """The caller cancelled the call, or its deadline passed, before the work committed.
    ``deadline`` tells which: nothing of the call was committed either way."""

    def __init__(self, message: str, *, deadline: bool = False) -> None:
        super().__init__(message)
        self.deadline = deadline


class Unimplemented(RetrieverError):
    """A declared feature that has not shipped yet."""


def translate(exc: BaseException) -> RetrieverError | None:
    """The domain error an infrastructure failure stands for, or None for a bug.

    The one place where SQLite, file-system and engine exceptions become statuses a caller
    can act on (a full disk, a busy or damaged database, an engine that is down), so none of
    them reaches a caller as INTERNAL with raw exception text."""
    import errno
    import sqlite3

    from indexers.base import (
        CollectionClosed,
        CollectionLost,
        DimensionMismatch,
        EngineUnavailable,
    )

    if isinstance(exc, RetrieverError):
        return exc
    if isinstance(exc, sqlite3.ProgrammingError) and "closed" in str(exc).lower():
        return NotReady("the catalog is closed: the server is shutting down; retry shortly")
    if isinstance(exc, sqlite3.Error):
        text = str(exc).lower()
        code = getattr(exc, "sqlite_errorcode", None)
        if code == sqlite3.SQLITE_FULL or "disk is full" in text:
            return StorageFull(_DISK_FULL)
        if code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB) or "malformed" in text \
                or "not a database" in text:
            return DataLoss(
                "the catalog database is damaged (" + str(exc) + "): stop the server and run "
                "`retriever check`, then `retriever repair` to recover what can be recovered")
        if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) or "locked" in text \
                or "busy" in text:
            return Unavailable("the catalog is busy with another writer; retry shortly")
        if code == sqlite3.SQLITE_IOERR or "disk i/o error" in text:
            return Unavailable("the catalog's disk reported an I/O error; retry, and check "
                               "the data directory's disk if it persists")
        if code == sqlite3.SQLITE_READONLY or "readonly" in text:
            return FailedPrecondition("the catalog is read-only: give the server write "
                                      "access to its data directory")
        return None
    if isinstance(exc, OSError):
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return StorageFull(_DISK_FULL)
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return FailedPrecondition(f"the data directory is not writable ({exc.strerror}): "
                                      "give the server write access to it")
        if exc.errno == errno.EIO:
            return Unavailable("the data directory's disk reported an I/O error; retry, and "
                               "check the disk if it persists")
        return None
    if isinstance(exc, CollectionLost):
        return Unavailable(f"the index engine no longer has collection {exc.collection!r} "
                           "(dropped outside the service, or the engine came back without "
                           "its data); the service is rebuilding it from the catalog: retry "
                           "shortly")
    if isinstance(exc, CollectionClosed):
        return NotReady("the namespace's index is closed: the server is shutting down or the "
                        "namespace was just deleted; retry")
    if isinstance(exc, DimensionMismatch):
        return ModelMismatch(str(exc), field="namespace")
    if isinstance(exc, EngineUnavailable):
        return Unavailable(f"the index engine is unavailable: {exc}")
    if isinstance(exc, ValueError) and _ENGINE_DISK_FULL.search(str(exc)):
        # tantivy's I/O errors reach Python as ValueError with the OS error in the text.
        return StorageFull(_DISK_FULL)
    return None


# The text of an engine's error for a full disk or an exceeded quota (ENOSPC 28, EDQUOT 122).
_ENGINE_DISK_FULL = re.compile(r"\(os error (?:28|122)\)|No space left on device"
                               r"|Disk quota exceeded")

_DISK_FULL = ("the data directory's disk is full: free space (deleting documents or "
              "namespaces works) or grow the volume; retrying will not help until then")


def disk_full() -> StorageFull:
    """The error of a write refused, or failed, because the data directory's disk is full."""
    return StorageFull(_DISK_FULL)
