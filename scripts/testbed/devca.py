"""A development certificate authority for the broker's mutual TLS (PROTOCOL §1).

Never used on a device or in production: it exists so that the demo, the local broker and the
tests have a real PKI. Every key is ECDSA P-256, every private key is written PKCS#8 PEM with
mode 0600.

    ca = DevCA(Path("run/pki"))                     # creates ca.key / ca.pem, or reuses them
    cert, key = ca.issue_server()                   # broker certificate: localhost, 127.0.0.1, ::1
    ca.sign_csr(Path("dongle.csr"), Path("dongle.pem"))   # device CSR from `dongle provision`
    cert, key = ca.issue_client("cloud-console", Path("run/cloud"))

CLI: ``python -m scripts.testbed.devca DIR init | server | sign CSR OUT | client CN OUTDIR``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import logging
import os
import re
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger(__name__)

# Certificate CNs become MQTT usernames (use_identity_as_username) and are substituted into ACL
# patterns, so they are held to the device-id alphabet (PROTOCOL §1): no '+', '#' or '/'.
_CN_RE = re.compile(r"^[a-z0-9-]{4,64}$")
_CA_DAYS = 3650
_LEAF_DAYS = 825
_BACKDATE = dt.timedelta(minutes=5)  # tolerate a little clock skew between machines


def _write_private_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _check_cn(cn: str) -> str:
    if not _CN_RE.match(cn):
        raise ValueError(f"certificate CN {cn!r} is not 4-64 characters of [a-z0-9-]")
    return cn


def _check_p256(public_key: object) -> ec.EllipticCurvePublicKey:
    if not (isinstance(public_key, ec.EllipticCurvePublicKey)
            and isinstance(public_key.curve, ec.SECP256R1)):
        raise ValueError("only ECDSA P-256 keys are accepted (PROTOCOL §1)")
    return public_key


class DevCA:
    """A CA kept in ``directory`` as ``ca.key`` (PKCS#8, 0600) and ``ca.pem``."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._key_path = self.directory / "ca.key"
        self._cert_path = self.directory / "ca.pem"
        if self._key_path.exists() and self._cert_path.exists():
            self._key = serialization.load_pem_private_key(self._key_path.read_bytes(), None)
            self._cert = x509.load_pem_x509_certificate(self._cert_path.read_bytes())
            if self._cert.public_key() != self._key.public_key():
                raise ValueError(f"{self._cert_path} does not belong to {self._key_path}")
            log.debug("devca: reusing CA in %s", self.directory)
        elif self._key_path.exists() or self._cert_path.exists():
            raise FileExistsError(f"{self.directory} holds only half a CA (ca.key / ca.pem)")
        else:
            self._key, self._cert = self._create_ca()
            _write_private_key(self._key_path, self._key)
            _write_cert(self._cert_path, self._cert)
            log.info("devca: created CA in %s", self.directory)

    @property
    def ca_cert_path(self) -> Path:
        return self._cert_path

    @property
    def certificate(self) -> x509.Certificate:
        return self._cert

    def issue_server(self, name: str = "localhost", ips: tuple[str, ...] = ("127.0.0.1", "::1"),
                     *, out_dir: Path | None = None, not_before: dt.datetime | None = None,
                     days: int = _LEAF_DAYS) -> tuple[Path, Path]:
        """Issues a broker certificate for DNS ``name`` and ``ips``; writes
        ``server-<name>.pem``/``.key`` into ``out_dir`` (default: the CA directory).
        ``not_before`` (default: now, less a little skew) and ``days`` set its validity, e.g.
        one that a device whose clock is behind sees as not yet valid."""
        out = Path(out_dir) if out_dir is not None else self.directory
        key = ec.generate_private_key(ec.SECP256R1())
        san = [x509.DNSName(name)] + [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        cert = self._issue(key.public_key(), name, ExtendedKeyUsageOID.SERVER_AUTH, days,
                           san=san, not_before=not_before)
        cert_path, key_path = out / f"server-{name}.pem", out / f"server-{name}.key"
        _write_private_key(key_path, key)
        _write_cert(cert_path, cert)
        return cert_path, key_path

    def sign_csr(self, csr_path: Path, out_cert_path: Path, days: int = _LEAF_DAYS) -> Path:
        """Signs a client (device) CSR: keeps its CN only, EKU clientAuth.

        Raises ValueError for a CSR whose self-signature does not verify, without a valid CN,
        or with a key other than P-256.
        """
        data = Path(csr_path).read_bytes()
        try:
            csr = (x509.load_pem_x509_csr(data) if b"-----BEGIN" in data
                   else x509.load_der_x509_csr(data))
        except ValueError as e:
            raise ValueError(f"{csr_path}: not a CSR ({e})") from e
        if not csr.is_signature_valid:
            raise ValueError(f"{csr_path}: CSR signature does not verify")
        cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if len(cns) != 1:
            raise ValueError(f"{csr_path}: CSR must carry exactly one CN, has {len(cns)}")
        cn = _check_cn(str(cns[0].value))
        cert = self._issue(_check_p256(csr.public_key()), cn, ExtendedKeyUsageOID.CLIENT_AUTH, days)
        _write_cert(Path(out_cert_path), cert)
        log.info("devca: signed client certificate for %s -> %s", cn, out_cert_path)
        return Path(out_cert_path)

    def issue_client(self, cn: str, out_dir: Path, days: int = _LEAF_DAYS) -> tuple[Path, Path]:
        """Generates a key and a client certificate for ``cn`` (cloud console, tests); writes
        ``<cn>.pem`` and ``<cn>.key`` into ``out_dir``."""
        _check_cn(cn)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._issue(key.public_key(), cn, ExtendedKeyUsageOID.CLIENT_AUTH, days)
        out = Path(out_dir)
        cert_path, key_path = out / f"{cn}.pem", out / f"{cn}.key"
        _write_private_key(key_path, key)
        _write_cert(cert_path, cert)
        return cert_path, key_path

    # -- internals ---------------------------------------------------------------------------

    def _create_ca(self) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dongle dev CA"),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dongle development")])
        now = dt.datetime.now(dt.timezone.utc)
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (x509.CertificateBuilder()
                .subject_name(name).issuer_name(name)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - _BACKDATE)
                .not_valid_after(now + dt.timedelta(days=_CA_DAYS))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False,
                                             key_agreement=False, key_cert_sign=True,
                                             crl_sign=True, encipher_only=False,
                                             decipher_only=False), critical=True)
                .add_extension(ski, critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                               critical=False)
                .sign(key, hashes.SHA256()))
        return key, cert

    def _issue(self, public_key: ec.EllipticCurvePublicKey, cn: str, eku: x509.ObjectIdentifier,
               days: int, *, san: list[x509.GeneralName] | None = None,
               not_before: dt.datetime | None = None) -> x509.Certificate:
        start = not_before or dt.datetime.now(dt.timezone.utc) - _BACKDATE
        ca_ski = self._cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
                   .issuer_name(self._cert.subject)
                   .public_key(public_key)
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(start)
                   .not_valid_after(start + dt.timedelta(days=days))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                                key_encipherment=False, data_encipherment=False,
                                                key_agreement=False, key_cert_sign=False,
                                                crl_sign=False, encipher_only=False,
                                                decipher_only=False), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key),
                                  critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                       ca_ski), critical=False))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(self._key, hashes.SHA256())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.testbed.devca",
                                     description="Development CA for the broker's mutual TLS.")
    parser.add_argument("dir", type=Path, help="CA directory (ca.key, ca.pem)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("init", help="create the CA (or show the existing one)")
    server = sub.add_parser("server", help="issue a broker certificate into DIR")
    server.add_argument("--name", default="localhost")
    server.add_argument("--ip", action="append", dest="ips", help="IP SAN (repeatable)")
    sign = sub.add_parser("sign", help="sign a device CSR")
    sign.add_argument("csr", type=Path)
    sign.add_argument("out", type=Path)
    sign.add_argument("--days", type=int, default=_LEAF_DAYS)
    client = sub.add_parser("client", help="generate a client key and certificate")
    client.add_argument("cn")
    client.add_argument("outdir", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        ca = DevCA(args.dir)
        if args.cmd == "init":
            print(ca.ca_cert_path)
        elif args.cmd == "server":
            cert, key = ca.issue_server(args.name, tuple(args.ips or ("127.0.0.1", "::1")))
            print(cert, key)
        elif args.cmd == "sign":
            print(ca.sign_csr(args.csr, args.out, days=args.days))
        elif args.cmd == "client":
            cert, key = ca.issue_client(args.cn, args.outdir)
            print(cert, key)
    except (OSError, ValueError) as e:
        print(f"devca: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
