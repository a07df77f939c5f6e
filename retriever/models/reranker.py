"""The cross-encoder re-ranker: scores (query, passage) pairs with a sentence-transformers
``CrossEncoder``, on CUDA (fp16) when present, else the CPU.

Off unless ``reranker_model`` names a local model directory (nothing is downloaded). Point it
at real weights, e.g. a saved copy of ``cross-encoder/ms-marco-MiniLM-L-6-v2``. Scoring runs
on the service's one model thread (see models/batcher.py), in token-budgeted slices, so
plain searches never wait behind a whole re-ranking.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retriever.config import Settings
from retriever.errors import NotReady
from retriever.models.embedder import _state_hash

log = logging.getLogger(__name__)


class Reranker:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._model: Any = None
        self.name = ""
        self.revision = ""
        self.max_tokens = 0
        self.device = ""

    @property
    def configured(self) -> bool:
        return bool(self._settings.reranker_model)

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self) -> None:
        import torch
        from sentence_transformers import CrossEncoder

        s = self._settings
        source = s.reranker_model
        if not Path(source).is_dir():
            raise ValueError(f"reranker_model {source!r} is not a local model directory "
                             "(nothing is downloaded): save the cross-encoder there first")
        device = s.embedder_device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model = CrossEncoder(source, device=device, local_files_only=True,
                             max_length=s.reranker_max_tokens or None)
        model.eval()
        self.revision = _state_hash(model.model)
        if device == "cuda":
            model.model.half()
        self._model = model
        self.name = Path(source).resolve().name
        self.max_tokens = int(getattr(model, "max_seq_length", None) or 512)
        self.device = device
        log.info("reranker %s@%s loaded on %s, max %d tokens", self.name, self.revision,
                 device, self.max_tokens)

    def count_tokens(self, pairs: Sequence[tuple[str, str]]) -> list[int]:
        """Tokens of each pair as the model reads it (capped at its max length)."""
        tok = self._require().tokenizer
        enc = tok([q for q, _ in pairs], [p for _, p in pairs], truncation=True,
                  max_length=self.max_tokens, return_attention_mask=False,
                  return_token_type_ids=False)
        return [len(ids) for ids in enc["input_ids"]]

    def score(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        """float32 relevance per pair (the model's activated output; higher is better)."""
        model = self._require()
        if not pairs:
            return np.empty(0, dtype=np.float32)
        out = model.predict(list(pairs), batch_size=max(1, len(pairs)),
                            show_progress_bar=False, convert_to_numpy=True)
        return np.asarray(out, dtype=np.float32).reshape(len(pairs))

    def _require(self) -> Any:
        if self._model is None:
            raise NotReady("the reranker is not loaded")
        return self._model
