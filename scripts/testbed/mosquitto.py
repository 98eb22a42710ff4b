"""A real Mosquitto broker on loopback, configured like production: mutual TLS, ACL, persistence.

Used by the tests and the demo. The broker requires a client certificate from the DevCA and
takes the certificate's CN as the MQTT username, so the ACL can confine a device to its own
topics (PROTOCOL §2):

- a device (any CN that is not a cloud user) may only write ``{prefix}/%u/up/#`` and
  ``{prefix}/%u/status`` and read ``{prefix}/%u/down/#``;
- cloud users read and write ``{prefix}/#``.

    with LocalBroker(tmp_path, DevCA(tmp_path / "pki")) as broker:
        ... connect to broker.host, broker.port with broker.ca_file ...

CLI (demo): ``python -m scripts.testbed.mosquitto --dir DIR [--port N]`` prints the port and runs
until SIGINT/SIGTERM.

Not bound here: the MQTT client id to the certificate identity. Several cloud-side test clients
share one certificate, and mosquitto's ``use_username_as_clientid`` is all or nothing. A
production broker must bind them (that option, or an auth plugin): otherwise one device's
certificate can connect under another device's client id and take its session over.
"""
from __future__ import annotations

import argparse
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from agent.cloud import topics
from scripts.testbed.devca import DevCA

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
# PROTOCOL §3: an envelope is at most 256 KiB; the packet adds the fixed header, the topic and
# (MQTT 5) properties, hence the headroom on max_packet_size.
ENVELOPE_MAX = 256 * 1024
PACKET_MAX = ENVELOPE_MAX + 4096
_START_TIMEOUT_S = 15.0


def find_mosquitto() -> str:
    """The mosquitto binary: $MOSQUITTO, then PATH, then /usr/sbin (often not on PATH)."""
    for candidate in (os.environ.get("MOSQUITTO"), shutil.which("mosquitto"),
                      "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError("mosquitto not found (install the Debian package: scripts/setup.sh)")


def free_port(host: str = HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LocalBroker:
    def __init__(self, workdir: Path, ca: DevCA, *, port: int = 0,
                 cloud_users: tuple[str, ...] = ("cloud-console",), prefix: str = topics.ROOT,
                 options: Mapping[str, object] | None = None,
                 server_ips: tuple[str, ...] = ("127.0.0.1", "::1")):
        """``options``: more mosquitto.conf settings (e.g. ``{"max_queued_messages": 0}`` for a
        load test whose consumers take a backlog); ``server_ips``: the addresses the broker's
        certificate names."""
        self.workdir = Path(workdir)
        self.options = dict(options or {})
        self.ca = ca
        self.cloud_users = tuple(cloud_users)
        self.prefix = prefix.rstrip("/")
        self._requested_port = port
        self._port = port
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file = None
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._conf_path = self.workdir / "mosquitto.conf"
        self._acl_path = self.workdir / "acl"
        self._log_path = self.workdir / "mosquitto.log"
        # ``server_ips``: the addresses clients dial, in the certificate (a device VM reaches the
        # host's loopback through QEMU's guestfwd address, scripts/testbed/devicevm.py)
        self._cert_path, self._key_path = ca.issue_server("localhost", tuple(server_ips), out_dir=self.workdir)

    # -- properties ----------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return HOST

    @property
    def port(self) -> int:
        return self._port

    @property
    def ca_file(self) -> Path:
        return self.ca.ca_cert_path

    @property
    def log_path(self) -> Path:
        return self._log_path

    @property
    def pid(self) -> int | None:
        """mosquitto's pid while running (tests pause it with SIGSTOP to hold back PUBACKs)."""
        return self._proc.pid if self.running else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_text(self) -> str:
        try:
            return self._log_path.read_text(errors="replace")
        except OSError:
            return ""

    def add_device(self, *device_ids: str) -> None:
        """Nothing to do: the pattern ACL admits every certificate CN. (RabbitMQ needs a user
        per device; scripts/testbed/rabbitmq.py has the same method, so tests can take either.)"""

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Starts mosquitto and returns once its port accepts connections.

        With ``port=0`` a free loopback port is picked once and kept across restarts; if
        another process grabs it before mosquitto binds, a new one is tried (three times).
        """
        if self.running:
            return
        tries = 3 if self._requested_port == 0 and self._port == 0 else 1
        for attempt in range(tries):
            if self._port == 0 or attempt > 0:
                self._port = free_port()
            try:
                self._spawn()
                return
            except RuntimeError:
                if attempt == tries - 1:
                    raise
                log.warning("local broker: could not start on port %d, trying another",
                            self._port)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (mosquitto saves its persistence database) and wait."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.error("local broker: mosquitto ignored SIGTERM, killing it")
                proc.kill()
                proc.wait()
        self._reap()

    def kill(self) -> None:
        """SIGKILL: an abrupt outage (state since the last autosave is lost)."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        self._reap()

    def restart(self) -> None:
        """Stops the broker (if running) and starts it again on the same port."""
        self.stop()
        self._spawn()

    def __enter__(self) -> LocalBroker:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- internals -----------------------------------------------------------------------------

    def _reap(self) -> None:
        self._proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def _write_config(self) -> None:
        acl = ["# Written by scripts/testbed/mosquitto.py. Username = certificate CN.", ""]
        for user in self.cloud_users:
            acl += [f"user {user}", f"topic readwrite {self.prefix}/#", ""]
        acl += ["# Devices: confined to their own subtree (patterns apply to every user).",
                f"pattern write {self.prefix}/%u/up/#",
                f"pattern write {self.prefix}/%u/status",
                f"pattern read {self.prefix}/%u/down/#", ""]
        self._acl_path.write_text("\n".join(acl))
        # Run as root, mosquitto drops to user "mosquitto", which cannot read a pytest tmp dir
        # (0700); staying the invoking user is what a development broker wants anyway.
        user = pwd.getpwuid(os.geteuid()).pw_name
        conf = f"""# Written by scripts/testbed/mosquitto.py
per_listener_settings false
user {user}
allow_anonymous false
acl_file {self._acl_path}

listener {self._port} {HOST}
cafile {self.ca.ca_cert_path}
certfile {self._cert_path}
keyfile {self._key_path}
require_certificate true
use_identity_as_username true

persistence true
persistence_location {self.workdir}/
persistence_file mosquitto.db
autosave_interval 2

max_packet_size {PACKET_MAX}
{"".join(f"{k} {v}{chr(10)}" for k, v in self.options.items())}
log_dest stderr
log_type all
connection_messages true
log_timestamp true
log_timestamp_format %Y-%m-%dT%H:%M:%S
"""
        self._conf_path.write_text(conf)

    def _spawn(self) -> None:
        self._write_config()
        self._log_file = open(self._log_path, "ab")
        self._log_file.write(f"--- local_broker: starting on port {self._port}\n".encode())
        self._log_file.flush()
        self._proc = subprocess.Popen([find_mosquitto(), "-c", str(self._conf_path)],
                                      stdin=subprocess.DEVNULL, stdout=self._log_file,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + _START_TIMEOUT_S
        while True:
            if self._proc.poll() is not None:
                rc = self._proc.returncode
                self._reap()
                raise RuntimeError(f"mosquitto exited with {rc} on port {self._port}:\n"
                                   + self.log_text()[-4000:])
            try:
                with socket.create_connection((HOST, self._port), timeout=0.5):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"mosquitto did not accept connections on {self._port}:\n"
                                   + self.log_text()[-4000:])
            time.sleep(0.05)
        log.info("local broker: mosquitto pid %d on %s:%d", self._proc.pid, HOST, self._port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.testbed.mosquitto",
                                     description="Run a mutual-TLS Mosquitto for the demo.")
    parser.add_argument("--dir", type=Path, required=True,
                        help="work directory (broker files; the CA lives in DIR/pki)")
    parser.add_argument("--port", type=int, default=0, help="0 = a free port")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    ca = DevCA(args.dir / "pki")
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    broker = LocalBroker(args.dir / "broker", ca, port=args.port)
    try:
        broker.start()
    except (RuntimeError, OSError) as e:
        print(f"local_broker: {e}", file=sys.stderr)
        return 1
    print(broker.port, flush=True)
    log.info("broker on %s:%d, CA %s, log %s", broker.host, broker.port, broker.ca_file,
             broker.log_path)
    try:
        while not done.wait(1.0):
            if not broker.running:
                print("local_broker: mosquitto died:\n" + broker.log_text()[-2000:],
                      file=sys.stderr)
                return 1
    finally:
        broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
