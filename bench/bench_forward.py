"""Pure forward passes of the embedder on CUDA, per precision and batch size.

    python bench/bench_forward.py [--out bench/results/forward-cuda.json]

What the GPU itself delivers, without the CPU work around it: texts (1,000-character slices
of standard-library sources) are tokenised once, sorted longest first and moved to the GPU;
each precision (fp32, fp16, bf16) then runs every batch of 32, 128 and 512 rows, each batch
cut to its longest row, twice (the first pass untimed, so every shape has been seen once).
Then `SentenceTransformer.encode` (tokenisation included) at batch 32 and 256, fp32 and
after `model.half()`, twice in alternation. Prints chunks/s; writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import sysconfig
import time
from pathlib import Path

import torch
from sentence_transformers import SentenceTransformer

from retriever.models.embedder import default_model_path

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results/forward-cuda.json"))
    ap.add_argument("--texts", type=int, default=4096)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_forward.py measures CUDA: no GPU here")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = []
    for p in sorted(stdlib.glob("asyncio/*.py")) + sorted(stdlib.glob("email/*.py")):
        t = p.read_text(errors="replace")
        texts += [t[i : i + 1000] for i in range(0, len(t), 1000)]
    texts = texts[: args.texts]
    model = SentenceTransformer(default_model_path(), device="cuda", local_files_only=True)
    model.eval()
    t0 = time.perf_counter()
    feats = model.preprocess(texts)
    result: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                    "texts": len(texts), "tokenize_per_s": len(texts) / (time.perf_counter() - t0),
                    "forward": {}, "encode": {}}
    lengths = feats["attention_mask"].sum(1)
    order = torch.argsort(lengths, descending=True)
    dev = {k: v[order].cuda() for k, v in feats.items() if isinstance(v, torch.Tensor)}
    widths = lengths[order].tolist()

    def run(bs: int) -> None:
        for b in range(0, len(texts), bs):
            batch = {k: v[b : b + bs, : int(widths[b])] for k, v in dev.items()}
            with torch.inference_mode():
                model(batch)["sentence_embedding"]
        torch.cuda.synchronize()

    for rep in range(2):
        for prec, dtype in DTYPES.items():
            model.to(dtype)
            for bs in (32, 128, 512):
                run(bs)
                t0 = time.perf_counter()
                run(bs)
                rate = len(texts) / (time.perf_counter() - t0)
                result["forward"].setdefault(f"{prec}/batch{bs}", []).append(rate)
                print(f"rep {rep} {prec} batch {bs}: {rate:.0f} chunks/s", flush=True)
    for prec in ("fp32", "fp16", "fp32", "fp16"):
        model.to(DTYPES[prec])
        for bs in (32, 256):
            model.encode(texts[:256], batch_size=bs)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model.encode(texts, batch_size=bs)
            torch.cuda.synchronize()
            rate = len(texts) / (time.perf_counter() - t0)
            result["encode"].setdefault(f"{prec}/batch{bs}", []).append(rate)
            print(f"encode {prec} batch {bs}: {rate:.0f} chunks/s", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
