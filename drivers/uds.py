"""UDS (ISO 14229) over ISO-TP (ISO 15765-2) on a python-can bus, with can-isotp and udsoncan.

:class:`UdsClient` asks ECUs for data the way a diagnostic tester does: 0x22
ReadDataByIdentifier, the older 0x21 ReadDataByLocalIdentifier (Nissan's LBC) and OBD-II mode
0x01, on 11-bit ids, 29-bit ids given explicitly (VW MEB ``17FC00xx``) and 29-bit normal-fixed
addressing (``18DA<TA><SA>``). can-isotp does the transport (segmentation, flow control,
sequence numbers, timeouts); udsoncan does the request/response exchange (P2/P2* timing,
negative responses, 0x78 "response pending"). Nothing here segments or reassembles frames.

Every request ends in an :class:`Outcome`, never an exception: a positive answer, a negative
one (its NRC), a timeout (no answer, or an answer lost to a missing consecutive frame — can-isotp
drops a message with a sequence gap, it never hands over a partial one), or an invalid answer
(wrong service or identifier echoed). :class:`UdsStats` counts each kind; a value is only ever
decoded from a complete, positive answer to the very request sent.

Several ECUs share one bus through one ``can.Notifier``: each target address gets its own
``isotp.NotifierBasedCanStack`` (its own threads) and udsoncan ``Client``, created on first use.
The bus is opened separately from :class:`drivers.can.CanReader`'s (SocketCAN and the virtual
bus give every opened bus object every frame), so raw capture and diagnostics do not compete.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import can
import isotp
import udsoncan
from udsoncan import Request as UdsRequest
from udsoncan.BaseService import BaseService
from udsoncan.client import Client
from udsoncan.connections import PythonIsoTpConnection
from udsoncan.exceptions import (InvalidResponseException, NegativeResponseException,
                                 TimeoutException, UnexpectedResponseException)
from udsoncan.services import ReadDataByIdentifier

from drivers.can import open_bus

log = logging.getLogger(__name__)
# udsoncan logs every exchange at INFO and can-isotp every lost frame at WARNING; both are
# counted in UdsStats instead, so only their errors reach the agent's log.
logging.getLogger("drivers.uds.udsoncan").setLevel(logging.WARNING)
logging.getLogger("isotp").setLevel(logging.ERROR)

#: NRC 0x78: the ECU needs more time; udsoncan keeps waiting (P2*), we count it.
NRC_RESPONSE_PENDING = 0x78
#: NRCs meaning "this ECU will never answer that": the request can be dropped from a poll list.
NRC_NOT_SUPPORTED = frozenset({0x11, 0x12, 0x31})


class ReadDataByLocalIdentifier(BaseService):
    """KWP2000 / ISO 14230 service 0x21 (positive answer 0x61), still used by Nissan's LBC.
    udsoncan finds services by subclass, so defining this lets its client parse 0x61."""

    _sid = 0x21
    _use_subfunction = False
    supported_negative_response = [0x10, 0x11, 0x12, 0x13, 0x22, 0x31, 0x33, 0x78]


class ObdCurrentData(BaseService):
    """SAE J1979 mode 0x01 (positive answer 0x41), for standard PIDs such as 0x5B."""

    _sid = 0x01
    _use_subfunction = False
    supported_negative_response = [0x11, 0x12, 0x13, 0x22, 0x31, 0x78]


_SERVICE_CLASSES: dict[int, type[BaseService]] = {
    0x22: ReadDataByIdentifier, 0x21: ReadDataByLocalIdentifier, 0x01: ObdCurrentData}


@dataclass(frozen=True)
class Target:
    """An ECU's ISO-TP address: ``tx`` = the id we send on, ``rx`` = the id it answers on."""

    tx: int
    rx: int
    addressing: str = "normal_11bit"

    @classmethod
    def of(cls, request: Any) -> Target:
        """The target of an :class:`agent.ev_profile.Request` (anything with tx/rx/addressing)."""
        return cls(request.tx, request.rx, request.addressing)

    def isotp_address(self) -> isotp.Address:
        if self.addressing == "normal_11bit":
            return isotp.Address(isotp.AddressingMode.Normal_11bits, txid=self.tx, rxid=self.rx)
        if self.addressing == "normal_29bit":
            return isotp.Address(isotp.AddressingMode.Normal_29bits, txid=self.tx, rxid=self.rx)
        if self.addressing == "normal_fixed_29bit":
            # 18DA<TA><SA>: the request carries the ECU as target and us as source.
            return isotp.Address(isotp.AddressingMode.NormalFixed_29bits,
                                 target_address=(self.tx >> 8) & 0xFF, source_address=self.tx & 0xFF)
        raise ValueError(f"unknown addressing {self.addressing!r}")

    @property
    def extended(self) -> bool:
        return self.addressing != "normal_11bit"

    def __str__(self) -> str:
        width = 8 if self.extended else 3
        return f"{self.tx:0{width}X}->{self.rx:0{width}X}"


@dataclass(frozen=True)
class Outcome:
    """How one request ended. ``response`` (service id included) only when ``ok``."""

    ok: bool
    response: bytes | None = None
    error: str = ""           # "", "negative", "timeout", "invalid", "transport", "closed"
    nrc: int | None = None
    pending: int = 0          # 0x78 answers seen before the end
    elapsed_s: float = 0.0

    @property
    def unsupported(self) -> bool:
        return self.error == "negative" and self.nrc in NRC_NOT_SUPPORTED


@dataclass
class UdsStats:
    """Counters of one transport (both paths use this)."""

    requests: int = 0
    positive: int = 0
    negative: Counter = field(default_factory=Counter)  # NRC -> count
    pending: int = 0
    timeouts: int = 0
    invalid: int = 0
    transport_errors: Counter = field(default_factory=Counter)  # error kind -> count
    last_error: str = ""

    def record(self, outcome: Outcome) -> None:
        self.requests += 1
        self.pending += outcome.pending
        if outcome.ok:
            self.positive += 1
        elif outcome.error == "negative" and outcome.nrc is not None:
            self.negative[outcome.nrc] += 1
        elif outcome.error == "timeout":
            self.timeouts += 1
        elif outcome.error == "invalid":
            self.invalid += 1

    def as_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "positive": self.positive,
                "negative": {f"0x{k:02X}": v for k, v in sorted(self.negative.items())},
                "pending": self.pending, "timeouts": self.timeouts, "invalid": self.invalid,
                "transport_errors": dict(self.transport_errors),
                "lost_frames": self.lost_frames, "last_error": self.last_error}

    @property
    def lost_frames(self) -> int:
        """Messages can-isotp discarded for a sequence gap or a consecutive-frame timeout."""
        return (self.transport_errors["WrongSequenceNumberError"]
                + self.transport_errors["ConsecutiveFrameTimeoutError"])


def check_echo(request_payload: bytes, response: bytes) -> bool:
    """True when ``response`` is the positive answer to ``request_payload`` (service id + 0x40
    and the same identifier bytes)."""
    if not response or response[0] != request_payload[0] + 0x40:
        return False
    return response[1:len(request_payload)] == request_payload[1:]


def default_isotp_params(**overrides: Any) -> dict[str, Any]:
    """can-isotp parameters for talking to car ECUs: 8-byte frames padded with 0xAA (as a
    tester does; some ECUs ignore short frames), we ask for no pauses (STmin 0, block size 0,
    what the EV6 recording's tester sends: ``30 00 00``)."""
    params: dict[str, Any] = {
        "stmin": 0, "blocksize": 0, "tx_padding": 0xAA, "tx_data_min_length": 8,
        "rx_flowcontrol_timeout": 1000, "rx_consecutive_frame_timeout": 1000,
        "blocking_send": False,
    }
    params.update(overrides)
    return params


class _Channel:
    """One ISO-TP stack + udsoncan client for one target."""

    def __init__(self, bus: can.BusABC, notifier: can.Notifier, target: Target,
                 params: Mapping[str, Any], client_config: Mapping[str, Any],
                 on_isotp_error: Callable[[Exception], None]):
        self.target = target
        self.stack = isotp.NotifierBasedCanStack(bus, notifier, address=target.isotp_address(),
                                                 params=dict(params), error_handler=on_isotp_error)
        self.conn = PythonIsoTpConnection(self.stack, name=f"uds-{target}")
        self.client = Client(self.conn, config=dict(client_config))
        self.conn.open()

    def close(self) -> None:
        try:
            self.conn.close()
        except Exception:  # noqa: BLE001 - closing must not raise
            log.debug("closing UDS channel %s failed", self.target, exc_info=True)


class UdsClient:
    """UDS requests over ISO-TP on one python-can bus. Thread-safe (one request at a time).

    ``p2_s``: time for the first answer; ``p2_star_s``: time after each 0x78 "pending";
    ``request_timeout_s``: the most any one request may take in total.
    """

    def __init__(self, bus: can.BusABC, *, owns_bus: bool = False, p2_s: float = 1.0,
                 p2_star_s: float = 5.0, request_timeout_s: float = 8.0,
                 isotp_params: Mapping[str, Any] | None = None):
        self._bus = bus
        self._owns_bus = owns_bus
        self._notifier = can.Notifier(bus, [], timeout=0.05)
        self._params = default_isotp_params(**(isotp_params or {}))
        self._client_config = dict(udsoncan.configs.default_client_config)
        self._client_config.update(p2_timeout=p2_s, p2_star_timeout=p2_star_s,
                                   request_timeout=request_timeout_s,
                                   exception_on_negative_response=True,
                                   exception_on_invalid_response=True,
                                   exception_on_unexpected_response=True,
                                   logger_name="drivers.uds.udsoncan")
        self._channels: dict[Target, _Channel] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._pending_seen = 0
        self._isotp_errors_in_request: list[str] = []
        self.stats = UdsStats()

    @classmethod
    def from_setting(cls, setting: Mapping[str, Any], **kw: Any) -> UdsClient:
        """Opens the bus of one local CAN setting (``drivers.can.open_bus``) and owns it."""
        return cls(open_bus(setting), owns_bus=True, **kw)

    # -- requests ------------------------------------------------------------------------------

    def request(self, target: Target, payload: bytes) -> Outcome:
        """Sends ``payload`` (service id + parameters) to ``target`` and waits for the end."""
        with self._lock:
            if self._closed:
                return Outcome(False, error="closed")
            started = time.monotonic()
            self._pending_seen = 0
            self._isotp_errors_in_request = []
            try:
                channel = self._channel(target)
                outcome = self._exchange(channel, payload)
            except Exception as e:  # noqa: BLE001 - a request never raises
                self.stats.transport_errors[type(e).__name__] += 1
                outcome = Outcome(False, error="transport")
                self.stats.last_error = f"{target}: {type(e).__name__}: {e}"
                log.warning("UDS %s %s failed: %s", target, payload.hex(), self.stats.last_error)
            outcome = Outcome(outcome.ok, outcome.response, outcome.error, outcome.nrc,
                              self._pending_seen, time.monotonic() - started)
            self.stats.record(outcome)
            if not outcome.ok and outcome.error != "negative":
                lost = ", ".join(self._isotp_errors_in_request)
                self.stats.last_error = (f"{target} {payload.hex()}: {outcome.error}"
                                         + (f" ({lost})" if lost else ""))
            return outcome

    def read(self, req: Any) -> Outcome:
        """Sends a profile :class:`agent.ev_profile.Request` to its ECU."""
        return self.request(Target.of(req), req.payload)

    def _exchange(self, channel: _Channel, payload: bytes) -> Outcome:
        service = _SERVICE_CLASSES.get(payload[0])
        if service is None:
            raise ValueError(f"service 0x{payload[0]:02X} not supported")
        request = UdsRequest(service=service, data=payload[1:])
        try:
            response = channel.client.send_request(request)
        except NegativeResponseException as e:
            return Outcome(False, error="negative", nrc=e.response.code)
        except TimeoutException:
            return Outcome(False, error="timeout")
        except (InvalidResponseException, UnexpectedResponseException) as e:
            log.debug("UDS %s: invalid answer: %s", channel.target, e)
            return Outcome(False, error="invalid")
        if response is None:
            return Outcome(False, error="timeout")
        raw = bytes(response.original_payload)
        if not check_echo(payload, raw):
            log.debug("UDS %s: answer %s does not echo %s", channel.target, raw.hex(), payload.hex())
            return Outcome(False, error="invalid")
        return Outcome(True, raw)

    def _channel(self, target: Target) -> _Channel:
        channel = self._channels.get(target)
        if channel is None:
            channel = _Channel(self._bus, self._notifier, target, self._params,
                               dict(self._client_config, nrc78_callback=self._on_pending),
                               self._on_isotp_error)
            self._channels[target] = channel
        return channel

    def _on_pending(self) -> None:
        self._pending_seen += 1

    def _on_isotp_error(self, error: Exception) -> None:
        name = type(error).__name__
        self.stats.transport_errors[name] += 1
        self._isotp_errors_in_request.append(name)

    # -- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()
            try:
                self._notifier.stop()
            except Exception:  # noqa: BLE001
                log.debug("stopping the notifier failed", exc_info=True)
            if self._owns_bus:
                try:
                    self._bus.shutdown()
                except Exception:  # noqa: BLE001
                    log.debug("bus shutdown failed", exc_info=True)

    def __enter__(self) -> UdsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def status(self) -> dict[str, Any]:
        return {"path": "python-can", "channels": [str(t) for t in self._channels],
                **self.stats.as_dict()}


class IsoTpReplay:
    """ISO-TP reception over frames that were already captured — a recording, or the frames an
    ELM327 prints — by can-isotp's own receive state machine (no hand-written reassembly).

    ``feed`` takes ``(can_id, data)`` frames in order and returns the complete messages for
    ``address``; a message with a sequence gap or cut short by the next first/single frame is
    dropped and counted in :attr:`errors` by can-isotp's error name. Frames of other ids are
    ignored. Flow control this side would send goes nowhere (the tester already sent it).
    """

    def __init__(self, address: isotp.Address, params: Mapping[str, Any] | None = None):
        self.errors: Counter[str] = Counter()
        self._frames: list[isotp.CanMessage] = []
        self._layer = isotp.TransportLayerLogic(
            rxfn=self._next, txfn=lambda _msg: None, address=address,
            error_handler=lambda e: self.errors.update([type(e).__name__]),
            params=dict(params or {"stmin": 0, "blocksize": 0}))

    def _next(self) -> isotp.CanMessage | None:
        return self._frames.pop(0) if self._frames else None

    def feed(self, frames: Any) -> list[bytes]:
        out: list[bytes] = []
        for can_id, data in frames:
            self._frames.append(isotp.CanMessage(arbitration_id=can_id, data=bytes(data),
                                                 extended_id=can_id > 0x7FF, dlc=len(data)))
            self._layer.process()
            while self._layer.available():
                out.append(bytes(self._layer.recv()))
        return out

    def finish(self) -> None:
        """Counts a message still incomplete at the end of the frames as lost."""
        if self._layer.is_rx_active():
            self.errors["IncompleteAtEnd"] += 1
        self._layer.reset()
