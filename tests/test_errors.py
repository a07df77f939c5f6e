"""errors.translate on real infrastructure faults: SQLite's own errors, the kernel's ENOSPC."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from indexers.base import CollectionClosed
from retriever import errors


def _db(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, timeout=0)
    db.execute("CREATE TABLE IF NOT EXISTS t (x BLOB)")
    return db


def test_a_locked_catalog_is_unavailable_and_retryable(tmp_path: Path) -> None:
    holder = _db(tmp_path / "c.db")
    holder.execute("BEGIN IMMEDIATE")
    other = _db(tmp_path / "c.db")
    with pytest.raises(sqlite3.OperationalError) as info:
        other.execute("INSERT INTO t VALUES (1)")
    assert isinstance(errors.translate(info.value), errors.Unavailable)


def test_a_full_database_is_storage_full(tmp_path: Path) -> None:
    db = _db(tmp_path / "c.db")
    db.execute("PRAGMA max_page_count = 8")  # SQLite's own SQLITE_FULL
    with pytest.raises(sqlite3.OperationalError) as info:
        for _ in range(100):
            db.execute("INSERT INTO t VALUES (?)", (b"x" * 4096,))
    err = errors.translate(info.value)
    assert isinstance(err, errors.StorageFull)
    assert "disk is full" in err.message and "deleting" in err.message


def test_a_full_disk_is_storage_full() -> None:
    with pytest.raises(OSError) as info, open("/dev/full", "wb", buffering=0) as fh:
        fh.write(b"x")
    assert isinstance(errors.translate(info.value), errors.StorageFull)


def test_a_damaged_database_is_data_loss_naming_the_repair(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    db = _db(path)
    for i in range(200):
        db.execute("INSERT INTO t VALUES (?)", (str(i).encode() * 200,))
    db.close()
    raw = bytearray(path.read_bytes())
    raw[4096:4096 * 3] = b"\xde\xad" * 4096  # overwrite pages of the table's b-tree
    path.write_bytes(bytes(raw))
    with pytest.raises(sqlite3.DatabaseError) as info:
        sqlite3.connect(path).execute("SELECT count(*), sum(length(x)) FROM t").fetchall()
    err = errors.translate(info.value)
    assert isinstance(err, errors.DataLoss)
    assert "retriever repair" in err.message


def test_a_closed_connection_and_a_closed_collection_are_not_ready(tmp_path: Path) -> None:
    db = _db(tmp_path / "c.db")
    db.close()
    with pytest.raises(sqlite3.ProgrammingError) as info:
        db.execute("SELECT 1")
    assert isinstance(errors.translate(info.value), errors.NotReady)
    assert isinstance(errors.translate(CollectionClosed("x")), errors.NotReady)


def test_a_bug_stays_a_bug() -> None:
    assert errors.translate(KeyError("x")) is None
    assert errors.translate(sqlite3.OperationalError("no such column: y")) is None
