"""Raw CAN frames as stored: one block of columns per bus and group commit (docs/store.md).

A row per frame cost SQLite more than everything else the agent does with a frame (an index
entry, a row header, a tuple to bind; then a sort over every row when sealing). A block holds
the frames of one bus that one group commit wrote, as packed columns::

    version (1) | n (uint32) | t_us (n x int64) | key (n x uint32) | length (n x uint8) | data

``key`` is the CAN id, ``| EXT_FLAG`` (bit 31) for a 29-bit id (drivers.core.model.FrameBatch).
Little-endian, whatever the machine. :func:`decode` checks what it reads (ids in range for
their form, payloads of at most 64 bytes, no negative time): a block that fails is not
sealable and is set aside by the store (quarantine), never sent and never retried.
"""
from __future__ import annotations

import itertools
import sys
from array import array

from drivers.core.model import EXT_FLAG, EXT_MAX, STD_MAX, FrameBatch

VERSION = 1
#: A block holds at most this many frames (a larger commit is split): sealing takes blocks
#: whole where it can, and one 128 KiB envelope holds ~27,000 frames.
BLOCK_MAX = 8192
MAX_DATA = 64
_SWAP = sys.byteorder != "little"


class BlockError(ValueError):
    """A stored block that cannot be sealed (corrupt, or frames the protocol cannot carry)."""


def _packed(typecode: str, values) -> bytes:
    a = array(typecode, values)
    if _SWAP:
        a.byteswap()
    return a.tobytes()


def _unpacked(typecode: str, raw: bytes) -> list[int]:
    a = array(typecode)
    a.frombytes(raw)
    if _SWAP:
        a.byteswap()
    return a.tolist()


def encode(t_us: list[int], keys: list[int], data: list) -> bytes:
    """One block of the given columns (equal lengths, at most :data:`BLOCK_MAX` frames)."""
    n = len(keys)
    lengths = bytes(map(len, data))   # ValueError for a payload over 255 bytes
    return b"".join((bytes((VERSION,)), n.to_bytes(4, "little"), _packed("q", t_us),
                     _packed("I", keys), lengths, b"".join(data)))


def blocks(batch: FrameBatch) -> list[tuple[int, int, bytes]]:
    """``(n, earliest t_us, block)`` for a batch, split into blocks of :data:`BLOCK_MAX`."""
    out = []
    for i in range(0, len(batch), BLOCK_MAX):
        t = batch.t_us[i:i + BLOCK_MAX]
        out.append((len(t), min(t), encode(t, batch.keys[i:i + BLOCK_MAX], batch.data[i:i + BLOCK_MAX])))
    return out


def decode(bus: str, blob: bytes) -> FrameBatch:
    """The frames of a block, checked; raises :class:`BlockError` when it cannot be sealed."""
    blob = bytes(blob)
    if len(blob) < 5 or blob[0] != VERSION:
        raise BlockError(f"not a frame block (version byte {blob[:1].hex() or 'missing'})")
    n = int.from_bytes(blob[1:5], "little")
    o_keys = 5 + 8 * n
    o_lens = o_keys + 4 * n
    o_data = o_lens + n
    if len(blob) < o_data:
        raise BlockError(f"truncated block: {len(blob)} bytes for {n} frames")
    lengths = blob[o_lens:o_data]
    if o_data + sum(lengths) != len(blob):
        raise BlockError(f"block of {n} frames: {len(blob) - o_data} data bytes, lengths say {sum(lengths)}")
    t_us = _unpacked("q", blob[5:o_keys])
    keys = _unpacked("I", blob[o_keys:o_lens])
    if n:
        if min(t_us) < 0:
            raise BlockError(f"negative frame time {min(t_us)}")
        if max(lengths) > MAX_DATA:
            raise BlockError(f"a payload of {max(lengths)} bytes (at most {MAX_DATA})")
        for k in set(keys):   # a few hundred distinct ids at most
            if (STD_MAX < k < EXT_FLAG) or k > EXT_FLAG + EXT_MAX:
                form = "29-bit" if k >= EXT_FLAG else "11-bit"
                raise BlockError(f"{form} id {k & ~EXT_FLAG:#x} out of range")
    ends = list(itertools.accumulate(lengths, initial=o_data))
    data = [blob[a:b] for a, b in zip(ends, ends[1:])]
    return FrameBatch(bus, t_us, keys, data)


def decode_frames(bus: str, blob: bytes) -> dict:
    """A stored block as plain columns (``dongle export``): times, ids, ext flags, payloads."""
    b = decode(bus, blob)
    return {"t_us": b.t_us, "id": [k & EXT_MAX for k in b.keys], "ext": [k >= EXT_FLAG for k in b.keys],
            "data": b.data}
