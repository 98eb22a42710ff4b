"""agent.malloc: glibc's thresholds are fixed unless the environment sets them."""
from __future__ import annotations

import subprocess
import sys

import pytest

from agent.device import malloc

pytestmark = pytest.mark.skipif(malloc._LIBC is None, reason="not glibc")


def _run(code: str, env: dict[str, str]) -> str:
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_tune_sets_the_thresholds_unless_the_environment_does(tmp_path):
    code = "from agent.device import malloc; print(malloc.tune()); malloc.trim()"
    assert _run(code, {"PATH": "/usr/bin:/bin"}) == "True"
    assert _run(code, {"PATH": "/usr/bin:/bin", "MALLOC_MMAP_THRESHOLD_": "65536"}) == "False"


def test_trim_returns_freed_heap_to_the_system():
    """Many small blocks freed in the middle of the heap stay resident until trimmed."""
    code = """
import ctypes, re
from agent.device import malloc
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def anon_kb():
    return int(re.search(r"RssAnon:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
malloc.tune()
blocks = [libc.malloc(4000) for _ in range(20000)]   # ~80 MB below the mmap threshold
keep = libc.malloc(4000)                              # pins the top of the heap
for b in blocks:
    ctypes.memset(b, 1, 4000)
for b in blocks:
    libc.free(b)
before = anon_kb()
malloc.trim()
print(before - anon_kb())
"""
    assert int(_run(code, {"PATH": "/usr/bin:/bin"})) > 50_000  # KB handed back
