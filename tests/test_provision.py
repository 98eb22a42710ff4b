"""Key files (agent.keys), `dongle provision` and scripts/refcloud/keys.py."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.x509.oid import NameOID

from agent.cli import main as cli
from agent.cloud import keys, protocol
from agent.cloud.keys import KeyFileError
from scripts.refcloud.keys import generate_cloud_keys, main as cloud_keys_main

DEVICE = "rav4-2018-0001"
KEY_FILES = ("device_sign.key", "device_enc.key", "tls.key")
PUBLIC_FILES = ("device_sign.pub", "device_enc.pub", "cloud_sign.pub", "cloud_enc.pub", "tls.csr",
                "registration.json")


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def raw_kid(pub) -> str:
    return hashlib.sha256(pub.public_bytes_raw()).hexdigest()[:16]


@pytest.fixture
def cloud(tmp_path, capsys):
    result = generate_cloud_keys(tmp_path / "cloud")
    capsys.readouterr()
    return result


def provision_args(cloud, out: Path, device: str = DEVICE, *extra: str) -> list[str]:
    return ["provision", "--device-id", device, "--cloud-sign-pub", str(cloud["paths"]["cloud_sign.pub"]),
            "--cloud-enc-pub", str(cloud["paths"]["cloud_enc.pub"]), "--out", str(out), *extra]


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())} if d.exists() else {}


# ---- keys ---------------------------------------------------------------------------------

def test_key_id_rfc8032_vector():
    raw = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
    pub = Ed25519PublicKey.from_public_bytes(raw)
    expected = hashlib.sha256(raw).digest()[:8].hex()
    assert keys.key_id(pub) == keys.key_id(raw) == expected
    assert len(expected) == 16 and expected == expected.lower()
    x = X25519PrivateKey.generate().public_key()
    assert keys.key_id(x) == raw_kid(x)
    with pytest.raises(TypeError):
        keys.key_id(b"short")


def test_private_key_written_0600_exclusively_and_loaded(tmp_path):
    old = os.umask(0)
    try:
        k = Ed25519PrivateKey.generate()
        path = tmp_path / "s.key"
        keys.write_private_key(path, k)
        assert mode(path) == 0o600
        assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
        loaded = keys.load_private_key(path, Ed25519PrivateKey)
        assert loaded.public_key().public_bytes_raw() == k.public_key().public_bytes_raw()
        with pytest.raises(KeyFileError, match="already exists"):
            keys.write_private_key(path, Ed25519PrivateKey.generate())
        assert keys.load_private_key(path, Ed25519PrivateKey).public_key() == k.public_key()
        path.chmod(0o644)
        k2 = Ed25519PrivateKey.generate()
        keys.write_private_key(path, k2, force=True)
        assert mode(path) == 0o600
        assert keys.load_private_key(path, Ed25519PrivateKey).public_key() == k2.public_key()
        assert [p.name for p in tmp_path.iterdir()] == ["s.key"]  # no temporary file left
    finally:
        os.umask(old)


def test_key_file_errors_name_the_file_and_reason(tmp_path):
    missing = tmp_path / "device_sign.key"
    with pytest.raises(KeyFileError) as info:
        keys.load_private_key(missing, Ed25519PrivateKey)
    assert str(info.value) == f"{missing}: not found"

    x = tmp_path / "x.key"
    keys.write_private_key(x, X25519PrivateKey.generate())
    with pytest.raises(KeyFileError) as info:
        keys.load_private_key(x, Ed25519PrivateKey)
    assert str(info.value) == f"{x}: not an Ed25519 private key"

    pub = tmp_path / "x.pub"
    keys.write_public_key(pub, X25519PrivateKey.generate().public_key())
    with pytest.raises(KeyFileError, match="not an Ed25519 public key"):
        keys.load_public_key(pub, Ed25519PublicKey)
    with pytest.raises(KeyFileError, match="not a PEM PKCS#8 private key"):
        keys.load_private_key(pub, X25519PrivateKey)
    with pytest.raises(KeyFileError, match="not a PEM public key"):
        keys.load_public_key(x, X25519PublicKey)

    garbage = tmp_path / "g.key"
    garbage.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot base64!\n-----END PRIVATE KEY-----\n")
    garbage.chmod(0o600)
    with pytest.raises(KeyFileError, match="g.key: not a valid PEM private key"):
        keys.load_private_key(garbage, Ed25519PrivateKey)

    enc = tmp_path / "enc.key"
    enc.write_bytes(Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw")))
    with pytest.raises(KeyFileError, match="encrypted"):
        keys.load_private_key(enc, Ed25519PrivateKey)

    with pytest.raises(KeyFileError, match="is a directory"):
        keys.load_public_key(tmp_path, X25519PublicKey)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_key_is_permission_denied(tmp_path):
    p = tmp_path / "s.key"
    keys.write_private_key(p, Ed25519PrivateKey.generate())
    p.chmod(0)
    with pytest.raises(KeyFileError) as info:
        keys.load_private_key(p, Ed25519PrivateKey)
    assert str(info.value) == f"{p}: permission denied"


def test_group_readable_private_key_warns(tmp_path, caplog):
    p = tmp_path / "s.key"
    keys.write_private_key(p, Ed25519PrivateKey.generate())
    with caplog.at_level(logging.WARNING, logger="agent.cloud.keys"):
        keys.load_private_key(p, Ed25519PrivateKey)
    assert not caplog.records
    p.chmod(0o640)
    with caplog.at_level(logging.WARNING, logger="agent.cloud.keys"):
        keys.load_private_key(p, Ed25519PrivateKey)
    assert any("0640" in r.getMessage() and str(p) in r.getMessage() for r in caplog.records)


# ---- provision ----------------------------------------------------------------------------

def test_provision_creates_everything(tmp_path, cloud, capsys):
    out = tmp_path / "keys"
    assert cli.main(provision_args(cloud, out)) == 0
    printed = capsys.readouterr().out

    assert sorted(p.name for p in out.iterdir()) == sorted(KEY_FILES + PUBLIC_FILES)
    assert mode(out) == 0o700
    for name in KEY_FILES:
        assert mode(out / name) == 0o600, name
        assert (out / name).read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
    for name in PUBLIC_FILES:
        assert mode(out / name) == 0o644, name

    sign = keys.load_private_key(out / "device_sign.key", Ed25519PrivateKey)
    enc = keys.load_private_key(out / "device_enc.key", X25519PrivateKey)
    tls = keys.load_private_key(out / "tls.key", ec.EllipticCurvePrivateKey)
    assert isinstance(tls.curve, ec.SECP256R1)
    assert keys.load_public_key(out / "device_sign.pub", Ed25519PublicKey) == sign.public_key()
    assert keys.load_public_key(out / "device_enc.pub", X25519PublicKey) == enc.public_key()
    assert (out / "cloud_sign.pub").read_bytes() == cloud["paths"]["cloud_sign.pub"].read_bytes()
    assert (out / "cloud_enc.pub").read_bytes() == cloud["paths"]["cloud_enc.pub"].read_bytes()

    csr = x509.load_pem_x509_csr((out / "tls.csr").read_bytes())
    assert csr.is_signature_valid
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == DEVICE
    assert csr.public_key() == tls.public_key()

    reg = json.loads((out / "registration.json").read_text())
    assert reg["device_id"] == DEVICE
    assert reg["kid_sign"] == raw_kid(sign.public_key())
    assert reg["kid_enc"] == raw_kid(enc.public_key())
    assert reg["kid_cloud_sign"] == cloud["kid_sign"] and reg["kid_cloud_enc"] == cloud["kid_enc"]
    assert serialization.load_pem_public_key(reg["device_sign_pub"].encode()) == sign.public_key()
    assert serialization.load_pem_public_key(reg["device_enc_pub"].encode()) == enc.public_key()
    assert x509.load_pem_x509_csr(reg["tls_csr"].encode()).public_key() == tls.public_key()

    for kid in (reg["kid_sign"], reg["kid_enc"], cloud["kid_sign"], cloud["kid_enc"]):
        assert kid in printed


def test_provisioned_keys_talk_to_the_cloud_keys(tmp_path, cloud, capsys):
    out = tmp_path / "keys"
    assert cli.main(provision_args(cloud, out)) == 0
    dev_sign = keys.load_private_key(out / "device_sign.key", Ed25519PrivateKey)
    dev_enc = keys.load_private_key(out / "device_enc.key", X25519PrivateKey)
    cloud_sign = keys.load_private_key(cloud["paths"]["cloud_sign.key"], Ed25519PrivateKey)
    cloud_enc = keys.load_private_key(cloud["paths"]["cloud_enc.key"], X25519PrivateKey)

    up = protocol.seal("event", {"type": "trip_start", "ts": 1}, dev=DEVICE, seq=1, signer=dev_sign,
                       recipient=keys.load_public_key(out / "cloud_enc.pub", X25519PublicKey))
    opened = protocol.open_envelope(
        up, expected_dev=DEVICE, expected_kind="event", recipient_key=cloud_enc, now_ms=None, last_seq=None,
        trusted_signers=keys.trusted_signers([keys.load_public_key(out / "device_sign.pub", Ed25519PublicKey)]))
    assert opened.body["type"] == "trip_start"

    down = protocol.seal("command", {"op": "ping"}, dev=DEVICE, seq=1, signer=cloud_sign,
                         recipient=keys.load_public_key(out / "device_enc.pub", X25519PublicKey))
    opened = protocol.open_envelope(
        down, expected_dev=DEVICE, expected_kind="command", recipient_key=dev_enc, now_ms=None, last_seq=0,
        trusted_signers=keys.trusted_signers([keys.load_public_key(out / "cloud_sign.pub", Ed25519PublicKey)]))
    assert opened.body == {"op": "ping"}


def test_refuses_to_overwrite_without_force(tmp_path, cloud, capsys):
    out = tmp_path / "keys"
    assert cli.main(provision_args(cloud, out)) == 0
    before = snapshot(out)
    capsys.readouterr()
    assert cli.main(provision_args(cloud, out)) == 1
    err = capsys.readouterr().err
    assert "--force" in err and "device_sign.key" in err
    assert snapshot(out) == before

    assert cli.main(provision_args(cloud, out, DEVICE, "--force")) == 0
    after = snapshot(out)
    for name in ("device_sign.key", "device_enc.key", "tls.key", "tls.csr"):
        assert after[name] != before[name]
    for name in KEY_FILES:
        assert mode(out / name) == 0o600


def test_one_existing_key_blocks_everything(tmp_path, cloud, capsys):
    out = tmp_path / "keys"
    out.mkdir()
    keys.write_private_key(out / "tls.key", ec.generate_private_key(ec.SECP256R1()))
    before = snapshot(out)
    assert cli.main(provision_args(cloud, out)) == 1
    assert "tls.key" in capsys.readouterr().err
    assert snapshot(out) == before


@pytest.mark.parametrize("device", ["CAR-1", "abc", "a" * 65, "car_0001", "car 1", "car.1", ""])
def test_bad_device_id_exit_2_nothing_written(tmp_path, cloud, capsys, device):
    out = tmp_path / "keys"
    assert cli.main(provision_args(cloud, out, device)) == 2
    assert "device id" in capsys.readouterr().err
    assert not out.exists()


def test_device_id_limits_accepted(tmp_path, cloud, capsys):
    assert cli.main(provision_args(cloud, tmp_path / "a", "abcd")) == 0
    assert cli.main(provision_args(cloud, tmp_path / "b", "0-" * 32)) == 0


def test_bad_cloud_keys_exit_2(tmp_path, cloud, capsys):
    out = tmp_path / "keys"
    swapped = ["provision", "--device-id", DEVICE, "--cloud-sign-pub", str(cloud["paths"]["cloud_enc.pub"]),
               "--cloud-enc-pub", str(cloud["paths"]["cloud_sign.pub"]), "--out", str(out)]
    assert cli.main(swapped) == 2
    assert "not an Ed25519 public key" in capsys.readouterr().err
    private = ["provision", "--device-id", DEVICE, "--cloud-sign-pub", str(cloud["paths"]["cloud_sign.key"]),
               "--cloud-enc-pub", str(cloud["paths"]["cloud_enc.pub"]), "--out", str(out)]
    assert cli.main(private) == 2
    missing = provision_args(cloud, out)
    missing[missing.index("--cloud-enc-pub") + 1] = str(tmp_path / "nope.pub")
    assert cli.main(missing) == 2
    assert "nope.pub: not found" in capsys.readouterr().err
    assert cli.main(["provision", "--device-id", DEVICE]) == 2  # argparse: missing options
    assert cli.main([]) == 2
    assert not out.exists()


def test_cloud_keys_script(tmp_path, capsys):
    out = tmp_path / "c"
    result = generate_cloud_keys(out)
    assert capsys.readouterr().out == ""   # the demo's first run prints no unexplained key ids
    assert mode(out / "cloud_sign.key") == mode(out / "cloud_enc.key") == 0o600
    sign = keys.load_private_key(out / "cloud_sign.key", Ed25519PrivateKey)
    assert keys.key_id(sign.public_key()) == result["kid_sign"]
    assert keys.load_public_key(out / "cloud_enc.pub", X25519PublicKey) == \
        keys.load_private_key(out / "cloud_enc.key", X25519PrivateKey).public_key()
    before = snapshot(out)
    with pytest.raises(FileExistsError):
        generate_cloud_keys(out)
    assert snapshot(out) == before
    assert generate_cloud_keys(out, force=True)["kid_sign"] != result["kid_sign"]
    # the command line says which key ids its envelopes will carry
    assert cloud_keys_main(["--out", str(tmp_path / "d")]) == 0
    printed = capsys.readouterr().out.split()
    assert printed[0] == "kid_sign" and printed[2] == "kid_enc"
    assert printed[1] == keys.key_id(keys.load_private_key(tmp_path / "d" / "cloud_sign.key",
                                                           Ed25519PrivateKey).public_key())
