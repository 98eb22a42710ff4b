"""Delta updates: a zstd patch of the new bundle's tar against the installed one.

The old tar is the raw content the patch refers to (what ``zstd --patch-from`` does): matches may point
anywhere into the old bytes, so a release that changes a few modules costs the changed bytes
plus the match descriptions. The window must reach back over the whole dictionary, hence
``window_log`` >= 25 (32 MiB) and larger for larger bundles — with the default window the patch
loses most references and grows by two orders of magnitude. Long-distance matching finds
repeats far back in the window cheaply.

The patch is a standard zstd frame: ``zstd -d --patch-from=OLD`` applies it, and patches made by
``zstd --patch-from`` apply here (tests/test_update_bundle.py checks both directions when the CLI
is installed).
"""
from __future__ import annotations

import logging

import zstandard

from agent.update.bundle import FrameParams, decompress_bounded

log = logging.getLogger(__name__)

MIN_WINDOW_LOG = 25
MAX_WINDOW_LOG = 30   # 1 GiB: the largest window a device decoder accepts
LEVEL = 19


class DeltaError(Exception):
    """A patch that cannot be made or applied."""


def window_log_for(old_size: int, new_size: int) -> int:
    need = max(old_size, new_size, 1).bit_length() + 1
    wl = max(MIN_WINDOW_LOG, need)
    if wl > MAX_WINDOW_LOG:
        raise DeltaError(f"bundles of {max(old_size, new_size)} bytes are too large for a delta")
    return wl


def _dict(old: bytes) -> zstandard.ZstdCompressionDict:
    return zstandard.ZstdCompressionDict(old, dict_type=zstandard.DICT_TYPE_RAWCONTENT)


def make_delta(old: bytes, new: bytes, level: int = LEVEL) -> bytes:
    """The patch that turns ``old`` into ``new`` (both uncompressed tars). Release host only.

    The old bundle is referenced as a *prefix* (``ZSTD_CCtx_refPrefix``, as ``zstd
    --patch-from`` does), through python-zstandard's low-level cffi bindings: its
    ``ZstdCompressor(dict_data=...)`` loads a dictionary into a CDict, which indexes only a
    suffix of a large dictionary and skips long-distance matching, so a 60 MB environment
    patch came out at 5.6 MB instead of a few KB. The frame is an ordinary zstd frame either way:
    devices apply it with the public API (:func:`apply_delta`, raw-content dictionary).
    """
    from zstandard._cffi import ffi, lib  # noqa: PLC0415 - only the release host needs it

    wl = window_log_for(len(old), len(new))
    cctx = lib.ZSTD_createCCtx()
    if cctx == ffi.NULL:
        raise MemoryError("ZSTD_createCCtx")
    try:
        for param, value in ((lib.ZSTD_c_compressionLevel, level), (lib.ZSTD_c_windowLog, wl),
                             (lib.ZSTD_c_enableLongDistanceMatching, 1),
                             (lib.ZSTD_c_contentSizeFlag, 1), (lib.ZSTD_c_checksumFlag, 1)):
            _check(lib, lib.ZSTD_CCtx_setParameter(cctx, param, value), "setParameter")
        _check(lib, lib.ZSTD_CCtx_setPledgedSrcSize(cctx, len(new)), "setPledgedSrcSize")
        old_buf = ffi.from_buffer(old)
        _check(lib, lib.ZSTD_CCtx_refPrefix(cctx, old_buf, len(old)), "refPrefix")
        cap = lib.ZSTD_compressBound(len(new))
        dst = ffi.new("char[]", cap)
        n = lib.ZSTD_compress2(cctx, dst, cap, ffi.from_buffer(new), len(new))
        _check(lib, n, "compress2")
        return ffi.buffer(dst, n)[:]
    finally:
        lib.ZSTD_freeCCtx(cctx)


def _check(lib, code: int, what: str) -> None:  # noqa: ANN001
    if lib.ZSTD_isError(code):
        from zstandard._cffi import ffi  # noqa: PLC0415
        raise DeltaError(f"{what}: {ffi.string(lib.ZSTD_getErrorName(code)).decode()}")


def apply_delta(old: bytes, patch: bytes, max_size: int) -> bytes:
    """Applies ``patch`` to ``old``; refuses output beyond ``max_size`` bytes or a window beyond
    ``MAX_WINDOW_LOG``. The caller checks the result's hash."""
    try:
        fp = FrameParams.of(patch)
        if fp.content_size and fp.content_size > max_size:
            raise DeltaError(f"patch output claims {fp.content_size} bytes, over {max_size}")
        dctx = zstandard.ZstdDecompressor(dict_data=_dict(old),
                                          max_window_size=1 << MAX_WINDOW_LOG)
        return decompress_bounded(dctx, patch, max_size, fp.content_size, DeltaError, "patch output")
    except zstandard.ZstdError as e:
        raise DeltaError(f"patch does not apply: {e}") from e
