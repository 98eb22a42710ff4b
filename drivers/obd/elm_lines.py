"""Every line an ELM327 (or a clone) may answer instead of data, and what the reader does about it.

An answer is a list of lines (python-OBD strips the prompt and splits at CR/LF). Data lines are
hex frames (``7E8 04 41 0C 1A F8``); everything else is one of :data:`TABLE` (matched as a prefix,
upper case, spaces ignored for the negative-response form) or unknown. :func:`classify` sorts an
answer into the data lines python-OBD should parse and the worst :class:`Handling` among the rest,
which the reader records and the poller acts on:

========== ============================================================= ==========================
handling   what it means                                                 what happens
========== ============================================================= ==========================
``info``   progress text (``SEARCHING...``, ``BUS INIT: ...OK``, ``OK``) line dropped, data used
``no_data``the adapter asked, no ECU answered (``NO DATA``)              request failed; counts
                                                                         toward ``fail_limit``
``retry``  the request was spoilt on the way (bus or adapter error:      request failed; counts
           ``CAN ERROR``, ``BUS INIT: ...ERROR``, ``STOPPED``,           toward ``fail_limit``
           ``BUFFER FULL``, ``<DATA ERROR``, ``?``, non-hex text, a
           frame cut short, an answer to another request)
``refused``an ECU answered with a negative response (``7F 01 12``)        request failed; the
                                                                         vehicle is there: does
                                                                         not count toward
                                                                         ``fail_limit``
``reconnect`` the adapter lost the vehicle or its own settings            connection dropped now,
           (``UNABLE TO CONNECT``, ``LV RESET``, ``ACT ALERT``,          reconnect after backoff
           ``LP ALERT``, ``ERRxx``, a reset banner ``ELM327 v..``)
========== ============================================================= ==========================

An answer with good data and a status line (``41 0C ..`` then ``CAN ERROR`` from another ECU)
keeps its data: the reader uses what echoes its request, and only the absence of it is a failure.
Negative response code ``78`` (response pending) is ``retry``: the ECU will answer later, after
the adapter gave up. A stray prompt character inside a line (a clone that prints ``>`` early) is
removed and the rest of the line used; an answer cut off by one ends as a frame python-OBD cannot
parse (``retry``), and its rest, arriving during the next request, as an answer to another
request (``retry``). docs: drivers/obd/reader.py's module text and docs/technician.md.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

INFO, NO_DATA, RETRY, REFUSED, RECONNECT = "info", "no_data", "retry", "refused", "reconnect"
#: from least to most severe: the worst handling of an answer's lines is the answer's
SEVERITY = {INFO: 0, REFUSED: 1, NO_DATA: 2, RETRY: 3, RECONNECT: 4}


@dataclass(frozen=True)
class StatusLine:
    prefix: str
    handling: str
    meaning: str


#: Every ELM327 v1.x/v2.x message (ELM327 data sheet, "Messages and alerts"), and what a clone adds.
TABLE: tuple[StatusLine, ...] = (
    StatusLine("SEARCHING", INFO, "protocol search in progress (the answer follows)"),
    StatusLine("BUS INIT: ...OK", INFO, "ISO 9141 / KWP slow init done"),
    StatusLine("BUS INIT: OK", INFO, "ISO 9141 / KWP slow init done"),
    StatusLine("OK", INFO, "AT command done"),
    StatusLine("NO DATA", NO_DATA, "no ECU answered within the adapter's timeout"),
    StatusLine("BUS INIT", RETRY, "ISO 9141 / KWP init failed (the adapter retries at the next "
                                  "request)"),
    StatusLine("BUS BUSY", RETRY, "bus too busy to send"),
    StatusLine("BUS ERROR", RETRY, "bus signal error (short, open line)"),
    StatusLine("CAN ERROR", RETRY, "CAN controller error (no acknowledgement, wrong bit rate)"),
    StatusLine("<DATA ERROR", RETRY, "a frame with a bad checksum or format (line is suspect)"),
    StatusLine("DATA ERROR", RETRY, "answer with a bad checksum or format"),
    StatusLine("<RX ERROR", RETRY, "receive error in a frame"),
    StatusLine("FB ERROR", RETRY, "feedback error: the adapter did not see its own frame"),
    StatusLine("STOPPED", RETRY, "the adapter stopped answering: a character arrived meanwhile"),
    StatusLine("BUFFER FULL", RETRY, "the adapter's buffer overflowed (serial link too slow)"),
    StatusLine("?", RETRY, "the adapter did not understand the command"),
    StatusLine("UNABLE TO CONNECT", RECONNECT, "no protocol or vehicle found (ignition off?)"),
    StatusLine("LV RESET", RECONNECT, "the adapter reset itself on low voltage: settings lost"),
    StatusLine("ACT ALERT", RECONNECT, "no activity: the adapter goes to low power"),
    StatusLine("LP ALERT", RECONNECT, "the adapter goes to low power"),
    StatusLine("ELM327", RECONNECT, "reset banner: the adapter restarted, settings lost"),
    StatusLine("ERR", RECONNECT, "internal adapter error (ERRxx)"),
)

#: SAE J1979 / ISO 14229 negative response codes worth naming.
NRC = {0x10: "general reject", 0x11: "service not supported",
       0x12: "sub-function not supported", 0x13: "bad message length", 0x21: "busy, repeat",
       0x22: "conditions not correct", 0x31: "request out of range",
       0x78: "response pending"}

_HEX = re.compile(r"^[0-9A-Fa-f]+$")
# a CAN frame line (11- or 29-bit header, PCI byte) holding a negative response 7F <sid> <nrc>
_NEGATIVE = re.compile(r"^(?:[0-9A-F]{3}|[0-9A-F]{8})?0[3-7]7F([0-9A-F]{2})([0-9A-F]{2})|^7F"
                       r"([0-9A-F]{2})([0-9A-F]{2})")
_UNKNOWN = StatusLine("", RETRY, "not data and not an ELM327 message (garbled line)")


@dataclass
class Verdict:
    """What :func:`classify` found in one answer."""

    data: list[str]  # hex lines, for python-OBD's parser
    handling: str | None = None  # the worst handling among the other lines; None: data only
    text: str | None = None  # the line that gave it
    meaning: str | None = None


def lookup(line: str) -> StatusLine:
    """The table entry for a line that is not data (:data:`_UNKNOWN`'s RETRY if none fits).
    The ``<...`` entries are found anywhere in the line: the adapter appends them to the frame
    they concern (``7E8 04 41 0C 1A F8 <DATA ERROR``)."""
    upper = line.strip().upper()
    for entry in TABLE:
        if upper.startswith(entry.prefix) or (entry.prefix.startswith("<")
                                                and entry.prefix in upper):
            return entry
    return _UNKNOWN


def negative(line: str) -> tuple[int, int] | None:
    """``(service, code)`` when ``line`` is a negative response frame (``7E8 03 7F 01 12``)."""
    m = _NEGATIVE.match(line.replace(" ", "").upper())
    if m is None:
        return None
    service, code = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    return int(service, 16), int(code, 16)


def classify(lines: Iterable[str]) -> Verdict:
    """Splits an answer into data lines and the worst status among the rest."""
    verdict = Verdict(data=[])
    for raw in lines:
        line = raw.replace(">", "").strip()  # a stray prompt is never part of an answer
        if not line:
            continue
        compact = line.replace(" ", "")
        nrc = negative(compact) if _HEX.match(compact) else None
        if nrc is not None:
            handling = RETRY if nrc[1] == 0x78 else REFUSED
            entry = StatusLine(line, handling, f"negative response to service {nrc[0]:02X}: "
                               f"{NRC.get(nrc[1], f'code {nrc[1]:02X}')}")
        elif _HEX.match(compact):
            verdict.data.append(compact)
            continue
        else:
            entry = lookup(line)
        if verdict.handling is None or SEVERITY[entry.handling] > SEVERITY[verdict.handling]:
            verdict.handling, verdict.text, verdict.meaning = entry.handling, line, entry.meaning
    return verdict
