"""The agent's bridge to the dongle's power-management microcontroller (docs/mcu-protocol.md).

``port`` (the :class:`~firmware_bridge.port.McuPort` interface and ``make_port``), ``link``
(McuLink: the protocol on a UART), ``messages`` and ``framing`` (the wire format, pure), ``sim``
(the MCU's twin on a pty). Imports nothing from ``agent`` or ``drivers``.
"""
