"""The serial port python-OBD talks through: a time budget per command, and a stop from any thread.

python-OBD (0.7.x) opens its port itself (``serial.serial_for_url(port, timeout=10)``), reads every
answer with that timeout and reads a silent answer again and again for a second of sleeps: a
silent or babbling adapter holds one command for 10 s to minutes, inside ``obd.OBD()`` (which
connects in its constructor) or inside a query, and nothing outside can end it. Here the port is
ours, through pyserial's own extension point for URL handlers (``serial.protocol_handler_packages``,
module ``drivers/obd/protocol_obdport.py``):

- :func:`open_url` makes a :class:`PortSlot` for a device and returns it; ``obd.OBD(slot.url)``
  then opens an :class:`ObdSerial` on that device, which the slot holds.
- :attr:`PortSlot.budget_s`: every write (one command) starts a budget; reads past it return
  nothing at once, so one command costs at most the budget plus python-OBD's second of re-reads.
  The reader sets 10 s while connecting (the protocol search) and its ``timeout_s`` after.
- :meth:`PortSlot.abort` (any thread): wakes a read in progress (pyserial's ``cancel_read``) and
  makes every later read and write raise ``SerialException``. python-OBD catches that, marks the
  connection lost and closes the port on its own thread; a connect in progress then ends within
  about a second, a query at once.

Nothing here imports python-OBD.
"""
from __future__ import annotations

import functools
import itertools
import threading
import time
from typing import Any

import serial

#: The URL scheme of the ports made here (``obdport://<n>``).
SCHEME = "obdport"
#: python-OBD's own read timeout: the budget while connecting.
CONNECT_BUDGET_S = 10.0

_slots: dict[str, "PortSlot"] = {}
_slots_lock = threading.Lock()
_ids = itertools.count(1)

if "drivers.obd" not in serial.protocol_handler_packages:
    serial.protocol_handler_packages.append("drivers.obd")


class Aborted(serial.SerialException):
    """Raised by an aborted port's reads and writes."""


class PortSlot:
    """A device python-OBD will open through :attr:`url`, and the port once it did."""

    def __init__(self, device: str, budget_s: float):
        self.device = device
        self.budget_s = budget_s
        self.url = f"{SCHEME}://{next(_ids)}"
        self.port: ObdSerial | None = None
        self._aborted = threading.Event()

    @property
    def aborted(self) -> bool:
        return self._aborted.is_set()

    def abort(self) -> None:
        """Ends what the port is doing and everything after (thread-safe, idempotent)."""
        self._aborted.set()
        port = self.port
        if port is not None:
            port.wake()

    def release(self) -> None:
        """Forgets the URL (the port itself is python-OBD's to close)."""
        with _slots_lock:
            _slots.pop(self.url, None)


def open_url(device: str, budget_s: float = CONNECT_BUDGET_S) -> PortSlot:
    """A new slot for ``device``; pass ``slot.url`` to ``obd.OBD`` and :meth:`PortSlot.release`
    it when the connection is closed."""
    slot = PortSlot(device, budget_s)
    with _slots_lock:
        _slots[slot.url] = slot
    return slot


def serial_class_for_url(url: str) -> tuple[str, Any]:
    """pyserial's hook for ``obdport://`` URLs: the device path and a port class bound to the
    slot."""
    with _slots_lock:
        slot = _slots.get(url)
    if slot is None:
        raise serial.SerialException(f"{url}: no such OBD port (closed or never opened)")
    return slot.device, functools.partial(ObdSerial, slot=slot)


class ObdSerial(serial.Serial):
    """pyserial's port with the slot's command budget and abort."""

    def __init__(self, *args: Any, slot: PortSlot, **kwargs: Any):
        self._slot = slot
        self._deadline = float("inf")
        super().__init__(*args, **kwargs)
        slot.port = self

    def _check(self) -> None:
        if self._slot.aborted:
            raise Aborted(f"{self._slot.device}: closed by the poller (stopping)")

    def open(self) -> None:
        self._check()
        super().open()

    def write(self, data: Any) -> int | None:
        self._check()
        self._deadline = time.monotonic() + self._slot.budget_s
        return super().write(data)

    def read(self, size: int = 1) -> bytes:
        self._check()
        left = self._deadline - time.monotonic()
        if left <= 0:
            return b""
        saved = self._timeout
        self._timeout = left if saved is None else min(saved, left)
        try:
            data = super().read(size)
        finally:
            self._timeout = saved
        self._check()
        return data

    def wake(self) -> None:
        """Wakes a read in progress on another thread."""
        try:
            self.cancel_read()
        except Exception:  # noqa: BLE001 - a port closed meanwhile has nothing to wake
            pass
