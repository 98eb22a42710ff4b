"""Envelope seal and open, exactly per PROTOCOL §3 (both directions, device and cloud side).

An envelope is ``CBOR([protected: bstr, ciphertext: bstr, signature: bstr])``:

- ``protected`` = CBOR map ``{v, dev, kind, seq, ts, [exp], enc, kid_s, kid_r}``;
- ``ciphertext`` = HPKE base mode single shot, DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 /
  ChaCha20-Poly1305 to the recipient's X25519 key, ``info`` = the ``protected`` bytes, empty
  ``aad``; the bytes are the 32-byte encapsulated key followed by the AEAD output;
- ``signature`` = Ed25519 over ``CBOR(["dongle-envelope/v1", protected, ciphertext])``;
- plaintext = ``CBOR(body)``, then content-encoded by ``enc`` (``zstd`` or ``identity``).

:func:`open_envelope` checks in the §3 order and raises :class:`Rejected` with a named reason
on the first failure: ``oversize``, ``malformed``, ``bad_version``, ``wrong_device``,
``wrong_kind``, ``unknown_signer``, ``bad_signature``, ``wrong_recipient``, ``decrypt_failed``,
``expired``, ``replay``, ``duplicate``, ``bad_body``, ``schema``. From ``expired`` on the
envelope is authenticated and the exception carries its header (``Rejected.authenticated``),
so the device can answer with an ``ack`` (§4: one per downlink envelope that passed signature
and HPKE) — ``duplicate`` is answered with status ``duplicate``, the rest with ``rejected``.

Choices where PROTOCOL is silent (a backend must make the same ones):

- Encoding. ``protected``, the body and the envelope are written as deterministic CBOR
  (definite lengths, shortest integer/float forms, map keys sorted; for keys under 24 bytes,
  as all header keys are, this is the RFC 8949 §4.2.1 order). Receivers do not require it: any
  well-formed CBOR is accepted, since the signature covers the exact ``protected`` bytes.
- Strict decoding. The envelope, ``protected`` and the plaintext must each be exactly one CBOR
  data item with no trailing bytes; duplicate map keys are rejected; nesting is capped (16 in the
  envelope and header, 64 in bodies). CBOR tags are not used by the protocol: a tagged item
  (even tag 55799) is ``malformed`` in the envelope or ``protected`` and ``bad_body`` in the
  plaintext. Simple values other than false/true/null fail the header checks or the schema.
- Header types. ``v``, ``seq``, ``ts``, ``exp`` are unsigned integers below 2**64 (a CBOR bool or
  float is not one); ``dev``, ``kind``, ``enc``, ``kid_s``, ``kid_r`` are text. Missing or mistyped
  keys are ``malformed`` (checked before ``v``, in the §3 order); header keys not listed in §3
  are ignored (they are still signed).
- Kind. ``kind`` must equal the kind the topic carries (``TOPIC_KINDS``), checked right after
  ``dev`` and reported as ``wrong_kind``.
- Signature. A signature that is not 64 bytes is ``bad_signature``. The signed bytes are the
  deterministic CBOR of the 3-element array (text string, then the two byte strings).
- ``exp``: rejected when ``now_ms > exp`` (an envelope is valid up to and including ``exp``).
  ``ts`` is informative only; it is not compared with the receiver's clock.
- ``enc`` values other than ``zstd``/``identity`` are ``bad_body`` (the header is well-formed;
  only the content is not understood). A zstd plaintext may be several concatenated frames
  (RFC 8878); a truncated frame or trailing garbage is ``bad_body``. Decompression is capped at
  ``MAX_PLAINTEXT`` (4 MiB) and a window of 8 MiB, so a zstd bomb is ``bad_body``, not an OOM.
- Size. Receivers accept envelopes up to ``MAX_ENVELOPE`` (256 KiB). :func:`seal` refuses to
  produce an uplink envelope over ``MAX_UPLINK`` (128 KiB) or a downlink one over 256 KiB.
- Sequence. The caller passes the highest accepted ``seq`` for this (device, kind) — downlink:
  per kind (§3); the cloud passes ``None`` and deduplicates on ``(dev, seq)`` itself.
- Bodies. The choices §4 leaves open (required fields, unknown keys, value ranges) are in
  ``config/schemas/*.json`` and :mod:`agent.schemas`; :func:`seal` validates before sealing.
"""
from __future__ import annotations

import io
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import cbor2
import zstandard
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from agent.cloud import schemas, topics
from agent.cloud.keys import key_id

log = logging.getLogger(__name__)

VERSION = 1
MAX_ENVELOPE = 256 * 1024
MAX_UPLINK = 128 * 1024
MAX_PLAINTEXT = 4 * 1024 * 1024
MAX_ZSTD_WINDOW = 8 * 1024 * 1024
SIG_CONTEXT = "dongle-envelope/v1"
#: zstd level of :func:`seal` unless told otherwise (fast; large telemetry pays for more, see
#: docs/performance.md).
DEFAULT_ZSTD_LEVEL = 3

UPLINK_KINDS = frozenset(topics.UPLINK.values())
DOWNLINK_KINDS = frozenset(topics.DOWNLINK.values())
KINDS = UPLINK_KINDS | DOWNLINK_KINDS
TOPIC_KINDS = topics.KIND_OF
ENCODINGS = frozenset({"zstd", "identity"})
DEVICE_ID_RE = re.compile(r"[a-z0-9-]{4,64}")

SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)

# Rejection reasons, in the order open_envelope checks them.
OVERSIZE = "oversize"
MALFORMED = "malformed"
BAD_VERSION = "bad_version"
WRONG_DEVICE = "wrong_device"
WRONG_KIND = "wrong_kind"
UNKNOWN_SIGNER = "unknown_signer"
BAD_SIGNATURE = "bad_signature"
WRONG_RECIPIENT = "wrong_recipient"
DECRYPT_FAILED = "decrypt_failed"
EXPIRED = "expired"
REPLAY = "replay"
DUPLICATE = "duplicate"
BAD_BODY = "bad_body"
SCHEMA = "schema"
REASONS = (OVERSIZE, MALFORMED, BAD_VERSION, WRONG_DEVICE, WRONG_KIND, UNKNOWN_SIGNER, BAD_SIGNATURE,
           WRONG_RECIPIENT, DECRYPT_FAILED, EXPIRED, REPLAY, DUPLICATE, BAD_BODY, SCHEMA)

_UINT_MAX = 2**64 - 1
_REQUIRED_HEADER: dict[str, type] = {
    "v": int, "dev": str, "kind": str, "seq": int, "ts": int, "enc": str, "kid_s": str, "kid_r": str,
}
_ENVELOPE_DEPTH = 16
_BODY_DEPTH = 64


class EnvelopeTooLarge(ValueError):
    """:func:`seal` produced an envelope larger than allowed; split the body and retry."""

    def __init__(self, size: int, limit: int):
        self.size = size
        self.limit = limit
        super().__init__(f"envelope is {size} bytes, limit {limit}")


class Rejected(Exception):
    """An envelope failed a §3 check. ``reason`` is one of :data:`REASONS`.

    ``header`` is set only when the envelope was authenticated (signature and HPKE passed),
    i.e. for ``expired`` and everything after it.
    """

    def __init__(self, reason: str, detail: str, header: dict[str, Any] | None = None):
        self.reason = reason
        self.detail = detail
        self.header = header
        super().__init__(f"{reason}: {detail}")

    @property
    def authenticated(self) -> bool:
        return self.header is not None


@dataclass(frozen=True)
class Opened:
    header: dict[str, Any]
    body: dict[str, Any]
    protected: bytes

    @property
    def kind(self) -> str:
        return self.header["kind"]

    @property
    def seq(self) -> int:
        return self.header["seq"]


def valid_device_id(device_id: object) -> bool:
    return isinstance(device_id, str) and DEVICE_ID_RE.fullmatch(device_id) is not None


def _is_uint(x: object) -> bool:
    return type(x) is int and 0 <= x <= _UINT_MAX


def signature_input(protected: bytes, ciphertext: bytes) -> bytes:
    """The bytes the Ed25519 signature covers: ``CBOR(["dongle-envelope/v1", protected, ciphertext])``."""
    return cbor2.dumps([SIG_CONTEXT, protected, ciphertext], canonical=True)


def _no_tags(*_args: Any) -> Any:
    raise ValueError("CBOR tags are not used by the protocol")


class _RefuseAllTags(Mapping[int, Any]):
    """``semantic_decoders`` that turns every tag, built-in or not, into a decode error."""

    def __getitem__(self, tag: int) -> Any:
        return _no_tags

    def get(self, tag: int, default: Any = None) -> Any:
        return _no_tags

    def __contains__(self, tag: object) -> bool:
        return True

    def __iter__(self) -> Any:
        return iter(())

    def __len__(self) -> int:
        return 0


_REFUSE_TAGS = _RefuseAllTags()


def _loads_exact(data: bytes, max_depth: int) -> Any:
    """Decodes exactly one untagged CBOR item; tags, duplicate keys and trailing bytes are errors."""
    fp = io.BytesIO(data)
    decoder = cbor2.CBORDecoder(fp, max_depth=max_depth, allow_duplicate_keys=False,
                                semantic_decoders=_REFUSE_TAGS, tag_hook=_no_tags)
    item = decoder.decode()
    if fp.tell() != len(data):
        raise ValueError(f"{len(data) - fp.tell()} trailing bytes after the CBOR item")
    return item


def _zstd_decompress(data: bytes, cap: int) -> bytes:
    """Decompresses one or more zstd frames, refusing output over ``cap`` bytes.

    Input is fed 64 bytes at a time: one zstd block (at most 3 header + 1 content byte) expands
    to at most 128 KiB, so each step adds at most ~2 MiB before the cap is checked.
    """
    dctx = zstandard.ZstdDecompressor(max_window_size=MAX_ZSTD_WINDOW)
    out = bytearray()
    pos = 0
    while True:
        dobj = dctx.decompressobj()
        while not dobj.eof:
            if pos >= len(data):
                raise ValueError("truncated zstd frame")
            chunk = data[pos:pos + 64]
            pos += len(chunk)
            out += dobj.decompress(chunk)
            if len(out) > cap:
                raise ValueError(f"zstd plaintext exceeds {cap} bytes")
        pos -= len(dobj.unused_data)
        if pos >= len(data):
            return bytes(out)


ZstdLevel = int | zstandard.ZstdCompressionParameters


def _compressor(zstd_level: ZstdLevel) -> zstandard.ZstdCompressor:
    if isinstance(zstd_level, zstandard.ZstdCompressionParameters):
        if zstd_level.window_log > MAX_ZSTD_WINDOW.bit_length() - 1:
            raise ValueError(f"zstd window_log {zstd_level.window_log} exceeds what receivers accept")
        return zstandard.ZstdCompressor(compression_params=zstd_level)
    return zstandard.ZstdCompressor(level=zstd_level)


def encode_body(body: Mapping[str, Any], enc: str, zstd_level: ZstdLevel = DEFAULT_ZSTD_LEVEL) -> bytes:
    """``CBOR(body)``, content-encoded by ``enc``.

    ``zstd_level``: a zstd level (1–22) or full ``zstandard.ZstdCompressionParameters``; it only
    changes the size and the sender's CPU and memory, never what a receiver needs (every
    setting decodes the same way, no dictionary; a window over 8 MiB is refused)."""
    plain = cbor2.dumps(dict(body), canonical=True)
    if enc == "zstd":
        return _compressor(zstd_level).compress(plain)
    if enc == "identity":
        return plain
    raise ValueError(f"unknown content encoding {enc!r}")


def seal(kind: str, body: Mapping[str, Any], *, dev: str, seq: int, signer: Ed25519PrivateKey,
         recipient: X25519PublicKey, ts_ms: int | None = None, exp_ms: int | None = None,
         enc: str = "zstd", max_size: int | None = None, check_schema: bool = True,
         zstd_level: ZstdLevel = DEFAULT_ZSTD_LEVEL) -> bytes:
    """Builds a signed, encrypted envelope of ``kind`` carrying ``body``.

    ``max_size`` defaults to :data:`MAX_UPLINK` for uplink kinds and :data:`MAX_ENVELOPE` for
    downlink ones; a larger result raises :class:`EnvelopeTooLarge`. ``check_schema`` validates
    the body first (raising :class:`agent.schemas.SchemaError`), so we never send what the other
    side must reject; tools that test rejection turn it off. ``zstd_level`` (a level 1–22 or
    ``zstandard.ZstdCompressionParameters``) applies to ``enc="zstd"``: higher is smaller and
    slower to seal, and opens exactly the same (:func:`encode_body`).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}")
    if not valid_device_id(dev):
        raise ValueError(f"invalid device id {dev!r}")
    if not _is_uint(seq):
        raise ValueError(f"seq must be an unsigned 64-bit integer, got {seq!r}")
    if enc not in ENCODINGS:
        raise ValueError(f"unknown content encoding {enc!r}")
    ts = time.time_ns() // 1_000_000 if ts_ms is None else ts_ms
    if not _is_uint(ts) or (exp_ms is not None and not _is_uint(exp_ms)):
        raise ValueError("ts_ms and exp_ms must be unsigned 64-bit integers (ms since the epoch)")
    if check_schema:
        schemas.validate(kind, body)
    header: dict[str, Any] = {
        "v": VERSION, "dev": dev, "kind": kind, "seq": seq, "ts": ts, "enc": enc,
        "kid_s": key_id(signer.public_key()), "kid_r": key_id(recipient),
    }
    if exp_ms is not None:
        header["exp"] = exp_ms
    protected = cbor2.dumps(header, canonical=True)
    ciphertext = SUITE.encrypt(encode_body(body, enc, zstd_level), recipient, info=protected)
    signature = signer.sign(signature_input(protected, ciphertext))
    envelope = cbor2.dumps([protected, ciphertext, signature], canonical=True)
    limit = max_size if max_size is not None else (MAX_UPLINK if kind in UPLINK_KINDS else MAX_ENVELOPE)
    if len(envelope) > limit:
        raise EnvelopeTooLarge(len(envelope), limit)
    return envelope


def _parse(data: bytes, max_size: int) -> tuple[bytes, bytes, bytes, dict[str, Any]]:
    if len(data) > max_size:
        raise Rejected(OVERSIZE, f"{len(data)} bytes > {max_size}")
    try:
        outer = _loads_exact(bytes(data), _ENVELOPE_DEPTH)
    except Exception as e:  # cbor2 raises CBORDecodeError, but also ValueError etc. on odd tags
        raise Rejected(MALFORMED, f"envelope is not CBOR: {e}") from None
    if not isinstance(outer, list) or len(outer) != 3:
        raise Rejected(MALFORMED, "envelope is not a CBOR array of 3 items")
    if not all(type(x) is bytes for x in outer):
        raise Rejected(MALFORMED, "envelope items are not all byte strings")
    protected, ciphertext, signature = outer
    try:
        header = _loads_exact(protected, _ENVELOPE_DEPTH)
    except Exception as e:
        raise Rejected(MALFORMED, f"protected is not CBOR: {e}") from None
    if not isinstance(header, dict):
        raise Rejected(MALFORMED, "protected is not a CBOR map")
    for name, typ in _REQUIRED_HEADER.items():
        if name not in header:
            raise Rejected(MALFORMED, f"protected lacks {name!r}")
        value = header[name]
        if typ is int and not _is_uint(value):
            raise Rejected(MALFORMED, f"protected {name!r} is not an unsigned integer")
        if typ is str and type(value) is not str:
            raise Rejected(MALFORMED, f"protected {name!r} is not text")
    if "exp" in header and not _is_uint(header["exp"]):
        raise Rejected(MALFORMED, "protected 'exp' is not an unsigned integer")
    return protected, ciphertext, signature, header


def open_envelope(data: bytes, *, expected_dev: str, expected_kind: str,
                  trusted_signers: Mapping[str, Ed25519PublicKey], recipient_key: X25519PrivateKey,
                  now_ms: int | None, last_seq: int | None, max_size: int = MAX_ENVELOPE,
                  check_schema: bool = True) -> Opened:
    """Checks and opens an envelope received on the topic for ``(expected_dev, expected_kind)``.

    ``now_ms`` is None while the clock is not synchronised (the ``exp`` check is skipped);
    ``last_seq`` is the highest accepted ``seq`` of this kind, or None to skip the sequence check.
    Raises :class:`Rejected` on the first failing check, in the §3 order. ``check_schema=False``
    leaves the last check (the body against its kind's schema) to the caller: a receiver of
    large telemetry bodies applies the same rules column by column
    (``scripts.refcloud.telemetry_check.validate_telemetry``, ~60× faster than JSON Schema on 1,200
    samples) and reports a failure as ``schema``.
    """
    if expected_kind not in KINDS:
        raise ValueError(f"unknown kind {expected_kind!r}")
    protected, ciphertext, signature, header = _parse(data, max_size)

    if header["v"] != VERSION:
        raise Rejected(BAD_VERSION, f"version {header['v']}, expected {VERSION}")
    if header["dev"] != expected_dev:
        raise Rejected(WRONG_DEVICE, f"envelope is for {header['dev']!r}, topic is {expected_dev!r}")
    if header["kind"] != expected_kind:
        raise Rejected(WRONG_KIND, f"envelope kind {header['kind']!r} on the {expected_kind!r} topic")

    signer = trusted_signers.get(header["kid_s"])
    if signer is None:
        raise Rejected(UNKNOWN_SIGNER, f"signer {header['kid_s']!r} is not trusted")
    try:
        signer.verify(signature, signature_input(protected, ciphertext))
    except InvalidSignature:
        raise Rejected(BAD_SIGNATURE, f"signature by {header['kid_s']} does not verify") from None

    own_kid = key_id(recipient_key.public_key())
    if header["kid_r"] != own_kid:
        raise Rejected(WRONG_RECIPIENT, f"sealed to {header['kid_r']!r}, our key is {own_kid}")
    try:
        plaintext = SUITE.decrypt(ciphertext, recipient_key, info=protected)
    except Exception as e:  # InvalidTag; also ValueError for a ciphertext shorter than the key
        raise Rejected(DECRYPT_FAILED, f"HPKE open failed ({type(e).__name__})") from None

    # Authenticated from here on: the caller may ack with this header.
    if now_ms is not None and "exp" in header and now_ms > header["exp"]:
        raise Rejected(EXPIRED, f"expired at {header['exp']}, now {now_ms}", header)
    if last_seq is not None:
        if header["seq"] < last_seq:
            raise Rejected(REPLAY, f"seq {header['seq']} < last accepted {last_seq}", header)
        if header["seq"] == last_seq:
            raise Rejected(DUPLICATE, f"seq {header['seq']} already accepted", header)

    enc = header["enc"]
    try:
        if enc == "zstd":
            plain = _zstd_decompress(plaintext, MAX_PLAINTEXT)
        elif enc == "identity":
            plain = plaintext
        else:
            raise ValueError(f"unknown content encoding {enc!r}")
        body = _loads_exact(plain, _BODY_DEPTH)
    except Exception as e:
        raise Rejected(BAD_BODY, str(e) or type(e).__name__, header) from None
    if not isinstance(body, dict):
        raise Rejected(BAD_BODY, "plaintext is not a CBOR map", header)
    if check_schema:
        try:
            schemas.validate(expected_kind, body)
        except schemas.SchemaError as e:
            raise Rejected(SCHEMA, e.message, header) from None
    return Opened(header=header, body=body, protected=protected)
