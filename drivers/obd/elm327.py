"""The one place that reaches into python-OBD's internals (python-OBD 0.7.x; requirements.txt
bounds it ``<0.8``). Nothing else in the project touches them.

python-OBD's public API is the ``obd.OBD`` connection (``query``, ``supports``, ``status``, ...)
and its commands and decoders. What the dongle needs beyond that goes through the connection's
ELM327 object (``OBD.interface``, an undocumented ``obd.elm327.ELM327``) and its message type:

- :func:`send_and_parse`: an AT command whose answer python-OBD parses into messages
  (``ELM327.send_and_parse``; ``OBD.query`` only sends OBD commands);
- :func:`line_sender`: a command whose answer lines come back unparsed (the name-mangled
  ``ELM327.__send``), for ISO-TP through the adapter (drivers/elm_isotp.py) and for the reader,
  which sorts the adapter's status lines out (drivers/obd/elm_lines.py) before parsing;
- :func:`line_parser`: python-OBD's parser of the connection's protocol (the name-mangled
  ``ELM327.__protocol``), which turns data lines into messages; ``send_and_parse`` is these two
  in one, without the look at the lines in between;
- :func:`message_like`: a message built from another one's frames and ECU with new data
  (``obd.protocols.protocol.Message``), for answers that must be reshaped before python-OBD's
  decoders see them (multi-PID, mode 02 frame numbers);
- the stderr handler python-OBD adds to the ``obd`` logger on import (``obd.console_handler``) is
  removed here: records propagate to the root logger, which the agent's logging config owns;
  with both, every line would be printed twice.

:func:`missing` names what of this the installed python-OBD lacks; tests/test_obd_internals.py
fails on any of it, naming the version, so an upgrade that changes them is caught before a car is.
"""
from __future__ import annotations

import inspect
import logging
from typing import Any, Callable

import obd
from obd.protocols.protocol import Message

try:
    from obd.elm327 import ELM327
except ImportError:  # reported by missing(); the calls below fail (and are caught) one by one
    ELM327 = None

__all__ = ["Message", "VERSION", "line_parser", "line_sender", "message_like", "missing",
           "send_and_parse"]

log = logging.getLogger(__name__)

#: The installed python-OBD's version.
VERSION: str = getattr(obd, "__version__", "unknown")

# name-mangled attributes of ELM327 (``self.__protocol``, ``def __send``)
_PROTOCOL = "_ELM327__protocol"
_SEND = "_ELM327__send"

if getattr(obd, "console_handler", None) is not None:
    logging.getLogger("obd").removeHandler(obd.console_handler)


def _interface(conn: Any) -> Any | None:
    return getattr(conn, "interface", None)


def send_and_parse(conn: Any, command: bytes) -> list[Message]:
    """Sends ``command`` (e.g. ``b"ATAT1"``) on a connected ``obd.OBD`` and returns python-OBD's
    parsed messages (``[]`` when none). Raises what python-OBD raises (callers catch it)."""
    return conn.interface.send_and_parse(command) or []


def line_sender(conn: Any) -> Callable[[bytes], list[str]]:
    """A function sending one command line on ``conn``'s adapter and returning the answer lines
    as the adapter printed them (prompt removed), bypassing python-OBD's parser. Raises
    ``AttributeError`` when the connection has no ELM327 object or python-OBD no such call."""
    return getattr(conn.interface, _SEND)


def line_parser(conn: Any) -> Callable[[list[str]], list[Message]]:
    """python-OBD's parser for ``conn``'s protocol: answer lines (hex, no spaces or with) to
    messages, frames that do not parse dropped. Raises ``AttributeError`` when the connection
    has no protocol object."""
    protocol = getattr(_interface(conn), _PROTOCOL)
    if not callable(protocol):
        raise AttributeError(f"{_PROTOCOL} is not a parser ({type(protocol).__name__})")
    return protocol


def message_like(template: Message, data: bytes | bytearray) -> Message:
    """A python-OBD message with ``template``'s frames and ECU and ``data`` as its data."""
    message = Message(template.frames)
    message.ecu = template.ecu
    message.data = bytearray(data)
    return message


def missing(conn: Any | None = None) -> list[str]:
    """What this module needs that the installed python-OBD does not have, one text each
    (empty when all is there). With a connected ``obd.OBD``, its ELM327 object and protocol parser
    are checked too; without, only the classes."""
    gaps: list[str] = []
    if ELM327 is None:
        return ["obd.elm327.ELM327 (the adapter class)"]
    if not callable(getattr(ELM327, "send_and_parse", None)):
        gaps.append("obd.elm327.ELM327.send_and_parse (method)")
    send = getattr(ELM327, _SEND, None)
    if not callable(send):
        gaps.append(f"obd.elm327.ELM327.{_SEND} (method)")
    elif list(inspect.signature(send).parameters)[:2] != ["self", "cmd"]:
        gaps.append(f"obd.elm327.ELM327.{_SEND}(self, cmd, ...) (signature is "
                    f"{inspect.signature(send)})")
    try:
        m = message_like(Message([]), b"\x41\x0c")
        if not (m.data == bytearray(b"\x41\x0c") and m.frames == [] and m.parsed()):
            gaps.append("obd.protocols.protocol.Message(frames) with .frames, .ecu, .data")
    except Exception as e:  # noqa: BLE001
        gaps.append(f"obd.protocols.protocol.Message(frames) with .frames, .ecu, .data ({e!r})")
    if not isinstance(getattr(obd, "console_handler", None), logging.Handler):
        gaps.append("obd.console_handler (logging.Handler)")
    if conn is not None:
        elm = _interface(conn)
        if not isinstance(elm, ELM327):
            gaps.append(f"obd.OBD.interface (an ELM327 object; got {type(elm).__name__})")
        else:
            protocol = getattr(elm, _PROTOCOL, None)
            if not callable(protocol):
                gaps.append(f"obd.elm327.ELM327 instance attribute {_PROTOCOL} (the protocol's "
                            "line parser)")
    return gaps
