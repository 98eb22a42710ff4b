"""Builds a complete local development fleet in one directory: CA, broker, cloud, devices.

Used by the demo (scripts/demo.py) and the end-to-end tests, so both exercise exactly the
provisioning path a real device goes through (``dongle provision`` → CSR signed by the CA).

Layout of ``run_dir``::

    ca/                 development CA (scripts/testbed/devca.py)
    broker/             mosquitto config, ACL, log, persistence (scripts/testbed/mosquitto.py)
    broker.json         {"host", "port", "ca_file"} for clients
    cloud/              cloud_sign.key/.pub, cloud_enc.key/.pub, console.crt/.key, console.db
    devices/<id>/       the device's keys (dongle provision), tls.crt, ca.pem, registration.json
    devices/<id>/agent.toml   local settings for that device
    devices/<id>/data/  its data directory
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from agent.cloud import provision as provision_mod
from scripts.refcloud.keys import generate_cloud_keys
from scripts.testbed.devca import DevCA
from scripts.testbed.mosquitto import LocalBroker

CONSOLE_CN = "cloud-console"


def make_cloud(run_dir: Path) -> DevCA:
    """CA, broker server certificate, cloud keys and the console's client certificate (idempotent)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    ca = DevCA(run_dir / "ca")
    cloud = run_dir / "cloud"
    if not (cloud / "cloud_sign.key").exists():
        generate_cloud_keys(cloud)
    if not (cloud / "console.crt").exists():
        cert, key = ca.issue_client(CONSOLE_CN, cloud / "tmp-console")
        shutil.move(str(cert), cloud / "console.crt")
        shutil.move(str(key), cloud / "console.key")
        shutil.rmtree(cloud / "tmp-console", ignore_errors=True)
    return ca


def start_broker(run_dir: Path, ca: DevCA, port: int = 0,
                 server_ips: tuple[str, ...] = ("127.0.0.1", "::1")) -> LocalBroker:
    broker = LocalBroker(run_dir / "broker", ca, port=port, cloud_users=(CONSOLE_CN,), server_ips=server_ips)
    broker.start()
    (run_dir / "broker.json").write_text(json.dumps(
        {"host": broker.host, "port": broker.port, "ca_file": str(broker.ca_file)}))
    return broker


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))   # a TOML basic string


def make_device(run_dir: Path, ca: DevCA, device_id: str, *, broker_port: int,
                obd_port: str | None = None, extra_toml: str = "", mqtt_protocol: str = "5",
                backoff_max_s: float = 10.0, tuf_root: Path | None = None,
                update: Mapping[str, Any] | None = None, control: dict | None = None,
                broker_ports: Sequence[int] | None = None) -> Path:
    """Provisions ``device_id`` as a technician would and writes its agent.toml. Returns its path.

    ``tuf_root``: the update repository's root metadata, pinned at provisioning (``dongle
    provision --tuf-root``; a device provisioned before gets it pinned now). ``update``: the
    ``[update]`` section of agent.toml (scripts/demo_update.update_settings). ``broker_ports``:
    several brokers on loopback (``mqtt.urls``, e.g. a cluster's nodes) instead of
    ``broker_port``."""
    ddir = run_dir / "devices" / device_id
    cloud = run_dir / "cloud"
    if not (ddir / "device_sign.key").exists():
        provision_mod.provision(device_id, cloud / "cloud_sign.pub", cloud / "cloud_enc.pub", ddir,
                                tuf_root=tuf_root)
    elif tuf_root is not None and not (ddir / provision_mod.TUF_ROOT_FILE).exists():
        (ddir / provision_mod.TUF_ROOT_FILE).write_bytes(provision_mod.load_tuf_root(tuf_root))
    if not (ddir / "tls.crt").exists():
        ca.sign_csr(ddir / "tls.csr", ddir / "tls.crt")
    shutil.copy(ca.ca_cert_path, ddir / "ca.pem")
    # Each device its own control socket (the technician CLI); relative = beside agent.toml.
    control = control or {"socket": "agent.sock"}
    control_toml = "[control]\n" + "".join(f'{k} = "{v}"\n' for k, v in control.items())
    obd = (f'[obd]\nenabled = true\nport = "{obd_port}"\n' if obd_port
           else "[obd]\nenabled = false\n")
    broker_urls = (f"urls = {json.dumps([f'mqtts://127.0.0.1:{p}' for p in broker_ports])}"
                   if broker_ports else f'url = "mqtts://127.0.0.1:{broker_port}"')
    toml = f"""# Written by scripts/testbed/devenv.py for local development.
[device]
id = "{device_id}"
data_dir = "data"

[keys]
sign_key = "device_sign.key"
enc_key = "device_enc.key"
cloud_enc_pub = "cloud_enc.pub"
cloud_sign_pubs = ["cloud_sign.pub"]

[mqtt]
{broker_urls}
ca_file = "ca.pem"
cert_file = "tls.crt"
key_file = "tls.key"
protocol = "{mqtt_protocol}"
backoff_min_s = 0.5
backoff_max_s = {backoff_max_s}

{obd}
{control_toml}
[clock]
# A development machine's kernel is often not NTP-disciplined (adjtimex says unsynchronised):
# trust its wall clock. A device uses the default, "kernel".
synced_by = "wall"

{extra_toml}
"""
    if update:
        toml += "\n[update]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in update.items())
    (ddir / "agent.toml").write_text(toml)
    return ddir / "agent.toml"
