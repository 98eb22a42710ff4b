"""The data key: identity and location fields (VIN, positions) are stored encrypted under it.

Flash keeps overwritten blocks (wear levelling), so deleting a row cannot promise that its bytes
are gone from the chip. Fields that identify the car or where it went are therefore written
only as ChaCha20-Poly1305 ciphertext (AEAD from ``cryptography``) under a 256-bit key held in
one small file (``data.key``, mode 0600, in the data directory; a secure element would hold it
on production hardware). ``dongle wipe`` destroys that key first: every copy of those fields,
wherever wear levelling left it, becomes unreadable at once.

Each value is ``nonce(12) || ciphertext+tag``; the associated data names what the value is
(e.g. ``b"location_positions"``), so a value cannot be moved into another field unnoticed.

Events waiting in the store to be sealed for the uplink are kept the same way when they carry
identity data (:data:`IDENTITY_EVENT_TYPES`: the ``vehicle`` event's VIN, the free text of
``device_wiped.by``): :class:`EventsAtRest` is the store's event codec.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
from pathlib import Path
from typing import Any

import cbor2
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

log = logging.getLogger(__name__)

KEY_FILE = "data.key"
NONCE_LEN = 12


class DataKeyError(Exception):
    """The key is destroyed or a value does not open under it."""


class DataKey:
    def __init__(self, path: str | os.PathLike, *, create: bool = True):
        self.path = Path(path)
        self.create = create
        self._lock = threading.Lock()
        self._aead: ChaCha20Poly1305 | None = None
        self.destroyed = False

    @classmethod
    def in_dir(cls, data_dir: str | os.PathLike, *, create: bool = True) -> "DataKey":
        return cls(Path(data_dir) / KEY_FILE, create=create)

    def _cipher(self) -> ChaCha20Poly1305:
        with self._lock:
            if self._aead is not None:
                return self._aead
            if self.destroyed:
                raise DataKeyError("the data key was destroyed (device wiped)")
            try:
                key = self.path.read_bytes()
            except FileNotFoundError:
                if not self.create:
                    raise DataKeyError(f"{self.path}: no data key (wiped, or never created)") from None
                key = ChaCha20Poly1305.generate_key()
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    os.write(fd, key)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                log.info("datakey: created %s", self.path)
            if len(key) != 32:
                raise DataKeyError(f"{self.path}: not a 32-byte key")
            self._aead = ChaCha20Poly1305(key)
            self._pseudo_key = hmac.new(key, b"dongle-pseudonym/v1", hashlib.sha256).digest()
            return self._aead

    def pseudonym(self, text: str) -> str:
        """A stable stand-in for an identifier (e.g. the VIN as a table key): keyed by the data
        key, so it links rows while the key lives and means nothing once a wipe destroyed it."""
        self._cipher()
        return "veh-" + hmac.new(self._pseudo_key, text.encode(), hashlib.sha256).hexdigest()[:16]

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(NONCE_LEN)
        return nonce + self._cipher().encrypt(nonce, plaintext, aad)

    def open(self, blob: bytes, aad: bytes) -> bytes:
        try:
            return self._cipher().decrypt(bytes(blob[:NONCE_LEN]), bytes(blob[NONCE_LEN:]), aad)
        except InvalidTag:
            raise DataKeyError("a value does not open under the data key (key replaced or data damaged)") from None

    def seal_obj(self, obj: Any, aad: bytes) -> bytes:
        return self.seal(cbor2.dumps(obj), aad)

    def open_obj(self, blob: bytes, aad: bytes) -> Any:
        return cbor2.loads(self.open(blob, aad))

    def destroy(self) -> bool:
        """Overwrites the key file with random bytes, syncs, unlinks it and forgets the key.
        True if a key file existed. After this, every value sealed under it is unreadable."""
        with self._lock:
            self._aead = None
            self.destroyed = True
            existed = self.path.exists()
            if existed:
                size = max(32, self.path.stat().st_size)
                with open(self.path, "r+b", buffering=0) as f:
                    f.write(os.urandom(size))
                    os.fsync(f.fileno())
                self.path.unlink()
                try:
                    dfd = os.open(self.path.parent, os.O_RDONLY)
                    try:
                        os.fsync(dfd)
                    finally:
                        os.close(dfd)
                except OSError:
                    pass
                log.warning("datakey: destroyed %s", self.path)
            return existed


def put_secret_meta(store, key: DataKey, name: str, value: Any) -> None:
    """Stores ``value`` in the store's ``meta`` table encrypted under the data key (e.g. the
    vehicle's VIN): ``store.set_meta(name, {"enc": <hex>})``."""
    blob = key.seal_obj(value, b"meta:" + name.encode())
    store.set_meta(name, {"enc": blob.hex()})


def open_secret_meta(key: DataKey, name: str, raw: Any) -> Any:
    """A ``meta`` value as stored (``raw``): opened if :func:`put_secret_meta` sealed it, else as
    it is. Raises :class:`DataKeyError` when it does not open."""
    if not (isinstance(raw, dict) and set(raw) == {"enc"}):
        return raw
    return key.open_obj(bytes.fromhex(raw["enc"]), b"meta:" + name.encode())


def get_secret_meta(store, key: DataKey, name: str, default: Any = None) -> Any:
    raw = store.get_meta(name)
    if raw is None:
        return default
    try:
        return open_secret_meta(key, name, raw)
    except DataKeyError:
        return default


#: Event types whose bodies identify the car or a person (docs/privacy.md, category
#: "identity"): ``vehicle`` (the VIN) and ``device_wiped`` (``by``, free text given at the car).
#: Every other event type carries vehicle, service or device data only.
IDENTITY_EVENT_TYPES = frozenset({"vehicle", "device_wiped"})


class EventsAtRest:
    """The store's event codec (agent/outbox/store.py ``EventCodec``): a body of an
    :data:`IDENTITY_EVENT_TYPES` type is stored as ``{"type", "ts", "enc"}``, ``enc`` the whole
    body sealed under the data key (associated data ``event:<type>``); ``type`` and ``ts`` stay
    readable for ordering, retention and the clock fix-up (which may move ``ts``: the stored one
    wins). Other bodies are stored as they are."""

    def __init__(self, key: DataKey):
        self._key = key

    def seal(self, body: dict) -> dict:
        kind = body.get("type")
        if kind not in IDENTITY_EVENT_TYPES:
            return body
        return {"type": kind, "ts": body.get("ts"), "enc": self._key.seal_obj(body, b"event:" + kind.encode())}

    def open(self, stored: dict) -> dict:
        """The body of ``stored``; raises :class:`DataKeyError` if it does not open (wiped)."""
        if "enc" not in stored:
            return stored
        kind = str(stored.get("type"))
        body = self._key.open_obj(bytes(stored["enc"]), b"event:" + kind.encode())
        if stored.get("ts") is not None:
            body["ts"] = stored["ts"]
        return body
