"""OpenVINO inference for the embedder: the loaded sentence-transformers model converted with
``openvino.convert_model`` (no optimum-intel, which pins an old transformers), optionally
quantized to static int8 by ``nncf.quantize``, compiled for this CPU.

The converted graph is exactly what the torch path computes per batch: the transformer, the
model's own pooling (mean for all-MiniLM-L6-v2) and the L2 normalisation, with dynamic batch
and sequence dimensions. A build is checked against torch fp32 on real text before it is
cached or served (float: every cosine >= 0.999; int8: mean cosine >= 0.98).

Cache: ``<data_dir>/models/<key>/`` (``model.xml``, ``model.bin``, ``meta.json``), the key
naming the weights revision, backend, precision and CPU flags. An entry is written under a
temporary name and renamed into place, and checked when read (its files' hashes, the
compile, one finite unit-norm forward pass); a damaged one is logged, removed and rebuilt.

Threads: ``INFERENCE_NUM_THREADS`` (the ``torch_threads`` setting, 0 = the cores this
process may run on), one stream, no CPU pinning: the OpenVINO pool then shares the cores with
torch's OpenMP pool (the re-ranker, tokenisation) and FAISS instead of claiming them. All
inference runs on the caller's thread (the model thread), serialised by a lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import shutil
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional

log = logging.getLogger(__name__)

INSTALL_HINT = ("embedder_backend=openvino needs OpenVINO and NNCF: "
                "pip install 'retriever[openvino]' (openvino 2026.4, nncf 3.4)")
FORMAT = 1  # bumped when what a cache entry holds changes: older entries are rebuilt
FLOAT_MIN_COSINE = 0.999
INT8_MEAN_COSINE = 0.98
VERIFY_TEXTS = 16
# A build's temporary entry untouched this long was left by a build cut short.
STALE_TMP_S = 600.0

# (texts) -> features as the model's own preprocess makes them (numpy, int64, padded).
Tokenize = Callable[[Sequence[str]], dict[str, np.ndarray]]
Reference = Callable[[Sequence[str]], np.ndarray]  # torch fp32 vectors of texts


def available(precision: str = "fp32") -> bool:
    try:
        import openvino  # noqa: F401

        if precision == "int8":
            import nncf  # noqa: F401
    except ImportError:
        return False
    return True


def _openvino() -> Any:
    try:
        import openvino
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc
    return openvino


def _nncf() -> Any:
    try:
        import nncf
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc
    return nncf


def cache_key(weights_revision: str, precision: str, cpu: str) -> str:
    """Directory name of a cached model: readable, and unique per CPU flag set."""
    flags = hashlib.sha1(cpu.encode()).hexdigest()[:8]
    return f"{weights_revision}-openvino-{precision}-{flags}"


@dataclass(frozen=True)
class Provenance:
    """Where a cached model came from (meta.json)."""

    key: str
    weights_revision: str
    precision: str
    cpu: str
    inputs: tuple[str, ...]
    calibration: str  # "" (float), or where the int8 calibration text came from
    calibration_texts: int
    calibration_sha: str  # of the calibration texts, in order
    built_s: float


class OpenVINOModel:
    """A compiled model: ``features -> (n, dimension) float32`` L2-normalised vectors."""

    def __init__(self, compiled: Any, inputs: Sequence[str], provenance: Provenance,
                 directory: Path, reused: bool, graph: Any) -> None:
        self._compiled = compiled
        # The verified graph it was compiled from (read from a checked cache entry, or just
        # built): further copies compile from it, never from files read again.
        self.graph = graph
        self._request = compiled.create_infer_request()
        self._lock = threading.Lock()
        self.inputs = tuple(inputs)
        self.provenance = provenance
        self.directory = directory
        self.reused = reused  # read from the cache, not built by this load

    def __call__(self, features: dict[str, np.ndarray]) -> np.ndarray:
        feed = {k: np.ascontiguousarray(features[k], dtype=np.int64) for k in self.inputs}
        with self._lock:
            result = self._request.infer(feed)
            out = np.array(result[self._compiled.output(0)], dtype=np.float32)
        return out


def load(torch_model: Any, *, cache_root: Path, weights_revision: str, pipeline: str,
         precision: str, cpu: str, threads: int, bf16_native: bool, tokenize: Tokenize,
         reference: Reference,
         calibration: Callable[[], tuple[list[str], str]], verify_texts: Sequence[str]
         ) -> OpenVINOModel:
    """The cached model for (weights, precision, CPU), built (and cached) when missing or
    damaged. ``calibration()`` -> (texts, where they came from) is only called for an int8
    build; ``verify_texts`` check a build against ``reference``. ``pipeline`` fingerprints
    what around the weights makes the vectors (`pipeline_fingerprint`): an entry traced for
    another pipeline is rebuilt."""
    ov = _openvino()
    if precision == "int8":
        _nncf()  # fail before converting, with the install hint
    key = cache_key(weights_revision, precision, cpu)
    directory = cache_root / key
    core = ov.Core()
    config = compile_config(precision, threads, bf16_native)
    _remove_stale_temporaries(cache_root)
    if directory.exists():
        try:
            return _read(core, directory, config, key, weights_revision, precision, cpu,
                         pipeline)
        except Exception as exc:  # any damage: rebuild, never fail start-up over a cache
            log.warning("cached OpenVINO model %s is unusable (%s: %s); rebuilding it",
                        directory, type(exc).__name__, exc)
            with contextlib.suppress(OSError):  # _save replaces it, or says why it cannot
                _remove(directory)
    return _build(ov, core, torch_model, directory, config, key, weights_revision, pipeline,
                  precision, cpu, tokenize, reference, calibration, verify_texts)


def compiled_copy(model: OpenVINOModel, threads: int, bf16_native: bool) -> OpenVINOModel:
    """A second compiled copy of ``model`` (from the verified graph it was compiled from,
    not from its cache files: those may have failed to save, or changed since) with
    ``threads`` inference threads, an infer request and a lock of its own: it runs beside
    the first. Its first inference (the smoke check) runs on the calling thread, whose
    priority the copy's workers inherit."""
    ov = _openvino()
    core = ov.Core()
    precision = model.provenance.precision
    compiled = core.compile_model(model.graph, "CPU",
                                  compile_config(precision, threads, bf16_native))
    copy = OpenVINOModel(compiled, model.inputs, model.provenance, model.directory,
                         reused=model.reused, graph=model.graph)
    _smoke(copy)
    return copy


def compile_config(precision: str, threads: int, bf16_native: bool) -> dict[str, Any]:
    """Compile properties. The inference precision is always set: OpenVINO's default is
    bf16 on a CPU with native bf16, which would make "fp32" silently bf16. An int8 model
    runs its unquantized ops (softmax, layer norms) in bf16 where native (faster, and what
    the gate measured), else fp32."""
    hint = {"fp32": "f32", "bf16": "bf16"}.get(precision, "bf16" if bf16_native else "f32")
    return {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": int(threads),
            "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY", "ENABLE_CPU_PINNING": False}


def _read(core: Any, directory: Path, config: dict[str, Any], key: str, weights_revision: str,
          precision: str, cpu: str, pipeline: str) -> OpenVINOModel:
    t0 = time.perf_counter()
    meta = json.loads((directory / "meta.json").read_text())
    expect = {"format": FORMAT, "key": key, "weights_revision": weights_revision,
              "precision": precision, "cpu": cpu, "pipeline": pipeline}
    if got := {k: meta.get(k) for k in expect if meta.get(k) != expect[k]}:
        raise ValueError(f"it was built for {got}, not {expect}")
    for name in ("model.xml", "model.bin"):
        if _sha256(directory / name) != meta["sha256"][name]:
            raise ValueError(f"{name} does not match its recorded hash")
    prov = Provenance(**{**meta["provenance"], "inputs": tuple(meta["provenance"]["inputs"])})
    graph = core.read_model(directory / "model.xml")
    compiled = core.compile_model(graph, "CPU", config)
    model = OpenVINOModel(compiled, prov.inputs, prov, directory, reused=True, graph=graph)
    _smoke(model)
    log.info("OpenVINO %s model read from %s in %.2fs", precision, directory,
             time.perf_counter() - t0)
    return model


def _build(ov: Any, core: Any, torch_model: Any, directory: Path, config: dict[str, Any],
           key: str, weights_revision: str, pipeline: str, precision: str, cpu: str,
           tokenize: Tokenize,
           reference: Reference, calibration: Callable[[], tuple[list[str], str]],
           verify_texts: Sequence[str]) -> OpenVINOModel:
    t0 = time.perf_counter()
    sample = tokenize(["a padded example", "and a longer one, padded less than the first"])
    inputs = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in sample]
    graph = convert(ov, torch_model, {k: sample[k] for k in inputs})
    cal_source, cal_texts = "", list[str]()
    if precision == "int8":
        cal_texts, cal_source = calibration()
        graph = quantize(graph, [{k: v for k, v in tokenize([t]).items() if k in inputs}
                                 for t in cal_texts])
    compiled = core.compile_model(graph, "CPU", config)
    prov = Provenance(
        key=key, weights_revision=weights_revision, precision=precision, cpu=cpu,
        inputs=tuple(inputs), calibration=cal_source, calibration_texts=len(cal_texts),
        calibration_sha=hashlib.sha256("\0".join(cal_texts).encode()).hexdigest()[:12]
        if cal_texts else "",
        built_s=round(time.perf_counter() - t0, 2))
    model = OpenVINOModel(compiled, inputs, prov, directory, reused=False, graph=graph)
    verify(model, tokenize, reference, verify_texts, precision)
    saved = _save(ov, graph, directory, prov, pipeline)
    log.info("OpenVINO %s model built in %.1fs%s; %s", precision, prov.built_s,
             f" (int8 calibrated on {len(cal_texts)} texts: {cal_source})" if cal_texts
             else "", f"cached in {directory}" if saved else
             "serving it uncached (the next start builds it again)")
    return model


def convert(ov: Any, torch_model: Any, example: dict[str, np.ndarray]) -> Any:
    """The sentence-transformers model (transformer, pooling, normalisation) as an OpenVINO
    graph with dynamic batch and sequence dimensions."""
    graph = _Graph(torch_model).eval()
    ex = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in example.items()}
    shape = [(k, ov.PartialShape([-1, -1]), ov.Type.i64) for k in example]
    # The tracer warns about Python-side branches on shapes (padding length, mask size);
    # with dynamic shapes they hold for every input (verify() checks it on padded batches).
    # It also reads every attribute, deprecated ones included, which log warnings.
    with warnings.catch_warnings(), torch.no_grad(), _quiet("sentence_transformers",
                                                            "transformers"):
        warnings.simplefilter("ignore")
        return ov.convert_model(graph, example_input=ex, input=shape)


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Those loggers at ERROR for the duration."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


class _Graph(torch.nn.Module):
    """What Embedder.embed computes on torch for one batch, as one module to trace."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        features = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            features["token_type_ids"] = token_type_ids
        emb = self.model(features)["sentence_embedding"]
        return functional.normalize(emb.float(), p=2, dim=1)


def quantize(graph: Any, dataset: list[dict[str, np.ndarray]]) -> Any:
    """Static int8 (NNCF post-training quantization, transformer preset: SmoothQuant and
    bias correction included) calibrated on ``dataset``, one text per item."""
    nncf = _nncf()
    nncf.set_log_level(logging.WARNING)
    # NNCF draws progress bars on stdout: keep them out of the service's output.
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nncf.quantize(graph, nncf.Dataset(dataset), model_type=nncf.ModelType.TRANSFORMER,
                             subset_size=len(dataset))


def verify(model: OpenVINOModel, tokenize: Tokenize, reference: Reference,
           texts: Sequence[str], precision: str) -> None:
    """Refuse a build whose vectors do not agree with torch fp32's on ``texts`` (one padded
    batch, longest and shortest together)."""
    texts = [t for t in texts if t.strip()][:VERIFY_TEXTS]
    if not texts:
        return
    got = _normalize(model(tokenize(texts)))
    cos = np.sum(got * reference(texts), axis=1)
    if precision == "int8":
        if not cos.mean() >= INT8_MEAN_COSINE:
            raise RuntimeError(f"the int8 OpenVINO model disagrees with torch fp32: mean "
                               f"cosine {cos.mean():.4f} < {INT8_MEAN_COSINE}")
    elif not cos.min() >= FLOAT_MIN_COSINE:
        raise RuntimeError(f"the OpenVINO conversion disagrees with torch fp32: min cosine "
                           f"{cos.min():.5f} < {FLOAT_MIN_COSINE}")
    log.debug("OpenVINO %s vs torch fp32 on %d texts: cosine mean %.5f, min %.5f",
              precision, len(texts), cos.mean(), cos.min())


def _smoke(model: OpenVINOModel) -> None:
    ids = np.array([[1, 5, 7, 2], [1, 5, 2, 0]], dtype=np.int64)  # in any vocabulary
    mask = (ids != 0).astype(np.int64)
    feats = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    out = model(feats)
    norms = np.linalg.norm(out, axis=1)
    if out.shape[0] != 2 or not np.all(np.isfinite(out)) or not np.allclose(norms, 1, atol=1e-2):
        raise ValueError("its forward pass gives no unit vectors")


def _save(ov: Any, graph: Any, directory: Path, prov: Provenance, pipeline: str) -> bool:
    """Write the cache entry under a temporary name, then rename it into place; True when
    it is in place. Any failure (a read-only or full data dir: OpenVINO reports a short
    write as a RuntimeError, not an OSError) is logged with what to do, leaves no
    temporary files, and the model is served uncached."""
    tmp = directory.parent / f".{directory.name}.tmp"
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        _remove(tmp)
        tmp.mkdir()
        # compress_to_fp16 defaults to True: it would round the fp32 weights.
        ov.save_model(graph, tmp / "model.xml", compress_to_fp16=False)
        meta = {"format": FORMAT, "key": prov.key, "weights_revision": prov.weights_revision,
                "precision": prov.precision, "cpu": prov.cpu, "pipeline": pipeline,
                "sha256": {n: _sha256(tmp / n) for n in ("model.xml", "model.bin")},
                "provenance": {**prov.__dict__, "inputs": list(prov.inputs)},
                "openvino": ov.get_version(), "built_at": datetime.now(UTC).isoformat()}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        _remove(directory)
        tmp.rename(directory)
        return True
    except Exception as exc:  # noqa: BLE001 - a cache must never stop the server
        log.warning("could not cache the OpenVINO model in %s (%s: %s): serving it uncached;"
                    " free space or make %s (and the entry, where one is left) writable, and"
                    " the next start caches it", directory, type(exc).__name__, exc,
                    directory.parent)
        return False
    finally:
        try:
            _remove(tmp)
        except OSError:
            log.warning("could not remove the temporary model files %s", tmp)


def pipeline_fingerprint(model: Any) -> str:
    """A hash of what around the weights decides a sentence-transformers model's vectors:
    its modules in order with their configurations (pooling, normalisation, sequence
    length, lower-casing) and its tokenizer. The weights' hash alone let a graph traced
    with mean pooling be served after the model was changed to CLS pooling."""
    h = hashlib.sha256()
    for module in model:
        h.update(type(module).__name__.encode())
        conf = module.get_config_dict() if hasattr(module, "get_config_dict") else {}
        h.update(json.dumps(conf, sort_keys=True, default=str).encode())
    h.update(str(getattr(model, "max_seq_length", "")).encode())
    backend = getattr(getattr(model, "tokenizer", None), "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    return h.hexdigest()[:16]


def _remove_stale_temporaries(cache_root: Path) -> None:
    """Remove what a build cut short (a kill during `_save`) left: entries being written
    are ``.<key>.tmp``. Only those untouched for STALE_TMP_S: a data dir's lock keeps
    other servers out, but a models directory may be shared through a link."""
    try:
        found = list(cache_root.glob(".*-openvino-*.tmp"))
    except OSError:
        return
    for tmp in found:
        try:
            if time.time() - tmp.lstat().st_mtime > STALE_TMP_S:
                _remove(tmp)
                log.info("removed %s, left by a model build that was cut short", tmp)
        except OSError as exc:
            log.warning("could not remove %s, left by a model build that was cut short "
                        "(%s)", tmp, exc)


def _remove(path: Path) -> None:
    """Remove a file, a link or a directory tree at ``path``; nothing there is fine."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _normalize(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)
