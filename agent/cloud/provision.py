"""Device provisioning (PROTOCOL §1): create the device's keys and what the cloud needs to register it.

``provision()`` writes into one directory (created mode 0700 if missing):

=====================  ===================================================  =====
file                   content                                              mode
=====================  ===================================================  =====
device_sign.key        Ed25519 private key, signs uplink envelopes (PKCS#8)  0600
device_enc.key         X25519 private key, opens downlink envelopes          0600
tls.key                P-256 private key for mutual TLS to the broker        0600
tls.csr                CSR for the TLS client certificate, CN = device id    0644
device_sign.pub        public halves (SubjectPublicKeyInfo PEM)              0644
device_enc.pub
cloud_sign.pub         the cloud's keys the device trusts / encrypts to      0644
cloud_enc.pub
registration.json      device id, key ids, public PEMs and the CSR: what     0644
                       the backend registers (and its CA signs)
tuf_root.json          with ``tuf_root``: the pinned TUF root metadata that   0644
                       anchors software updates (PROTOCOL §7, docs/updates.md)
=====================  ===================================================  =====

It refuses to overwrite anything that exists unless ``force`` is given, and then writes nothing.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.x509.oid import NameOID

from agent.cloud import keys
from agent.cloud.protocol import valid_device_id

log = logging.getLogger(__name__)

PRIVATE_FILES = ("device_sign.key", "device_enc.key", "tls.key")
PUBLIC_FILES = ("device_sign.pub", "device_enc.pub", "cloud_sign.pub", "cloud_enc.pub")
OTHER_FILES = ("tls.csr", "registration.json")
ALL_FILES = PRIVATE_FILES + PUBLIC_FILES + OTHER_FILES
TUF_ROOT_FILE = "tuf_root.json"


class ProvisionError(Exception):
    """Provisioning did not happen; ``exit_code`` is what the CLI returns."""

    exit_code = 1


class InvalidInput(ProvisionError):
    """A bad device id or cloud key: nothing was written."""

    exit_code = 2


class AlreadyProvisioned(ProvisionError):
    """Files exist and ``force`` was not given: nothing was written."""

    exit_code = 1


def _load_cloud_key(path: str | os.PathLike[str], expected: type, what: str) -> Any:
    try:
        return keys.load_public_key(path, expected)
    except keys.KeyFileError as e:
        raise InvalidInput(f"{what}: {e}") from None


def make_csr(device_id: str, tls_key: ec.EllipticCurvePrivateKey) -> x509.CertificateSigningRequest:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)])
    return x509.CertificateSigningRequestBuilder().subject_name(subject).sign(tls_key, hashes.SHA256())


def load_tuf_root(path: str | os.PathLike[str]) -> bytes:
    """Reads TUF root metadata and checks that it is one and signed by its own root keys."""
    from tuf.api.metadata import Metadata, Root

    try:
        data = Path(path).read_bytes()
        md = Metadata[Root].from_bytes(data)
        if not isinstance(md.signed, Root):
            raise ValueError(f"a {md.signed.type} role, not root")
        md.verify_delegate(Root.type, md)
    except OSError as e:
        raise InvalidInput(f"--tuf-root: {e}") from None
    except Exception as e:  # noqa: BLE001 - tuf raises several types for bad metadata
        raise InvalidInput(f"--tuf-root {path}: not valid TUF root metadata ({e})") from None
    return data


def provision(device_id: str, cloud_sign_pub: str | os.PathLike[str], cloud_enc_pub: str | os.PathLike[str],
              out_dir: str | os.PathLike[str], force: bool = False,
              tuf_root: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Creates the device's keys in ``out_dir``; returns the key ids and the paths written.

    ``cloud_sign_pub`` / ``cloud_enc_pub`` are PEM files of the cloud's Ed25519 / X25519 public
    keys; ``tuf_root`` (optional) the update repository's root metadata to pin. Raises
    :class:`InvalidInput` or :class:`AlreadyProvisioned` before writing anything.
    """
    if not valid_device_id(device_id):
        raise InvalidInput(f"invalid device id {device_id!r}: 4-64 characters of [a-z0-9-]")
    cloud_sign = _load_cloud_key(cloud_sign_pub, Ed25519PublicKey, "--cloud-sign-pub")
    cloud_enc = _load_cloud_key(cloud_enc_pub, X25519PublicKey, "--cloud-enc-pub")
    tuf_root_data = load_tuf_root(tuf_root) if tuf_root is not None else None
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InvalidInput(f"{out}: not a directory")
    names = ALL_FILES + ((TUF_ROOT_FILE,) if tuf_root_data is not None else ())
    paths = {name: out / name for name in names}
    existing = [str(p) for p in paths.values() if p.exists() or p.is_symlink()]
    if existing and not force:
        raise AlreadyProvisioned("refusing to overwrite existing files (use --force): " + ", ".join(existing))

    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    sign_key = Ed25519PrivateKey.generate()
    enc_key = X25519PrivateKey.generate()
    tls_key = ec.generate_private_key(ec.SECP256R1())
    csr = make_csr(device_id, tls_key)
    try:
        keys.write_private_key(paths["device_sign.key"], sign_key, force=force)
        keys.write_private_key(paths["device_enc.key"], enc_key, force=force)
        keys.write_private_key(paths["tls.key"], tls_key, force=force)
    except keys.KeyFileError as e:  # created by someone else since the check above
        raise AlreadyProvisioned(str(e)) from None
    keys.write_public_key(paths["device_sign.pub"], sign_key.public_key())
    keys.write_public_key(paths["device_enc.pub"], enc_key.public_key())
    keys.write_public_key(paths["cloud_sign.pub"], cloud_sign)
    keys.write_public_key(paths["cloud_enc.pub"], cloud_enc)
    csr_pem = csr.public_bytes(serialization.Encoding.PEM)
    paths["tls.csr"].write_bytes(csr_pem)
    paths["tls.csr"].chmod(0o644)

    result: dict[str, Any] = {
        "device_id": device_id,
        "kid_sign": keys.key_id(sign_key.public_key()),
        "kid_enc": keys.key_id(enc_key.public_key()),
        "kid_cloud_sign": keys.key_id(cloud_sign),
        "kid_cloud_enc": keys.key_id(cloud_enc),
    }
    registration = {
        **result,
        "protocol": 1,
        "device_sign_pub": keys.public_pem(sign_key.public_key()).decode(),
        "device_enc_pub": keys.public_pem(enc_key.public_key()).decode(),
        "tls_csr": csr_pem.decode(),
    }
    paths["registration.json"].write_text(json.dumps(registration, indent=2) + "\n", encoding="utf-8")
    paths["registration.json"].chmod(0o644)
    if tuf_root_data is not None:
        paths[TUF_ROOT_FILE].write_bytes(tuf_root_data)
        paths[TUF_ROOT_FILE].chmod(0o644)
        result["tuf_root"] = str(paths[TUF_ROOT_FILE])
    log.info("provisioned %s in %s (kid_sign %s, kid_enc %s)", device_id, out, result["kid_sign"], result["kid_enc"])
    return {**result, "paths": paths}
