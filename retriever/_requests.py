"""Request builders shared by the sync and the async client, so that both take the same
options and send the same protos. :func:`search_request` is public (re-exported by both
clients) for ``batch_search``:

    client.batch_search([search_request("docs", q, top_k=5, mode="lexical", collapse=True)
                         for q in queries])
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from datetime import timedelta
from typing import TypeAlias, cast

from google.protobuf.duration_pb2 import Duration

from retriever.v1 import retriever_pb2 as pb

__all__ = ["DEFAULT", "Feedback", "SearchModeLike", "Staleness", "chunk_feedback", "duration",
           "evaluate_request", "record_feedback_request", "register_golden_set_request",
           "search_mode", "search_request", "sync_source_request"]

# A pb.SearchMode value (pb.DENSE...), its lower-case name, or None for the server's default.
SearchModeLike: TypeAlias = "int | str | None"
# Seconds, a timedelta, or a Duration.
Staleness: TypeAlias = "float | timedelta | Duration"
# chunk id -> relevant, (chunk id, relevant) pairs, or ChunkFeedback messages.
Feedback: TypeAlias = "Mapping[str, bool] | Iterable[tuple[str, bool] | pb.ChunkFeedback]"

_MODES: dict[str, int] = {"dense": pb.DENSE, "lexical": pb.LEXICAL, "hybrid": pb.HYBRID}


class _Default:
    """The type of a default that differs by call (see ``sync_source``)."""

    def __repr__(self) -> str:
        return "<default>"


DEFAULT = _Default()


def search_mode(mode: SearchModeLike) -> pb.SearchMode:
    """``mode`` as a SearchMode value: None means SEARCH_MODE_UNSPECIFIED (the server's
    default). A string is one of "dense", "lexical", "hybrid" (any case), else ValueError;
    an int is passed on as is (the server refuses one outside SearchMode)."""
    if mode is None:
        return pb.SEARCH_MODE_UNSPECIFIED
    if isinstance(mode, str):
        try:
            return cast(pb.SearchMode, _MODES[mode.lower()])
        except KeyError:
            raise ValueError(f"mode must be one of {', '.join(map(repr, _MODES))} (or a "
                             f"retriever.v1 SearchMode value), got {mode!r}") from None
    return cast(pb.SearchMode, int(mode))


# The longest protobuf Duration, in seconds (10,000 years).
_MAX_DURATION_S = 315_576_000_000


def duration(value: Staleness) -> Duration:
    if isinstance(value, Duration):
        return value
    d = Duration()
    if isinstance(value, timedelta):
        d.FromTimedelta(value)
        return d
    seconds = float(value)
    if not math.isfinite(seconds) or abs(seconds) > _MAX_DURATION_S:
        raise ValueError(f"a duration must be a finite number of seconds within "
                         f"{_MAX_DURATION_S:,}, got {value!r}")
    d.FromNanoseconds(round(seconds * 1e9))
    return d


def search_request(namespace: str, query: str, top_k: int = 10,
                   filter: pb.SearchFilter | None = None,  # noqa: A002
                   *, mode: SearchModeLike = None, rerank: bool = False,
                   dense_weight: float | None = None, rerank_candidates: int = 0,
                   collapse: bool = False, min_score: float | None = None,
                   max_hits_per_path: int = 0, max_staleness: Staleness | None = None,
                   flag_stale: bool = False) -> pb.SearchRequest:
    """A SearchRequest; options left at their defaults leave the field unset (the server's
    default). See SearchRequest in proto/retriever/v1/retriever.proto for limits.

    ``mode``: see :func:`search_mode`. ``rerank``: re-rank the best ``rerank_candidates``
    (0: the server's default) with the cross-encoder. ``dense_weight``: HYBRID only, in
    [0, 1]. ``collapse``: one hit per document. ``min_score``: drop hits scoring below it
    (the last stage's scale). ``max_hits_per_path``: 0 is no cap. ``max_staleness``
    (seconds, timedelta or Duration): drop hits lagging their source by more, or with
    ``flag_stale`` keep them marked ``Hit.stale``.

    Raises ValueError for a mode string that names no mode and for a value no field can
    hold (a count past 32 bits, a duration that is not finite); everything else is checked
    by the server (INVALID_ARGUMENT naming the field)."""
    try:
        req = pb.SearchRequest(namespace=namespace, query=query, top_k=top_k, filter=filter,
                               mode=search_mode(mode), rerank=rerank,
                               rerank_candidates=rerank_candidates, collapse=collapse,
                               max_hits_per_path=max_hits_per_path, flag_stale=flag_stale)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"search request: {exc} (top_k, rerank_candidates and "
                         "max_hits_per_path are 32-bit counts)") from None
    # Optional fields: set only when given, so that unset still means the server's default.
    if dense_weight is not None:
        req.dense_weight = dense_weight
    if min_score is not None:
        req.min_score = min_score
    if max_staleness is not None:
        req.max_staleness.CopyFrom(duration(max_staleness))
    return req


def chunk_feedback(feedback: Feedback) -> list[pb.ChunkFeedback]:
    """Judgements as ChunkFeedback messages, in the order given."""
    if isinstance(feedback, Mapping):
        return [pb.ChunkFeedback(chunk_id=c, relevant=bool(r)) for c, r in feedback.items()]
    if isinstance(feedback, (str, bytes)):
        raise TypeError("feedback is a mapping of chunk id -> relevant, or (chunk id, "
                        f"relevant) pairs, not a string: got {feedback!r}")
    out: list[pb.ChunkFeedback] = []
    for item in feedback:
        if isinstance(item, pb.ChunkFeedback):
            out.append(item)
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            out.append(pb.ChunkFeedback(chunk_id=item[0], relevant=bool(item[1])))
        else:
            raise TypeError(f"feedback items are (chunk id, relevant) pairs or ChunkFeedback "
                            f"messages, got {item!r}")
    return out


def record_feedback_request(namespace: str, request_id: str,
                            feedback: Feedback) -> pb.RecordFeedbackRequest:
    return pb.RecordFeedbackRequest(namespace=namespace, request_id=request_id,
                                    feedback=chunk_feedback(feedback))


def register_golden_set_request(namespace: str, name: str,
                                queries: Iterable[pb.GoldenQuery],
                                from_source_history: pb.GoldenSetFromHistory | None
                                ) -> pb.RegisterGoldenSetRequest:
    return pb.RegisterGoldenSetRequest(namespace=namespace, name=name, queries=list(queries),
                                       from_source_history=from_source_history)


def evaluate_request(namespace: str, golden_set: str, k: Iterable[int], mode: SearchModeLike,
                     version: int, rerank: bool) -> pb.EvaluateRequest:
    return pb.EvaluateRequest(namespace=namespace, golden_set=golden_set, k=list(k),
                              mode=search_mode(mode), version=version, rerank=rerank)


def sync_source_request(namespace: str, repo: str, ref: str, include: Iterable[str],
                        exclude: Iterable[str], max_file_bytes: int,
                        wait: bool) -> pb.SyncSourceRequest:
    return pb.SyncSourceRequest(namespace=namespace, repo=repo, ref=ref, include=list(include),
                                exclude=list(exclude), max_file_bytes=max_file_bytes,
                                wait=wait)
