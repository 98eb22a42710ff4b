"""Key files and key ids (PROTOCOL §1).

Keys are exchanged as PEM: public keys as SubjectPublicKeyInfo, private keys as unencrypted
PKCS#8. Private key files are created mode 0600 and never readable by anyone but the agent's
user; loading one that is warns. Every failure to load a key is a :class:`KeyFileError` whose
text names the file and the reason, so the daemon can log it and the CLI can print it as is.

A key id (``kid``) is the first 8 bytes of SHA-256 over the raw 32-byte public key, written as
16 lowercase hex characters.
"""
from __future__ import annotations

import hashlib
import logging
import os
import ssl
import stat
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from drivers.core.local_file import LocalFileError

log = logging.getLogger(__name__)

PrivateKey = Ed25519PrivateKey | X25519PrivateKey | ec.EllipticCurvePrivateKey
PublicKey = Ed25519PublicKey | X25519PublicKey | ec.EllipticCurvePublicKey
K = TypeVar("K")

_TYPE_NAMES: dict[type, str] = {
    Ed25519PrivateKey: "an Ed25519 private key",
    X25519PrivateKey: "an X25519 private key",
    ec.EllipticCurvePrivateKey: "an EC private key",
    Ed25519PublicKey: "an Ed25519 public key",
    X25519PublicKey: "an X25519 public key",
    ec.EllipticCurvePublicKey: "an EC public key",
}


class KeyFileError(LocalFileError):
    """A key or certificate file is missing, unreadable, malformed or holds the wrong kind of key."""


def key_id(public_key: Ed25519PublicKey | X25519PublicKey | bytes) -> str:
    """PROTOCOL §1 key id: SHA-256 of the raw 32-byte public key, first 8 bytes, lowercase hex."""
    if isinstance(public_key, (Ed25519PublicKey, X25519PublicKey)):
        raw = public_key.public_bytes_raw()
    elif isinstance(public_key, (bytes, bytearray, memoryview)) and len(public_key) == 32:
        raw = bytes(public_key)
    else:
        raise TypeError(f"key_id needs an Ed25519/X25519 public key or 32 raw bytes, got {type(public_key).__name__}")
    return hashlib.sha256(raw).digest()[:8].hex()


def trusted_signers(keys: Iterable[Ed25519PublicKey]) -> dict[str, Ed25519PublicKey]:
    """The ``kid -> key`` mapping :func:`agent.protocol.open_envelope` takes as ``trusted_signers``."""
    return {key_id(k): k for k in keys}


def _type_name(expected_type: type) -> str:
    return _TYPE_NAMES.get(expected_type, f"a {expected_type.__name__}")


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(path, "not found") from None
    except PermissionError:
        raise KeyFileError(path, "permission denied") from None
    except IsADirectoryError:
        raise KeyFileError(path, "is a directory") from None
    except OSError as e:
        raise KeyFileError(path, f"cannot read: {e.strerror or e}") from None


def load_private_key(path: str | os.PathLike[str], expected_type: type[K]) -> K:
    """Loads an unencrypted PKCS#8 PEM private key of ``expected_type`` (e.g. ``Ed25519PrivateKey``)."""
    p = Path(path)
    data = _read(p)
    try:
        mode = stat.S_IMODE(p.stat().st_mode)
        if mode & 0o077:
            log.warning("%s: private key file is accessible by group/others (mode %04o); it should be 0600", p, mode)
    except OSError:  # pragma: no cover - the read above just succeeded
        pass
    if b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in data:
        raise KeyFileError(p, "encrypted private keys are not supported")
    if b"-----BEGIN PRIVATE KEY-----" not in data:
        raise KeyFileError(p, "not a PEM PKCS#8 private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise KeyFileError(p, f"not a valid PEM private key ({e})") from None
    except Exception as e:  # cryptography raises UnsupportedAlgorithm for unknown key types
        raise KeyFileError(p, f"unsupported private key ({e})") from None
    if not isinstance(key, expected_type):
        raise KeyFileError(p, f"not {_type_name(expected_type)}")
    return key


def load_public_key_pem(data: bytes, expected_type: type[K], *, source: str = "<pem>") -> K:
    """Parses a SubjectPublicKeyInfo PEM of ``expected_type``; errors name ``source``."""
    if b"-----BEGIN PUBLIC KEY-----" not in data:
        raise KeyFileError(source, "not a PEM public key (SubjectPublicKeyInfo)")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise KeyFileError(source, f"not a valid PEM public key ({e})") from None
    except Exception as e:
        raise KeyFileError(source, f"unsupported public key ({e})") from None
    if not isinstance(key, expected_type):
        raise KeyFileError(source, f"not {_type_name(expected_type)}")
    return key


def load_public_key(path: str | os.PathLike[str], expected_type: type[K]) -> K:
    """Loads a SubjectPublicKeyInfo PEM public key of ``expected_type`` (e.g. ``X25519PublicKey``)."""
    p = Path(path)
    return load_public_key_pem(_read(p), expected_type, source=str(p))


def private_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def public_pem(key: PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _write_atomic(path: Path, data: bytes, mode: int, *, exclusive: bool) -> None:
    """Writes ``data`` to ``path`` with ``mode``.

    ``exclusive``: create with O_CREAT|O_EXCL, failing if the file exists (no window in which
    another process could have created it). Otherwise write a temporary file in the same
    directory and rename it over ``path``. In both cases the file never exists with a wider mode.
    """
    if exclusive:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        except FileExistsError:
            raise KeyFileError(path, "already exists") from None
        except PermissionError:
            raise KeyFileError(path, "permission denied") from None
        try:
            os.fchmod(fd, mode)  # the umask may have narrowed it; never widen beyond mode
            with os.fdopen(fd, "wb") as f:
                fd = -1
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            if fd >= 0:
                os.close(fd)
            path.unlink(missing_ok=True)
            raise
        return
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # created mode 0600
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_private_key(path: str | os.PathLike[str], key: PrivateKey, force: bool = False) -> None:
    """Writes ``key`` as PKCS#8 PEM, mode 0600. Without ``force`` an existing file is an error."""
    _write_atomic(Path(path), private_pem(key), 0o600, exclusive=not force)


def write_public_key(path: str | os.PathLike[str], key: PublicKey, force: bool = True) -> None:
    """Writes ``key`` as SubjectPublicKeyInfo PEM, mode 0644 (replacing any existing file by default)."""
    _write_atomic(Path(path), public_pem(key), 0o644, exclusive=not force)


@dataclass(frozen=True)
class DeviceKeys:
    """The keys the running agent uses (PROTOCOL §1), loaded from the ``[keys]`` settings."""

    sign: Ed25519PrivateKey                      # signs every uplink envelope
    enc: X25519PrivateKey                        # opens downlink envelopes
    cloud_enc: X25519PublicKey                   # uplink envelopes are sealed to it
    trusted_signers: dict[str, Ed25519PublicKey]  # kid -> cloud key trusted to sign downlink

    @classmethod
    def load(cls, sign_key: os.PathLike[str], enc_key: os.PathLike[str], cloud_enc_pub: os.PathLike[str],
             cloud_sign_pubs: Iterable[os.PathLike[str]]) -> DeviceKeys:
        """Raises :class:`KeyFileError` naming the first file that cannot be used."""
        return cls(sign=load_private_key(sign_key, Ed25519PrivateKey),
                   enc=load_private_key(enc_key, X25519PrivateKey),
                   cloud_enc=load_public_key(cloud_enc_pub, X25519PublicKey),
                   trusted_signers=trusted_signers(load_public_key(p, Ed25519PublicKey) for p in cloud_sign_pubs))


# --------------------------------------------------------------------------------------------
# The MQTT link's TLS files, checked before the agent starts
# --------------------------------------------------------------------------------------------

def load_certificates(path: str | os.PathLike[str]) -> list[x509.Certificate]:
    """The PEM certificates in ``path`` (at least one), or :class:`KeyFileError`."""
    p = Path(path)
    data = _read(p)
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise KeyFileError(p, "not a PEM certificate (no -----BEGIN CERTIFICATE----- block)")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise KeyFileError(p, f"not a valid PEM certificate ({e})") from None


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:   # an old v1 root: a CA only if it signed itself
        return cert.issuer == cert.subject


def check_ca_file(path: str | os.PathLike[str]) -> None:
    """Raises :class:`KeyFileError` unless ``path`` holds PEM certificates, one of them a CA."""
    cas = load_certificates(path)
    if not any(_is_ca(c) for c in cas):
        raise KeyFileError(path, f"not a CA certificate ({cas[0].subject.rfc4514_string()} is not marked as a "
                                 "CA: a device or server certificate instead of the CA that signed the "
                                 "server's?)")


def _tls_private_key(path: str | os.PathLike[str]):
    """A PEM private key in any form TLS takes (PKCS#8, SEC1, PKCS#1), unencrypted."""
    p = Path(path)
    data = _read(p)
    if b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in data or b"Proc-Type: 4,ENCRYPTED" in data:
        raise KeyFileError(p, "encrypted private keys are not supported")
    if b"PRIVATE KEY-----" not in data:
        raise KeyFileError(p, "not a PEM private key")
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise KeyFileError(p, f"not a valid PEM private key ({e})") from None
    except Exception as e:
        raise KeyFileError(p, f"unsupported private key ({e})") from None


def _spki(key) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def check_tls_files(ca_file: str | os.PathLike[str], cert_file: str | os.PathLike[str],
                    key_file: str | os.PathLike[str], *, device_id: str | None = None) -> None:
    """Raises :class:`KeyFileError` naming the first of the MQTT link's files that cannot
    work: a CA file that holds no CA certificate, a certificate that is not PEM (or is another
    device's: its CN must be ``device_id``), a key that does not match the certificate, or a
    set the TLS library itself refuses."""
    check_ca_file(ca_file)
    cert = load_certificates(cert_file)[0]
    if device_id is not None:
        cns = [a.value for a in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]
        if cns != [device_id]:
            raise KeyFileError(cert_file, f"the certificate is for CN={','.join(map(str, cns)) or '(none)'}, "
                                          f"not for this device ({device_id}, device.id)")
    key = _tls_private_key(key_file)
    if _spki(key.public_key()) != _spki(cert.public_key()):
        raise KeyFileError(key_file, f"the private key does not match the certificate {cert_file}")
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
        ctx.load_cert_chain(str(cert_file), str(key_file))
    except ssl.SSLError as e:
        raise KeyFileError(cert_file, f"refused by the TLS library ({e.reason or e})") from None
