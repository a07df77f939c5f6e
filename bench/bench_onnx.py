"""Would an ONNX Runtime embedder backend help on this CPU? ONNX Runtime fp32 and dynamic
int8 against the service's torch fp32 and OpenVINO fp32 / static int8 backends.

    pip install -e '.[bench-onnx]'
    python bench/bench_onnx.py [--chunks 192] [--rounds 5] [--out bench/results/onnx-probe.json]

In one process, on the same real chunks (this repository's ``retriever/`` and ``docs/``,
cut by the service's structured chunkers, with their headers; a fixed sample), in the same
batches (the service's token-budgeted ones, longest first):

- **torch fp32**: the service's ``Embedder`` (the reference and the default);
- **openvino fp32 / int8**: the service's ``Embedder`` with that backend (int8: NNCF static
  quantization calibrated on other chunks of the same pool, as a server calibrates on its
  catalog's);
- **onnxruntime fp32**: the same transformer exported with ``torch.onnx.export`` (from a
  model copy of its own: tracing changes the traced module's state), mean pooling and
  normalization in numpy, the CPU execution provider with as many threads as torch;
- **onnxruntime int8**: that graph after ``quantize_dynamic`` (int8 weights, dynamic
  activation scales), ONNX Runtime's own int8 path.

Speed: ``--rounds`` rounds, the candidates interleaved within each; the best round of each
(and the median), as a ratio to torch fp32 in the same round set. Fidelity: cosine of each
chunk vector to torch fp32's (mean, min). Writes JSON and Markdown naming the CPU model
and flags; the machine may be shared (the load average is recorded).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
from bench_backends import chunk_doc, loadavg  # noqa: E402
from benchlib import cpu, cpu_line, git, log  # noqa: E402

from retriever.config import Settings  # noqa: E402
from retriever.ingest.pipeline import service_chunkers  # noqa: E402
from retriever.models.embedder import Embedder, _batches, default_model_path  # noqa: E402
from retriever.slo.evaluation import CorpusDoc  # noqa: E402

INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def chunk_pool(ref: Embedder, settings: Settings) -> list[str]:
    """Every embedded text of the repository's retriever/ and docs/, in a fixed order."""
    chunkers = service_chunkers(settings, ref, structured=True)
    files = sorted(ROOT.glob("retriever/**/*.py")) + sorted(ROOT.glob("docs/*.md"))
    texts: list[str] = []
    for p in files:
        rel = str(p.relative_to(ROOT))
        texts += chunk_doc(CorpusDoc(doc_id=rel, text=p.read_text(), path=rel), chunkers, ref)
    return sorted(texts, key=lambda t: hashlib.sha256(t.encode()).hexdigest())


def export_onnx(model_dir: str, path: Path) -> None:
    """The transformer of the packaged model as an ONNX graph (last hidden state), from a
    model loaded for this alone."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)

    class Hidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            return self.m(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state

    dummy = tok(["an example", "another example text"], return_tensors="pt", padding=True)
    axes = {n: {0: "batch", 1: "tokens"} for n in (*INPUTS, "last_hidden_state")}
    torch.onnx.export(Hidden(), tuple(dummy[n] for n in INPUTS), str(path),
                      input_names=list(INPUTS), output_names=["last_hidden_state"],
                      dynamic_axes=axes, opset_version=17, dynamo=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chunks", type=int, default=192)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calibration-samples", type=int,
                    default=Settings().embedder_calibration_samples)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/onnx-probe.json")
    args = ap.parse_args()

    import onnxruntime as ort
    import openvino
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    machine = cpu()
    result: dict[str, Any] = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": git(ROOT, "rev-parse", "--short", "HEAD"),
        "cpu": machine, "threads": torch.get_num_threads(), "loadavg_start": loadavg(),
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__,
                     "openvino": openvino.get_version()},
    }
    log(f"CPU {cpu_line(machine)}; load average {result['loadavg_start']}")
    base = Settings(embedder_backend="torch")  # the fp32 reference, whatever the default
    ref = Embedder(base)
    ref.load()
    pool = chunk_pool(ref, base)
    texts, calib = pool[: args.chunks], pool[args.chunks:]
    result["chunks"] = {"timed": len(texts), "tokens": int(sum(ref.count_tokens(texts))),
                        "pool": len(pool)}

    candidates: dict[str, Any] = {"torch fp32": lambda: ref.embed(texts)}
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as tmp:
        for prec in ("fp32", "int8"):
            e = Embedder(Settings(data_dir=Path(tmp) / prec, embedder_backend="openvino",
                                  embedder_precision=prec,
                                  embedder_calibration_samples=args.calibration_samples))
            e.load(calibration_texts=lambda n: calib[:n])
            candidates[f"openvino {prec}"] = lambda e=e: e.embed(texts)
        fp32_path, int8_path = Path(tmp) / "model.onnx", Path(tmp) / "model-int8.onnx"
        t0 = time.perf_counter()
        export_onnx(base.embedder_model or default_model_path(), fp32_path)
        quantize_dynamic(str(fp32_path), str(int8_path), weight_type=QuantType.QInt8)
        result["onnx_build_s"] = round(time.perf_counter() - t0, 2)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        sessions = {p: ort.InferenceSession(str(p), options,
                                            providers=["CPUExecutionProvider"])
                    for p in (fp32_path, int8_path)}

        tok = ref._model.tokenizer
        feats = tok(texts, padding=True, truncation=True, max_length=ref.max_tokens,
                    return_tensors="np")
        lengths = feats["attention_mask"].sum(1).tolist()
        order = sorted(range(len(texts)), key=lambda i: -lengths[i])
        batches = list(_batches(order, lengths, ref.default_batch_size,
                                ref.default_batch_tokens))

        def run_onnx(session: Any) -> np.ndarray:
            out = np.empty((len(texts), ref.dimension), dtype=np.float32)
            for idx, width in batches:
                inputs = {k: feats[k][idx, :width].astype(np.int64) for k in INPUTS}
                hidden = session.run(None, inputs)[0]
                mask = inputs["attention_mask"][..., None].astype(np.float32)
                pooled = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
                out[idx] = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
            return out

        candidates["onnxruntime fp32"] = lambda: run_onnx(sessions[fp32_path])
        candidates["onnxruntime int8 (dynamic)"] = lambda: run_onnx(sessions[int8_path])

        vectors = {name: np.asarray(fn()) for name, fn in candidates.items()}  # warm-up too
        seconds: dict[str, list[float]] = {name: [] for name in candidates}
        for r in range(args.rounds):
            for name, fn in candidates.items():
                t0 = time.perf_counter()
                fn()
                seconds[name].append(time.perf_counter() - t0)
            log(f"round {r + 1}/{args.rounds}: " + ", ".join(
                f"{n} {len(texts) / s[-1]:.1f}/s" for n, s in seconds.items()))
    ref_best, ref_median = min(seconds["torch fp32"]), float(np.median(seconds["torch fp32"]))
    rows = []
    for name, s in seconds.items():
        cos = (vectors[name] * vectors["torch fp32"]).sum(1)
        rows.append({"backend": name, "chunks_per_s": round(len(texts) / min(s), 1),
                     "x_torch_fp32": round(ref_best / min(s), 2),
                     "x_torch_fp32_median": round(ref_median / float(np.median(s)), 2),
                     "cos_mean": round(float(cos.mean()), 4),
                     "cos_min": round(float(cos.min()), 4)})
    result["rows"] = rows
    result["loadavg_end"] = loadavg()
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(render(result))
    print(render(result))
    return 0


def render(r: dict[str, Any]) -> str:
    c = r["cpu"]
    lines = [
        f"# ONNX Runtime against the service's embedder backends on {c['model']}",
        "",
        f"{r['when']}, commit {r['commit']}. CPU **{cpu_line(c)}**; {r['threads']} threads; "
        + ", ".join(f"{k} {v}" for k, v in r["versions"].items())
        + f". Load average {r['loadavg_start']} at the start, {r['loadavg_end']} at the end.",
        "",
        f"{r['chunks']['timed']} real chunks ({r['chunks']['tokens']} tokens; the service's "
        "structured chunking and headers of this repository's retriever/ and docs/), the "
        "service's token-budgeted batches for every candidate; the best of "
        "the rounds (median in brackets) as × torch fp32 in the same process. ONNX graph "
        f"export and dynamic quantization took {r['onnx_build_s']} s.",
        "",
        "| backend | chunks/s | × torch fp32 | cos vs torch fp32 mean / min |",
        "|---|---|---|---|",
    ]
    for row in r["rows"]:
        lines.append(f"| {row['backend']} | {row['chunks_per_s']} | **{row['x_torch_fp32']}** "
                     f"[{row['x_torch_fp32_median']}] | {row['cos_mean']} / {row['cos_min']} |")
    by = {row["backend"]: row for row in r["rows"]}
    lines += [
        "",
        "Read: at each precision ONNX Runtime against OpenVINO on this CPU — fp32 "
        f"{by['onnxruntime fp32']['x_torch_fp32']}× vs {by['openvino fp32']['x_torch_fp32']}×, "
        f"int8 {by['onnxruntime int8 (dynamic)']['x_torch_fp32']}× (cosine min "
        f"{by['onnxruntime int8 (dynamic)']['cos_min']}) vs "
        f"{by['openvino int8']['x_torch_fp32']}× (cosine min {by['openvino int8']['cos_min']}).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
