"""PROTOCOL §3 envelopes, checked against an independent reading of the spec.

Everything the spec fixes is rebuilt here from raw cbor2 / cryptography primitives, without
agent.protocol's helpers: the signature input bytes are assembled by hand and HPKE (RFC 9180
base mode, DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20-Poly1305) is implemented from the
RFC's definitions, so a misreading shared by agent.protocol and cryptography's ``hpke`` module
cannot pass.
"""
from __future__ import annotations

import functools
import hashlib
import hmac
import os
import time
import struct
import tracemalloc

import cbor2
import pytest
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.cloud import protocol
from agent.cloud.protocol import Rejected
from agent.cloud.schemas import SchemaError

DEV = "car-0001"
NOW = 1_750_000_000_000
TELEMETRY = {"t0": NOW - 60_000,
             "signals": [{"name": "rpm", "unit": "rpm", "t": [0, 500, 1000], "v": [812, 1500.5, 2000.25]}],
             "frames": [{"bus": "can0", "t": [0, 10], "id": [0x25, 0x18DAF110], "ext": [False, True],
                         "data": [b"\x01\x02\x03", b""]}]}
CONFIG = {"version": 7, "upload": {"interval_s": 30},
          "obd": {"pids": [{"name": "rpm", "pid": "RPM", "period_s": 1}], "dtc_period_s": 600},
          "can": {"signals": [], "raw": {"enabled": False, "ids": []}}}


# ---- an independent implementation of the spec's primitives ------------------------------

def kid(pub) -> str:
    return hashlib.sha256(pub.public_bytes_raw()).hexdigest()[:16]


def bstr_head(n: int) -> bytes:
    """RFC 8949 §3: major type 2 head for a byte string of length n (shortest form)."""
    if n < 24:
        return bytes([0x40 | n])
    if n < 0x100:
        return bytes([0x58, n])
    if n < 0x10000:
        return b"\x59" + struct.pack(">H", n)
    return b"\x5a" + struct.pack(">I", n)


def sig_input(protected: bytes, ciphertext: bytes) -> bytes:
    # array(3), text(18) "dongle-envelope/v1", bstr protected, bstr ciphertext
    return (b"\x83" + b"\x72" + b"dongle-envelope/v1" + bstr_head(len(protected)) + protected
            + bstr_head(len(ciphertext)) + ciphertext)


_KEM_ID, _KDF_ID, _AEAD_ID = 0x0020, 0x0001, 0x0003
_KEM_SUITE = b"KEM" + struct.pack(">H", _KEM_ID)
_HPKE_SUITE = b"HPKE" + struct.pack(">HHH", _KEM_ID, _KDF_ID, _AEAD_ID)


def _extract(suite: bytes, salt: bytes, label: bytes, ikm: bytes) -> bytes:
    return hmac.new(salt, b"HPKE-v1" + suite + label + ikm, hashlib.sha256).digest()


def _expand(suite: bytes, prk: bytes, label: bytes, info: bytes, length: int) -> bytes:
    labeled = struct.pack(">H", length) + b"HPKE-v1" + suite + label + info
    out, block, i = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + labeled + bytes([i]), hashlib.sha256).digest()
        out += block
        i += 1
    return out[:length]


def _key_schedule(dh: bytes, enc: bytes, pk_r: bytes, info: bytes) -> tuple[bytes, bytes]:
    eae_prk = _extract(_KEM_SUITE, b"", b"eae_prk", dh)
    shared = _expand(_KEM_SUITE, eae_prk, b"shared_secret", enc + pk_r, 32)
    psk_id_hash = _extract(_HPKE_SUITE, b"", b"psk_id_hash", b"")
    info_hash = _extract(_HPKE_SUITE, b"", b"info_hash", info)
    context = b"\x00" + psk_id_hash + info_hash  # mode_base
    secret = _extract(_HPKE_SUITE, shared, b"secret", b"")
    return (_expand(_HPKE_SUITE, secret, b"key", context, 32),
            _expand(_HPKE_SUITE, secret, b"base_nonce", context, 12))


def hpke_seal(pk_r: X25519PublicKey, info: bytes, plaintext: bytes) -> bytes:
    sk_e = X25519PrivateKey.generate()
    enc = sk_e.public_key().public_bytes_raw()
    key, nonce = _key_schedule(sk_e.exchange(pk_r), enc, pk_r.public_bytes_raw(), info)
    return enc + ChaCha20Poly1305(key).encrypt(nonce, plaintext, b"")


def hpke_open(sk_r: X25519PrivateKey, info: bytes, ciphertext: bytes) -> bytes:
    enc, sealed = ciphertext[:32], ciphertext[32:]
    key, nonce = _key_schedule(sk_r.exchange(X25519PublicKey.from_public_bytes(enc)), enc,
                               sk_r.public_key().public_bytes_raw(), info)
    return ChaCha20Poly1305(key).decrypt(nonce, sealed, b"")


# ---- fixtures and raw envelope building ---------------------------------------------------

class Keys:
    def __init__(self) -> None:
        self.cloud_sign = Ed25519PrivateKey.generate()
        self.cloud_enc = X25519PrivateKey.generate()
        self.dev_sign = Ed25519PrivateKey.generate()
        self.dev_enc = X25519PrivateKey.generate()
        self.other_sign = Ed25519PrivateKey.generate()
        self.other_enc = X25519PrivateKey.generate()


@pytest.fixture(scope="module")
def k() -> Keys:
    return Keys()


def header(k: Keys, **over) -> dict:
    """A downlink header, cloud -> device."""
    h = {"v": 1, "dev": DEV, "kind": "config", "seq": 5, "ts": NOW, "enc": "zstd",
         "kid_s": kid(k.cloud_sign.public_key()), "kid_r": kid(k.dev_enc.public_key())}
    h.update(over)
    return {key: value for key, value in h.items() if value is not ...}


def raw_plaintext(body, enc: str = "zstd") -> bytes:
    plain = cbor2.dumps(body)
    return zstandard.ZstdCompressor().compress(plain) if enc == "zstd" else plain


def raw_envelope(k: Keys, hdr: dict | bytes | None = None, body=CONFIG, *, plaintext: bytes | None = None,
                 signer: Ed25519PrivateKey | None = None, recipient: X25519PublicKey | None = None) -> bytes:
    protected = hdr if isinstance(hdr, bytes) else cbor2.dumps(hdr if hdr is not None else header(k))
    hdr_map = cbor2.loads(protected)
    if plaintext is None:
        plaintext = raw_plaintext(body, hdr_map.get("enc", "zstd") if isinstance(hdr_map, dict) else "zstd")
    ciphertext = hpke_seal(recipient or k.dev_enc.public_key(), protected, plaintext)
    signature = (signer or k.cloud_sign).sign(sig_input(protected, ciphertext))
    return cbor2.dumps([protected, ciphertext, signature])


def device_open(k: Keys, data: bytes, *, kind: str = "config", now_ms: int | None = NOW,
                last_seq: int | None = 4, dev: str = DEV) -> protocol.Opened:
    return protocol.open_envelope(data, expected_dev=dev, expected_kind=kind,
                                  trusted_signers={kid(k.cloud_sign.public_key()): k.cloud_sign.public_key()},
                                  recipient_key=k.dev_enc, now_ms=now_ms, last_seq=last_seq)


def rejected(k: Keys, data: bytes, **kw) -> Rejected:
    with pytest.raises(Rejected) as info:
        device_open(k, data, **kw)
    return info.value


# ---- (a) agent.protocol.seal, opened by the raw code --------------------------------------

@pytest.mark.parametrize("enc", ["zstd", "identity"])
def test_seal_output_matches_the_spec_byte_for_byte(k, enc):
    env = protocol.seal("telemetry", TELEMETRY, dev=DEV, seq=42, signer=k.dev_sign,
                        recipient=k.cloud_enc.public_key(), ts_ms=NOW, exp_ms=NOW + 5000, enc=enc)
    outer = cbor2.loads(env)
    assert isinstance(outer, list) and len(outer) == 3 and all(type(x) is bytes for x in outer)
    protected, ciphertext, signature = outer
    assert cbor2.dumps(outer) == env  # exactly one item, nothing trailing
    hdr = cbor2.loads(protected)
    assert hdr == {"v": 1, "dev": DEV, "kind": "telemetry", "seq": 42, "ts": NOW, "exp": NOW + 5000,
                   "enc": enc, "kid_s": kid(k.dev_sign.public_key()), "kid_r": kid(k.cloud_enc.public_key())}
    assert protected == cbor2.dumps(hdr, canonical=True)  # deterministic header encoding
    assert protocol.signature_input(protected, ciphertext) == sig_input(protected, ciphertext)
    k.dev_sign.public_key().verify(signature, sig_input(protected, ciphertext))  # raises if wrong
    plaintext = hpke_open(k.cloud_enc, protected, ciphertext)
    assert len(ciphertext) == 32 + len(plaintext) + 16  # enc key || AEAD output (tag 16)
    with pytest.raises(InvalidTag):  # info really is the protected bytes
        hpke_open(k.cloud_enc, b"", ciphertext)
    if enc == "zstd":
        plaintext = zstandard.ZstdDecompressor().decompress(plaintext)
    assert cbor2.loads(plaintext) == TELEMETRY


def test_seal_without_exp_has_no_exp_and_defaults_ts_to_now(k):
    before = time.time_ns() // 1_000_000
    env = protocol.seal("ack", {"ref_kind": "command", "ref_seq": 3, "status": "done"}, dev=DEV, seq=1,
                        signer=k.dev_sign, recipient=k.cloud_enc.public_key())
    hdr = cbor2.loads(cbor2.loads(env)[0])
    assert "exp" not in hdr
    assert before <= hdr["ts"] <= time.time_ns() // 1_000_000


def test_seal_refuses_oversize_uplink_and_invalid_bodies(k):
    big = {"t0": NOW, "signals": [{"name": "x", "unit": "", "t": list(range(20000)),
                                   "v": [int.from_bytes(os.urandom(7)) for _ in range(20000)]}]}
    with pytest.raises(protocol.EnvelopeTooLarge) as info:
        protocol.seal("telemetry", big, dev=DEV, seq=1, signer=k.dev_sign, recipient=k.cloud_enc.public_key())
    assert info.value.limit == protocol.MAX_UPLINK and info.value.size > protocol.MAX_UPLINK
    # the same body is fine as a downlink-sized envelope when the caller allows it
    protocol.seal("telemetry", big, dev=DEV, seq=1, signer=k.dev_sign, recipient=k.cloud_enc.public_key(),
                  max_size=protocol.MAX_ENVELOPE)
    with pytest.raises(SchemaError):
        protocol.seal("telemetry", {"t0": NOW}, dev=DEV, seq=1, signer=k.dev_sign,
                      recipient=k.cloud_enc.public_key())
    with pytest.raises(ValueError):
        protocol.seal("telemetry", TELEMETRY, dev="Bad_Id", seq=1, signer=k.dev_sign,
                      recipient=k.cloud_enc.public_key())


def test_seal_and_open_round_trip_both_directions(k):
    env = protocol.seal("config", CONFIG, dev=DEV, seq=9, signer=k.cloud_sign, recipient=k.dev_enc.public_key())
    opened = device_open(k, env, last_seq=8)
    assert opened.body == CONFIG and opened.seq == 9 and opened.kind == "config"
    up = protocol.seal("telemetry", TELEMETRY, dev=DEV, seq=1, signer=k.dev_sign, recipient=k.cloud_enc.public_key())
    cloud = protocol.open_envelope(up, expected_dev=DEV, expected_kind="telemetry",
                                   trusted_signers={kid(k.dev_sign.public_key()): k.dev_sign.public_key()},
                                   recipient_key=k.cloud_enc, now_ms=NOW, last_seq=None)
    assert cloud.body == TELEMETRY


def test_zstd_level_changes_the_size_not_what_the_receiver_gets(k):
    # Raw CAN frames of a periodic message with a rolling counter: the kind of body the uplink
    # seals at a high level. Any level opens the same way, within the receiver's window cap.
    n = 4000
    body = {"t0": NOW, "signals": [], "frames": [{
        "bus": "can0", "t": [i * 10_000 + (i * 7919) % 613 for i in range(n)], "id": [0x2C1] * n,
        "ext": [False] * n, "data": [bytes([0, 0x14, i % 7, 0x14, 0xBB, 0xCA, i % 16, (i * 37) % 256])
                                     for i in range(n)]}]}
    sizes = {}
    small_window = zstandard.ZstdCompressionParameters(
        window_log=18, chain_log=18, hash_log=18, search_log=1, min_match=3, target_length=32,
        strategy=zstandard.STRATEGY_BTULTRA2)
    for level in (1, 19, 22, small_window):
        env = protocol.seal("telemetry", body, dev=DEV, seq=len(sizes) + 1, signer=k.dev_sign,
                            recipient=k.cloud_enc.public_key(), ts_ms=NOW, zstd_level=level)
        sizes[level] = len(env)
        protected, ciphertext, _ = cbor2.loads(env)
        plain = zstandard.ZstdDecompressor(max_window_size=8 * 1024 * 1024).decompress(
            hpke_open(k.cloud_enc, protected, ciphertext))
        assert cbor2.loads(plain) == body
        cloud = protocol.open_envelope(env, expected_dev=DEV, expected_kind="telemetry",
                                       trusted_signers={kid(k.dev_sign.public_key()): k.dev_sign.public_key()},
                                       recipient_key=k.cloud_enc, now_ms=NOW, last_seq=None)
        assert cloud.body == body
    assert sizes[19] < sizes[1] and sizes[small_window] < sizes[1]
    with pytest.raises(ValueError):  # a window receivers would refuse is never produced
        protocol.seal("telemetry", body, dev=DEV, seq=9, signer=k.dev_sign, recipient=k.cloud_enc.public_key(),
                      zstd_level=zstandard.ZstdCompressionParameters(window_log=24))


# ---- (b) raw-built envelopes, opened by agent.protocol ------------------------------------

@pytest.mark.parametrize("enc", ["zstd", "identity"])
def test_raw_envelope_opens(k, enc):
    env = raw_envelope(k, header(k, enc=enc, exp=NOW + 1))
    opened = device_open(k, env)
    assert opened.body == CONFIG
    assert opened.header == header(k, enc=enc, exp=NOW + 1)
    assert opened.protected == cbor2.loads(env)[0]


def test_non_canonical_header_with_unknown_key_is_accepted(k):
    # keys in a non-sorted order plus an extra key: the signature covers the bytes, not a re-encoding
    hdr = {"kid_r": kid(k.dev_enc.public_key()), "zz": "extension", **header(k)}
    assert device_open(k, raw_envelope(k, cbor2.dumps(hdr))).body == CONFIG


def test_multi_frame_zstd_plaintext_opens(k):
    plain = cbor2.dumps(CONFIG)
    z = zstandard.ZstdCompressor()
    two = z.compress(plain[:10]) + z.compress(plain[10:])
    assert device_open(k, raw_envelope(k, plaintext=two)).body == CONFIG


def test_envelope_just_under_the_receive_limit_opens(k):
    body = dict(CONFIG, padding="x" * (250 * 1024))
    env = raw_envelope(k, header(k, enc="identity"), body)
    assert protocol.MAX_UPLINK < len(env) <= protocol.MAX_ENVELOPE
    assert device_open(k, env).body["padding"] == body["padding"]


# ---- (c) every rejection ------------------------------------------------------------------

def _parts(env: bytes) -> list[bytes]:
    return cbor2.loads(env)


def _flip(b: bytes, i: int = -1) -> bytes:
    b = bytearray(b)
    b[i] ^= 0x01
    return bytes(b)


def test_tampered_header_is_bad_signature(k):
    p, c, s = _parts(raw_envelope(k))
    forged = cbor2.dumps(header(k, seq=6))
    assert rejected(k, cbor2.dumps([forged, c, s])).reason == protocol.BAD_SIGNATURE


def test_tampered_ciphertext_is_bad_signature(k):
    p, c, s = _parts(raw_envelope(k))
    r = rejected(k, cbor2.dumps([p, _flip(c, 40), s]))
    assert r.reason == protocol.BAD_SIGNATURE and not r.authenticated


def test_tampered_signature_is_bad_signature(k):
    p, c, s = _parts(raw_envelope(k))
    assert rejected(k, cbor2.dumps([p, c, _flip(s, 5)])).reason == protocol.BAD_SIGNATURE
    assert rejected(k, cbor2.dumps([p, c, s[:63]])).reason == protocol.BAD_SIGNATURE
    assert rejected(k, cbor2.dumps([p, c, b""])).reason == protocol.BAD_SIGNATURE


def test_signed_but_corrupt_ciphertext_is_decrypt_failed(k):
    p, c, _ = _parts(raw_envelope(k))
    for bad in (_flip(c, 40), _flip(c, 0), c[:20], b""):
        r = rejected(k, cbor2.dumps([p, bad, k.cloud_sign.sign(sig_input(p, bad))]))
        assert r.reason == protocol.DECRYPT_FAILED and not r.authenticated


def test_wrong_recipient(k):
    env = raw_envelope(k, header(k, kid_r=kid(k.other_enc.public_key())), recipient=k.other_enc.public_key())
    assert rejected(k, env).reason == protocol.WRONG_RECIPIENT
    # our kid, but sealed to another key: HPKE cannot open it
    env = raw_envelope(k, header(k), recipient=k.other_enc.public_key())
    assert rejected(k, env).reason == protocol.DECRYPT_FAILED


def test_unknown_signer(k):
    env = raw_envelope(k, header(k, kid_s=kid(k.other_sign.public_key())), signer=k.other_sign)
    assert rejected(k, env).reason == protocol.UNKNOWN_SIGNER
    # a trusted kid with another key's signature
    env = raw_envelope(k, header(k), signer=k.other_sign)
    assert rejected(k, env).reason == protocol.BAD_SIGNATURE


def test_wrong_device_and_wrong_kind(k):
    assert rejected(k, raw_envelope(k, header(k, dev="car-0002"))).reason == protocol.WRONG_DEVICE
    assert rejected(k, raw_envelope(k), kind="command").reason == protocol.WRONG_KIND


def test_oversize(k):
    env = raw_envelope(k, header(k, enc="identity"), dict(CONFIG, padding="x" * (257 * 1024)))
    assert rejected(k, env).reason == protocol.OVERSIZE
    assert rejected(k, b"\x00" * (protocol.MAX_ENVELOPE + 1)).reason == protocol.OVERSIZE


def _sig(k, p: bytes, c: bytes) -> bytes:
    return k.cloud_sign.sign(sig_input(p, c))


@pytest.mark.parametrize("name,build", [
    ("not cbor", lambda k: b"\xff\x00"),
    ("empty", lambda k: b""),
    ("truncated", lambda k: raw_envelope(k)[:-1]),
    ("trailing bytes", lambda k: raw_envelope(k) + b"\x00"),
    ("not an array", lambda k: cbor2.dumps({"p": b"", "c": b"", "s": b""})),
    ("bytes not array", lambda k: cbor2.dumps(b"abc")),
    ("2 elements", lambda k: cbor2.dumps(_parts(raw_envelope(k))[:2])),
    ("4 elements", lambda k: cbor2.dumps(_parts(raw_envelope(k)) + [b""])),
    ("text instead of bytes", lambda k: cbor2.dumps([cbor2.dumps(header(k)).decode("latin-1"), b"c", b"s"])),
    ("signature as text", lambda k: cbor2.dumps(_parts(raw_envelope(k))[:2] + ["sig"])),
    ("protected not a map", lambda k: raw_envelope(k, cbor2.dumps([1, "car-0001"]))),
    ("protected not cbor", lambda k: cbor2.dumps([b"\xff", b"c", b"s"])),
    ("protected trailing bytes", lambda k: raw_envelope(k, cbor2.dumps(header(k)) + b"\x01")),
    ("tagged envelope", lambda k: cbor2.dumps(cbor2.CBORTag(55799, _parts(raw_envelope(k))))),
    ("tagged seq", lambda k: raw_envelope(k, cbor2.dumps(header(k, seq=cbor2.CBORTag(2, b"\x05"))))),
    ("seq as text", lambda k: raw_envelope(k, cbor2.dumps(header(k, seq="5")))),
    ("seq negative", lambda k: raw_envelope(k, cbor2.dumps(header(k, seq=-1)))),
    ("seq 2**64", lambda k: raw_envelope(k, cbor2.dumps(header(k, seq=2**64)))),
    ("v as bool", lambda k: raw_envelope(k, cbor2.dumps(header(k, v=True)))),
    ("ts as float", lambda k: raw_envelope(k, cbor2.dumps(header(k, ts=float(NOW))))),
    ("exp as text", lambda k: raw_envelope(k, cbor2.dumps(header(k, exp="soon")))),
    ("dev as bytes", lambda k: raw_envelope(k, cbor2.dumps(header(k, dev=DEV.encode())))),
    ("kid_s as null", lambda k: raw_envelope(k, cbor2.dumps(header(k, kid_s=None)))),
    ("duplicate key", lambda k: raw_envelope(k, b"\xa9" + cbor2.dumps(header(k))[1:] + b"\x63seq\x06")),
] + [(f"missing {key}", (lambda key: lambda k: raw_envelope(k, cbor2.dumps(header(k, **{key: ...}))))(key))
     for key in ("v", "dev", "kind", "seq", "ts", "enc", "kid_s", "kid_r")])
def test_malformed(k, name, build):
    r = rejected(k, build(k))
    assert r.reason == protocol.MALFORMED, (name, r)
    assert not r.authenticated


def test_duplicate_key_case_really_has_duplicate_keys(k):
    data = b"\xa9" + cbor2.dumps(header(k))[1:] + b"\x63seq\x06"
    assert cbor2.loads(data)["seq"] == 6  # a lax decoder takes the last one; we must refuse


def test_bad_version(k):
    assert rejected(k, raw_envelope(k, header(k, v=2))).reason == protocol.BAD_VERSION
    assert rejected(k, raw_envelope(k, header(k, v=0))).reason == protocol.BAD_VERSION


def test_expired_is_authenticated_and_skipped_without_clock(k):
    env = raw_envelope(k, header(k, exp=NOW - 1))
    r = rejected(k, env)
    assert r.reason == protocol.EXPIRED and r.authenticated
    assert r.header["seq"] == 5 and r.header["kind"] == "config"
    assert device_open(k, env, now_ms=None).body == CONFIG  # clock not synchronised: skipped
    assert device_open(k, raw_envelope(k, header(k, exp=NOW))).body == CONFIG  # valid up to exp


def test_replay_duplicate_and_no_sequence_check(k):
    env = raw_envelope(k, header(k, seq=5))
    r = rejected(k, env, last_seq=6)
    assert r.reason == protocol.REPLAY and r.authenticated
    r = rejected(k, env, last_seq=5)
    assert r.reason == protocol.DUPLICATE and r.header["seq"] == 5
    assert device_open(k, env, last_seq=4).seq == 5
    assert device_open(k, env, last_seq=None).seq == 5


@functools.cache
def _bomb() -> bytes:
    plain = cbor2.dumps({"version": 1, "pad": "\x00" * (64 * 1024 * 1024)})
    return zstandard.ZstdCompressor(level=3).compress(plain)


@pytest.mark.parametrize("name,plaintext,enc", [
    ("zstd bomb with content size", _bomb(), "zstd"),
    ("zstd bomb, streamed", zstandard.ZstdCompressor(level=1, write_content_size=False).compress(
        b"\xa1\x61x\x7a\x04\x00\x00\x00" + b"a" * (64 * 1024 * 1024)), "zstd"),
    ("not zstd", b"hello", "zstd"),
    ("empty zstd", b"", "zstd"),
    ("truncated zstd", zstandard.ZstdCompressor().compress(cbor2.dumps(CONFIG))[:-4], "zstd"),
    ("zstd + junk", zstandard.ZstdCompressor().compress(cbor2.dumps(CONFIG)) + b"junk", "zstd"),
    ("unknown enc", cbor2.dumps(CONFIG), "gzip"),
    ("not a map", cbor2.dumps([1, 2, 3]), "identity"),
    ("not cbor", b"\xff", "identity"),
    ("trailing bytes", cbor2.dumps(CONFIG) + b"\x00", "identity"),
    ("tagged value", cbor2.dumps(dict(CONFIG, when=cbor2.CBORTag(1, 1700000000))), "identity"),
])
def test_bad_body(k, name, plaintext, enc):
    r = rejected(k, raw_envelope(k, header(k, enc=enc), plaintext=plaintext))
    assert r.reason == protocol.BAD_BODY, (name, r)
    assert r.authenticated


def test_zstd_bomb_is_refused_without_inflating_it(k):
    env = raw_envelope(k, header(k), plaintext=_bomb())  # 64 MiB of plaintext in ~2 KiB
    tracemalloc.start()
    try:
        r = rejected(k, env)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert r.reason == protocol.BAD_BODY
    assert peak < 24 * 1024 * 1024, f"decompression peaked at {peak} bytes"


def test_schema_failure(k):
    r = rejected(k, raw_envelope(k, body={"version": 8}))
    assert r.reason == protocol.SCHEMA and r.authenticated
    assert "upload" in r.detail
    # a body valid for another kind is not valid for this one
    r = rejected(k, raw_envelope(k, header(k, kind="command"), body=CONFIG), kind="command")
    assert r.reason == protocol.SCHEMA


def test_check_order(k):
    """A failure early in the §3 list wins over every later one."""
    hdr = header(k, exp=NOW - 1, seq=1)  # expired, and a replay against last_seq=4
    p, c, s = _parts(raw_envelope(k, hdr, body={"junk": 1}))
    assert rejected(k, cbor2.dumps([p, c, _flip(s)])).reason == protocol.BAD_SIGNATURE
    assert rejected(k, raw_envelope(k, hdr, body={"junk": 1})).reason == protocol.EXPIRED
    assert rejected(k, raw_envelope(k, hdr, body={"junk": 1}), now_ms=None).reason == protocol.REPLAY
    assert rejected(k, raw_envelope(k, hdr, body={"junk": 1}), now_ms=None,
                    last_seq=None).reason == protocol.SCHEMA
    # header problems before any crypto
    bad = raw_envelope(k, header(k, v=2, dev="car-0002", kid_s="0" * 16), signer=k.other_sign)
    assert rejected(k, bad).reason == protocol.BAD_VERSION
    bad = raw_envelope(k, header(k, dev="car-0002", kind="command", kid_s="0" * 16))
    assert rejected(k, bad).reason == protocol.WRONG_DEVICE
    bad = raw_envelope(k, header(k, kind="command", kid_s="0" * 16))
    assert rejected(k, bad).reason == protocol.WRONG_KIND
    bad = raw_envelope(k, header(k, kid_s="0" * 16, kid_r="1" * 16))
    assert rejected(k, bad).reason == protocol.UNKNOWN_SIGNER
    p, c, s = _parts(raw_envelope(k, header(k, kid_r="1" * 16)))
    assert rejected(k, cbor2.dumps([p, c, _flip(s)])).reason == protocol.BAD_SIGNATURE
    bad = raw_envelope(k, header(k, kid_r="1" * 16, exp=NOW - 1))
    assert rejected(k, bad).reason == protocol.WRONG_RECIPIENT
    p, _, _ = _parts(raw_envelope(k, header(k, exp=NOW - 1)))
    assert rejected(k, cbor2.dumps([p, b"x" * 60, _sig(k, p, b"x" * 60)])).reason == protocol.DECRYPT_FAILED
    bomb = raw_envelope(k, header(k, seq=4), plaintext=_BOMB)
    assert rejected(k, bomb).reason == protocol.DUPLICATE
    malformed_and_oversize = b"\xff" * (protocol.MAX_ENVELOPE + 1)
    assert rejected(k, malformed_and_oversize).reason == protocol.OVERSIZE


_BOMB = _bomb()


def test_reasons_are_distinct_and_named():
    assert len(set(protocol.REASONS)) == len(protocol.REASONS) == 14
    assert set(protocol.TOPIC_KINDS.values()) == protocol.UPLINK_KINDS | protocol.DOWNLINK_KINDS


# ---- property tests: nothing but Rejected escapes -----------------------------------------

_FUZZ_KEYS = Keys()
_cbor_leaves = (st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
                | st.floats(allow_nan=True) | st.text(max_size=20) | st.binary(max_size=40))
_cbor_values = st.recursive(_cbor_leaves, lambda children: st.lists(children, max_size=5)
                            | st.dictionaries(st.text(max_size=8) | st.integers(), children, max_size=5),
                            max_leaves=30)
_fuzz = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _only_rejected(data: bytes, **kw) -> None:
    try:
        device_open(_FUZZ_KEYS, data, **kw)
    except Rejected as r:
        assert r.reason in protocol.REASONS


@_fuzz
@given(st.binary(max_size=600))
def test_random_bytes_only_reject(data):
    _only_rejected(data)


@_fuzz
@given(_cbor_values)
def test_random_cbor_only_rejects(value):
    _only_rejected(cbor2.dumps(value))


_header_values = st.one_of(_cbor_leaves, st.just(DEV), st.just("config"), st.just(1), st.just("zstd"),
                           st.just(kid(_FUZZ_KEYS.cloud_sign.public_key())),
                           st.just(kid(_FUZZ_KEYS.dev_enc.public_key())))


@_fuzz
@given(st.dictionaries(st.sampled_from(["v", "dev", "kind", "seq", "ts", "exp", "enc", "kid_s", "kid_r", "x"]),
                       _header_values, max_size=10), st.binary(max_size=100), st.binary(max_size=80))
def test_random_headers_only_reject(hdr, ciphertext, signature):
    _only_rejected(cbor2.dumps([cbor2.dumps(hdr), ciphertext, signature]))


@_fuzz
@given(st.sampled_from(sorted(protocol.DOWNLINK_KINDS)), st.sampled_from(["zstd", "identity"]),
       _cbor_values | st.dictionaries(st.sampled_from(["version", "op", "booking_id", "component", "upload",
                                                       "obd", "can", "privacy", "categories"]), _cbor_values))
def test_random_authenticated_bodies_open_or_reject(kind, enc, body):
    env = raw_envelope(_FUZZ_KEYS, header(_FUZZ_KEYS, kind=kind, enc=enc), plaintext=raw_plaintext(body, enc))
    try:
        opened = device_open(_FUZZ_KEYS, env, kind=kind)
    except Rejected as r:
        assert r.reason in (protocol.BAD_BODY, protocol.SCHEMA) and r.authenticated
    else:
        assert opened.body == body
