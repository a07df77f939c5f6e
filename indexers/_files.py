"""File helpers the engines' damage checks share."""

from __future__ import annotations

import zlib
from pathlib import Path


def file_crc32(path: Path) -> int:
    """The CRC-32 of the file's bytes, read in 1 MiB blocks."""
    crc = 0
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            crc = zlib.crc32(block, crc)
    return crc
