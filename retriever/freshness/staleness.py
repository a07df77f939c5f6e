"""How far an indexed document version lags its source.

Until a namespace is bound to a source it can poll, the newest version the service knows of
is the one it indexed: staleness is zero when the source time of that version is known and
unset when it is not (never a made-up number).
"""

from __future__ import annotations

from datetime import datetime

from retriever.domain import ChunkRecord


def hit_staleness(chunk: ChunkRecord, now: datetime) -> float | None:
    """Seconds the chunk's document version lags its source; None when unknown."""
    if chunk.source_updated_at is None:
        return None
    return 0.0
