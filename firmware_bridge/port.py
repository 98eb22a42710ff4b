"""What the agent may ask of the power-management microcontroller, and where to get it.

:class:`McuPort` is the interface; :func:`make_port` builds one from the ``power.mcu_port``
setting. As python-can has buses and gpiozero pin factories, the MCU has two implementations
behind it:

- :class:`firmware_bridge.link.McuLink`, the framed serial protocol of docs/mcu-protocol.md on
  the dongle's UART (``/dev/serial0``) or any pyserial URL;
- the simulator, :class:`firmware_bridge.sim.McuSimulator`: the MCU's twin. It serves the same
  protocol on a pty, and a McuLink talks to it through pyserial exactly as to the UART, so the
  whole agent side (framing, retries, firmware transfer) is the one that runs on a device, the
  way python-can's virtual bus stands behind the same ``Bus`` API as a CAN controller.
  ``mcu_port = "sim"`` starts one in-process (:class:`firmware_bridge.sim.SimulatedLink`);
  tests and the demo start their own and hand its ``port`` path to McuLink.

Events (:class:`IgnitionChanged`, :class:`SupplyVoltage`, :class:`McuBooted`) go to the
``on_event`` callback given to :func:`make_port`, on the port's own thread: a slow or failing
callback never stalls the port. Trouble with the MCU or the line raises :class:`McuError`
(subclasses below); bad arguments raise ``ValueError``.

This module imports neither pyserial nor the simulator; :func:`make_port` loads the one asked for.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from firmware_bridge.messages import (
    ErrorCode, Event, FwState, FwStatus, IgnitionChanged, McuBooted, MsgType, SupplyVoltage)

__all__ = ["McuPort", "make_port", "check_spec", "Progress", "McuError", "McuTimeout",
           "McuLinkClosed", "McuRejected", "FirmwareUpdateError", "FirmwareRejected",
           "FirmwareRolledBack", "Event", "IgnitionChanged", "SupplyVoltage", "McuBooted",
           "FwStatus", "FwState"]

#: ``progress(bytes_stored, bytes_total)`` during a firmware transfer.
Progress = Callable[[int, int], None]

#: ``power.mcu_port`` values that mean the in-process simulator: ``sim`` or ``sim://?opt=v&...``.
SIM_SCHEME = "sim"


class McuError(Exception):
    """Anything that went wrong talking to the MCU."""


class McuTimeout(McuError):
    """No valid response after all retries."""


class McuLinkClosed(McuError):
    """The link is not open (never opened, closed, the port could not be opened or failed)."""


class McuRejected(McuError):
    """The MCU answered with an ERROR packet."""

    def __init__(self, msg_type: MsgType, code: int) -> None:
        name = code.name if isinstance(code, ErrorCode) else str(code)
        super().__init__(f"MCU refused {msg_type.name}: {name}")
        self.msg_type = msg_type
        self.code = code


class FirmwareUpdateError(McuError):
    """An MCU firmware update did not end on the new image."""


class FirmwareRejected(FirmwareUpdateError):
    """The MCU refused to switch: the image's hash or signature did not verify."""


class FirmwareRolledBack(FirmwareUpdateError):
    """The new image was not confirmed in time and the MCU went back to the old slot."""


@runtime_checkable
class McuPort(Protocol):
    """The MCU as the agent uses it (agent.device.power, agent.update.updater).

    Made closed; :meth:`open` may be called again after :meth:`close` or a failure (the MCU
    keeps running meanwhile). Every call but open/close/status needs an open port and raises
    :class:`McuError` on trouble.
    """

    def open(self) -> None:
        """Open the port and start receiving; raises :class:`McuLinkClosed` if it cannot."""

    def close(self) -> None:
        """Stop receiving and release the port. Idempotent; never raises."""

    def status(self) -> dict[str, Any]:
        """For ``dongle status``: ``port``, ``open``, ``error`` (why the port failed, or None)
        and the link's counters."""

    # --- queries

    def ignition(self) -> bool:
        """The debounced ignition line."""

    def supply_voltage(self) -> float:
        """The car's 12 V supply, volts."""

    def wake_reason(self) -> str:
        """Why the Pi was last powered up: ``power_on``, ``ignition``, ``timer``, ``button``
        or ``watchdog``."""

    def firmware_version(self) -> str:
        """The running MCU firmware's version text."""

    # --- commands

    def kick_watchdog(self) -> None:
        """Restart the watchdog's countdown."""

    def set_watchdog(self, timeout_s: float) -> None:
        """Power-cycle the Pi unless kicked within ``timeout_s`` (whole seconds, 0 = off); also
        a kick. The MCU goes back to its boot default after every reset and Pi power-up."""

    def set_supply_report(self, period_s: float) -> None:
        """Send :class:`SupplyVoltage` every ``period_s`` (0 = off; off after an MCU reset)."""

    def sleep(self, wake_after_s: float, *, power_off_delay_s: float = 10) -> None:
        """Cut the Pi's power ``power_off_delay_s`` from now and restore it ``wake_after_s``
        after the cut (0 = no timer), or on ignition or the button."""

    # --- firmware update

    def update_firmware(self, image: bytes, signature: bytes,
                        progress: Progress | None = None, *, trial_s: int = 60) -> str:
        """Transfer (resuming what the MCU already holds), verify, switch to and confirm a new
        image signed with Ed25519; returns the version then running. Raises
        :class:`FirmwareRejected` (signature or hash refused), :class:`FirmwareRolledBack` (the
        image did not come up; the old one runs) or another :class:`McuError` (call again to
        resume)."""


def make_port(spec: str, *, on_event: Callable[[Event], None],
              **options: Any) -> McuPort | None:
    """The port ``spec`` (the ``power.mcu_port`` setting) names, not yet opened:

    - ``""``: None, no MCU;
    - ``"sim"`` or ``"sim://?version=1.0.0&ignition=on&supply_v=12.6&pubkey=FILE"``: a
      simulator started in this process, with a McuLink on its pty (see
      :func:`firmware_bridge.sim.sim_options` for the options);
    - anything else: a McuLink on that device path or pyserial URL.

    ``options`` are McuLink's keyword arguments (``timeout_s``, ``retries``, ...). Raises
    ``ValueError`` for a ``sim`` spec it cannot read (:func:`check_spec` says so beforehand).
    """
    spec = spec.strip()
    if not spec:
        return None
    if _is_sim(spec):
        from firmware_bridge.sim import McuSimulator, SimulatedLink
        return SimulatedLink(McuSimulator.from_spec(spec).start(), on_event=on_event, **options)
    from firmware_bridge.link import McuLink
    return McuLink(spec, on_event=on_event, **options)


def check_spec(spec: str) -> None:
    """Raises ValueError if :func:`make_port` could not use ``spec``, for settings validation.
    Only ``sim`` specs can be wrong before opening: a device path that does not exist is an
    MCU that is missing, which :meth:`McuPort.open` reports and the agent survives."""
    spec = spec.strip()
    if _is_sim(spec):
        from firmware_bridge.sim import sim_options
        sim_options(spec)


def _is_sim(spec: str) -> bool:
    return spec == SIM_SCHEME or spec.startswith(SIM_SCHEME + ":")
