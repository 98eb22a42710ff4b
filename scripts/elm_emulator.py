"""Runs the ELM327-emulator package on a pseudo-tty, for tests and the demo.

ELM327-emulator is CC BY-NC-SA: it is a test/demo peer only. It runs here as a separate process
(``python -m elm``); nothing under ``agent/`` or ``drivers/`` may import it.

How the emulator behaves (ELM327-emulator 4.x, ``site-packages/elm/``):

- A scenario (``-s car``) is a table in ``elm/obd_message.py``: one entry per PID with a
  ``Response`` that is either fixed or a list of answers. Lists are served in sequence (choice
  mode "sequential"): the n-th request of a PID gets entry ``(n - 1) % len``, so values change on
  every request, deterministically. The per-PID request counts are the emulator's ``counters``.
- Batch mode (``-b FILE``) prints the pty path as the first line of FILE and then reads
  interpreter commands from stdin, one a line. Besides the built-in commands (``counters``,
  ``scenario``, ``edit``, ``pause``, ...), any Python statement runs with ``emulator`` bound to
  the running instance. This harness keeps stdin open and uses that to change answers at run
  time: ``emulator.answer[<PID name>]`` overrides a PID's answer, and the module lists
  ``elm.obd_message.DTC_STORED`` / ``DTC_PENDING`` / ``DTC_PERMANENT`` are the DTCs that modes
  03 / 07 / 0A report (PID 01 01 reports the MIL and count from ``DTC_STORED``).
- Over CAN (ISO 15765-4) a mode 03/07/0A answer carries the number of DTCs before the codes
  (``43 02 03 01 04 20``); the emulator 4.0 leaves the count out, so python-OBD, like a client
  talking to a real car, would misread every code. On start this harness replaces the
  emulator's ``dtc_frames`` with one that adds the count (an empty list still answers ``43 00``,
  and a mode 04 clear still empties it).
- The emulator writes ``elm.log`` in its working directory, so it runs in ``workdir`` (a fresh
  temporary directory unless given) with its logging sent to a file there, not to stdout.

``link``: an optional symlink kept pointing at the current pty (created on start, removed on stop
or kill), which plays the part of a udev name such as ``/dev/serial/by-id/...``: a restarted
emulator gets a new pty, the link stays the same path.

CLI (demo): ``python -m scripts.elm_emulator --scenario car [--link PATH]`` prints the pty path
on stdout (one line, flushed) and runs until SIGINT/SIGTERM.
"""
from __future__ import annotations

import argparse
import itertools
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

_LOG_CONFIG = """\
version: 1
disable_existing_loggers: False
formatters:
  plain:
    format: '%(asctime)s %(name)s %(levelname)s %(message)s'
handlers:
  file:
    class: logging.FileHandler
    formatter: plain
    filename: elm.log
    level: INFO
root:
  level: INFO
  handlers: [file]
"""

# One line for the emulator's interpreter: dtc_frames() with the CAN "number of DTCs" byte.
_DTC_FRAMES_PATCH = (
    "import elm.obd_message as m; "
    "m.dtc_frames = lambda emu, dtcs, sid, header=m.ECU_R_ADDR_E: m.iso_tp_frames("
    "[sid] + (['00'] if emu.counters.get('cmd_dtc_cleared') else "
    "(lambda v: ['%02X' % len(v)] + [c[i:i + 2] for c in v for i in (0, 2)])("
    "[d.replace(' ', '').upper() for d in dtcs if d and len(d.replace(' ', '')) == 4])), header)"
)

_DTC_LETTERS = {"P": 0, "C": 1, "B": 2, "U": 3}


def dtc_to_hex(code: str) -> str:
    """``"P0301"`` -> ``"0301"`` (the two SAE J2012 bytes the emulator's DTC lists hold).

    A 4-digit hex string is returned unchanged (upper case).
    """
    code = code.strip().upper()
    if len(code) == 5 and code[0] in _DTC_LETTERS and code[1] in "0123":
        value = (_DTC_LETTERS[code[0]] << 14) | (int(code[1]) << 12) | int(code[2:], 16)
        return f"{value:04X}"
    if len(code) == 4:
        int(code, 16)  # raises ValueError on a bad code
        return code
    raise ValueError(f"not a DTC: {code!r}")


class EmulatorError(RuntimeError):
    pass


class ElmEmulator:
    """One ELM327-emulator process on a pty.

    >>> with ElmEmulator("car") as emu:
    ...     reader = ObdReader(emu.port)
    """

    _markers = itertools.count(1)

    def __init__(self, scenario: str = "car", workdir: str | os.PathLike[str] | None = None, *,
                 link: str | os.PathLike[str] | None = None, start_timeout_s: float = 30.0):
        self.scenario = scenario
        self.link = Path(link) if link is not None else None
        self.start_timeout_s = start_timeout_s
        self._own_workdir = workdir is None
        self._workdir = Path(workdir) if workdir is not None else None
        self._proc: subprocess.Popen[str] | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader: threading.Thread | None = None
        self._stderr = None
        self._port: str | None = None
        self._cmd_lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def port(self) -> str:
        """The pty path (or the link, when one was given) of the running emulator."""
        if self._port is None:
            raise EmulatorError("emulator not started")
        return str(self.link) if self.link is not None else self._port

    @property
    def pty(self) -> str | None:
        """The pty path itself, even when a link is used."""
        return self._port

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def workdir(self) -> Path | None:
        return self._workdir

    def start(self) -> str:
        """Starts the emulator and returns :attr:`port` once it answers commands."""
        if self.running:
            return self.port
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="elm-emulator-"))
        self._workdir.mkdir(parents=True, exist_ok=True)
        log_cfg = self._workdir / "elm-log.yaml"
        log_cfg.write_text(_LOG_CONFIG)
        env = dict(os.environ, ELM_LOG_CFG=str(log_cfg), PYTHONUNBUFFERED="1")
        self._stderr = open(self._workdir / "elm.stderr", "ab")
        self._lines = queue.Queue()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "elm", "-s", self.scenario, "-b", "-"],
            cwd=self._workdir, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._stderr, text=True, bufsize=1, start_new_session=True)
        self._reader = threading.Thread(target=self._read_stdout, args=(self._proc,),
                                        name=f"elm-emulator-{self._proc.pid}", daemon=True)
        self._reader.start()
        deadline = time.monotonic() + self.start_timeout_s
        try:
            first = self._next_line(deadline)
            if not first.startswith("/dev/"):
                raise EmulatorError(f"emulator did not report a pty: {first!r}")
            self._port = first
            self._sync(deadline)  # scenario set, interpreter reading commands
            self.python(_DTC_FRAMES_PATCH)
        except BaseException:
            self.kill()
            raise
        if self.link is not None:
            tmp = self.link.with_name(self.link.name + f".tmp{os.getpid()}")
            tmp.unlink(missing_ok=True)
            os.symlink(self._port, tmp)
            os.replace(tmp, self.link)
        log.info("ELM327-emulator pid %s scenario %s on %s", self._proc.pid, self.scenario,
                 self.port)
        return self.port

    def stop(self, timeout_s: float = 5.0) -> None:
        """Ends the emulator (SIGTERM, then SIGKILL if it lingers) and removes the link.

        SIGTERM rather than the interpreter's ``quit``: the emulator has nothing to save, and
        its own shutdown path sleeps more than a second."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._cleanup()

    def kill(self) -> None:
        """SIGKILL: the adapter vanishes at once (its pty, and the link, disappear)."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        self._cleanup()

    def __enter__(self) -> "ElmEmulator":
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _cleanup(self) -> None:
        if self.link is not None and self.link.is_symlink() and self._port is not None:
            try:
                if os.readlink(self.link) == self._port:
                    self.link.unlink()
            except OSError:
                pass
        proc = self._proc
        if proc is not None:
            for stream in (proc.stdin, proc.stdout):
                try:
                    if stream is not None:
                        stream.close()
                except OSError:
                    pass
        if self._reader is not None:
            self._reader.join(2.0)
            self._reader = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        if self._own_workdir and self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        self._port = None

    # -- run-time commands -------------------------------------------------------------------

    def command(self, line: str, timeout_s: float = 10.0) -> str:
        """Sends one interpreter command (built-in or Python) and returns what it printed."""
        if "\n" in line:
            raise ValueError("one command, one line")
        if not self.running:
            raise EmulatorError("emulator not running")
        with self._cmd_lock:
            self._write(line)
            return self._sync(time.monotonic() + timeout_s)

    def python(self, statement: str) -> str:
        """Runs a Python statement in the emulator; raises :class:`EmulatorError` if it fails."""
        out = self.command(statement)
        if "Error executing command" in out:
            raise EmulatorError(f"emulator rejected {statement!r}: {out.strip()}")
        return out

    def set_answer(self, pid_name: str, data_hex: str, header: str = "7E8") -> None:
        """Makes the emulator answer ``pid_name`` (an entry of its scenario, which uses the
        python-OBD names) with one CAN frame carrying ``data_hex``, e.g.
        ``set_answer("RPM", "41 0C 1A F8")``, until :meth:`clear_answer`."""
        data = bytes.fromhex(data_hex)
        spaced = " ".join(f"{b:02X}" for b in data)
        self.set_answer_xml(pid_name, f"<header>{header}</header><size>{len(data):02X}</size>"
                                      f"<data>{spaced}</data>")

    def set_answer_xml(self, pid_name: str, response: str) -> None:
        """Overrides an answer with the emulator's own response markup (e.g.
        ``"<writeln>12.6V</writeln>"``)."""
        self.python(f"emulator.answer[{pid_name!r}] = {response!r}")

    def clear_answer(self, pid_name: str) -> None:
        self.python(f"emulator.answer.pop({pid_name!r}, None)")

    def set_dtcs(self, stored: list[str] | tuple[str, ...] = (),
                 pending: list[str] | tuple[str, ...] = (),
                 permanent: list[str] | tuple[str, ...] = ()) -> None:
        """Sets the DTCs modes 03 (stored), 07 (pending) and 0A (permanent) report; codes as
        ``"P0301"`` or the emulator's hex ``"0301"``. Empty lists clear them. Also undoes a
        previous mode 04 clear."""
        lists = {name: [dtc_to_hex(c) for c in codes] for name, codes in
                 (("DTC_STORED", stored), ("DTC_PENDING", pending),
                  ("DTC_PERMANENT", permanent))}
        assigns = "; ".join(f"m.{name}[:] = {codes!r}" for name, codes in lists.items())
        self.python(f"import elm.obd_message as m; {assigns}; "
                    "emulator.counters.pop('cmd_dtc_cleared', None)")

    def counters(self) -> dict[str, str]:
        """The emulator's counters: requests served per PID name, plus a few settings."""
        out = self.command("counters")
        result: dict[str, str] = {}
        for line in out.splitlines():
            name, sep, value = line.partition("=")
            if sep:
                result[name.strip()] = value.strip()
        return result

    def request_count(self, pid_name: str) -> int:
        return int(self.counters().get(pid_name, "0"))

    # -- plumbing ----------------------------------------------------------------------------

    def _write(self, line: str) -> None:
        proc = self._proc
        if proc is None or proc.stdin is None:
            raise EmulatorError("emulator not running")
        try:
            proc.stdin.write(line + "\n")
            proc.stdin.flush()
        except (OSError, ValueError) as e:
            raise EmulatorError(f"emulator stdin closed: {e}") from e

    def _sync(self, deadline: float) -> str:
        marker = f"__elm_emulator_sync_{next(self._markers)}__"
        self._write(f"echo {marker}")
        out: list[str] = []
        while True:
            line = self._next_line(deadline)
            if line == marker:
                return "\n".join(out)
            out.append(line)

    def _next_line(self, deadline: float) -> str:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise EmulatorError("timed out waiting for the emulator")
        try:
            line = self._lines.get(timeout=remaining)
        except queue.Empty:
            raise EmulatorError("timed out waiting for the emulator") from None
        if line is None:
            raise EmulatorError(f"emulator exited (rc={self._proc.poll() if self._proc else None})")
        return line

    def _read_stdout(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                self._lines.put(line.rstrip("\r\n"))
        except (OSError, ValueError):
            pass
        finally:
            self._lines.put(None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.elm_emulator",
                                     description="ELM327-emulator on a pty (test/demo tool)")
    parser.add_argument("--scenario", default="car")
    parser.add_argument("--link", help="keep this symlink pointing at the pty")
    parser.add_argument("--workdir", help="directory for the emulator's log (default: temporary)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    emu = ElmEmulator(args.scenario, args.workdir, link=args.link)
    try:
        port = emu.start()
        print(port, flush=True)
        while not stop.wait(0.5):
            if not emu.running:
                log.error("emulator exited on its own")
                return 1
    finally:
        emu.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
