"""CAN frames → samples: the config's ``can`` section applied to a cantools database.

Pure: no I/O, no clock (a sample's time is its frame's time). A :class:`CanDecoder` is built once
per config (PROTOCOL §4 ``can``) and per DBC, and replaced whole when a new config arrives, so the
lookup tables are never edited in place (the stale-lookup trap of ``cantools.Database.refresh``).

Hot path (:meth:`CanDecoder.feed_into`): one dict lookup for an unconfigured id, a length check
and one ``Message.decode_simple`` (codecs compiled by cantools ahead of time) for a configured one.
Only configured ids are decoded; ids in the DBC whose length does not match are counted per id
and skipped (a DBC that does not fit the car must not crash or mis-decode); ids outside the DBC
are counted in total.

Sampling per signal (``period_s``):

* ``period_s > 0``: time is cut into slots of ``period_s`` (aligned to the epoch, so a fleet samples
  on the same grid and rates do not drift); the first frame of each slot emits the signal's current
  value, the rest of the slot emits nothing — at most one sample per period, and never a value older
  than the frame that carried it.
* ``period_s == 0``: on change — the first value, then each value that differs from the last one
  emitted. Holding the last sample reconstructs the signal exactly.

Multiplexed messages: a configured signal that the frame's multiplexer value does not carry simply
yields nothing for that frame. A multiplexer value the DBC does not know is a decode error (counted
per id).
"""
from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from drivers.core.model import Frame, Sample

if TYPE_CHECKING:  # cantools itself is imported only where a DBC is loaded (drivers.can.load_dbc)
    from cantools.database.can import Database, Message

log = logging.getLogger(__name__)

#: Added to an extended (29-bit) id in the lookup keys so it cannot collide with an 11-bit id.
EXT_FLAG = 0x8000_0000
_STD_MASK = 0x7FF
_EXT_MASK = 0x1FFF_FFFF
_UNSET = object()


def frame_key(can_id: int, extended: bool) -> int:
    return can_id | EXT_FLAG if extended else can_id


class _Slot:
    """One configured signal: where to find it, how to sample it, what was emitted last."""

    __slots__ = ("name", "signal", "unit", "period_ms", "last_slot", "last_value")

    def __init__(self, name: str, signal: str, unit: str, period_ms: int):
        self.name = name
        self.signal = signal
        self.unit = unit
        self.period_ms = period_ms
        self.last_slot = -1
        self.last_value: Any = _UNSET


class _Entry:
    __slots__ = ("message", "length", "slots")

    def __init__(self, message: Message, slots: list[_Slot]):
        self.message = message
        self.length = message.length
        self.slots = tuple(slots)


class CanDecoder:
    """Decodes the configured signals of one DBC from a stream of :class:`~agent.model.Frame`.

    ``can_config`` is the cloud config's ``can`` section::

        {"signals": [{"name", "message", "signal", "period_s"}], "raw": {"enabled", "ids"}}

    Entries naming a message or signal the DBC lacks (or malformed entries) are listed in
    :attr:`problems` and skipped; the rest applies. ``buses``, when given, restricts *decoding*
    to frames from those bus names (one decoder per DBC when buses carry different DBCs); raw
    capture (:meth:`wants_raw`) ignores it.
    """

    def __init__(self, db: Database | None, can_config: Mapping[str, Any] | None,
                 *, buses: Collection[str] | None = None):
        self.problems: list[str] = []
        self._buses = frozenset(buses) if buses is not None else None
        cfg = can_config or {}
        per_msg: dict[int, tuple[Message, list[_Slot]]] = {}
        for i, item in enumerate(cfg.get("signals") or ()):
            slot_msg = self._resolve(db, i, item)
            if slot_msg is None:
                continue
            slot, msg = slot_msg
            key = frame_key(msg.frame_id, msg.is_extended_frame)
            per_msg.setdefault(key, (msg, []))[1].append(slot)
        self._table: dict[int, _Entry] = {k: _Entry(m, s) for k, (m, s) in per_msg.items()}
        self._dbc_len: dict[int, int] = {
            frame_key(m.frame_id, m.is_extended_frame): m.length for m in (db.messages if db else ())}

        raw = cfg.get("raw") or {}
        self.raw_enabled = bool(raw.get("enabled", False))
        ids = raw.get("ids") or []
        bad = [x for x in ids if not isinstance(x, int) or isinstance(x, bool) or not 0 <= x <= _EXT_MASK]
        if bad:
            self.problems.append(f"can.raw.ids: not CAN ids, ignored: {bad!r}")
        self.raw_ids: frozenset[int] = frozenset(x for x in ids if x not in bad)
        self._raw_all = self.raw_enabled and not ids
        # A list given only bad ids must not silently turn into "capture everything".
        self._raw_set = self.raw_ids if self.raw_enabled and not self._raw_all else frozenset()

        self._frames = 0
        self._decoded = 0
        self._unknown = 0
        self._other_bus = 0
        self._mismatch: dict[int, int] = {}
        self._decode_errors: dict[int, int] = {}
        for p in self.problems:
            log.warning("can config: %s", p)

    def _resolve(self, db: Database | None, i: int, item: Any) -> tuple[_Slot, Message] | None:
        if not isinstance(item, Mapping):
            self.problems.append(f"can.signals[{i}]: not an object, skipped")
            return None
        name, msg_name, sig_name = item.get("name"), item.get("message"), item.get("signal")
        period = item.get("period_s", 0)
        if not all(isinstance(x, str) and x for x in (name, msg_name, sig_name)):
            self.problems.append(f"can.signals[{i}]: needs text name, message and signal, skipped")
            return None
        if not isinstance(period, (int, float)) or isinstance(period, bool) or not period >= 0:
            self.problems.append(f"can.signals[{i}] {name!r}: period_s must be a number >= 0, skipped")
            return None
        if db is None:
            self.problems.append(f"can.signals[{i}] {name!r}: no DBC on these buses, skipped")
            return None
        try:
            msg = db.get_message_by_name(msg_name)
        except KeyError:
            self.problems.append(f"can.signals[{i}] {name!r}: message {msg_name!r} not in the DBC, skipped")
            return None
        try:
            sig = msg.get_signal_by_name(sig_name)
        except KeyError:
            self.problems.append(
                f"can.signals[{i}] {name!r}: signal {sig_name!r} not in message {msg_name!r}, skipped")
            return None
        if msg.is_container:
            self.problems.append(f"can.signals[{i}] {name!r}: container message {msg_name!r} unsupported, skipped")
            return None
        return _Slot(name, sig_name, sig.unit or "", round(period * 1000)), msg

    # -- hot path -------------------------------------------------------------------------------

    def feed(self, frame: Frame) -> list[Sample]:
        """The samples this frame produces (often none)."""
        out: list[Sample] = []
        self.feed_into(frame, out)
        return out

    def feed_many(self, frames: Iterable[Frame]) -> list[Sample]:
        """All samples of a batch of frames, in frame order (what a reader's consumer calls)."""
        out: list[Sample] = []
        feed_into = self.feed_into
        for frame in frames:
            feed_into(frame, out)
        return out

    def feed_into(self, frame: Frame, out: list[Sample]) -> None:
        """Appends this frame's samples to ``out`` (no list per frame): the hot-path form of :meth:`feed`."""
        self._frames += 1
        if self._buses is not None and frame.bus not in self._buses:
            self._other_bus += 1
            return
        key = frame.can_id | EXT_FLAG if frame.extended else frame.can_id
        entry = self._table.get(key)
        data = frame.data
        if entry is None:
            expected = self._dbc_len.get(key)
            if expected is None:
                self._unknown += 1
            elif len(data) != expected:
                self._mismatch[key] = self._mismatch.get(key, 0) + 1
            return
        if len(data) != entry.length:
            self._mismatch[key] = self._mismatch.get(key, 0) + 1
            return
        try:
            values = entry.message.decode_simple(data, False, True, False, True)
        except Exception:  # cantools raises DecodeError, bitstruct errors, ValueError...
            self._decode_errors[key] = self._decode_errors.get(key, 0) + 1
            return
        self._decoded += 1
        t_ms = frame.t_us // 1000
        for slot in entry.slots:
            value = values.get(slot.signal)
            if value is None:  # not carried by this multiplexer value
                continue
            period = slot.period_ms
            if period:
                n = t_ms // period
                if n == slot.last_slot:
                    continue
                slot.last_slot = n
            else:
                if value == slot.last_value:
                    continue
                slot.last_value = value
            out.append(Sample(slot.name, slot.unit, t_ms, float(value)))

    def wants_raw(self, frame: Frame) -> bool:
        """Whether raw capture (``can.raw``) keeps this frame."""
        return self._raw_all or frame.can_id in self._raw_set

    # -- introspection --------------------------------------------------------------------------

    @property
    def stats(self) -> dict[str, Any]:
        """Counters since this decoder was built. Per-id maps are keyed by the CAN id."""
        return {
            "frames": self._frames,
            "decoded": self._decoded,
            "unknown_id": self._unknown,
            "other_bus": self._other_bus,
            "length_mismatch": {k & _EXT_MASK: n for k, n in self._mismatch.items()},
            "decode_error": {k & _EXT_MASK: n for k, n in self._decode_errors.items()},
        }

    @property
    def configured_ids(self) -> list[tuple[int, bool]]:
        """(CAN id, extended) of every message a configured signal lives in."""
        return sorted((k & _EXT_MASK, bool(k & EXT_FLAG)) for k in self._table)

    @property
    def can_filters(self) -> list[dict[str, Any]] | None:
        """python-can acceptance filters for what this config needs.

        ``None`` when raw capture wants every id (no filtering). Otherwise one exact-match filter
        per configured message and raw id (a raw id above 0x7FF is taken as extended, one below
        matches both forms). ``[]`` means nothing is wanted; note python-can treats ``[]`` as
        "no filtering", so a caller with nothing configured should rather not read the bus.
        """
        if self._raw_all:
            return None
        wanted: set[tuple[int, bool]] = set(self.configured_ids)
        for can_id in self._raw_set:
            wanted.add((can_id, True))
            if can_id <= _STD_MASK:
                wanted.add((can_id, False))
        return [{"can_id": i, "can_mask": _EXT_MASK if ext else _STD_MASK, "extended": ext}
                for i, ext in sorted(wanted)]


def decoder_from_dbc_text(dbc_text: str, can_config: Mapping[str, Any] | None, **kw: Any) -> CanDecoder:
    """Convenience for tests and tools: a decoder from DBC text (parsed with ``strict=False``)."""
    import cantools
    db = cantools.database.load_string(dbc_text, database_format="dbc", strict=False)
    return CanDecoder(db, can_config, **kw)
