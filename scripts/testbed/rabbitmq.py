"""RabbitMQ on loopback, the second (clustering) broker for the tests: Debian's ``rabbitmq-server``
with its MQTT plugin, configured like :mod:`scripts.testbed.mosquitto`'s Mosquitto.

Each broker is a private instance in its own directory: its own epmd (port), node name, data
directory, Erlang cookie, distribution port and MQTT port. The system service (``rabbitmq``
user, /var/lib/rabbitmq, 5672) is never used or touched. What the MQTT side looks like:

- one listener, MQTT over TLS on 127.0.0.1; no plain MQTT, no AMQP listener;
- a client certificate from the DevCA is required (``verify_peer``, ``fail_if_no_peer_cert``)
  and its CN is the user (``ssl_cert_login``, ``ssl_cert_login_from = common_name``);
- permissions equal to Mosquitto's ACL (RabbitMQ checks MQTT topics as AMQP routing keys on
  ``amq.topic``, where ``/`` became ``.``): a device writes only ``{prefix}/<cn>/up/#`` and
  ``{prefix}/<cn>/status`` and reads only ``{prefix}/<cn>/down/#``; cloud users read and write
  ``{prefix}/#``. Unlike Mosquitto's pattern ACL, RabbitMQ knows only the users it has, so a
  device must be added (:meth:`RabbitBroker.add_device`) before it can connect;
- persistent sessions (clean session false) are durable queues ``mqtt-subscription-<client
  id>qos1`` that expire ``session_ttl_s`` after the client left (the plugin's default is 24 h;
  here 7 days, the agent's session expiry);
- MQTT 3.1.1 only (3.10's plugin has no MQTT 5).

    with RabbitBroker(tmp_path / "rabbit", DevCA(tmp_path / "pki"), devices=["dev-0001"]) as b:
        ... connect to b.host, b.port with b.ca_file, MQTT 3.1.1 ...

    with RabbitCluster(tmp_path / "cluster", ca, devices=["dev-0001"]) as c:
        c.endpoints              # [(host, port)] of the three nodes' MQTT listeners
        c.node_at(port).kill()   # SIGKILL the node behind one endpoint

Start-up cost is what CI pays, so: the config is Erlang terms (no cuttlefish run), users and
permissions are loaded from a definitions file at boot (no ``rabbitmqctl`` round trips), and a
fresh single node starts from a copy of a stopped, booted node (a template kept under the
system temp directory, keyed by the RabbitMQ version), which skips the schema creation and the
3–6 s the MQTT plugin waits on a node's first boot for cluster peers that may be about to join.
Cluster nodes 2 and 3 boot blank and join node 1 during boot (classic peer discovery): joining
nodes find their peer at once and skip that wait too. Figures: docs/performance.md, "Test
brokers: start-up" (bench/bench_brokers.py).

CLI (demo, manual checks): ``python -m scripts.testbed.rabbitmq --dir DIR [--cluster]
[--device ID ...]`` prints the MQTT port(s) and runs until SIGINT/SIGTERM.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Literal

from scripts.testbed.devca import DevCA
from scripts.testbed.mosquitto import HOST, free_port

log = logging.getLogger(__name__)

RABBIT_BIN = Path(os.environ.get("RABBITMQ_BIN", "/usr/lib/rabbitmq/bin"))
# The Debian package's /usr/sbin/rabbitmq-server and rabbitmqctl are wrappers that switch to the
# system user `rabbitmq` (home /var/lib/rabbitmq): the scripts behind them take our environment.
SERVER = RABBIT_BIN / "rabbitmq-server"
CTL = RABBIT_BIN / "rabbitmqctl"
VHOST = "/"
EXCHANGE = "amq.topic"
DEFAULT_SESSION_TTL_S = 7 * 86400   # = agent.cloud.mqtt.MqttLink's default session expiry
_START_TIMEOUT_S = 90.0
_STOP_TIMEOUT_S = 30.0
_CTL_TIMEOUT_S = 60.0
_READY_LINE = "Server startup complete"
QueueType = Literal["classic", "quorum"]


# --------------------------------------------------------------------------------------------
# Finding the installation
# --------------------------------------------------------------------------------------------

def missing_reason() -> str | None:
    """Why RabbitMQ cannot run here (for a pytest skip), or None when it can."""
    for exe in (SERVER, CTL):
        if not os.access(exe, os.X_OK):
            return (f"{exe} not found: install Debian's rabbitmq-server "
                    "(scripts/setup.sh does)")
    if _epmd() is None:
        return "epmd not found (Debian package erlang-base)"
    if not _plugin_dir("rabbitmq_mqtt"):
        return "the rabbitmq_mqtt plugin is missing from the rabbitmq-server installation"
    return None


def version() -> str:
    """The installed RabbitMQ version, from its lib directory (e.g. ``3.10.8``)."""
    base = RABBIT_BIN.parent / "lib"
    found = sorted(p.name for p in base.glob("rabbitmq_server-*"))
    if not found:
        raise FileNotFoundError(f"no rabbitmq_server-* under {base}")
    return found[-1].removeprefix("rabbitmq_server-")


def _plugin_dir(name: str) -> Path | None:
    try:
        base = RABBIT_BIN.parent / "lib" / f"rabbitmq_server-{version()}" / "plugins"
    except FileNotFoundError:
        return None
    found = sorted(base.glob(f"{name}-*"))
    return found[-1] if found else None


def _epmd() -> str | None:
    for candidate in (shutil.which("epmd"), "/usr/lib/erlang/bin/epmd"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


# --------------------------------------------------------------------------------------------
# Erlang terms (the node's config is an Erlang term file: no cuttlefish translation at boot)
# --------------------------------------------------------------------------------------------

class Atom(str):
    """An Erlang atom in :func:`erl_term` (a plain ``str`` becomes an Erlang string)."""


def erl_term(value: object) -> str:
    """Python → Erlang term text: str → "string", bytes → <<"binary">>, Atom → atom,
    tuple → {…}, list → […], bool → true/false, int → integer."""
    if isinstance(value, Atom):
        if re.fullmatch(r"[a-z][A-Za-z0-9_@]*", value):
            return str(value)
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, bytes):
        return "<<" + erl_term(value.decode()) + ">>"
    if isinstance(value, tuple):
        return "{" + ", ".join(erl_term(v) for v in value) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(erl_term(v) for v in value) + "]"
    raise TypeError(f"no Erlang term for {value!r}")


# --------------------------------------------------------------------------------------------
# Permissions: Mosquitto's ACL (scripts/testbed/mosquitto.py) in RabbitMQ's terms
# --------------------------------------------------------------------------------------------

def routing_key_regex(prefix: str) -> str:
    """The regex for an MQTT topic prefix as RabbitMQ sees it: levels joined by '.'."""
    return r"\.".join(re.escape(level) for level in prefix.strip("/").split("/"))


def definitions(prefix: str, cloud_users: Iterable[str], devices: Iterable[str]) -> dict:
    """RabbitMQ definitions (users, vhost permissions, topic permissions) for the ACL.

    Topic permissions are matched against the routing key of a publish (write) and the
    binding key of a subscription (read); ``{username}`` expands to the certificate CN. A user
    without a topic permission on an exchange may use every topic on it (RabbitMQ's default),
    so a device is always defined together with its topic permission.
    Vhost permissions cannot expand variables: every device may declare, bind and consume
    queues named ``mqtt-subscription-*`` (its own, through MQTT; see docs/protocol.md on
    client ids).
    """
    p = routing_key_regex(prefix)
    users, perms, topic_perms = [], [], []
    for user in cloud_users:
        users.append(_user(user))
        perms.append({"user": user, "vhost": VHOST, "configure": ".*", "write": ".*", "read": ".*"})
        topic_perms.append({"user": user, "vhost": VHOST, "exchange": EXCHANGE,
                            "write": rf"^{p}(\..+)?$", "read": rf"^{p}(\..+)?$"})
    for dev in devices:
        users.append(_user(dev))
        queues = r"mqtt-subscription-.*"
        perms.append({"user": dev, "vhost": VHOST, "configure": rf"^{queues}$",
                      "write": rf"^(amq\.topic|{queues})$", "read": rf"^(amq\.topic|{queues})$"})
        topic_perms.append({"user": dev, "vhost": VHOST, "exchange": EXCHANGE,
                            # Mosquitto: pattern write {prefix}/%u/up/#, {prefix}/%u/status
                            "write": rf"^{p}\.{{username}}\.(up(\..+)?|status)$",
                            # Mosquitto: pattern read {prefix}/%u/down/#
                            "read": rf"^{p}\.{{username}}\.down(\..+)?$"})
    return {"vhosts": [{"name": VHOST}], "users": users, "permissions": perms,
            "topic_permissions": topic_perms}


def _user(name: str) -> dict:
    # No password hash: the user can log in only by certificate (ssl_cert_login).
    return {"name": name, "password_hash": "", "hashing_algorithm": "rabbit_password_hashing_sha256",
            "tags": []}


def _check_id(name: str) -> str:
    if not re.fullmatch(r"[a-z0-9-]{4,64}", name):
        raise ValueError(f"{name!r} is not 4-64 characters of [a-z0-9-] (PROTOCOL §1)")
    return name


# --------------------------------------------------------------------------------------------
# epmd: one per broker (or cluster), so node names and ports never meet another instance's
# --------------------------------------------------------------------------------------------

class Epmd:
    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        if self.running:
            return
        exe = _epmd()
        if exe is None:
            raise FileNotFoundError("epmd not found (Debian package erlang-base)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            self.port = pick_port()
            with open(self.workdir / "epmd.log", "ab") as out:
                self._proc = subprocess.Popen([exe, "-port", str(self.port), "-address", HOST],
                                              stdin=subprocess.DEVNULL, stdout=out,
                                              stderr=subprocess.STDOUT, start_new_session=True)
            if _wait_port(self.port, 5.0, alive=self.running_check):
                return
            self.stop()
        raise RuntimeError("epmd did not start")

    def running_check(self) -> bool:
        return self.running

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()


_handed_out: set[int] = set()
_ports_lock = threading.Lock()


def pick_port() -> int:
    """A free loopback port not handed out before by this process: ``free_port`` alone can
    return the same port twice in a row, and a node needs two (distribution, MQTT)."""
    with _ports_lock:
        for _ in range(100):
            port = free_port()
            if port not in _handed_out:
                _handed_out.add(port)
                return port
    raise RuntimeError("no fresh free port")


def _wait_port(port: int, timeout: float, *, alive=lambda: True) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.03)
    return False


# --------------------------------------------------------------------------------------------
# One node
# --------------------------------------------------------------------------------------------

class RabbitNode:
    """One ``rabbitmq-server`` node in ``workdir``. Use :class:`RabbitBroker` or
    :class:`RabbitCluster`; this class is what they share (and what a cluster test kills)."""

    def __init__(self, workdir: Path, *, name: str, epmd: Epmd, cookie: str, mqtt_port: int,
                 server_cert: tuple[Path, Path], ca_file: Path, definitions_file: Path,
                 session_ttl_s: int | None, queue_type: QueueType,
                 seed: str | None = None, use_template: bool = False):
        self.workdir = Path(workdir)
        self.name = name
        self.node = f"{name}@localhost"
        self._epmd = epmd
        self._cookie = cookie
        self.mqtt_port = mqtt_port
        self._fixed_mqtt_port = bool(mqtt_port)
        self.dist_port = 0
        self._cert, self._key = server_cert
        self._ca_file = ca_file
        self._definitions = definitions_file
        self._session_ttl_s = session_ttl_s
        self._queue_type = queue_type
        self._seed = seed
        self._use_template = use_template
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        self.last_start_s: float | None = None
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "rabbit.log"
        self._stdout_path = self.workdir / "stdout.log"
        self._mnesia = self.workdir / "mnesia"
        self._pid_file = self.workdir / "beam.pid"
        home = self.workdir / "home"
        home.mkdir(exist_ok=True)
        cookie_file = home / ".erlang.cookie"
        if not cookie_file.exists() or cookie_file.read_text() != cookie:
            cookie_file.unlink(missing_ok=True)
            fd = os.open(cookie_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
            with os.fdopen(fd, "w") as f:
                f.write(cookie)

    # -- state -----------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The Erlang VM's pid while running (SIGSTOP it to hold back acknowledgements)."""
        if not self.running:
            return None
        try:
            return int(self._pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Starts the node and waits for it. Ports picked here (not given by the caller) are
        picked again if another process took one first (three tries)."""
        tries = 3 if not (self.mqtt_port and self.dist_port) else 1
        for attempt in range(tries):
            self.spawn()
            try:
                self.wait_ready()
                return
            except RuntimeError as e:
                if attempt == tries - 1 or not self.forget_taken_ports(e):
                    raise

    def forget_taken_ports(self, error: Exception) -> bool:
        """After a failed start: if a port this node picked itself was taken by someone else
        (eaddrinuse), forget the picked ports so the next start picks new ones; True then."""
        if "eaddrinuse" not in str(error):
            return False
        log.warning("rabbitmq: %s: a port was taken, trying others", self.node)
        if not self._fixed_mqtt_port:
            self.mqtt_port = 0
        self.dist_port = 0
        return True

    def spawn(self) -> None:
        """Starts the node without waiting for it (a cluster boots its joiners in parallel)."""
        if self.running:
            return
        if self._use_template and not (self._mnesia / self.node).exists():
            _Template.copy_into(self._mnesia, self.name)
        self._use_template = False  # only ever for the very first boot of this directory
        if not self.dist_port:
            self.dist_port = pick_port()
        if not self.mqtt_port:
            self.mqtt_port = pick_port()
        self._write_config()
        try:
            self._log_offset = self.log_path.stat().st_size
        except OSError:
            self._log_offset = 0
        self._pid_file.unlink(missing_ok=True)
        self._t0 = time.monotonic()
        with open(self._stdout_path, "ab") as out:
            out.write(f"--- rabbitmq.py: starting {self.node}, MQTT port {self.mqtt_port}\n".encode())
            out.flush()
            self._proc = subprocess.Popen([str(SERVER)], env=self._env(), cwd=self.workdir,
                                          stdin=subprocess.DEVNULL, stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = _START_TIMEOUT_S) -> None:
        """Returns once the node says it has started and its MQTT port accepts connections."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.running:
                rc = self._proc.returncode if self._proc else None
                self._proc = None
                raise RuntimeError(f"{self.node} exited with {rc} during start-up:\n"
                                   + self._diagnostics())
            if _READY_LINE in self._new_log() and _wait_port(self.mqtt_port, 0.5):
                break
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{self.node} did not start within {timeout:.0f} s:\n"
                                   + self._diagnostics())
            time.sleep(0.05)
        self.last_start_s = time.monotonic() - self._t0
        log.info("rabbitmq: %s up in %.1f s, MQTT on %s:%d", self.node, self.last_start_s, HOST,
                 self.mqtt_port)

    def stop(self, timeout: float = _STOP_TIMEOUT_S) -> None:
        """Graceful shutdown (SIGTERM: queues, messages and the retained store are saved)."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()  # the start script forwards it to the VM and waits
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.error("rabbitmq: %s ignored SIGTERM for %.0f s, killing it", self.node, timeout)
                self.kill()
                return
        self._reap_group(proc)
        self._proc = None

    def kill(self) -> None:
        """SIGKILL to the node's whole process group: a crash, nothing saved on the way out."""
        proc = self._proc
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        self._proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def _reap_group(self, proc: subprocess.Popen[bytes]) -> None:
        # erl_child_setup and friends leave with the VM; make sure nothing of ours lingers.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    # -- rabbitmqctl -----------------------------------------------------------------------

    def ctl(self, *args: str, timeout: float = _CTL_TIMEOUT_S) -> str:
        """Runs ``rabbitmqctl -n <node> ARGS`` against this node; returns its stdout."""
        cmd = [str(CTL), "-q", "-n", self.node, *args]
        res = subprocess.run(cmd, env=self._env(), cwd=self.workdir, capture_output=True,
                             text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if res.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} on {self.node} failed "
                               f"({res.returncode}): {res.stderr.strip() or res.stdout.strip()}")
        return res.stdout

    def eval(self, expr: str) -> str:
        """Evaluates an Erlang expression on the node (``rabbitmqctl eval``)."""
        return self.ctl("eval", expr).strip()

    def import_definitions(self, path: Path) -> None:
        """Imports a definitions file synchronously (``rabbitmqctl import_definitions`` only
        starts the import)."""
        out = self.eval(f"{{ok, B}} = file:read_file({erl_term(str(path))}), "
                        "rabbit_definitions:import_raw(B).")
        if out != "ok":
            raise RuntimeError(f"definitions import on {self.node} failed: {out}")

    # -- internals -------------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RABBITMQ_", "ERL_"))}
        w = self.workdir
        env.update({
            "HOME": str(w / "home"),                       # .erlang.cookie for server and CLI
            "ERL_EPMD_PORT": str(self._epmd.port),
            "ERL_CRASH_DUMP": str(w / "erl_crash.dump"),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_USE_LONGNAME": "false",
            "RABBITMQ_CONF_ENV_FILE": str(w / "rabbitmq-env.conf"),   # not /etc/rabbitmq's
            "RABBITMQ_CONFIG_FILE": str(w / "rabbitmq.config"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(w / "advanced.config"),  # absent on purpose
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(w / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(self._mnesia),
            "RABBITMQ_LOG_BASE": str(w / "log"),
            "RABBITMQ_PID_FILE": str(self._pid_file),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            # A shared 2-core machine: do not pin schedulers to cores.
            "RABBITMQ_SCHEDULER_BIND_TYPE": "u",
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        })
        return env

    def _write_config(self) -> None:
        w = self.workdir
        (w / "rabbitmq-env.conf").write_text("# empty: everything is set in the environment\n")
        (w / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        (w / "log").mkdir(exist_ok=True)
        rabbit: list[tuple] = [
            (Atom("tcp_listeners"), []),   # no AMQP
            (Atom("ssl_listeners"), []),
            (Atom("ssl_options"), [
                (Atom("cacertfile"), str(self._ca_file)),
                (Atom("certfile"), str(self._cert)),
                (Atom("keyfile"), str(self._key)),
                (Atom("verify"), Atom("verify_peer")),
                (Atom("fail_if_no_peer_cert"), True),
                (Atom("versions"), [Atom("tlsv1.3"), Atom("tlsv1.2")]),
            ]),
            (Atom("ssl_cert_login_from"), Atom("common_name")),
            (Atom("load_definitions"), str(self._definitions)),
            (Atom("log"), [(Atom("console"), [(Atom("enabled"), False)]),
                           (Atom("file"), [(Atom("file"), str(self.log_path)),
                                           (Atom("level"), Atom("info"))])]),
            (Atom("cluster_nodes"), ([Atom(self._seed)] if self._seed else [], Atom("disc"))),
            # A joiner whose seed is slow (or restarting) keeps asking for a while (60 x 0.5 s)
            # rather than booting alone after the default 10 tries.
            (Atom("cluster_formation"), [(Atom("discovery_retry_limit"), 60),
                                         (Atom("discovery_retry_interval"), 500)]),
        ]
        mqtt: list[tuple] = [
            (Atom("tcp_listeners"), []),
            (Atom("ssl_listeners"), [(HOST, self.mqtt_port)]),
            (Atom("ssl_cert_login"), True),
            (Atom("allow_anonymous"), False),
            (Atom("vhost"), VHOST.encode()),
            (Atom("exchange"), EXCHANGE.encode()),
            (Atom("subscription_ttl"), Atom("undefined") if self._session_ttl_s is None
             else self._session_ttl_s * 1000),
            (Atom("durable_queue_type"), Atom(self._queue_type)),
        ]
        config = [(Atom("rabbit"), rabbit), (Atom("rabbitmq_mqtt"), mqtt)]
        (w / "rabbitmq.config").write_text(erl_term(config) + ".\n")

    def _new_log(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def _diagnostics(self) -> str:
        try:
            out = self._stdout_path.read_text(errors="replace")[-3000:]
        except OSError:
            out = ""
        return f"-- {self._stdout_path}:\n{out}\n-- {self.log_path}:\n{self._new_log()[-4000:]}"


class _Template:
    """A booted-then-stopped blank node per node name, copied into new data directories.

    Kept in the system temp directory across test runs, keyed by RabbitMQ version, user and
    node name; made under a lock file the first time, atomically renamed into place.
    """

    _lock = threading.Lock()

    @classmethod
    def root(cls) -> Path:
        return Path(tempfile.gettempdir()) / f"dongle-rabbitmq-template-{os.geteuid()}" / version()

    @classmethod
    def copy_into(cls, mnesia: Path, name: str) -> bool:
        """Fills ``mnesia`` (a node's RABBITMQ_MNESIA_BASE) from the template; False (nothing
        copied, the node boots cold) where the path cannot be written into Ra's config."""
        if '"' in str(mnesia) or "\\" in str(mnesia):
            return False
        src = cls._ensure(name)
        if mnesia.exists():
            shutil.rmtree(mnesia)
        shutil.copytree(src, mnesia, symlinks=True)
        # Ra keeps its data directory as an absolute path in each server's `config` file
        # (Erlang terms): point the copy's at its new home.
        original = (src / ".complete").read_text().splitlines()[1]
        for config in mnesia.glob("*/*/*/*/config"):
            text = config.read_text()
            config.write_text(text.replace(f'"{original}/', f'"{mnesia}/'))
        return True

    @classmethod
    def _ensure(cls, name: str) -> Path:
        done = cls.root() / name
        if (done / ".complete").exists():
            return done
        with cls._lock:
            if (done / ".complete").exists():
                return done
            cls.root().mkdir(parents=True, exist_ok=True)
            work = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=cls.root()))
            try:
                log.info("rabbitmq: making the node template %s (one cold boot)", done)
                epmd = Epmd(work / "epmd")
                epmd.start()
                try:
                    defs = work / "definitions.json"
                    defs.write_text(json.dumps(definitions("dongle/v1", [], [])))
                    # Any certificate will do: this node never takes a client.
                    ca = DevCA(work / "pki")
                    cert = ca.issue_server("localhost", out_dir=work)
                    node = RabbitNode(work / "node", name=name, epmd=epmd,
                                      cookie=secrets.token_hex(16), mqtt_port=0,
                                      server_cert=cert, ca_file=ca.ca_cert_path,
                                      definitions_file=defs, session_ttl_s=None,
                                      queue_type="classic")
                    try:
                        node.start()
                    finally:
                        node.stop()
                finally:
                    epmd.stop()
                staged = work / "node" / "mnesia"
                (staged / ".complete").write_text(f"{version()}\n{staged}\n")
                try:
                    staged.rename(done)
                except OSError:  # another process was quicker
                    if not (done / ".complete").exists():
                        raise
            finally:
                for _ in range(3):  # the VM may still be writing its last log lines
                    shutil.rmtree(work, ignore_errors=True)
                    if not work.exists():
                        break
                    time.sleep(0.2)
        return done


# --------------------------------------------------------------------------------------------
# The broker the tests use, and the cluster
# --------------------------------------------------------------------------------------------

class _Acl:
    """The definitions file shared by a broker's node(s) and the users it holds."""

    def __init__(self, path: Path, prefix: str, cloud_users: Sequence[str], devices: Iterable[str]):
        self.path = path
        self.prefix = prefix.rstrip("/")
        self.cloud_users = tuple(_check_id(u) for u in cloud_users)
        self.devices: list[str] = []
        self._lock = threading.Lock()
        self.add(devices)

    def add(self, devices: Iterable[str]) -> list[str]:
        """Records new devices in the file (loaded at every boot); returns the new ones."""
        with self._lock:
            new = [_check_id(d) for d in dict.fromkeys(devices)
                   if d not in self.devices and d not in self.cloud_users]
            self.devices += new
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(definitions(self.prefix, self.cloud_users, self.devices),
                                      indent=1))
            os.replace(tmp, self.path)
            return new

    def import_new(self, node: RabbitNode, new: list[str]) -> None:
        if not new:
            return
        part = self.path.with_name(f"definitions-add-{secrets.token_hex(4)}.json")
        part.write_text(json.dumps(definitions(self.prefix, [], new)))
        try:
            node.import_definitions(part)
        finally:
            part.unlink(missing_ok=True)


class _Broker:
    """What a single node and a cluster share: the work directory, the definitions (users,
    permissions), the server certificate and the epmd the node(s) register with."""

    host = HOST

    def __init__(self, workdir: Path, ca: DevCA, cloud_users: Sequence[str], prefix: str,
                 devices: Iterable[str]):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ca = ca
        self.prefix = prefix.rstrip("/")
        self.cloud_users = tuple(cloud_users)
        self._acl = _Acl(self.workdir / "definitions.json", prefix, cloud_users, devices)
        self._epmd = Epmd(self.workdir)
        self._server_cert = ca.issue_server("localhost", out_dir=self.workdir)
        self.nodes: list[RabbitNode] = []

    @property
    def ca_file(self) -> Path:
        return self.ca.ca_cert_path

    @property
    def devices(self) -> list[str]:
        return list(self._acl.devices)

    @property
    def running_nodes(self) -> list[RabbitNode]:
        return [n for n in self.nodes if n.running]

    def add_device(self, *device_ids: str) -> None:
        """Lets devices with these certificate CNs connect (user + permissions). Takes effect
        at once when running (one ``rabbitmqctl eval``, under a second; the user database is
        cluster-wide) and at every boot."""
        new = self._acl.add(device_ids)
        running = self.running_nodes
        if running:
            self._acl.import_new(running[0], new)

    def _node(self, name: str, *, mqtt_port: int, cookie: str, session_ttl_s: int | None,
              queue_type: QueueType, seed: str | None, use_template: bool) -> RabbitNode:
        return RabbitNode(self.workdir / name, name=name, epmd=self._epmd, cookie=cookie,
                          mqtt_port=mqtt_port, server_cert=self._server_cert,
                          ca_file=self.ca.ca_cert_path, definitions_file=self._acl.path,
                          session_ttl_s=session_ttl_s, queue_type=queue_type, seed=seed,
                          use_template=use_template)

    def __enter__(self):  # type: ignore[no-untyped-def]
        self.start()  # type: ignore[attr-defined]
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()  # type: ignore[attr-defined]


class RabbitBroker(_Broker):
    """One RabbitMQ node with the MQTT plugin: LocalBroker's interface (host, port, ca_file,
    start/stop/kill/restart, pid, log) plus :meth:`add_device`.

    With ``port=0`` a free port is picked at the first start and kept across restarts.
    ``queue_type`` is the plugin's ``durable_queue_type`` for persistent sessions.
    """

    def __init__(self, workdir: Path, ca: DevCA, *, port: int = 0,
                 cloud_users: Sequence[str] = ("cloud-console",), prefix: str = "dongle/v1",
                 devices: Iterable[str] = (), session_ttl_s: int | None = DEFAULT_SESSION_TTL_S,
                 queue_type: QueueType = "classic", use_template: bool = True):
        super().__init__(workdir, ca, cloud_users, prefix, devices)
        self.node = self._node("dongle", mqtt_port=port, cookie=secrets.token_hex(16),
                               session_ttl_s=session_ttl_s, queue_type=queue_type, seed=None,
                               use_template=use_template)
        self.nodes = [self.node]

    @property
    def port(self) -> int:
        return self.node.mqtt_port

    @property
    def log_path(self) -> Path:
        return self.node.log_path

    @property
    def pid(self) -> int | None:
        return self.node.pid

    @property
    def running(self) -> bool:
        return self.node.running

    def log_text(self) -> str:
        return self.node.log_text()

    def start(self) -> None:
        if not self._epmd.running:
            self._epmd.start()
        try:
            self.node.start()
        except Exception:
            self._epmd.stop()
            raise

    def stop(self) -> None:
        self.node.stop()
        self._epmd.stop()

    def kill(self) -> None:
        """SIGKILL: an abrupt outage (epmd stays, so :meth:`restart` can follow)."""
        self.node.kill()

    def restart(self) -> None:
        """Stops the node (if running) and starts it again on the same port, with its data."""
        self.node.stop()
        self.start()


class RabbitCluster(_Broker):
    """``size`` RabbitMQ nodes clustered on loopback, one MQTT port each (:attr:`endpoints`).

    Node 1 starts first (from the template); then the others, together, boot blank with
    node 1 as their classic-config peer and join it during boot. ``queue_type`` defaults to
    ``quorum``: a classic session queue lives on one node and is gone while that node is
    (docs/protocol.md §2.7).
    """

    def __init__(self, workdir: Path, ca: DevCA, *, size: int = 3,
                 cloud_users: Sequence[str] = ("cloud-console",), prefix: str = "dongle/v1",
                 devices: Iterable[str] = (), session_ttl_s: int | None = DEFAULT_SESSION_TTL_S,
                 queue_type: QueueType = "quorum", use_template: bool = True):
        if size < 1:
            raise ValueError("a cluster has at least one node")
        super().__init__(workdir, ca, cloud_users, prefix, devices)
        cookie = secrets.token_hex(16)
        names = ["dongle"] + [f"dongle-{chr(ord('b') + i)}" for i in range(size - 1)]
        seed = f"{names[0]}@localhost"
        self.nodes = [self._node(n, mqtt_port=0, cookie=cookie, session_ttl_s=session_ttl_s,
                                 queue_type=queue_type, seed=None if i == 0 else seed,
                                 use_template=use_template and i == 0)
                      for i, n in enumerate(names)]
        self.last_start_s: float | None = None

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        """(host, MQTT port) of every node, running or not, in node order."""
        return [(HOST, n.mqtt_port) for n in self.nodes]

    def node_at(self, port: int) -> RabbitNode:
        """The node whose MQTT listener is on ``port`` (a client's port tells its node)."""
        for n in self.nodes:
            if n.mqtt_port == port:
                return n
        raise KeyError(f"no node listens on port {port}")

    def node_of_client(self, client_id: str) -> RabbitNode | None:
        """The node a connected MQTT client is on, as the cluster reports it (None: connected
        nowhere). One ``rabbitmqctl list_mqtt_connections`` (it lists the whole cluster's);
        the listener port in each row names the node."""
        running = self.running_nodes
        if not running:
            return None
        out = running[0].ctl("list_mqtt_connections", "client_id", "port", "--no-table-headers")
        for line in out.splitlines():
            cid, _, port = line.rpartition("\t")
            if cid == client_id and port.strip().isdigit():
                return self.node_at(int(port))
        return None

    def cluster_members(self) -> list[str]:
        """Running cluster members as a running node sees them."""
        n = self.running_nodes[0]
        out = n.eval("rabbit_nodes:all_running().")
        return sorted(re.findall(r"'?([A-Za-z0-9_-]+@localhost)'?", out))

    def start(self) -> None:
        t0 = time.monotonic()
        if not self._epmd.running:
            self._epmd.start()
        try:
            # The seed first: a joiner that boots alongside it can read the seed's feature
            # flags file while it is still empty and fail (incompatible_feature_flags,
            # case_clause {ok,[]}: seen here). The joiners together, then.
            self.nodes[0].start()
            for n in self.nodes[1:]:
                n.spawn()
            for n in self.nodes[1:]:
                try:
                    n.wait_ready()
                except RuntimeError as e:
                    if not n.forget_taken_ports(e):
                        raise
                    n.start()
            members = self.cluster_members()
            want = sorted(n.node for n in self.nodes)
            if members != want:
                raise RuntimeError(f"cluster did not form: running members {members}, "
                                   f"expected {want}")
        except Exception:
            self.stop()
            raise
        self.last_start_s = time.monotonic() - t0
        log.info("rabbitmq: cluster of %d up in %.1f s", len(self.nodes), self.last_start_s)

    def start_node(self, node: RabbitNode) -> None:
        """(Re)starts one node; it rejoins the cluster with its data."""
        node.start()

    def stop(self) -> None:
        # Stop in reverse order: the seed stops last and may then start first.
        for n in reversed(self.nodes):
            try:
                n.stop()
            except Exception:
                log.exception("rabbitmq: stopping %s failed; killing it", n.node)
                n.kill()
        self._epmd.stop()


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.testbed.rabbitmq",
                                     description="Run a mutual-TLS RabbitMQ MQTT broker (or "
                                                 "a three-node cluster) on loopback.")
    parser.add_argument("--dir", type=Path, required=True,
                        help="work directory (broker files; the CA lives in DIR/pki)")
    parser.add_argument("--cluster", action="store_true", help="three nodes instead of one")
    parser.add_argument("--device", action="append", default=[], help="device id (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    reason = missing_reason()
    if reason:
        print(f"rabbitmq: {reason}", file=sys.stderr)
        return 1
    ca = DevCA(args.dir / "pki")
    broker: RabbitBroker | RabbitCluster
    if args.cluster:
        broker = RabbitCluster(args.dir / "cluster", ca, devices=args.device)
    else:
        broker = RabbitBroker(args.dir / "rabbit", ca, devices=args.device)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    try:
        broker.start()
    except (RuntimeError, OSError) as e:
        print(f"rabbitmq: {e}", file=sys.stderr)
        return 1
    ports = ([p for _, p in broker.endpoints] if isinstance(broker, RabbitCluster)
             else [broker.port])
    print(" ".join(map(str, ports)), flush=True)
    try:
        done.wait()
    finally:
        broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
