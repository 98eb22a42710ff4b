"""A serial CAN adapter's end of the line, for tests: a pty whose slave end python-can's slcan
driver opens as its adapter (``interface = "slcan"``, ``channel`` = :attr:`SlcanPty.port`).

Lines written with :meth:`SlcanPty.send` (``t1230...``, garbage, anything) arrive as what the
adapter received from the car; what the driver writes (``C``, ``S6``, ``O``, frames it sends) is
read and kept in :attr:`SlcanPty.heard`, so the driver never blocks on a full pty.
"""
from __future__ import annotations

import os
import pty
import select
import threading
import tty


def slcan_line(can_id: int, data: bytes, *, ext: bool = False) -> str:
    """The adapter's line for one received data frame (without the ``\\r``)."""
    return (f"T{can_id:08X}" if ext else f"t{can_id:03X}") + f"{len(data)}{data.hex().upper()}"


class SlcanPty:
    def __init__(self) -> None:
        self.master, self._slave = pty.openpty()
        tty.setraw(self._slave)
        self.port = os.ttyname(self._slave)
        self.heard = bytearray()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="slcan-pty", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            if select.select([self.master], [], [], 0.1)[0]:
                try:
                    self.heard += os.read(self.master, 4096)
                except OSError:
                    return

    def send(self, *lines: str | bytes) -> None:
        """Writes each line and its ``\\r`` terminator, as the adapter would."""
        os.write(self.master, b"".join((line if isinstance(line, bytes) else line.encode()) + b"\r"
                                       for line in lines))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        os.close(self.master)
        os.close(self._slave)

    def __enter__(self) -> SlcanPty:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
