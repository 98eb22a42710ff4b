"""MCU simulator: the power-management microcontroller's side of docs/mcu-protocol.md on a pty.

The MCU's twin (see :mod:`firmware_bridge.port`), shipped with the agent: it imports only the
standard library, pyserial, cryptography and firmware_bridge. :class:`McuSimulator` opens a pty
pair (``os.openpty``), keeps the slave open (so the agent can come and go) and serves the
protocol on the master from one thread; a :class:`~firmware_bridge.link.McuLink` opens the
slave's path as it opens the real UART. Tests drive its inputs (ignition, supply voltage,
button, time) and read its outputs (``power_log``, firmware slots), and can tamper with the line
through ``request_hook``, ``response_hook`` and :meth:`inject`. ``mcu_port = "sim"`` in the
agent's settings runs one in the agent's process (:func:`sim_options`, :class:`SimulatedLink`).

Simulated time is ``time.monotonic()`` plus whatever :meth:`advance` added, so the simulator
also runs on its own for the demo. Simplification: the simulator answers requests even while
the Pi is "off" (a real Pi could not send any); it sends no events then.

Simulator image convention (the real MCU's image format is its own business): an image that
starts with ``SIM_MAGIC`` carries ``healthy: u8`` and ``len: u8`` + version text after it; an
unhealthy image boots but never talks, so it is never confirmed. See :func:`make_image`.

    python -m firmware_bridge.sim [--version 1.0.0] [--pubkey FILE | --dev-key-out FILE]

prints the pty path and reads simple commands from stdin (``ign on``, ``volts 11.9``, ...).
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import math
import os
import random
import select
import sys
import threading
import time
import tty
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from firmware_bridge.framing import Deframer, encode_frame
from firmware_bridge.link import McuLink
from firmware_bridge.messages import (
    HEADER, PROTOCOL_VERSION, REQUESTS, Ack, ErrorCode, ErrorReply, FwBegin, FwChunk,
    FwConfirm, FwProgress, FwState,
    FwStatus, FwSwitch, GetFwStatus, GetIgnition, GetSupply, GetVersion, GetWakeReason,
    IgnitionChanged, IgnitionState, KickWatchdog, Kind, McuBooted, Message, MessageError,
    MsgType, Packet, SetSupplyReport, SetWatchdog, Sleep, SupplyReading, SupplyVoltage,
    VersionInfo, WakeReason, WakeReasonInfo, decode_packet, encode_packet, volts_to_mv)
from firmware_bridge.port import SIM_SCHEME

log = logging.getLogger(__name__)

SIM_MAGIC = b"MCUSIMFW"
ZERO_SHA = bytes(32)


def make_image(version: str, size: int = 8192, *, healthy: bool = True, seed: int = 0) -> bytes:
    """A simulator firmware image of ``size`` bytes carrying ``version``."""
    v = version.encode()
    header = SIM_MAGIC + bytes([int(healthy), len(v)]) + v
    if size < len(header):
        raise ValueError("image too small for its header")
    return header + random.Random(seed).randbytes(size - len(header))


def parse_image(image: bytes) -> tuple[str, bool]:
    """(version, healthy) of a simulator image; anything else counts as a healthy "unknown"."""
    n = len(SIM_MAGIC)
    if image[:n] != SIM_MAGIC or len(image) < n + 2:
        return "unknown", True
    healthy, vlen = image[n], image[n + 1]
    return image[n + 2:n + 2 + vlen].decode(errors="replace"), bool(healthy)


@dataclass(frozen=True)
class PowerEvent:
    t: float       # simulator time (s)
    action: str    # "cut" or "restore"
    reason: str    # cut: "sleep" / "watchdog"; restore: a WakeReason label


@dataclass
class _Slot:
    image: bytes
    version: str
    healthy: bool

    @property
    def sha256(self) -> bytes:
        return hashlib.sha256(self.image).digest()


class _Refuse(Exception):
    def __init__(self, code: ErrorCode) -> None:
        super().__init__(code.name)
        self.code = code


class McuSimulator:
    def __init__(self, public_key: Ed25519PublicKey | bytes, *, version: str = "1.0.0",
                 supply_v: float = 12.6, ignition: bool = False, watchdog_boot_s: int = 300,
                 supply_report_s: int = 0, slot_size: int = 256 * 1024,
                 reboot_s: float = 0.3, power_off_s: float = 2.0) -> None:
        if isinstance(public_key, bytes):
            public_key = Ed25519PublicKey.from_public_bytes(public_key)
        self._pub = public_key
        self._lock = threading.RLock()
        self._write_lock = threading.Lock()
        self._offset = 0.0
        self._slot_size = slot_size
        self._reboot_s = reboot_s
        self._power_off_s = power_off_s
        self._wdt_boot_s = watchdog_boot_s
        self._deframer = Deframer()
        self._master, self._slave = os.openpty()
        tty.setraw(self._slave)
        self._port = os.ttyname(self._slave)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # line tampering for tests
        self.request_hook: Callable[[Packet], bool] | None = None
        self.response_hook: Callable[[Packet, bytes], bytes] | None = None
        # observable state
        self.requests: list[Packet] = []
        self.chunk_offsets: list[int] = []
        self.power_log: list[PowerEvent] = []
        self.pi_powered = True
        self.wake_reason = WakeReason.POWER_ON
        self.ignition = ignition
        self.supply_v = supply_v
        self.slots: list[_Slot | None] = [_Slot(make_image(version, 256), version, True), None]
        self.active_slot = 0
        self.fw_state = FwState.IDLE
        self.reboots = 0
        # timers and internals
        now = self.now()
        self._wdt_timeout = watchdog_boot_s
        self._wdt_deadline: float | None = now + watchdog_boot_s if watchdog_boot_s else None
        self._supply_period = supply_report_s
        self._supply_next = now + supply_report_s
        self._sleep_at: float | None = None
        self._sleep_wake_after = 0
        self._sleeping = False
        self._wake_at: float | None = None
        self._restore_at: float | None = None
        self._boot_at: float | None = None
        self._boot_slot = 0
        self._boot_trial = False
        self._trial_s = 60
        self._trial_deadline: float | None = None
        self._prev_slot = 0
        self._dead = False
        self._event_seq = 0
        self._session: tuple[int, bytes, bytes] | None = None  # total, sha, signature
        self._trial_image: _Slot | None = None  # the image of the last switch
        self._staging = bytearray()

    @classmethod
    def from_spec(cls, spec: str) -> McuSimulator:
        """A simulator (not started) from a ``power.mcu_port`` value (see :func:`sim_options`)."""
        return cls(**sim_options(spec))

    # --- lifecycle ----------------------------------------------------------------------------

    @property
    def port(self) -> str:
        """Path of the pty slave: what the agent opens."""
        return self._port

    def start(self) -> McuSimulator:
        self._thread = threading.Thread(target=self._run, name="mcu-sim", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        for fd in (self._master, self._slave):
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> McuSimulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- test controls ------------------------------------------------------------------------

    def now(self) -> float:
        return time.monotonic() + self._offset

    def advance(self, seconds: float) -> None:
        """Move simulated time forward and fire whatever fell due."""
        with self._lock:
            self._offset += seconds
            self._tick()

    def set_ignition(self, on: bool) -> None:
        with self._lock:
            if on != self.ignition:
                self.ignition = on
                self._emit(IgnitionChanged(on))
            self._tick()

    def set_supply_voltage(self, volts: float) -> None:
        with self._lock:
            self.supply_v = volts

    def press_button(self) -> None:
        with self._lock:
            if not self.pi_powered:
                self._restore(WakeReason.BUTTON)

    def inject(self, raw: bytes) -> None:
        """Write raw bytes on the line (garbage, truncated or corrupted frames)."""
        self._write(raw)

    @property
    def version(self) -> str:
        slot = self.slots[self.active_slot]
        return slot.version if slot else "none"

    @property
    def watchdog_timeout_s(self) -> int:
        return self._wdt_timeout

    @property
    def wake_timer_s(self) -> float | None:
        """Seconds until the wake timer fires (None: no timer armed)."""
        with self._lock:
            return None if self._wake_at is None else self._wake_at - self.now()

    def received(self, msg_type: MsgType) -> list[Packet]:
        with self._lock:
            return [p for p in self.requests if p.type == msg_type]

    # --- I/O ----------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self._master], [], [], 0.02)
                data = os.read(self._master, 4096) if ready else b""
            except OSError as e:
                if not self._stop.is_set():
                    log.error("simulator pty read failed: %s", e)
                return
            with self._lock:
                for body in self._deframer.feed(data):
                    try:
                        self._on_body(body)
                    except Exception:  # a test's hook, most likely: keep serving
                        log.exception("simulator: handling a request failed")
                self._tick()

    def _write(self, raw: bytes) -> None:
        if not raw:
            return
        with self._write_lock:
            try:
                os.write(self._master, raw)
            except OSError as e:
                log.warning("simulator pty write failed: %s", e)

    def _emit(self, event: Message) -> None:
        if not self.pi_powered or self._dead or self._boot_at is not None:
            return
        self._write(encode_frame(encode_packet(self._event_seq, event)))
        self._event_seq = (self._event_seq + 1) & 0xFF

    def _on_body(self, body: bytes) -> None:
        try:
            packet = decode_packet(body)
        except MessageError as e:
            log.warning("simulator: undecodable packet: %s", e)
            return
        if packet.kind is not Kind.REQUEST:
            return
        self.requests.append(packet)
        if self._dead or self._boot_at is not None:
            return  # rebooting, or a broken image that never talks
        if self.request_hook is not None and not self.request_hook(packet):
            return
        reply = self._reply(packet)
        if isinstance(packet.type, MsgType):
            wire = encode_frame(encode_packet(packet.seq, reply, msg_type=packet.type))
        else:
            wire = _raw_error(packet, reply)
        if self.response_hook is not None:
            wire = self.response_hook(packet, wire)
        self._write(wire)

    def _reply(self, packet: Packet) -> Message:
        cls = REQUESTS.get(packet.type)  # type: ignore[call-overload]
        if cls is None:
            return ErrorReply(ErrorCode.UNKNOWN_TYPE)
        try:
            msg = cls.parse(packet.payload)
        except MessageError as e:
            log.warning("simulator: bad %s payload: %s", cls.__name__, e)
            return ErrorReply(ErrorCode.BAD_LENGTH)
        try:
            return self._handle(msg)
        except _Refuse as e:
            return ErrorReply(e.code)

    # --- request handlers ---------------------------------------------------------------------

    def _handle(self, msg: Message) -> Message:  # noqa: C901 - one branch per request type
        now = self.now()
        match msg:
            case GetVersion():
                return VersionInfo(self.active_slot, self.version)
            case GetIgnition():
                return IgnitionState(self.ignition)
            case GetSupply():
                return SupplyReading(volts_to_mv(self.supply_v))
            case GetWakeReason():
                return WakeReasonInfo(self.wake_reason)
            case Sleep(wake_after_s=wake, power_off_delay_s=delay):
                self._sleep_at = now + delay
                self._sleep_wake_after = wake
                return Ack()
            case KickWatchdog():
                if self._wdt_timeout:
                    self._wdt_deadline = now + self._wdt_timeout
                return Ack()
            case SetWatchdog(timeout_s=t):
                self._wdt_timeout = t
                self._wdt_deadline = now + t if t else None
                return Ack()
            case SetSupplyReport(period_s=p):
                self._supply_period = p
                self._supply_next = now + p
                return Ack()
            case FwBegin():
                return self._fw_begin(msg)
            case FwChunk():
                return self._fw_chunk(msg)
            case GetFwStatus():
                if self._session is not None:
                    total, sha = self._session[0], self._session[1]
                elif self._trial_image is not None:
                    total, sha = len(self._trial_image.image), self._trial_image.sha256
                else:
                    total, sha = 0, ZERO_SHA
                return FwStatus(self.fw_state, self.active_slot, total, len(self._staging), sha)
            case FwSwitch(trial_s=trial):
                return self._fw_switch(trial)
            case FwConfirm(sha256=sha):
                slot = self.slots[self.active_slot]
                if self.fw_state in (FwState.TRIAL, FwState.COMMITTED) and slot is not None \
                        and slot.sha256 == sha:
                    self.fw_state = FwState.COMMITTED
                    self._trial_deadline = None
                    return Ack()
                raise _Refuse(ErrorCode.BAD_STATE)
        raise _Refuse(ErrorCode.UNKNOWN_TYPE)

    def _fw_begin(self, msg: FwBegin) -> Message:
        if self.fw_state is FwState.TRIAL:
            raise _Refuse(ErrorCode.BAD_STATE)
        if msg.total_size == 0:
            raise _Refuse(ErrorCode.BAD_VALUE)
        if msg.total_size > self._slot_size:
            raise _Refuse(ErrorCode.TOO_LARGE)
        same = (self._session is not None and self._session[:2] == (msg.total_size, msg.sha256)
                and self.fw_state in (FwState.RECEIVING, FwState.COMPLETE))
        if not same:
            self._staging = bytearray()
        self._session = (msg.total_size, msg.sha256, msg.signature)
        self._trial_image = None
        self.fw_state = (FwState.COMPLETE if len(self._staging) == msg.total_size
                         else FwState.RECEIVING)
        return FwProgress(len(self._staging))

    def _fw_chunk(self, msg: FwChunk) -> Message:
        if self.fw_state not in (FwState.RECEIVING, FwState.COMPLETE) or self._session is None:
            raise _Refuse(ErrorCode.BAD_STATE)
        self.chunk_offsets.append(msg.offset)
        stored, end = len(self._staging), msg.offset + len(msg.data)
        if end > self._session[0]:
            raise _Refuse(ErrorCode.TOO_LARGE)
        if msg.offset == stored:
            self._staging += msg.data
        elif end > stored or self._staging[msg.offset:end] != msg.data:
            raise _Refuse(ErrorCode.BAD_OFFSET)  # a gap, or a rewrite that differs
        if len(self._staging) == self._session[0]:
            self.fw_state = FwState.COMPLETE
        return FwProgress(len(self._staging))

    def _fw_switch(self, trial_s: int) -> Message:
        active = self.slots[self.active_slot]
        if self.fw_state is FwState.TRIAL and self._session and active \
                and active.sha256 == self._session[1]:
            return Ack()  # a retry after the switch happened
        if self.fw_state is not FwState.COMPLETE or self._session is None:
            raise _Refuse(ErrorCode.BAD_STATE)
        total, sha, signature = self._session
        image = bytes(self._staging)
        code = None
        if hashlib.sha256(image).digest() != sha:
            code = ErrorCode.BAD_HASH
        else:
            try:
                self._pub.verify(signature, image)
            except InvalidSignature:
                code = ErrorCode.BAD_SIGNATURE
        if code is not None:
            log.info("simulator: refusing the staged image: %s", code.name)
            self.fw_state = FwState.REJECTED
            self._staging = bytearray()
            raise _Refuse(code)
        version, healthy = parse_image(image)
        target = 1 - self.active_slot
        self.slots[target] = _Slot(image, version, healthy)
        self._prev_slot = self.active_slot
        self._trial_s = trial_s or 60
        self._start_reboot(target, trial=True, delay=0.05)
        return Ack()

    # --- time ---------------------------------------------------------------------------------

    def _start_reboot(self, slot: int, *, trial: bool, delay: float = 0.0) -> None:
        self._boot_at = self.now() + delay + self._reboot_s
        self._boot_slot = slot
        self._boot_trial = trial
        self._trial_deadline = None

    def _tick(self) -> None:  # noqa: C901 - one branch per timer
        now = self.now()
        if self._boot_at is not None and now >= self._boot_at:
            self._boot()
        if self._trial_deadline is not None and now >= self._trial_deadline:
            log.info("simulator: trial image not confirmed, rolling back to slot %d",
                     self._prev_slot)
            self._dead = False
            self._start_reboot(self._prev_slot, trial=False)
            self.fw_state = FwState.ROLLED_BACK
        if self._dead or self._boot_at is not None:
            return
        if self.pi_powered and self._sleep_at is not None and now >= self._sleep_at:
            self._sleep_at = None
            self._cut("sleep")
            self._sleeping = True
            self._wake_at = now + self._sleep_wake_after if self._sleep_wake_after else None
        if self._sleeping:
            if self.ignition:
                self._restore(WakeReason.IGNITION)
            elif self._wake_at is not None and now >= self._wake_at:
                self._restore(WakeReason.TIMER)
        if self.pi_powered and self._wdt_deadline is not None and now >= self._wdt_deadline:
            log.info("simulator: watchdog expired, power-cycling the Pi")
            self._cut("watchdog")
            self._restore_at = now + self._power_off_s
        if self._restore_at is not None and now >= self._restore_at:
            self._restore(WakeReason.WATCHDOG)
        if self.pi_powered and self._supply_period and now >= self._supply_next:
            self._supply_next = now + self._supply_period
            self._emit(SupplyVoltage(self.supply_v))

    def _boot(self) -> None:
        self._boot_at = None
        self.reboots += 1
        self.active_slot = self._boot_slot
        self._event_seq = 0
        # RAM settings are lost in a reset: back to the defaults (docs §5.2)
        self._supply_period = 0
        self._wdt_timeout = self._wdt_boot_s
        self._wdt_deadline = (self.now() + self._wdt_boot_s
                              if self._wdt_boot_s and self.pi_powered else None)
        slot = self.slots[self.active_slot]
        if self._boot_trial:
            self.fw_state = FwState.TRIAL
            self._session = None
            self._staging = bytearray()
            self._trial_image = slot
            self._trial_deadline = self.now() + self._trial_s
            self._dead = slot is not None and not slot.healthy
        if not self._dead:
            self._emit(McuBooted(self.active_slot, self.fw_state, self.version))

    def _cut(self, reason: str) -> None:
        self.pi_powered = False
        self._wdt_deadline = None
        self._sleep_at = None
        self.power_log.append(PowerEvent(self.now(), "cut", reason))

    def _restore(self, reason: WakeReason) -> None:
        now = self.now()
        self.pi_powered = True
        self._sleeping = False
        self._wake_at = None
        self._restore_at = None
        self.wake_reason = reason
        self._wdt_timeout = self._wdt_boot_s  # the agent sets its own once it runs
        self._wdt_deadline = now + self._wdt_boot_s if self._wdt_boot_s else None
        self.power_log.append(PowerEvent(now, "restore", reason.label))


def sim_options(spec: str) -> dict[str, Any]:
    """:class:`McuSimulator` keyword arguments from a ``power.mcu_port`` value ``sim`` or
    ``sim://?version=1.0.0&ignition=on&supply_v=12.6&pubkey=FILE``:

    - ``version``: firmware version in slot 0 (default 1.0.0);
    - ``ignition``: ``on`` (default: nobody turns this twin's key, and with it off the agent
      would put the machine it runs on to sleep) or ``off``;
    - ``supply_v``: the 12 V supply (default 12.6);
    - ``pubkey``: the Ed25519 firmware-signing public key (raw 32 bytes or PEM) the simulated
      bootloader verifies images with (default: a fresh key no image matches).

    Opens nothing but the key file. Raises ValueError naming what it cannot read.
    """
    parts = urlsplit(SIM_SCHEME + ":" if spec == SIM_SCHEME else spec)
    if parts.scheme != SIM_SCHEME or parts.netloc or parts.path not in ("", "/") \
            or parts.fragment:
        raise ValueError(f"mcu_port {spec!r}: expected 'sim' or 'sim://?option=value&...'")
    try:
        opts = dict(parse_qsl(parts.query, keep_blank_values=True,
                              strict_parsing=bool(parts.query)))
    except ValueError as e:
        raise ValueError(f"mcu_port {spec!r}: {e}") from None
    unknown = sorted(set(opts) - {"version", "ignition", "supply_v", "pubkey"})
    if unknown:
        raise ValueError(f"mcu_port {spec!r}: unknown option {unknown[0]!r}")
    if opts.get("ignition", "on") not in ("on", "off"):
        raise ValueError(f"mcu_port {spec!r}: ignition must be 'on' or 'off'")
    try:
        supply_v = float(opts.get("supply_v", 12.6))
    except ValueError:
        supply_v = math.nan
    if not math.isfinite(supply_v):
        raise ValueError(f"mcu_port {spec!r}: supply_v is not a number")
    try:
        pub = (_load_public_key(opts["pubkey"]) if "pubkey" in opts
               else Ed25519PrivateKey.generate().public_key())
    except (OSError, ValueError) as e:
        raise ValueError(f"mcu_port {spec!r}: pubkey: {e}") from None
    return {"public_key": pub, "version": opts.get("version", "1.0.0"), "supply_v": supply_v,
            "ignition": opts.get("ignition", "on") == "on"}


class SimulatedLink(McuLink):
    """A McuLink on the pty of an in-process :class:`McuSimulator`: what ``mcu_port = "sim"``
    gives (:func:`firmware_bridge.port.make_port`). The simulator keeps running across the
    link's close and open, as the real MCU outlives the agent's port; ``simulator.stop()``
    ends it (it is a daemon thread: process exit does too)."""

    def __init__(self, simulator: McuSimulator, **link_options: Any) -> None:
        super().__init__(simulator.port, **link_options)
        self.simulator = simulator

    def status(self) -> dict[str, Any]:
        return {**super().status(), "simulated": True}


def _raw_error(packet: Packet, reply: Message) -> bytes:
    """The ERROR answer to a request type that is not in MsgType (encode_packet needs one)."""
    body = HEADER.pack((PROTOCOL_VERSION << 4) | Kind.ERROR, packet.seq, int(packet.type))
    return encode_frame(body + reply.payload())


def _load_public_key(path: str) -> Ed25519PublicKey:
    """Raises ValueError (or OSError) for a file that does not hold an Ed25519 public key."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) == 32:
        return Ed25519PublicKey.from_public_bytes(data)
    key = serialization.load_pem_public_key(data)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path}: not an Ed25519 public key")
    return key


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="MCU simulator on a pty (docs/mcu-protocol.md)")
    ap.add_argument("--version", default="1.0.0", help="firmware version in slot 0")
    ap.add_argument("--pubkey", help="Ed25519 firmware-signing public key (raw 32 bytes or PEM)")
    ap.add_argument("--dev-key-out", help="without --pubkey: write a fresh dev signing key "
                                          "(PEM, PKCS#8) here for signing demo images")
    ap.add_argument("--supply-report", type=int, default=10, help="EVT_SUPPLY period, s")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.pubkey:
        try:
            pub = _load_public_key(args.pubkey)
        except (OSError, ValueError) as e:
            raise SystemExit(f"--pubkey: {e}") from None
    else:
        priv = Ed25519PrivateKey.generate()
        pub = priv.public_key()
        if args.dev_key_out:
            with open(args.dev_key_out, "wb") as f:
                f.write(priv.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    sim = McuSimulator(pub, version=args.version, supply_report_s=args.supply_report).start()
    print(sim.port, flush=True)
    print("commands: ign on|off, volts V, button, advance S, status, quit", file=sys.stderr)
    try:
        for line in sys.stdin:
            cmd = line.split()
            try:
                if not cmd:
                    continue
                if cmd[0] == "ign":
                    sim.set_ignition(cmd[1] == "on")
                elif cmd[0] == "volts":
                    sim.set_supply_voltage(float(cmd[1]))
                elif cmd[0] == "button":
                    sim.press_button()
                elif cmd[0] == "advance":
                    sim.advance(float(cmd[1]))
                elif cmd[0] == "status":
                    print(f"pi_powered={sim.pi_powered} ignition={sim.ignition} "
                          f"supply={sim.supply_v}V wake={sim.wake_reason.label} "
                          f"fw={sim.version} slot={sim.active_slot} state={sim.fw_state.label} "
                          f"power_log={sim.power_log}", flush=True)
                elif cmd[0] == "quit":
                    break
                else:
                    print(f"unknown command {cmd[0]!r}", file=sys.stderr)
            except (IndexError, ValueError) as e:
                print(f"bad command: {e}", file=sys.stderr)
        else:
            # stdin closed (run in the background): keep serving until killed
            threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        sim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
