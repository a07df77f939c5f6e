"""Helpers the benchmarks share: the machine's description, git, progress lines."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

GIT_ENV = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null",
           "GIT_TERMINAL_PROMPT": "0"}
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True,
                          text=True, env=GIT_ENV).stdout.strip()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cpu() -> dict:
    """CPU model, cores and the instruction-set flags that decide embedding speed."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines()
                  if ln.startswith("model name")), platform.processor())
    present = set(info.split())
    return {"model": model, "cores": os.cpu_count(),
            "flags": [f for f in FLAGS if f in present]}


def cpu_line(c: dict) -> str:
    return f"{c['model']}, {c['cores']} cores ({' '.join(c['flags'])})"


def gpu_line() -> str:
    """The GPU's name, memory and driver as nvidia-smi reports them (or why not)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=30).stdout.strip()
        return out or "no nvidia-smi output"
    except Exception as exc:  # noqa: BLE001 - reported as is
        return f"nvidia-smi failed: {exc}"
