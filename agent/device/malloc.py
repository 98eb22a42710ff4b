"""glibc malloc settings for a long-running process on a small device (docs/performance.md).

Sealing a raw-frame envelope builds and frees ~10 MB of short-lived objects every few seconds
(rows, columns, CBOR, the zstd context). With glibc's defaults that memory is not given back:
the mmap threshold rises to the largest block freed (so later large buffers come from the heap
and fragment it), and free memory inside the heap is returned only from its top. On the
10,000 frames/s bench that left the agent ~7 MB larger than it needs to be.

:func:`tune` fixes both thresholds (what ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``
do, so a value set in the environment wins and nothing is changed); :func:`trim` hands free heap
pages back after a large transient allocation. Both are no-ops where the C library is not glibc.
"""
from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: Blocks from this size up are mmapped (and unmapped when freed); glibc's initial default.
MMAP_THRESHOLD = 128 * 1024
#: Free memory above this at the top of the heap is returned at once.
TRIM_THRESHOLD = 128 * 1024

_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def _libc():
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _libc()


def tune() -> bool:
    """Fixes glibc's mmap and trim thresholds (see the module docstring). Returns whether it did."""
    if _LIBC is None or any(k in os.environ for k in _ENV):
        return False
    ok = (_LIBC.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
          and _LIBC.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
    if not ok:
        log.warning("malloc: mallopt refused the thresholds; glibc's defaults stay")
    return ok


def trim() -> None:
    """Returns free heap memory to the system (``malloc_trim(0)``); a few ms at most."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
