"""The agent's side of the MCU serial link (docs/mcu-protocol.md): the :class:`McuPort` on a UART.

:class:`McuLink` owns one pyserial port and two threads: a reader that de-frames, matches
responses to the one request in flight by (seq, type) and queues events, and a dispatcher that
hands events to ``on_event`` (so a slow callback never stalls reception). Requests are
serialised: one in flight at a time, retried with the same seq after ``timeout_s``
(every request is idempotent on the MCU, so a retry after a lost response is harmless).
"""
from __future__ import annotations

import hashlib
import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import serial

from firmware_bridge.framing import Deframer, encode_frame
from firmware_bridge.messages import (
    MAX_CHUNK, Ack, ErrorCode, ErrorReply, Event, FwBegin, FwChunk, FwConfirm, FwProgress,
    FwState, FwStatus, FwSwitch, GetFwStatus, GetIgnition, GetSupply, GetVersion,
    GetWakeReason, IgnitionChanged, IgnitionState, Kind, KickWatchdog, McuBooted, Message,
    MessageError, MsgType, SetSupplyReport, SetWatchdog, Sleep, SupplyReading, SupplyVoltage,
    VersionInfo, WakeReasonInfo, decode_packet, encode_packet, parse_message)
from firmware_bridge.port import (
    FirmwareRejected, FirmwareRolledBack, FirmwareUpdateError, McuError, McuLinkClosed, McuPort,
    McuRejected, McuTimeout, Progress)

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

# The port's errors and events are re-exported so that callers of McuLink need only this module.
__all__ = ["McuLink", "McuPort", "McuError", "McuTimeout", "McuRejected", "McuLinkClosed",
           "FirmwareUpdateError", "FirmwareRejected", "FirmwareRolledBack", "LinkStats",
           "Event", "IgnitionChanged", "SupplyVoltage", "McuBooted", "FwStatus", "FwState"]


@dataclass
class LinkStats:
    frames: int = 0            # good frames received
    bad_frames: int = 0        # COBS/CRC/oversize errors
    bad_packets: int = 0       # good CRC, but not a valid packet/message
    stale_responses: int = 0   # responses whose seq/type matched no request in flight
    events: int = 0
    events_dropped: int = 0
    retries: int = 0
    timeouts: int = 0


@dataclass
class _Pending:
    seq: int
    msg_type: MsgType
    result: Message | None = None
    done: threading.Event = field(default_factory=threading.Event)


class McuLink:
    """:class:`~firmware_bridge.port.McuPort` over the framed serial protocol. ``port`` is a
    device path or pyserial URL (opened by :meth:`open`) or an already open pyserial port."""

    def __init__(self, port: str | serial.SerialBase, *, on_event: Callable[[Event], None],
                 timeout_s: float = 0.5, retries: int = 3, baudrate: int = 115200,
                 chunk_size: int = 192, event_queue: int = 256) -> None:
        if not 1 <= chunk_size <= MAX_CHUNK:
            raise ValueError(f"chunk_size must be 1..{MAX_CHUNK}")
        self._port = port
        self._on_event = on_event
        self.timeout_s = timeout_s
        self.retries = retries
        self._baudrate = baudrate
        self._chunk = chunk_size
        self._ser: serial.SerialBase | None = None
        self._deframer = Deframer()
        self._req_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._pending: _Pending | None = None
        self._seq = random.randrange(256)
        self._events: queue.Queue[Event] = queue.Queue(maxsize=event_queue)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._failed: str | None = None
        self._last_event_seq: int | None = None
        self.stats = LinkStats()

    # --- lifecycle ----------------------------------------------------------------------------

    def open(self) -> None:
        if self._ser is not None:
            return
        if isinstance(self._port, str):
            try:
                self._ser = serial.serial_for_url(self._port, baudrate=self._baudrate,
                                                  timeout=0.05)
            except (OSError, ValueError) as e:  # serial.SerialException is an OSError
                self._failed = f"cannot open: {e}"
                raise McuLinkClosed(f"cannot open MCU port {self._port}: {e}") from e
        else:
            self._ser = self._port
        self._stop.clear()
        self._failed = None
        self._deframer = Deframer()
        self._threads = [
            threading.Thread(target=self._read_loop, name="mcu-link-rx", daemon=True),
            threading.Thread(target=self._event_loop, name="mcu-link-events", daemon=True)]
        for t in self._threads:
            t.start()
        log.info("MCU link open on %s", self.port_name)

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=2)
        self._threads = []
        if self._ser is not None:
            try:
                self._ser.close()
            except (serial.SerialException, OSError) as e:
                log.warning("closing MCU port: %s", e)
            self._ser = None

    @property
    def port_name(self) -> str:
        port = self._port
        return port if isinstance(port, str) else str(getattr(port, "port", port))

    def status(self) -> dict[str, Any]:
        return {"port": self.port_name, "open": self._ser is not None and not self._failed,
                "error": self._failed, **asdict(self.stats)}

    def __enter__(self) -> McuLink:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- typed API ----------------------------------------------------------------------------

    def ignition(self) -> bool:
        return self._call(GetIgnition(), IgnitionState).on

    def supply_voltage(self) -> float:
        return self._call(GetSupply(), SupplyReading).millivolts / 1000

    def wake_reason(self) -> str:
        """``"power_on"``, ``"ignition"``, ``"timer"``, ``"button"`` or ``"watchdog"``."""
        return self._call(GetWakeReason(), WakeReasonInfo).reason.label

    def firmware_version(self) -> str:
        return self._call(GetVersion(), VersionInfo).version

    def kick_watchdog(self) -> None:
        self._call(KickWatchdog(), Ack)

    def set_watchdog(self, timeout_s: float) -> None:
        """Power-cycle the Pi unless kicked within ``timeout_s`` (whole seconds, 0 disables).
        Also counts as a kick. The MCU re-arms its boot default after every Pi power-up."""
        self._call(SetWatchdog(_u16(timeout_s, "timeout_s")), Ack)

    def set_supply_report(self, period_s: float) -> None:
        """Period of the unsolicited :class:`SupplyVoltage` event (0 = off)."""
        self._call(SetSupplyReport(_u16(period_s, "period_s")), Ack)

    def sleep(self, wake_after_s: float, *, power_off_delay_s: float = 10) -> None:
        """Ask the MCU to cut the Pi's power ``power_off_delay_s`` from now (time to halt) and
        to restore it ``wake_after_s`` after the cut (0 = no timer), or on ignition/button."""
        wake = int(wake_after_s)
        if not 0 <= wake <= 0xFFFFFFFF:
            raise ValueError("wake_after_s out of range")
        self._call(Sleep(wake, _u16(power_off_delay_s, "power_off_delay_s")), Ack)

    def firmware_status(self) -> FwStatus:
        return self._call(GetFwStatus(), FwStatus)

    def confirm_firmware(self, sha256: bytes) -> None:
        """The handshake that makes a trial image permanent."""
        self._call(FwConfirm(sha256), Ack)

    def update_firmware(self, image: bytes, signature: bytes,
                        progress: Progress | None = None, *, trial_s: int = 60,
                        confirm: bool = True, boot_timeout_s: float | None = None) -> str:
        """Transfer, verify, switch to and (``confirm``) commit a new MCU image.

        Resumable: the MCU keeps what it stored of the same image (same size and SHA-256)
        across link loss, agent restarts and Pi power cuts, and only the rest is sent.
        Returns the version the MCU reports afterwards. Raises :class:`FirmwareRejected` if the
        MCU's signature check fails, :class:`FirmwareRolledBack` if the new image did not come
        up (MCU back on the old slot), :class:`McuError` for link trouble (call again to resume).
        """
        sha = hashlib.sha256(image).digest()
        total = len(image)
        status = self.firmware_status()
        if status.state in (FwState.RECEIVING, FwState.COMPLETE) and status.sha256 == sha \
                and status.total_size == total:
            log.info("MCU holds %d/%d bytes of this image: resuming", status.stored, total)
        elif status.state is FwState.TRIAL and status.sha256 == sha:
            log.info("MCU already runs this image on trial")
            return self._finish_trial(sha, confirm)
        stored = self._call(FwBegin(total, sha, signature), FwProgress).stored
        if stored:
            log.info("MCU firmware transfer resumes at %d of %d bytes", stored, total)
        if progress is not None:
            progress(stored, total)
        while stored < total:
            end = min(total, stored + self._chunk)
            new = self._call(FwChunk(stored, image[stored:end]), FwProgress).stored
            if not stored < new <= total:
                raise FirmwareUpdateError(f"MCU stored {new} bytes after a chunk at {stored}")
            stored = new
            if progress is not None:
                progress(stored, total)
        self._switch(trial_s)
        self._await_trial(sha, boot_timeout_s if boot_timeout_s is not None else trial_s + 10)
        return self._finish_trial(sha, confirm)

    # --- firmware update steps ----------------------------------------------------------------

    def _switch(self, trial_s: int) -> None:
        try:
            self._call(FwSwitch(_u16(trial_s, "trial_s")), Ack)
        except McuRejected as e:
            if e.code in (ErrorCode.BAD_SIGNATURE, ErrorCode.BAD_HASH):
                raise FirmwareRejected(f"MCU refused the image: {e.code.name}") from e
            raise
        except McuTimeout:
            # The ack can be lost to the reboot; the status poll below tells what happened.
            log.warning("no answer to FW_SWITCH; checking whether the MCU rebooted")

    def _await_trial(self, sha: bytes, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                st = self._call(GetFwStatus(), FwStatus, retries=0)
            except McuTimeout:
                st = None  # rebooting, or a new image that does not talk
            if st is not None:
                if st.state in (FwState.TRIAL, FwState.COMMITTED) and st.sha256 == sha:
                    return
                if st.state is FwState.ROLLED_BACK:
                    raise FirmwareRolledBack("new MCU image was not confirmed; MCU rolled back")
                if st.state is FwState.REJECTED:
                    raise FirmwareRejected("MCU refused the image")
                if st.state is FwState.COMPLETE:
                    self._switch(0)  # our FW_SWITCH never arrived
            if time.monotonic() > deadline:
                raise FirmwareUpdateError("MCU did not come back after FW_SWITCH")
            self._stop.wait(0.1)

    def _finish_trial(self, sha: bytes, confirm: bool) -> str:
        if confirm:
            self.confirm_firmware(sha)
        version = self.firmware_version()
        log.info("MCU now runs firmware %s%s", version, "" if confirm else " (trial)")
        return version

    # --- request/response ---------------------------------------------------------------------

    def request(self, msg: Message, *, timeout_s: float | None = None,
                retries: int | None = None) -> Message:
        """Send one request; return its response message (see messages.RESPONSES).

        Raises :class:`McuTimeout` after ``1 + retries`` attempts, :class:`McuRejected` on an
        ERROR answer, :class:`McuLinkClosed` if the link is not open.
        """
        if msg.KIND is not Kind.REQUEST or msg.TYPE is None:
            raise ValueError(f"{type(msg).__name__} is not a request")
        timeout = self.timeout_s if timeout_s is None else timeout_s
        tries = 1 + (self.retries if retries is None else retries)
        with self._req_lock:
            self._seq = (self._seq + 1) & 0xFF
            pending = _Pending(self._seq, msg.TYPE)
            frame = encode_frame(encode_packet(pending.seq, msg))
            with self._state_lock:
                self._pending = pending
            try:
                for attempt in range(tries):
                    if attempt:
                        self.stats.retries += 1
                        log.debug("retrying %s seq %d (attempt %d)", msg.TYPE.name,
                                  pending.seq, attempt + 1)
                    self._write(frame)
                    if pending.done.wait(timeout):
                        break
                    self._check_open()
                else:
                    self.stats.timeouts += 1
                    raise McuTimeout(f"no response to {msg.TYPE.name} (seq {pending.seq}) "
                                     f"after {tries} attempts of {timeout} s")
            finally:
                with self._state_lock:
                    self._pending = None
        result = pending.result
        assert result is not None
        if isinstance(result, ErrorReply):
            raise McuRejected(msg.TYPE, result.code)
        return result

    def _call(self, msg: Message, expect: type[M], *,
                          retries: int | None = None) -> M:
        result = self.request(msg, retries=retries)
        if not isinstance(result, expect):  # cannot happen with messages.RESPONSES as it is
            raise McuError(f"unexpected answer to {msg.TYPE}: {result!r}")
        return result

    def _check_open(self) -> None:
        if self._ser is None or self._stop.is_set():
            raise McuLinkClosed("MCU link is closed")
        if self._failed:
            raise McuLinkClosed(f"MCU port failed: {self._failed}")

    def _write(self, frame: bytes) -> None:
        self._check_open()
        try:
            with self._write_lock:
                self._ser.write(frame)  # type: ignore[union-attr]
        except (serial.SerialException, OSError) as e:
            raise McuError(f"writing to the MCU port: {e}") from e

    # --- threads ------------------------------------------------------------------------------

    def _read_loop(self) -> None:
        ser = self._ser
        assert ser is not None
        while not self._stop.is_set():
            try:
                data = ser.read(ser.in_waiting or 1)
            except (serial.SerialException, OSError, TypeError) as e:
                if not self._stop.is_set():
                    self._failed = str(e)
                    log.error("MCU port read failed, link down: %s", e)
                return
            if not data:
                continue
            bad_before = self._deframer.bad_frames
            bodies = self._deframer.feed(data)
            if self._deframer.bad_frames != bad_before:
                self.stats.bad_frames += self._deframer.bad_frames - bad_before
                log.warning("MCU link: dropped %d bad frame(s): %s",
                            self._deframer.bad_frames - bad_before, self._deframer.last_error)
            for body in bodies:
                self.stats.frames += 1
                try:
                    self._on_packet(body)
                except MessageError as e:
                    self.stats.bad_packets += 1
                    log.warning("MCU link: dropped invalid packet %s: %s", body.hex(), e)

    def _on_packet(self, body: bytes) -> None:
        packet = decode_packet(body)
        if packet.kind is Kind.EVENT:
            event = parse_message(packet)
            assert isinstance(event, Event)
            self._note_event_seq(packet.seq)
            self.stats.events += 1
            try:
                self._events.put_nowait(event)
            except queue.Full:
                self.stats.events_dropped += 1
                log.error("MCU event queue full, dropped %r", event)
            return
        if packet.kind is Kind.REQUEST:
            log.warning("MCU link: ignoring a request packet from the MCU (type %s)", packet.type)
            return
        with self._state_lock:
            pending = self._pending
            if pending is None or pending.done.is_set() or packet.seq != pending.seq \
                    or packet.type != pending.msg_type:
                self.stats.stale_responses += 1
                log.debug("MCU link: stale response seq %d type %s ignored",
                          packet.seq, packet.type)
                return
        message = parse_message(packet)  # MessageError: left pending, the retry fixes it
        pending.result = message
        pending.done.set()

    def _note_event_seq(self, seq: int) -> None:
        last = self._last_event_seq
        if last is not None and seq != (last + 1) & 0xFF and seq != 0:
            log.info("MCU events %d..%d missed", (last + 1) & 0xFF, (seq - 1) & 0xFF)
        self._last_event_seq = seq

    def _event_loop(self) -> None:
        while not self._stop.is_set():
            try:
                event = self._events.get(timeout=0.1)
            except queue.Empty:
                continue
            try:
                self._on_event(event)
            except Exception:
                log.exception("MCU event callback failed on %r", event)


def _u16(value: float, what: str) -> int:
    v = int(value)
    if not 0 <= v <= 0xFFFF:
        raise ValueError(f"{what} must be 0..65535, got {value}")
    return v
