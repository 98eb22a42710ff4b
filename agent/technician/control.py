"""The agent's local control socket: the ``dongle`` CLI talks to the running agent through it.

Protocol: JSON lines over a Unix stream socket. The client sends one request line
``{"op": <name>, ...arguments}``; the server answers with zero or more interim lines
(``{"interim": true, ...}``: progress, prompts, captured frames) and one final line
``{"ok": true, ...result}`` or ``{"ok": false, "code": <code>, "error": <text for a person>}``.
Codes: ``not_permitted``, ``unknown_op``, ``bad_request``, ``no_adapter``, ``unknown_booking``,
``refused``, ``timeout``, ``busy``, ``internal``.

Who may connect: the socket file is mode 0660 and owned by the ``control.group`` group (default
``dongle``); the kernel refuses everyone else at ``connect()``. The server checks again with
``SO_PEERCRED``: root, the agent's own user, or a member of that group. A refused peer gets a
``not_permitted`` answer and is logged.

Bounds (a local client must not be able to use up the agent): at most ``max_connections``
(:data:`MAX_CONNECTIONS`) at once, each on its own thread; one more is answered ``busy`` and
closed at once, without a thread (the CLI retries for a few seconds). The request line must be
complete within ``request_timeout_s`` (:data:`REQUEST_TIMEOUT_S`) of the connection, however it
trickles in: a client that connects and sends nothing, or half a line, is answered ``timeout``
and dropped. A client that stops reading the answers is dropped after :data:`SEND_TIMEOUT_S`.

Local settings (``[control]`` in agent.toml): ``socket`` (default ``/run/dongle/agent.sock``),
``group`` (default ``dongle``).
"""
from __future__ import annotations

import errno
import grp
import json
import logging
import os
import pwd
import socket
import sqlite3
import stat
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024
MAX_CONNECTIONS = 16
REQUEST_TIMEOUT_S = 5.0
SEND_TIMEOUT_S = 10.0
#: A client refused ``busy`` tries again for this long (the server drops idle ones meanwhile).
BUSY_RETRY_S = 10.0
_WARN_EVERY_S = 60.0


class ControlError(Exception):
    """A refusal with a code and a message a person understands (raised by handlers)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


#: ``SO_PEERGROUPS`` (Linux 4.13+; not in Python's socket module): the peer's groups as the
#: kernel recorded them at connect().
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)


@dataclass(frozen=True)
class Peer:
    """The process at the other end, as the kernel tells it (``SO_PEERCRED``, ``SO_PEERGROUPS``):
    nothing the client sends can change it."""

    pid: int
    uid: int
    gid: int
    #: supplementary groups at connect(); None where the kernel cannot tell (then /proc)
    gids: frozenset[int] | None = None

    @classmethod
    def of(cls, conn: socket.socket) -> Peer:
        pid, uid, gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                            struct.calcsize("3i")))
        gids = None
        for size in (256, 65536):
            try:
                raw = conn.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * size)
            except OSError as e:
                if e.errno == errno.ERANGE:
                    continue
                break
            gids = frozenset(struct.unpack(f"{len(raw) // 4}I", raw))
            break
        return cls(pid, uid, gid, gids)

    @property
    def user(self) -> str:
        try:
            return pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return f"uid {self.uid}"

    def groups(self) -> set[int]:
        """The peer's groups: from the kernel at connect(), else the process's live group set
        (``/proc/<pid>/status``), else its user's groups."""
        if self.gids is not None:
            return set(self.gids) | {self.gid}
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]} | {self.gid}
        except OSError:
            pass
        try:
            return set(os.getgrouplist(pwd.getpwuid(self.uid).pw_name, self.gid))
        except KeyError:
            return {self.gid}

    def in_group(self, name: str) -> bool:
        gid = _group_id(name)
        return gid is not None and gid in self.groups()


Reply = Callable[[dict], None]
Handler = Callable[[dict, Peer, Reply], dict]


class _ClientGone(Exception):
    """The client closed the connection or stopped reading the answers."""


class _RequestError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _line(obj: dict) -> bytes:
    return json.dumps(obj, default=str).encode() + b"\n"


def _group_id(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


class ControlServer:
    """Serves ``handlers`` (op name → ``handler(request, peer, reply) -> result``) on ``path``.

    A handler returns the result map (``ok`` is added), raises :class:`ControlError` to refuse,
    and may call ``reply(map)`` for interim lines. Each connection runs on its own thread, so a
    request waiting for a button press does not hold up ``status``."""

    def __init__(self, path: str | os.PathLike, handlers: dict[str, Handler], *, group: str,
                 max_connections: int = MAX_CONNECTIONS, request_timeout_s: float = REQUEST_TIMEOUT_S):
        self.path = Path(path)
        self.handlers = dict(handlers)
        self.group = group
        self.max_connections = max_connections
        self.request_timeout_s = request_timeout_s
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._gid: int | None = None
        self._slots = threading.BoundedSemaphore(max_connections)
        self._open = 0
        self._lock = threading.Lock()
        self._warned: dict[str, float] = {}
        self.stats = {"requests": 0, "refused": 0, "errors": 0, "busy": 0, "timed_out": 0}
        self.last_error: str | None = None

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        self._stop.clear()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._remove_stale()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(str(self.path))
            # Until this chmod the umask applies; a peer that slips in is still checked below.
            os.chmod(self.path, 0o660)
            self._gid = _group_id(self.group)
            if self._gid is None:
                log.warning("control: group %r does not exist; the socket %s is open to root and the "
                            "agent's user only (create the group: groupadd %s)", self.group, self.path, self.group)
            else:
                os.chown(self.path, -1, self._gid)
            sock.listen(self.max_connections)
            sock.settimeout(0.5)
        except OSError as e:
            self.last_error = f"cannot listen on {self.path}: {e}"
            log.error("control: %s; the dongle CLI cannot reach this agent", self.last_error)
            return
        self._sock = sock
        self._thread = threading.Thread(target=self._accept, name="control", daemon=True)
        self._thread.start()
        log.info("control: listening on %s (group %s, mode 0660)", self.path, self.group)

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(5)
            self._thread = None
        if self._sock:
            self._sock.close()
            self._sock = None
            try:
                self.path.unlink()
            except OSError:
                pass

    @property
    def listening(self) -> bool:
        return self._sock is not None

    def status(self) -> dict:
        return {"socket": str(self.path), "listening": self.listening, "group": self.group,
                "connections": self._open, "max_connections": self.max_connections,
                **self.stats, "last_error": self.last_error}

    def _remove_stale(self) -> None:
        if not self.path.exists() and not self.path.is_symlink():
            return
        if not stat.S_ISSOCK(os.lstat(self.path).st_mode):
            raise OSError(f"{self.path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(self.path))
        except OSError:
            self.path.unlink()  # nobody listens: left over from a crash
            return
        finally:
            probe.close()
        raise OSError(f"another agent is already listening on {self.path}")

    # -- serving ----------------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError as e:
                if not self._stop.is_set():
                    log.error("control: accept failed: %s", e)
                    self._stop.wait(0.5)
                continue
            if not self._slots.acquire(blocking=False):
                self._refuse_busy(conn)
                continue
            try:
                threading.Thread(target=self._serve, args=(conn,), name="control-conn", daemon=True).start()
            except RuntimeError as e:  # no thread to be had
                self._slots.release()
                self._refuse_busy(conn, f"cannot start a thread: {e}")

    def _warn(self, kind: str, message: str, *args) -> None:
        """Logs a refusal of this kind at most once a minute (a flood must not flood the log)."""
        now = time.monotonic()
        level = logging.WARNING if now - self._warned.get(kind, -_WARN_EVERY_S) >= _WARN_EVERY_S else logging.DEBUG
        if level == logging.WARNING:
            self._warned[kind] = now
        log.log(level, message, *args)

    def _refuse_busy(self, conn: socket.socket, why: str | None = None) -> None:
        self.stats["busy"] += 1
        why = why or f"{self.max_connections} connections are open already"
        self._warn("busy", "control: refused a connection: %s (refused so far: %d)", why, self.stats["busy"])
        try:
            conn.settimeout(0.5)   # a fresh socket's buffer is empty: this does not block the accept loop
            conn.sendall(_line({"ok": False, "code": "busy",
                                "error": f"the agent is busy: {why}; try again in a few seconds"}))
        except OSError:
            pass
        finally:
            conn.close()

    def _permitted(self, peer: Peer) -> bool:
        if peer.uid in (0, os.getuid()):
            return True
        return self._gid is not None and self._gid in peer.groups()

    def _read_request(self, conn: socket.socket) -> bytes:
        """The request line, complete within ``request_timeout_s`` of the connection."""
        deadline = time.monotonic() + self.request_timeout_s
        buf = bytearray()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _RequestError("timeout", f"no complete request within {self.request_timeout_s:g} s; "
                                               "connection closed")
            conn.settimeout(left)
            try:
                chunk = conn.recv(4096)
            except TimeoutError:
                continue
            if not chunk:
                if not buf:
                    raise _ClientGone("closed without a request")   # e.g. another agent's probe
                return bytes(buf)   # the client ended its request with the connection
            buf += chunk
            end = buf.find(b"\n")
            if end >= 0:
                return bytes(buf[:end])
            if len(buf) > MAX_REQUEST:
                raise _RequestError("bad_request", f"bad request: longer than {MAX_REQUEST // 1024} KiB")

    def _serve(self, conn: socket.socket) -> None:
        with self._lock:
            self._open += 1
        try:
            with conn:
                self._serve_conn(conn)
        finally:
            with self._lock:
                self._open -= 1
            self._slots.release()

    def _serve_conn(self, conn: socket.socket) -> None:
        def send(obj: dict) -> None:
            conn.settimeout(SEND_TIMEOUT_S)
            try:
                conn.sendall(_line(obj))
            except (TimeoutError, BrokenPipeError, ConnectionResetError):
                raise _ClientGone() from None

        try:
            peer = Peer.of(conn)
            pid, uid = peer.pid, peer.uid
            if not self._permitted(peer):
                self.stats["refused"] += 1
                log.warning("control: refused %s (uid %d): not root and not in group %s",
                            peer.user, uid, self.group)
                send({"ok": False, "code": "not_permitted",
                      "error": f"not permitted: user {peer.user} is not in the '{self.group}' group"})
                return
            try:
                line = self._read_request(conn)
                try:
                    request = json.loads(line)
                except ValueError as e:
                    raise _RequestError("bad_request", f"bad request: {e}") from None
                if not isinstance(request, dict) or not isinstance(request.get("op"), str):
                    raise _RequestError("bad_request", "bad request: a request is a JSON object with an 'op'")
            except _RequestError as e:
                if e.code == "timeout":
                    self.stats["timed_out"] += 1
                    self._warn("timeout", "control: dropped a connection of %s (pid %d): %s",
                               peer.user, pid, e.message)
                send({"ok": False, "code": e.code, "error": e.message})
                return
            send(self._dispatch(request, peer, lambda m: send({"interim": True, **m})))
        except (_ClientGone, ConnectionResetError, BrokenPipeError) as e:
            log.log(logging.DEBUG if e.args == ("closed without a request",) else logging.INFO,
                    "control: the client went away before the answer")
        except Exception:
            log.exception("control: serving a request failed")

    def _dispatch(self, request: dict, peer: Peer, reply: Reply) -> dict:
        op = request["op"]
        handler = self.handlers.get(op)
        self.stats["requests"] += 1
        if handler is None:
            return {"ok": False, "code": "unknown_op",
                    "error": f"this agent does not know the request {op!r} (CLI and agent versions differ?)"}
        try:
            result = handler(request, peer, reply)
        except ControlError as e:
            return {"ok": False, "code": e.code, "error": e.message}
        except _ClientGone:
            raise
        except Exception as e:
            self.stats["errors"] += 1
            self.last_error = f"{op}: {type(e).__name__}: {e}"
            log.exception("control: %s failed", op)
            return {"ok": False, "code": "internal",
                    "error": f"the agent failed to do {op}: {type(e).__name__}: {e} (see the agent's log)"}
        return {"ok": True, **(result or {})}


# --------------------------------------------------------------------------------------------
# Client side (the CLI)
# --------------------------------------------------------------------------------------------

class ClientError(Exception):
    """What the CLI prints (``code`` as in the server's answers, plus ``no_agent``)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class AgentNotRunning(ClientError):
    pass


def call(path: str | os.PathLike, op: str, *, timeout: float | None = 30.0,
         on_interim: Callable[[dict], None] | None = None, group: str = "dongle", **args: Any) -> dict:
    """Sends one request and returns the final answer's map (``ok`` true). Raises
    :class:`AgentNotRunning` when nothing listens, :class:`ClientError` on a refusal. A ``busy``
    agent (all its connections in use) is asked again for up to :data:`BUSY_RETRY_S`: it did
    not read the request, so asking again is safe."""
    retry_until = time.monotonic() + min(BUSY_RETRY_S, timeout if timeout is not None else BUSY_RETRY_S)
    pause = 0.1
    while True:
        try:
            return _call_once(str(path), op, timeout, on_interim, group, args)
        except ClientError as e:
            if e.code != "busy" or time.monotonic() + pause > retry_until:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 1.0)


def _call_once(path: str, op: str, timeout: float | None, on_interim: Callable[[dict], None] | None,
               group: str, args: dict) -> dict:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    gone = ClientError("internal", "the agent closed the connection without an answer (did it stop? see: dongle logs)")
    try:
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise AgentNotRunning("no_agent", f"no agent running: nothing listens on {path} "
                                              "(start it: sudo systemctl start dongle-agent)") from None
        except PermissionError:
            raise ClientError("not_permitted",
                              f"not permitted: {path} is open to the '{group}' group only; ask an "
                              f"administrator to add you (sudo usermod -aG {group} $USER) and log in again") from None
        try:
            sock.sendall(_line({"op": op, **args}))
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before it read the request (busy, not permitted): the answer is waiting
        f = sock.makefile("rb")
        while True:
            try:
                line = f.readline()
            except TimeoutError:
                raise ClientError("timeout", f"the agent did not answer {op} within {timeout:g} s") from None
            except (ConnectionResetError, BrokenPipeError):
                raise gone from None
            if not line:
                raise gone
            msg = json.loads(line)
            if msg.pop("interim", False):
                if on_interim:
                    on_interim(msg)
                continue
            if not msg.pop("ok", False):
                raise ClientError(msg.get("code", "internal"), msg.get("error", "refused"))
            return msg
    finally:
        sock.close()


def open_store_readonly(db_path: str | os.PathLike) -> sqlite3.Connection:
    """Opens the agent's SQLite store read-only (the agent is stopped, or we only look).

    ``mode=ro`` first; if WAL bookkeeping files cannot be created (the directory belongs to the
    agent's user), ``immutable=1``, which is right while the agent is not running."""
    p = Path(db_path)
    if not p.is_file():
        raise ClientError("no_store", f"no agent database at {p} (has the agent ever run on this device?)")
    for flags in ("mode=ro", "mode=ro&immutable=1"):
        try:
            conn = sqlite3.connect(f"file:{p}?{flags}", uri=True)
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            return conn
        except sqlite3.OperationalError as e:
            err = e
            continue
    if not os.access(p, os.R_OK):
        raise ClientError("not_permitted", f"not permitted to read {p}")
    raise ClientError("no_store", f"cannot open {p} read-only: {err}")
