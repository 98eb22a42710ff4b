"""An ELM327-speaking front end on a pseudo-tty, in front of a python-can bus.

For tests, the bench and the demo: the dongle's ELM327 path (``drivers.elm_isotp``) talks to
this pty exactly as to a USB adapter, and it puts real CAN frames on a python-can bus where
:mod:`scripts.ev_ecu_sim` answers — so the ELM327 path reaches the same simulated car as the
python-can path. Like a real ELM327 it sends the request as a single frame from ``ATSH``'s id
(with ``ATCP`` on 29-bit protocols), sends flow control after a first frame (``ATFCSH`` /
``ATFCSD`` when ``ATFCSM1``, else the request id with ``30 00 00``), prints every frame from
the ``ATCRA`` id as it arrives, and ends after ``ATST`` x 4 ms without a frame, or as soon as
the number of messages given as the request's trailing digit are complete. ``NO DATA`` when
nothing came. It implements the AT commands the driver and python-OBD's start-up use; others
answer ``OK``. Not implemented: ATMA, ATBD, CAN formatting off (ATCAF0).
"""
from __future__ import annotations

import logging
import os
import threading
import time
import tty
from collections.abc import Mapping
from typing import Any

import can

log = logging.getLogger(__name__)

BANNER = "ELM327 v1.5"


class ElmPty:
    def __init__(self, bus_setting: Mapping[str, Any]):
        self._setting = dict(bus_setting)
        self._bus: can.BusABC | None = None
        self._master, self._slave = os.openpty()
        tty.setraw(self._slave)
        self.path = os.ttyname(self._slave)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.commands: list[str] = []
        self._reset()

    def _reset(self) -> None:
        self.echo, self.linefeed, self.spaces, self.headers = True, True, True, False
        self.protocol = "6"
        self.header: int | None = None
        self.priority = 0x18
        self.cra: int | None = None
        self.fc_header: int | None = None
        self.fc_data = bytes([0x30, 0x00, 0x00])
        self.fc_mode = 0
        self.timeout_s = 0.2

    @property
    def extended(self) -> bool:
        return self.protocol in ("7", "9", "B")

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> ElmPty:
        self._bus = can.Bus(**self._setting)
        self._thread = threading.Thread(target=self._serve, name="elm-pty", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)
        for fd in (self._master, self._slave):
            try:
                os.close(fd)
            except OSError:
                pass
        if self._bus is not None:
            self._bus.shutdown()

    def __enter__(self) -> ElmPty:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- serial side ---------------------------------------------------------------------------

    def _write(self, text: str) -> None:
        eol = "\r\n" if self.linefeed else "\r"
        os.write(self._master, text.replace("\r", eol).encode("ascii"))

    def _serve(self) -> None:
        import select
        buf = b""
        while not self._stop.is_set():
            ready, _, _ = select.select([self._master], [], [], 0.1)
            if not ready:
                continue
            try:
                chunk = os.read(self._master, 1024)
            except OSError:
                return
            buf += chunk
            while b"\r" in buf:
                line, buf = buf.split(b"\r", 1)
                text = line.decode("ascii", "replace").strip()
                if self.echo:
                    self._write(text + "\r")
                try:
                    out = self._handle(text.upper().replace(" ", ""))
                except Exception:  # noqa: BLE001 - a peer must keep answering
                    log.exception("ELM front end failed on %r", text)
                    out = ["?"]
                self._write("\r".join(out) + "\r\r>")

    def _handle(self, cmd: str) -> list[str]:
        self.commands.append(cmd)
        if not cmd:
            return []
        if cmd.startswith("AT"):
            return self._at(cmd[2:])
        if not all(c in "0123456789ABCDEF" for c in cmd):
            return ["?"]
        count = None
        if len(cmd) % 2:
            count, cmd = int(cmd[-1], 16), cmd[:-1]
        return self._request(bytes.fromhex(cmd), count)

    def _at(self, a: str) -> list[str]:
        if a in ("Z", "WS"):
            self._reset()
            return [BANNER]
        if a == "D":
            self._reset()
            return ["OK"]
        if a in ("I", "@1"):
            return [BANNER if a == "I" else "dongle test ELM327 front end"]
        if a == "RV":
            return ["12.6V"]
        if a == "DPN":
            return [self.protocol]
        if a == "DP":
            return ["ISO 15765-4 (CAN 29/500)" if self.extended else "ISO 15765-4 (CAN 11/500)"]
        flags = {"E": "echo", "L": "linefeed", "S": "spaces", "H": "headers"}
        if len(a) == 2 and a[0] in flags and a[1] in "01":
            setattr(self, flags[a[0]], a[1] == "1")
            return ["OK"]
        if a.startswith("SPA") or a.startswith("TP"):
            self.protocol = a[-1] if a[-1] != "0" else "6"
            return ["OK"]
        if a.startswith("SP"):
            self.protocol = a[2:] if a[2:] not in ("0", "") else "6"
            return ["OK"]
        if a.startswith("SH"):
            self.header = int(a[2:], 16)
            return ["OK"]
        if a.startswith("CP"):
            self.priority = int(a[2:], 16)
            return ["OK"]
        if a.startswith("CRA"):
            self.cra = int(a[3:], 16) if a[3:] else None
            return ["OK"]
        if a == "AR":
            self.cra = None
            return ["OK"]
        if a.startswith("FCSH"):
            self.fc_header = int(a[4:], 16)
            return ["OK"]
        if a.startswith("FCSD"):
            self.fc_data = bytes.fromhex(a[4:])
            return ["OK"]
        if a.startswith("FCSM"):
            self.fc_mode = int(a[4:])
            return ["OK"]
        if a.startswith("ST"):
            self.timeout_s = max(1, int(a[2:], 16)) * 0.004
            return ["OK"]
        return ["OK"]

    # -- bus side ------------------------------------------------------------------------------

    def _tx_id(self) -> int:
        if self.extended:
            return (self.priority << 24) | ((self.header if self.header is not None else 0xDB33F1) & 0xFFFFFF)
        return self.header if self.header is not None else 0x7DF

    def _request(self, payload: bytes, count: int | None) -> list[str]:
        bus = self._bus
        assert bus is not None
        while bus.recv(0) is not None:
            pass
        tx = self._tx_id()
        if len(payload) > 7:
            return ["?"]
        bus.send(can.Message(arbitration_id=tx, is_extended_id=self.extended,
                             data=bytes([len(payload)]) + payload + bytes(7 - len(payload))))
        lines: list[str] = []
        deadline = time.monotonic() + self.timeout_s
        remaining = 0
        done = 0
        while time.monotonic() < deadline:
            msg = bus.recv(max(0.0, deadline - time.monotonic()))
            if msg is None:
                break
            if msg.is_extended_id != self.extended:
                continue
            if self.cra is not None and msg.arbitration_id != self.cra:
                continue
            if self.cra is None and not self.extended and not 0x7E8 <= msg.arbitration_id <= 0x7EF:
                continue
            data = bytes(msg.data)
            if not data:
                continue
            lines.append(self._format(msg.arbitration_id, data))
            deadline = time.monotonic() + self.timeout_s
            pci = data[0] >> 4
            if pci == 0:
                done += 1
            elif pci == 1:
                remaining = ((data[0] & 0x0F) << 8 | data[1]) - 6
                fc_id = self.fc_header if self.fc_mode == 1 and self.fc_header is not None else tx
                fc = self.fc_data if self.fc_mode == 1 else bytes([0x30, 0, 0])
                bus.send(can.Message(arbitration_id=fc_id, is_extended_id=self.extended,
                                     data=fc + bytes(8 - len(fc))))
            elif pci == 2:
                remaining -= 7
                if remaining <= 0:
                    done += 1
            if count is not None and done >= count:
                break
        return lines or ["NO DATA"]

    def _format(self, can_id: int, data: bytes) -> str:
        sep = " " if self.spaces else ""
        body = sep.join(f"{b:02X}" for b in data)
        if not self.headers:
            return body
        head = f"{can_id:08X}" if self.extended else f"{can_id:03X}"
        if self.spaces and self.extended:
            head = " ".join(head[i:i + 2] for i in range(0, 8, 2))
        return head + sep + body
