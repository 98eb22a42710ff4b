"""scripts/install.sh for real: run as root inside the CAN VM, whose root file system is a
throwaway RAM overlay of the host's (scripts/canvm/). Never runs anywhere else.

``make test-install`` runs it: the VM has no network, so the agent's dependencies come from a
wheelhouse (``$DONGLE_WHEELHOUSE``) the Makefile downloads on the host first.
"""
from __future__ import annotations

import grp
import os
import pwd
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519

ROOT = Path(__file__).resolve().parents[2]
INSTALL = ROOT / "scripts" / "install.sh"
WHEELHOUSE = os.environ.get("DONGLE_WHEELHOUSE", "")


def _in_canvm() -> bool:
    try:
        return "canvm_fs=" in Path("/proc/cmdline").read_text()
    except OSError:
        return False


pytestmark = [
    pytest.mark.skipif(not _in_canvm(), reason="changes the system: only inside the CAN VM (make test-install)"),
    pytest.mark.skipif(not WHEELHOUSE, reason="needs $DONGLE_WHEELHOUSE (make test-install provides it)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
]


def owner_mode(path: str) -> tuple[str, str, int]:
    st = os.stat(path)
    return pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name, stat.S_IMODE(st.st_mode)


def as_dongle(*cmd: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["setpriv", "--reuid=dongle", "--regid=dongle", "--init-groups", *cmd],
                          capture_output=True, text=True, timeout=timeout, cwd="/")


def test_install_provision_and_config_error_exit(tmp_path):
    r = subprocess.run(["bash", str(INSTALL), "--wheelhouse", WHEELHOUSE],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr

    user = pwd.getpwnam("dongle")
    assert user.pw_shell == "/usr/sbin/nologin" and user.pw_dir == "/var/lib/dongle"
    assert grp.getgrgid(user.pw_gid).gr_name == "dongle"
    assert {"dialout", "gpio"} <= {g.gr_name for g in grp.getgrall()}  # SupplementaryGroups= needs them
    assert owner_mode("/etc/dongle") == ("root", "dongle", 0o750)
    assert owner_mode("/etc/dongle/keys") == ("dongle", "dongle", 0o700)
    assert owner_mode("/etc/dongle/agent.toml") == ("root", "dongle", 0o640)
    assert owner_mode("/var/lib/dongle") == ("dongle", "dongle", 0o750)
    assert Path("/etc/dongle/agent.toml").read_text() == (ROOT / "config" / "agent.example.toml").read_text()
    unit = Path("/etc/systemd/system/dongle-agent.service")
    assert unit.read_text() == (ROOT / "systemd" / "dongle-agent.service").read_text()
    assert Path("/etc/systemd/system/multi-user.target.wants/dongle-agent.service").resolve() == unit
    assert os.access("/opt/dongle/venv/bin/dongle-agent", os.X_OK)
    assert os.readlink("/usr/local/bin/dongle") == "/opt/dongle/venv/bin/dongle"
    assert not (ROOT / "build").exists(), "install.sh left build output in the checkout"

    # idempotent: a second look finds nothing to create, and keeps the edited config
    Path("/etc/dongle/agent.toml").write_text("# edited\n")
    r = subprocess.run(["bash", str(INSTALL), "--dry-run", "--wheelhouse", WHEELHOUSE],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    plan = [ln for ln in r.stdout.splitlines() if ln.startswith("+ ")]
    assert not [ln for ln in plan if ln.split()[1] in ("useradd", "groupadd", "chown", "chmod", "systemctl")
                or (ln.split()[1] == "install" and "agent.toml" in ln)], plan
    assert "keeping existing /etc/dongle/agent.toml" in r.stdout
    Path("/etc/dongle/agent.toml").write_text((ROOT / "config" / "agent.example.toml").read_text())

    # provisioning as the service user, as docs/install.md says
    pubs = {}
    for name, key in (("cloud_sign.pub", ed25519.Ed25519PrivateKey.generate()),
                      ("cloud_enc.pub", x25519.X25519PrivateKey.generate())):
        pubs[name] = Path("/tmp") / name
        pubs[name].write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        pubs[name].chmod(0o644)
    r = as_dongle("/usr/local/bin/dongle", "provision", "--device-id", "car-0042",
                  "--cloud-sign-pub", str(pubs["cloud_sign.pub"]),
                  "--cloud-enc-pub", str(pubs["cloud_enc.pub"]), "--out", "/etc/dongle/keys")
    assert r.returncode == 0, r.stdout + r.stderr
    for key in ("device_sign.key", "device_enc.key", "tls.key"):
        assert owner_mode(f"/etc/dongle/keys/{key}") == ("dongle", "dongle", 0o600)
    assert owner_mode("/etc/dongle/keys/tls.csr")[:2] == ("dongle", "dongle")

    # before the certificate is installed the agent stops with status 2 and names what is
    # missing: the unit's RestartPreventExitStatus=2 then keeps systemd from looping
    r = as_dongle("/opt/dongle/venv/bin/dongle-agent", "--config", "/etc/dongle/agent.toml")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "/etc/dongle/keys/" in r.stderr
