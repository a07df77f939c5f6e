"""The serving process caps glibc's malloc arenas (retriever/_malloc.py)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")

# 16 threads allocate at once; malloc_info then lists one <heap> per arena.
PROBE = """
import ctypes, sys, threading, tempfile
from retriever._malloc import limit_arenas
applied = limit_arenas(int(sys.argv[1]))
barrier = threading.Barrier(16)
keep = []
def work():
    barrier.wait()
    keep.append([bytearray(50_000) for _ in range(20)])
threads = [threading.Thread(target=work) for _ in range(16)]
[t.start() for t in threads]; [t.join() for t in threads]
libc = ctypes.CDLL(None)
libc.fopen.restype = ctypes.c_void_p
with tempfile.NamedTemporaryFile(suffix=".xml") as f:
    fp = libc.fopen(f.name.encode(), b"w")
    libc.malloc_info(0, ctypes.c_void_p(fp))
    libc.fclose(ctypes.c_void_p(fp))
    print(applied, open(f.name).read().count("<heap nr="))
"""


def arenas(cap: int) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, str(cap)], capture_output=True,
                         text=True, timeout=60, check=True).stdout.split()
    return out[0] == "True", int(out[1])


def test_the_server_process_uses_at_most_malloc_arena_max_arenas() -> None:
    applied, capped = arenas(2)
    assert applied and capped <= 2
    applied, default = arenas(0)  # 0 leaves glibc's default: up to 8 per core
    assert not applied and default > 2
