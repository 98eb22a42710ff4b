"""CAN frames → samples: the config's ``can`` section applied to a cantools database.

Pure: no I/O, no clock (a sample's time is its frame's time). A :class:`CanDecoder` is built once
per config (PROTOCOL §4 ``can``) and per DBC, and replaced whole when a new config arrives, so the
lookup tables are never edited in place (the stale-lookup trap of ``cantools.Database.refresh``).

Hot path (:meth:`CanDecoder.decode_batch`, one :class:`~drivers.core.model.FrameBatch` of one
bus at a time): the frames of configured ids are picked out in one pass, the rest are only
counted (ids outside the DBC in total, DBC ids whose length does not match per id: a DBC that
does not fit the car must not crash or mis-decode). A configured frame is decoded (one
``Message.decode_simple``, codecs compiled by cantools ahead of time) only when one of its
signals is due: a frame inside every periodic signal's current slot, before any heartbeat and
with the same bytes as the frame last decoded for an on-change signal, cannot emit anything.

Sampling per signal (``period_s``):

* ``period_s > 0``: time is cut into slots of ``period_s`` (aligned to the epoch, so a fleet samples
  on the same grid and rates do not drift); the first frame of each slot emits the signal's current
  value, the rest of the slot emits nothing — at most one sample per period, and never a value older
  than the frame that carried it.
* ``period_s == 0``: on change — the first value, then each value that differs from the last one
  emitted, and the value again when ``heartbeat_s`` (default :data:`HEARTBEAT_S`, an agent
  extension of PROTOCOL §4, docs/protocol.md) has passed since the last sample of that signal, so a
  constant value is still seen. Holding the last sample reconstructs the signal exactly. Time
  going back (a replay starting over) samples again at once, in both modes.

Multiplexed messages: a configured signal that the frame's multiplexer value does not carry simply
yields nothing for that frame. A multiplexer value the DBC does not know is a decode error (counted
per id).
"""
from __future__ import annotations

import collections
import logging
from collections.abc import Collection, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from drivers.core.model import EXT_FLAG, Frame, FrameBatch, Sample

if TYPE_CHECKING:  # cantools itself is imported only where a DBC is loaded (drivers.can.load_dbc)
    from cantools.database.can import Database, Message

log = logging.getLogger(__name__)

_STD_MASK = 0x7FF
_EXT_MASK = 0x1FFF_FFFF
_UNSET = object()
#: Default heartbeat of an on-change signal (``period_s`` 0): its value is sent again after this
#: long without a change (per signal: ``heartbeat_s``).
HEARTBEAT_S = 60.0


def frame_key(can_id: int, extended: bool) -> int:
    return can_id | EXT_FLAG if extended else can_id


class _Slot:
    """One configured signal: where to find it, how to sample it, what was emitted last."""

    __slots__ = ("name", "signal", "unit", "period_ms", "heartbeat_ms", "last_slot", "last_value", "last_ms")

    def __init__(self, name: str, signal: str, unit: str, period_ms: int, heartbeat_ms: int):
        self.name = name
        self.signal = signal
        self.unit = unit
        self.period_ms = period_ms
        self.heartbeat_ms = heartbeat_ms
        self.last_slot = -1
        self.last_value: Any = _UNSET
        self.last_ms = 0

    def quiet(self) -> tuple[int, int]:
        """[lo, hi): the frame times (ms) at which this signal cannot emit unless its value changed."""
        if self.period_ms:
            return self.last_slot * self.period_ms, (self.last_slot + 1) * self.period_ms
        if self.last_value is _UNSET:
            return 0, 0
        return self.last_ms, self.last_ms + self.heartbeat_ms


class _Entry:
    """A configured message: its signals, and when a frame of it may be skipped undecoded."""

    __slots__ = ("message", "length", "slots", "on_change", "lo", "hi", "last_data")

    def __init__(self, message: Message, slots: list[_Slot]):
        self.message = message
        self.length = message.length
        self.slots = tuple(slots)
        self.on_change = any(not s.period_ms for s in slots)
        self.lo = self.hi = 0       # nothing decoded yet: every frame is due
        self.last_data: bytes | None = None

    def settle(self) -> None:
        windows = [s.quiet() for s in self.slots]
        self.lo = max(lo for lo, _ in windows)
        self.hi = min(hi for _, hi in windows)


class CanDecoder:
    """Decodes the configured signals of one DBC from :class:`~drivers.core.model.FrameBatch`es.

    ``can_config`` is the cloud config's ``can`` section::

        {"signals": [{"name", "message", "signal", "period_s", ["heartbeat_s"]}],
         "raw": {"enabled", "ids"}}

    Entries naming a message or signal the DBC lacks (or malformed entries) are listed in
    :attr:`problems` and skipped; the rest applies. ``buses``, when given, restricts *decoding*
    to frames from those bus names (one decoder per DBC when buses carry different DBCs); raw
    capture (:meth:`raw_of`) ignores it.
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
        # Frame keys raw capture keeps (an id below 0x800 in the list matches both forms).
        self._raw_keys = frozenset(k for x in self._raw_set
                                   for k in ((x, x | EXT_FLAG) if x <= _STD_MASK else (x | EXT_FLAG,)))

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
        heartbeat = item.get("heartbeat_s", HEARTBEAT_S)
        if not all(isinstance(x, str) and x for x in (name, msg_name, sig_name)):
            self.problems.append(f"can.signals[{i}]: needs text name, message and signal, skipped")
            return None
        if not isinstance(period, (int, float)) or isinstance(period, bool) or not period >= 0:
            self.problems.append(f"can.signals[{i}] {name!r}: period_s must be a number >= 0, skipped")
            return None
        if not isinstance(heartbeat, (int, float)) or isinstance(heartbeat, bool) or not heartbeat > 0:
            self.problems.append(f"can.signals[{i}] {name!r}: heartbeat_s must be a number > 0, skipped")
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
        return _Slot(name, sig_name, sig.unit or "", round(period * 1000), max(1, round(heartbeat * 1000))), msg

    # -- hot path -------------------------------------------------------------------------------

    def feed(self, frame: Frame) -> list[Sample]:
        """The samples this frame produces (often none)."""
        return self.feed_many([frame])

    def feed_many(self, frames: Iterable[Frame] | FrameBatch) -> list[Sample]:
        """All samples of some frames, in frame order per bus."""
        out: list[Sample] = []
        for batch in [frames] if isinstance(frames, FrameBatch) else FrameBatch.of(frames):
            self.decode_batch(batch, out)
        return out

    def decode_batch(self, batch: FrameBatch, out: list[Sample]) -> None:
        """Appends the samples of one bus's batch to ``out``, in frame order."""
        n = len(batch)
        self._frames += n
        if self._buses is not None and batch.bus not in self._buses:
            self._other_bus += n
            return
        keys, data = batch.keys, batch.data
        table, dbc_len = self._table, self._dbc_len
        # Counted in one pass (C): frames per (key, length) tell unknown ids and DBC mismatches.
        for (key, length), count in collections.Counter(zip(keys, map(len, data))).items():
            expected = dbc_len.get(key)
            if expected is None:
                self._unknown += count
            elif length != expected:
                self._mismatch[key] = self._mismatch.get(key, 0) + count
        if not table:
            return
        t_us = batch.t_us
        for i in [i for i, k in enumerate(keys) if k in table]:
            entry = table[keys[i]]
            d = data[i]
            if len(d) != entry.length:
                continue
            t_ms = t_us[i] // 1000
            if entry.lo <= t_ms < entry.hi and not (entry.on_change and d != entry.last_data):
                continue
            self._decode(entry, keys[i], d, t_ms, out)

    def _decode(self, entry: _Entry, key: int, data, t_ms: int, out: list[Sample]) -> None:
        try:
            values = entry.message.decode_simple(data, False, True, False, True)
        except Exception:  # cantools raises DecodeError, bitstruct errors, ValueError...
            self._decode_errors[key] = self._decode_errors.get(key, 0) + 1
            return
        self._decoded += 1
        entry.last_data = bytes(data)
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
                if value == slot.last_value and slot.last_ms <= t_ms < slot.last_ms + slot.heartbeat_ms:
                    continue
                slot.last_value = value
                slot.last_ms = t_ms
            out.append(Sample(slot.name, slot.unit, t_ms, float(value)))
        entry.settle()

    def raw_of(self, batch: FrameBatch) -> FrameBatch | None:
        """The frames of ``batch`` that raw capture (``can.raw``) keeps, None for none."""
        if self._raw_all:
            return batch
        keep = self._raw_keys
        if not keep:
            return None
        index = [i for i, k in enumerate(batch.keys) if k in keep]
        if not index:
            return None
        return batch if len(index) == len(batch) else batch.take(index)

    def wants_raw(self, frame: Frame) -> bool:
        """Whether raw capture (``can.raw``) keeps this frame."""
        return self._raw_all or frame_key(frame.can_id, frame.extended) in self._raw_keys

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
