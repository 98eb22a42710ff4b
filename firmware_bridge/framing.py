"""Frame layer of the agent <-> MCU serial protocol (docs/mcu-protocol.md §2): COBS + CRC-16.

Pure functions and one incremental de-framer; no I/O. A frame on the wire is::

    0x00  COBS( body || crc16_le(body) )  0x00

``body`` is the packet (header + payload, see :mod:`firmware_bridge.messages`). The CRC is
CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF, no reflection, no final xor; check value of
``b"123456789"`` is 0x29B1), sent little-endian. The leading 0x00 lets a receiver that holds
line noise in its buffer throw it away before a real frame starts; empty frames are ignored.

Everything that can go wrong with bytes from the line raises :class:`FrameError` (or its
subclass :class:`CrcError`) and nothing else.
"""
from __future__ import annotations

import binascii
import logging

log = logging.getLogger(__name__)

DELIMITER = 0x00
CRC_LEN = 2
#: Largest packet (header + payload) either side sends. Receivers drop anything longer.
MAX_BODY = 3 + 256
#: COBS adds one code byte per started run of 254 bytes.
MAX_ENCODED = MAX_BODY + CRC_LEN + (MAX_BODY + CRC_LEN + 253) // 254


class FrameError(ValueError):
    """Bytes from the line that are not a valid frame."""


class CrcError(FrameError):
    """A frame whose CRC does not match its body (bit errors on the line)."""


def crc16(data: bytes, crc: int = 0xFFFF) -> int:
    """CRC-16/CCITT-FALSE. ``binascii.crc_hqx`` is exactly this CRC when seeded with 0xFFFF."""
    return binascii.crc_hqx(data, crc)


def cobs_encode(data: bytes) -> bytes:
    """Consistent Overhead Byte Stuffing (Cheshire & Baker 1999), canonical form.

    The output contains no 0x00 byte. A run of 254 non-zero bytes at the very end is not
    followed by an empty 0x01 block (the form Wikipedia's examples use).
    """
    out = bytearray()
    n = len(data)
    i = 0
    while True:
        # One block: up to 254 non-zero bytes, then (implied) a zero unless the code is 0xFF.
        start = i
        while i < n and data[i] != 0 and i - start < 254:
            i += 1
        out.append(i - start + 1)
        out += data[start:i]
        if i - start == 254:
            if i == n:
                break
            continue  # 0xFF block: no implied zero, data goes on
        if i == n:
            break
        i += 1  # skip the zero the block's code stands for
    return bytes(out)


def cobs_decode(encoded: bytes) -> bytes:
    """Inverse of :func:`cobs_encode`; ``encoded`` is one frame without delimiters."""
    if not encoded:
        raise FrameError("empty COBS frame")
    out = bytearray()
    n = len(encoded)
    i = 0
    while i < n:
        code = encoded[i]
        if code == 0:
            raise FrameError(f"0x00 inside a COBS frame at offset {i}")
        end = i + code
        if end > n:
            raise FrameError(f"COBS block at offset {i} runs past the end of the frame")
        block = encoded[i + 1:end]
        if 0 in block:
            raise FrameError("0x00 inside a COBS block")
        out += block
        i = end
        if code != 0xFF and i < n:
            out.append(0)
    return bytes(out)


def encode_frame(body: bytes) -> bytes:
    """Body -> wire bytes, delimiters included."""
    if not body:
        raise ValueError("empty packet")
    if len(body) > MAX_BODY:
        raise ValueError(f"packet of {len(body)} bytes exceeds MAX_BODY={MAX_BODY}")
    raw = body + crc16(body).to_bytes(CRC_LEN, "little")
    return b"\x00" + cobs_encode(raw) + b"\x00"


def decode_frame(encoded: bytes) -> bytes:
    """One frame's bytes between two delimiters -> body. Raises :class:`FrameError`."""
    if len(encoded) > MAX_ENCODED:
        raise FrameError(f"frame of {len(encoded)} bytes exceeds MAX_ENCODED={MAX_ENCODED}")
    raw = cobs_decode(encoded)
    if len(raw) < CRC_LEN + 1:
        raise FrameError(f"frame of {len(raw)} decoded bytes is too short")
    body, got = raw[:-CRC_LEN], int.from_bytes(raw[-CRC_LEN:], "little")
    want = crc16(body)
    if got != want:
        raise CrcError(f"CRC mismatch: frame says {got:#06x}, body gives {want:#06x}")
    return body


class Deframer:
    """Incremental receiver: feed it whatever the port returned, get complete bodies back.

    Never raises. Bad frames (COBS or CRC errors, overlong runs without a delimiter) are
    dropped, counted in :attr:`bad_frames` and logged; the stream resynchronises at the next
    0x00.
    """

    def __init__(self, max_encoded: int = MAX_ENCODED) -> None:
        self._buf = bytearray()
        self._max = max_encoded
        self._discarding = False
        self.bad_frames = 0
        self.last_error: FrameError | None = None

    def feed(self, data: bytes) -> list[bytes]:
        bodies: list[bytes] = []
        self._buf += data
        while True:
            idx = self._buf.find(DELIMITER)
            if idx < 0:
                if len(self._buf) > self._max:
                    if not self._discarding:  # count an overlong run once
                        self._bad(FrameError(f"more than {self._max} bytes without a delimiter"))
                    self._buf.clear()
                    self._discarding = True  # the rest of this run up to the next 0x00 is junk too
                break
            chunk = bytes(self._buf[:idx])
            del self._buf[:idx + 1]
            if self._discarding:
                self._discarding = False
                continue
            if not chunk:
                continue
            try:
                bodies.append(decode_frame(chunk))
            except FrameError as e:
                self._bad(e)
        return bodies

    def _bad(self, err: FrameError) -> None:
        self.bad_frames += 1
        self.last_error = err
        log.debug("dropped bad frame: %s", err)
