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
- Multi-PID mode 01 requests (``010C0D05``, up to six PIDs) are answered by the emulator itself
  in one ISO-TP message; with the response-count hint (``010C0D052``) it answers ``?``. Its
  answer concatenates every ECU's data of each PID; this harness makes it use the first ECU's
  only (two scenario entries have two ECUs answering). :meth:`ElmEmulator.set_multi_pid` makes
  it answer only the first PID, or nothing, like ECUs without multi-PID support.
- Freeze frame (mode 02): the scenario answers PID 02 frame 00 (``020200``) and the other PIDs
  only without the frame number (``020C``), mostly with a negative response;
  :meth:`ElmEmulator.set_freeze_frame` sets a frame's code and values at run time.
- The emulator writes ``elm.log`` in its working directory, so it runs in ``workdir`` (a fresh
  temporary directory unless given) with its logging sent to a file there, not to stdout.

``link``: an optional symlink kept pointing at the current pty (created on start, removed on stop
or kill), which plays the part of a udev name such as ``/dev/serial/by-id/...``: a restarted
emulator gets a new pty, the link stays the same path.

CLI (demo): ``python -m scripts.vehicle_sim.elm_emulator --scenario car [--link PATH]`` prints the pty path
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

# Multi-PID answers from the first ECU only. The emulator 4.0 builds a multi-PID answer by
# concatenating every <data> of each PID's single answer, so a scenario entry where two ECUs
# answer (the 'car' scenario has them for ENGINE_LOAD and INTAKE_PRESSURE) puts the second ECU's
# "41 04 00" inside the first ECU's message, which no real ECU does.
_MULTI_PID_SOURCE = """
def _multi_pid_first_ecu(cmd, header):
    import re
    if not re.match(r'^01([0-9A-F]{2}){2,6}$', cmd):
        return None
    inner = emulator.handle_request
    def first_ecu(c, do_write=False):
        h, c2, resp = inner(c, do_write=do_write)
        if isinstance(resp, str):
            m = re.match(r'(.*?</data>)', resp, re.S)
            resp = m.group(1) if m else resp
        return h, c2, resp
    emulator.handle_request = first_ecu
    try:
        return type(emulator).multi_pid_answer(emulator, cmd, header)
    finally:
        del emulator.handle_request
emulator.multi_pid_answer = _multi_pid_first_ecu
"""
# the interpreter turns a literal backslash-n into a line break and runs the result
_MULTI_PID_PATCH = _MULTI_PID_SOURCE.strip().replace("\n", "\\n")

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
        self._freeze_names: list[str] = []

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
            self.python(_MULTI_PID_PATCH)
            self._configure()
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

    def _configure(self) -> None:
        """Runs once the emulator takes commands and before :attr:`port` is handed out (or the
        link made): a subclass sets its scenario up here (scripts/vehicle_sim/elm_twin.py)."""

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

    def set_multi_pid(self, mode: str = "full") -> None:
        """How the emulator treats a mode 01 request with several PIDs (``010C0D05``):
        ``"full"`` (one answer holding every supported PID: the default), ``"first"``
        (answers the first PID only, as some ECUs do) or ``"none"`` (treats it as unknown, as an
        ECU without multi-PID support may)."""
        if mode == "full":
            self.python(_MULTI_PID_PATCH)
        elif mode == "first":
            self.python("import re as _re; emulator.multi_pid_answer = lambda cmd, header: ("
                        "emulator.handle_request('01' + cmd[2:4])[2] "
                        "if _re.match(r'^01([0-9A-F]{2}){2,6}$', cmd) else None)")
        elif mode == "none":
            self.python("emulator.multi_pid_answer = lambda cmd, header: None")
        else:
            raise ValueError(f"unknown multi-PID mode {mode!r}")

    def set_freeze_frame(self, code: str | None, values: dict[str, str] | None = None) -> None:
        """Freeze frame 00 (mode 02): the code that stored it and, per mode 02 entry of the
        scenario (python-OBD names, e.g. ``{"DTC_RPM": "1A F8"}``), the PID's data bytes. The
        answers carry the frame number (``42 0C 00 1A F8``), as SAE J1979 has it. ``None``
        removes the frame (back to the scenario's answers)."""
        for name in self._freeze_names:
            self.clear_answer(name)
        self._freeze_names = []
        if code is None:
            return
        self._freeze_names = ["INJ_MF_2", *(values or {})]
        self.set_answer("INJ_MF_2", f"42 02 00 {dtc_to_hex(code)}")
        for name, data in (values or {}).items():
            pid = self._scenario_pid(name)
            self.set_answer(name, f"42 {pid} 00 {data}")

    def _scenario_pid(self, name: str) -> str:
        out = self.python(f"import elm.obd_message as m; print(m.ObdMessage[{self.scenario!r}]"
                          f"[{name!r}]['Request'][3:5])")
        pid = out.strip().splitlines()[-1] if out.strip() else ""
        int(pid, 16)  # raises ValueError for a name without a mode 02 PID
        return pid

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
    parser = argparse.ArgumentParser(prog="python -m scripts.vehicle_sim.elm_emulator",
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
