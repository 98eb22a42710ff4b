"""Text from outside (the cloud, the car, a technician) made safe to show: one helper for logs,
acks, the terminal and the reference console.

:func:`safe_text` escapes every character that is not printable (control characters such as ESC,
BEL, CR and LF, and format characters such as the bidirectional overrides), the way Python's
``repr`` writes them (``\\x1b``, ``\\n``, ``\\u202e``), so untrusted text can neither move a
terminal's cursor, recolour it, forge a log line nor reorder what is shown; and caps the length.
Text is stored as given; it is escaped only where it is shown.
"""
from __future__ import annotations


def safe_text(text: object, limit: int = 200) -> str:
    """``text`` (anything; ``str()`` of it) with non-printable characters escaped, and cut at
    ``limit`` characters of the escaped text (then ``…`` is appended)."""
    s = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))
    return s if len(s) <= limit else s[:limit] + "…"
