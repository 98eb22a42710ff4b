"""A bad local file stops the daemon at start with the one settings line, exit 2, nothing started.

Each file the settings name (or make the agent read) is spoilt in turn on a device provisioned
as a real one is (scripts/testbed/devenv.py: `dongle provision`, a CSR signed by the dev CA), and
``dongle-agent`` is run through ``agent.daemon.main``: a DBC cantools cannot parse, local and
shipped EV profiles, key files, and the MQTT link's certificates (not PEM, a key that does not
match, a CA file that is not a CA, another device's certificate). Once through the installed
console script in a subprocess.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.cloud import keys
from agent.daemon import main as daemon_main
from agent.vehicle import ev_profile
from scripts.testbed import devenv

DEV = "file-0001"
REPO = Path(__file__).resolve().parent.parent
DBC = REPO / "config" / "dbc" / "toyota_new_mc_pt_generated.dbc"


@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    run = tmp_path_factory.mktemp("fleet")
    return run, devenv.make_cloud(run)


@pytest.fixture
def device(cloud, tmp_path):
    """A freshly provisioned device (its own copy), the agent not started: (dir, agent.toml)."""
    run, ca = cloud
    toml = devenv.make_device(run, ca, DEV, broker_port=1)   # nothing connects: the agent never starts
    ddir = tmp_path / "dev"
    shutil.copytree(toml.parent, ddir, ignore=shutil.ignore_patterns("data", "agent.sock"))
    return ddir, ddir / "agent.toml"


def _daemon(toml: Path, capsys) -> tuple[int, str]:
    rc = daemon_main(["--config", str(toml)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("dongle-agent:")]
    assert len(lines) == 1, err
    return rc, lines[0]


def _expect(toml: Path, capsys, key: str, path: Path, *why: str) -> str:
    rc, line = _daemon(toml, capsys)
    assert rc == 2, line
    assert line.startswith(f"dongle-agent: {toml}: key '{key}': {path}: "), line
    for w in why:
        assert w in line, line
    assert not (toml.parent / "agent.sock").exists(), "the control socket was started"
    return line


def _add(toml: Path, text: str) -> None:
    toml.write_text(toml.read_text() + "\n" + text + "\n")


# --------------------------------------------------------------------------------------------
# DBC
# --------------------------------------------------------------------------------------------

def _bus(dbc: Path) -> str:
    return f'[[can.buses]]\nname = "can0"\ninterface = "virtual"\nchannel = "bad-files"\ndbc = "{dbc}"'


def test_a_dbc_with_a_syntax_error(device, capsys):
    ddir, toml = device
    dbc = ddir / "car.dbc"
    dbc.write_text('VERSION ""\nBO_ 100 MSG: 8 X\n SG_ A : 0|8@1+ (1,0) [0|255] "" X\nthis is garbage\n')
    _add(toml, _bus(Path("car.dbc")))   # relative to agent.toml, as every path of the file
    line = _expect(toml, capsys, "can.buses[0].dbc", dbc, "not a valid DBC file", "line 4, column 1")
    assert line.endswith('Invalid syntax at line 4, column 1: ">>!<<this is garbage"'), line


def test_a_truncated_real_dbc_and_a_second_bus(device, capsys):
    ddir, toml = device
    dbc = ddir / "cut.dbc"
    dbc.write_bytes(DBC.read_bytes()[:3000])
    _add(toml, _bus(DBC).replace("can0", "good") + "\n" + _bus(dbc))
    _expect(toml, capsys, "can.buses[1].dbc", dbc, "not a valid DBC file", "Invalid syntax at line")


# --------------------------------------------------------------------------------------------
# EV profiles
# --------------------------------------------------------------------------------------------

EV = '[ev]\ntransport = "elm327"\nport = "/dev/null"\n'


def test_a_local_ev_profile_that_is_malformed(device, capsys):
    ddir, toml = device
    good = json.loads((REPO / "config" / "ev_profiles" / "hyundai_egmp.json").read_text())
    (ddir / "mine.json").write_text(json.dumps({**good, "name": "mine"}))
    (ddir / "broken.json").write_text(json.dumps({"name": "broken", "sources": ["me"]}))
    _add(toml, EV + 'profiles = ["mine.json", "broken.json"]')
    _expect(toml, capsys, "ev.profiles[1]", ddir / "broken.json", "not a valid EV profile", "missing 'requests'")


def test_a_local_ev_profile_that_is_not_json(device, capsys):
    ddir, toml = device
    (ddir / "car.json").write_text("{ this is not json")
    _add(toml, EV + 'profiles = ["car.json"]')
    _expect(toml, capsys, "ev.profiles[0]", ddir / "car.json", "not a valid EV profile")


def test_a_broken_shipped_ev_profile(device, capsys, monkeypatch, tmp_path):
    """The package's own profiles, as an installed slot holds them, one of them damaged."""
    ddir, toml = device
    shipped = tmp_path / "pkg"
    shutil.copytree(REPO / "config", shipped, ignore=shutil.ignore_patterns("__pycache__"))
    bad = shipped / "ev_profiles" / "vw_meb.json"
    bad.write_text(bad.read_text()[:200])

    class Resources:
        @staticmethod
        def files(package):
            assert package == "agent.config"
            return shipped

    monkeypatch.setattr(ev_profile, "resources", Resources)
    _add(toml, EV)
    _expect(toml, capsys, "ev.transport", bad, "an EV profile shipped with the agent", "not a valid EV profile")


def test_ev_profiles_are_not_read_without_ev(device, capsys):
    """ev.transport = "off": the profiles are not the agent's business (it would start)."""
    ddir, toml = device
    (ddir / "car.json").write_text("{")
    _add(toml, '[ev]\ntransport = "off"\nprofiles = ["car.json"]')
    from agent import settings
    from agent.compose import build
    agent = build(settings.load(toml))
    assert agent.ev is None
    agent.store.close()


# --------------------------------------------------------------------------------------------
# Keys and certificates
# --------------------------------------------------------------------------------------------

def test_a_device_key_that_is_not_pem(device, capsys):
    ddir, toml = device
    (ddir / "device_enc.key").write_text("not a key\n")
    _expect(toml, capsys, "keys.enc_key", ddir / "device_enc.key", "not a PEM PKCS#8 private key")


def test_a_cloud_key_of_the_wrong_kind(device, capsys):
    ddir, toml = device
    shutil.copy(ddir / "cloud_enc.pub", ddir / "cloud_sign.pub")   # X25519 where Ed25519 belongs
    _expect(toml, capsys, "keys.cloud_sign_pubs[0]", ddir / "cloud_sign.pub", "not an Ed25519 public key")


def test_a_certificate_that_is_not_pem(device, capsys):
    ddir, toml = device
    (ddir / "tls.crt").write_bytes(b"\x30\x82\x01\x0a" + b"\x00" * 64)   # DER-ish bytes
    _expect(toml, capsys, "mqtt.cert_file", ddir / "tls.crt", "not a PEM certificate")


def test_a_tls_key_that_does_not_match_the_certificate(device, capsys):
    ddir, toml = device
    (ddir / "tls.key").unlink()
    keys.write_private_key(ddir / "tls.key", ec.generate_private_key(ec.SECP256R1()))
    _expect(toml, capsys, "mqtt.key_file", ddir / "tls.key", "does not match the certificate", "tls.crt")


def test_a_ca_file_that_is_not_a_ca(device, capsys):
    ddir, toml = device
    shutil.copy(ddir / "tls.crt", ddir / "ca.pem")   # the device's own certificate as "the CA"
    _expect(toml, capsys, "mqtt.ca_file", ddir / "ca.pem", "not a CA certificate", f"CN={DEV}")


def test_another_devices_certificate(cloud, device, capsys):
    run, ca = cloud
    ddir, toml = device
    other = devenv.make_device(run, ca, "file-0002", broker_port=1).parent
    shutil.copy(other / "tls.crt", ddir / "tls.crt")
    shutil.copy(other / "tls.key", ddir / "tls.key")
    _expect(toml, capsys, "mqtt.cert_file", ddir / "tls.crt", "CN=file-0002", f"not for this device ({DEV}")


def test_an_update_ca_file_that_is_not_a_ca(device, capsys, tmp_path):
    ddir, toml = device
    _add(toml, f'[update]\nenabled = true\nroot = "{tmp_path / "opt"}"\nca_file = "tls.crt"')
    _expect(toml, capsys, "update.ca_file", ddir / "tls.crt", "not a CA certificate")


def test_the_good_files_pass_the_checks(device):
    """The same device unspoilt: every check passes (the agent is built; not started)."""
    ddir, toml = device
    dbc = ddir / "car.dbc"
    shutil.copy(DBC, dbc)
    _add(toml, _bus(dbc) + "\n" + EV)
    from agent import settings
    from agent.compose import build
    agent = build(settings.load(toml))
    assert agent.can is not None and agent.ev is not None
    agent.store.close()


# --------------------------------------------------------------------------------------------
# The installed console script
# --------------------------------------------------------------------------------------------

def test_the_console_script_prints_one_line_and_exits_2(device):
    ddir, toml = device
    dbc = ddir / "car.dbc"
    dbc.write_text("BO_ not a dbc\n")
    _add(toml, _bus(dbc))
    r = subprocess.run([str(Path(sys.executable).parent / "dongle-agent"), "--config", str(toml)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.splitlines()
    assert "Traceback" not in r.stderr
    assert [line for line in lines if line.startswith("dongle-agent:")] == lines[-1:]
    assert lines[-1].startswith(f"dongle-agent: {toml}: key 'can.buses[0].dbc': {dbc}: not a valid DBC file")
    assert r.stdout == ""
