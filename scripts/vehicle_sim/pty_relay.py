"""A relay between an OBD client and an adapter's pty that simulates the vehicle side of the link.

The ELM327-emulator answers at once; a real car's ECU takes tens of milliseconds per request.
:class:`PtyRelay` offers a new pty (:attr:`PtyRelay.port`) to the client and forwards each
command line to the emulator's pty; OBD requests (hex lines) are held ``delay_s`` first (the
ECU round trip), adapter commands (``AT...``) go on at once (in order). Answers come back as
they are, or through ``mangle(bytes) -> bytes`` (to drop or corrupt characters in tests).
``intercept(line) -> bytes | None`` plays a bad adapter: it sees each command line (without its
CR) and may answer it itself (the bytes are written to the client as they are, so include the
``\r\r>`` prompt, or leave it out to play an adapter that never ends its answer); ``None``
forwards the line as usual. Thread-based, for tests and bench/bench_obd.py.
"""
from __future__ import annotations

import collections
import logging
import os
import re
import select
import threading
import time
import tty
from types import TracebackType
from typing import Callable

log = logging.getLogger(__name__)

_HEX_LINE = re.compile(rb"^[0-9A-Fa-f ]+$")


class PtyRelay:
    def __init__(self, target: str, delay_s: float = 0.05, *,
                 mangle: Callable[[bytes], bytes] | None = None,
                 intercept: Callable[[bytes], bytes | None] | None = None):
        self.target = target
        self.delay_s = delay_s
        self.mangle = mangle
        self.intercept = intercept
        self.intercepted = 0  # command lines answered by ``intercept``
        self.requests = 0  # OBD requests relayed
        self.lines: collections.deque[bytes] = collections.deque(maxlen=1000)  # latest commands
        self._master: int | None = None
        self._slave: int | None = None
        self._target_fd: int | None = None
        self._port: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> str:
        if self._port is None:
            raise RuntimeError("relay not started")
        return self._port

    def start(self) -> str:
        self._master, self._slave = os.openpty()
        tty.setraw(self._slave)  # the client side: no echo, no line editing
        self._port = os.ttyname(self._slave)
        self._target_fd = os.open(self.target, os.O_RDWR | os.O_NOCTTY)
        tty.setraw(self._target_fd)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="pty-relay", daemon=True)
        self._thread.start()
        log.info("pty relay %s -> %s, OBD requests delayed %.0f ms", self._port, self.target,
                 self.delay_s * 1000)
        return self._port

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        for fd in (self._master, self._slave, self._target_fd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._master = self._slave = self._target_fd = None

    def __enter__(self) -> "PtyRelay":
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _run(self) -> None:
        master, target = self._master, self._target_fd
        assert master is not None and target is not None
        pending = b""
        queue: list[tuple[float, bytes]] = []  # (due, line with its CR), in order
        while not self._stop.is_set():
            now = time.monotonic()
            while queue and queue[0][0] <= now:
                _, line = queue.pop(0)
                os.write(target, line)
            timeout = 0.05 if not queue else max(0.0, min(0.05, queue[0][0] - now))
            try:
                ready, _, _ = select.select([master, target], [], [], timeout)
            except (OSError, ValueError):
                return
            if master in ready:
                try:
                    data = os.read(master, 4096)
                except OSError:
                    data = b""
                pending += data
                while b"\r" in pending:
                    line, pending = pending.split(b"\r", 1)
                    due = time.monotonic()
                    self.lines.append(line.strip())
                    intercept = self.intercept
                    answer = intercept(line.strip()) if intercept is not None else None
                    if answer is not None:
                        self.intercepted += 1
                        if answer:
                            os.write(master, answer)
                        continue
                    if line.strip() and _HEX_LINE.match(line):
                        due += self.delay_s
                        self.requests += 1
                    if queue:
                        due = max(due, queue[-1][0])
                    queue.append((due, line + b"\r"))
            if target in ready:
                try:
                    data = os.read(target, 4096)
                except OSError:  # the emulator went away
                    return
                if self.mangle is not None:
                    data = self.mangle(data)
                if data:
                    os.write(master, data)
