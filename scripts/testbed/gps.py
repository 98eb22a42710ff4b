"""Real gpsd for tests: gpsd's own ``gpsfake`` playing the RAV4 minute's NMEA (Debian ``gpsd-clients``).

``gpsfake -1`` plays the log once, ``-p`` makes it wait for gpsd (else the first fixes are lost),
``-W`` lets it exit afterwards, ``-c`` is the delay between sentences (two sentences per fix:
RMC and GGA, each reported by gpsd as a TPV). See /work/shared/data/gnss/README.txt.
"""
from __future__ import annotations

import csv
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from scripts.testbed.shared_data import SHARED_DATA
from scripts.testbed.wait import wait_until

DATA = SHARED_DATA / "gnss"
NMEA = DATA / "comma2k19_rav4_seg40.nmea"
REFERENCE = DATA / "comma2k19_rav4_seg40_gnss_reference.csv"

needs_gpsd = pytest.mark.skipif(not (shutil.which("gpsfake") and (shutil.which("gpsd") or Path("/usr/sbin/gpsd").exists())),
                                reason="gpsd/gpsfake not installed (apt-get install gpsd gpsd-clients)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reference_rows() -> list[dict]:
    with REFERENCE.open() as f:
        return list(csv.DictReader(f))


def nmea_sentence(body: str) -> str:
    """``$body*CS`` with the NMEA checksum (XOR of the bytes between ``$`` and ``*``)."""
    cs = 0
    for ch in body.encode("ascii"):
        cs ^= ch
    return f"${body}*{cs:02X}\r\n"


def with_fix_lost(out: Path, keep_fixes: int = 10, void: int = 5) -> Path:
    """The real log's first ``keep_fixes`` fixes, then ``void`` epochs in which the receiver
    reports no fix (RMC status V, GGA quality 0), as a receiver does in a tunnel."""
    lines = NMEA.read_text().splitlines()[: 2 * keep_fixes]
    last_rmc = lines[-2].split(",")
    hhmmss, date = last_rmc[1], last_rmc[9]
    t = int(hhmmss[:2]) * 3600 + int(hhmmss[2:4]) * 60 + int(float(hhmmss[4:]))
    extra = []
    for i in range(1, void + 1):
        s = t + 2 * i
        stamp = f"{s // 3600:02d}{s % 3600 // 60:02d}{s % 60:02d}.00"
        extra.append(nmea_sentence(f"GPRMC,{stamp},V,,,,,,,{date},,,N").rstrip())
        extra.append(nmea_sentence(f"GPGGA,{stamp},,,,,0,00,,,M,,M,,").rstrip())
    out.write_text("\r\n".join(lines + extra) + "\r\n")
    return out


class GpsFake:
    """One ``gpsfake`` (and the gpsd it runs) on ``port``, ended by its process group id."""

    def __init__(self, workdir: Path, port: int | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    def start(self, nmea: Path = NMEA, *, cycle: float = 0.1, once: bool = True) -> "GpsFake":
        """Starts gpsfake. A looping one (``once=False``, for tests that need fixes for as long as
        they run) is started again, up to 3 times, until its gpsd lists the fake receiver: on a
        loaded machine gpsfake sometimes leaves a gpsd without a device (seen in the suite: the
        agent then saw ``no_receiver`` for good)."""
        args = ["gpsfake", "-q", "-p", "-c", str(cycle), "-P", str(self.port)]
        if once:
            args += ["-1", "-W", "3"]
        for attempt in range(1 if once else 3):
            self._log = open(self.workdir / f"gpsfake-{self.port}.log", "ab")
            self.proc = subprocess.Popen(args + [str(nmea)], cwd=self.workdir, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=self._log, start_new_session=True)
            if once or self.has_device(20.0):
                return self
            self.stop()
        raise RuntimeError(f"gpsfake on port {self.port}: its gpsd never listed the fake receiver "
                           f"(see {self.workdir}/gpsfake-{self.port}.log)")

    def has_device(self, timeout: float) -> bool:
        """True once this gpsd answers ``?DEVICES;`` with at least one device."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as s:
                    s.sendall(b"?DEVICES;\n")
                    s.settimeout(1.0)
                    buf = b""
                    while b'"class":"DEVICES"' not in buf and len(buf) < 65536:
                        chunk = s.recv(4096)
                        if not chunk:
                            break
                        buf += chunk
                    if b'"class":"DEVICES"' in buf and b'"devices":[]' not in buf:
                        return True
            except OSError:
                pass
            time.sleep(0.2)
        return False

    def wait_listening(self, timeout: float = 20.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return True
            except OSError:
                time.sleep(0.05)
        return False

    def wait_exit(self, timeout: float = 60.0) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)  # gpsfake and the gpsd it started
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        else:
            try:  # gpsfake is gone; its gpsd may linger in the group
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        self._log.close()
        self.proc = None


class BareGpsd:
    """A gpsd with no receiver at all (``gpsd -N`` without a device)."""

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        gpsd = shutil.which("gpsd") or "/usr/sbin/gpsd"
        self.proc = subprocess.Popen([gpsd, "-N", "-n", "-G", "-S", str(self.port), "-F",
                                      str(self.workdir / "gpsd.sock")],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


