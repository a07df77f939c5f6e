"""What the embedder's backend choice rests on: the CPU's flags, the gate verdicts, and the
text an int8 model is calibrated on.

**Verdicts.** ``embedder_backend=auto`` never measures anything at start: it reads verdicts
that a benchmark run wrote (``bench/bench_backends.py --verdicts FILE``), one per (weights
revision, backend, precision, CPU flags): whether the backend passed the quality gate
(nDCG@10 and recall@10 on SciFact and on a code history set >= 99 % of torch fp32's, in the
same run as the speed) and its speed over raw sentence-transformers fp32 in that run. A
verdict of another model, backend or CPU kind is never used to pick a backend; a missing
or damaged verdict file reads as no verdicts.

Where they are read (`verdict_sources`): the package ships the verdicts measured for the
packaged model on the CPU kinds the project was measured on (``retriever/models/
verdicts.json``), so `auto` picks a gated backend on those kinds from the first start; a
data dir's own ``models/verdicts.json`` (a bench run on that machine) adds to them and wins
on equal keys. An explicit ``embedder_verdicts_file`` is the only source.

**Calibration text** for static int8: chunks as the service embeds them (header + text),
sampled from the catalog when it has some; else the service's own source files and docs
(bundled with the package, so a first start on an empty data dir still calibrates on real
code and prose). Both are mixed with short query-like lines, since queries run through the
same quantized model.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# The instruction sets that decide which backend and precision is fastest (and whether int8
# or bf16 run natively at all). A verdict or a cached model is only reused on equal flags.
SPEED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16",
               "amx_int8")
VERDICTS_VERSION = 1


@functools.cache
def cpu_flags() -> tuple[str, ...]:
    """The `SPEED_FLAGS` this CPU has (from /proc/cpuinfo; none elsewhere)."""
    try:
        present = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return ()
    return tuple(f for f in SPEED_FLAGS if f in present)


def cpu_key(flags: Sequence[str] | None = None) -> str:
    """The CPU kind as verdicts and the model cache name it: its speed flags."""
    flags = cpu_flags() if flags is None else flags
    return " ".join(flags) or "generic"


def cpu_model() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    return next((ln.split(":", 1)[1].strip() for ln in info.splitlines()
                 if ln.startswith("model name")), "")


def has_native_bf16(flags: Sequence[str] | None = None) -> bool:
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


def has_int8_dot(flags: Sequence[str] | None = None) -> bool:
    """VNNI or AMX: int8 dot products in one instruction. Without them OpenVINO int8 buys
    nothing (measured on an AVX2-only CPU: 1.0x its fp32)."""
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


# -- verdicts ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Verdict:
    """One backend's gate result and speed on one CPU kind, for one model's weights."""

    weights_revision: str
    backend: str  # "torch" | "openvino"
    precision: str  # "fp32" | "bf16" | "int8" | ...
    cpu: str  # cpu_key()
    passed: bool  # nDCG@10 and R@10 on every gate set >= 99 % of torch fp32's
    # Chunks/s over raw sentence-transformers fp32 encode, measured in the same run.
    speedup: float
    # Its vectors may share a namespace with float vectors of the same weights: the gate
    # also passed with one side's queries against the other side's documents, both ways.
    interchangeable: bool = False
    measured_at: str = ""
    cpu_model: str = ""
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.weights_revision, self.backend, self.precision, self.cpu)


def read_verdicts(path: Path) -> list[Verdict]:
    """The verdicts in ``path``; none when it is missing or unreadable, and none of those
    that are not well-formed (each logged): a damaged file reads as no verdicts, never as a
    wrong one ("passed": "false" is not a pass) nor as a failed start."""
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        log.warning("ignoring the embedder verdict file %s: %s", path, exc)
        return []
    items = obj.get("verdicts") if isinstance(obj, dict) else None
    if not isinstance(items, list):
        log.warning("ignoring the embedder verdict file %s: no list under \"verdicts\"", path)
        return []
    out = []
    for item in items:
        try:
            out.append(_verdict(item))
        except (TypeError, ValueError) as exc:
            log.warning("ignoring a malformed verdict in %s: %s", path, exc)
    return out


def _verdict(item: object) -> Verdict:
    """A verdict from its JSON object, every field of its type (TypeError/ValueError)."""
    if not isinstance(item, dict):
        raise TypeError(f"a verdict is an object, not {type(item).__name__}")
    names = set(Verdict.__dataclass_fields__)
    v = Verdict(**{k: val for k, val in item.items() if k in names})
    for name in ("weights_revision", "backend", "precision", "cpu"):
        value = getattr(v, name)
        if not isinstance(value, str) or not value:
            raise TypeError(f"{name} must be a non-empty string, not {value!r}")
    for name in ("passed", "interchangeable"):
        if not isinstance(getattr(v, name), bool):
            raise TypeError(f"{name} must be true or false, not {getattr(v, name)!r}")
    if (isinstance(v.speedup, bool) or not isinstance(v.speedup, int | float)
            or not math.isfinite(v.speedup) or v.speedup <= 0):
        raise ValueError(f"speedup must be a positive number, not {v.speedup!r}")
    if not isinstance(v.measured_at, str) or not isinstance(v.cpu_model, str):
        raise TypeError("measured_at and cpu_model must be strings")
    if not isinstance(v.detail, dict):
        raise TypeError(f"detail must be an object, not {type(v.detail).__name__}")
    return v


# The verdicts measured for the packaged model (bench/bench_backends.py --verdicts THIS).
PACKAGED_VERDICTS = Path(__file__).resolve().with_name("verdicts.json")


def verdict_sources(explicit: Path | None, data_dir: Path) -> tuple[Path, ...]:
    """The verdict files `auto` reads, later ones winning on equal keys: ``explicit`` alone
    when set, else the packaged verdicts and then the data dir's own."""
    if explicit is not None:
        return (explicit,)
    return (PACKAGED_VERDICTS, data_dir / "models" / "verdicts.json")


def read_all_verdicts(paths: Sequence[Path]) -> list[Verdict]:
    """The verdicts of ``paths`` merged: one per key, a later file's winning."""
    merged: dict[tuple[str, str, str, str], Verdict] = {}
    for path in paths:
        merged.update({v.key: v for v in read_verdicts(path)})
    return list(merged.values())


def write_verdicts(path: Path, verdicts: Iterable[Verdict]) -> None:
    """Merge ``verdicts`` into ``path`` (one per key, the new one wins), atomically."""
    merged = {v.key: v for v in read_verdicts(path)}
    merged.update({v.key: v for v in verdicts})
    body = {"version": VERDICTS_VERSION,
            "verdicts": [asdict(v) for _, v in sorted(merged.items())]}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".verdicts-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(body, fh, indent=2)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def find_verdict(verdicts: Iterable[Verdict], weights_revision: str, backend: str,
                 precision: str, cpu: str | None = None) -> Verdict | None:
    key = (weights_revision, backend, precision, cpu_key() if cpu is None else cpu)
    return next((v for v in verdicts if v.key == key), None)


def int8_interchangeable(verdicts: Iterable[Verdict], weights_revision: str) -> bool:
    """Whether these weights' OpenVINO int8 vectors may share a namespace with their float
    vectors: an int8 verdict that passed the gate with interchangeable vectors, on this CPU
    kind or any other. Any kind, because it is a property of the vectors, not of the machine
    serving them: a data dir whose namespaces were built in int8 where a verdict said so
    keeps serving on a CPU that runs float (AVX2 without VNNI, where `auto` picks torch), and
    every machine with the same verdicts files gives the documents the same vector class, so
    moving a data dir re-embeds nothing."""
    here = find_verdict(verdicts, weights_revision, "openvino", "int8")
    if here is not None:  # this CPU kind's own verdict decides when there is one
        return here.passed and here.interchangeable
    return any(v.weights_revision == weights_revision and v.backend == "openvino"
               and v.precision == "int8" and v.passed and v.interchangeable
               for v in verdicts)


# -- calibration text ----------------------------------------------------------------------
_PACKAGE = Path(__file__).resolve().parent.parent  # retriever/
_WINDOW_LINES = 30  # about one 256-token chunk of code


def fallback_texts() -> list[str]:
    """Chunk-like windows of the service's own sources and docs, and short query-like lines
    (docstring and comment openings), in a fixed order."""
    files = sorted(p for p in _PACKAGE.rglob("*.py") if "/v1/" not in p.as_posix())
    docs = [p for p in (_PACKAGE.parent / "README.md", *sorted((_PACKAGE.parent / "docs")
                                                               .glob("*.md")))
            if p.is_file()]
    chunks: list[str] = []
    lines_out: list[str] = []
    for p in [*files, *docs]:
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        # The header the service puts in front of a chunk: "<path> (<language>)".
        head = f"{p.relative_to(_PACKAGE.parent).as_posix()} " + (
            "(python)" if p.suffix == ".py" else "(markdown)")
        lines = text.splitlines()
        for i in range(0, len(lines), _WINDOW_LINES):
            body = "\n".join(lines[i : i + _WINDOW_LINES]).strip()
            if body:
                chunks.append(f"{head}\n{body}")
        for ln in lines:
            s = ln.strip().strip('"#').strip()
            if 24 <= len(s) <= 160 and re.match(r"[A-Z][a-z]", s):
                lines_out.append(s)
    return _interleave(chunks, lines_out)


def calibration_sample(texts: Sequence[str], n: int, *, short: Sequence[str] = ()) -> list[str]:
    """``n`` texts spread over ``texts`` (a fixed choice: by hash, not position), a quarter of
    them query-like short texts: ``short``, or else a line of words from each text."""
    unique = sorted(set(t for t in texts if t.strip()), key=_stable)
    if not unique:
        return []
    n_short = n // 4
    long = unique[: n - n_short]
    queries = (sorted(set(short), key=_stable) if short
               else [q for t in reversed(unique) if (q := _query_like(t))])
    return _interleave(long, queries[:n_short])[:n]


def _query_like(text: str) -> str:
    """The longest line of ``text`` that reads like words, cut to a query's length."""
    lines = [ln.strip() for ln in text.splitlines() if re.match(r"\s*[A-Za-z]", ln)]
    return max(lines, key=len, default="")[:160]


def _stable(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "replace")).hexdigest()


def _interleave(a: Sequence[str], b: Sequence[str]) -> list[str]:
    """``a`` with ``b`` spread through it (a cut of the result keeps both kinds)."""
    if not b:
        return list(a)
    out: list[str] = []
    step = max(1, len(a) // len(b))
    bi = 0
    for i, t in enumerate(a):
        out.append(t)
        if (i + 1) % step == 0 and bi < len(b):
            out.append(b[bi])
            bi += 1
    out.extend(b[bi:])
    return out


def fallback_sample(n: int) -> list[str]:
    """``n`` calibration texts from the bundled fallback."""
    texts = fallback_texts()
    chunks = [t for t in texts if "\n" in t]
    short = [t for t in texts if "\n" not in t]
    return calibration_sample(chunks, n, short=short)
