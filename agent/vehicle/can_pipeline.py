"""Raw CAN to samples and frames: the buses of the local settings, decoded per the cloud config.

One :class:`~agent.vehicle.can_decode.CanDecoder` per DBC (buses sharing a DBC share a decoder);
buses without a DBC only feed raw capture. A new config builds new decoders and swaps them in
whole, then pushes the matching acceptance filters down to the interfaces that filter in the
kernel (SocketCAN: ids nobody configured never reach Python). The other interfaces (slcan,
udp_multicast, virtual) get none: python-can filters them in software, one Python loop over the
filters per frame inside ``recv()``, which costs more than the decoders skipping an
unconfigured id (counted in one C pass per batch).

Frames travel as :class:`~drivers.core.model.FrameBatch` (one bus, columns): the reader's batch
goes to the listeners, the decoders and, for what raw capture keeps, to ``put_frames`` as is.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from agent.vehicle.can_decode import CanDecoder
from drivers.core.model import FrameBatch, Sample
from drivers.can import CanReader, load_dbc

if TYPE_CHECKING:
    from cantools.database.can import Database

log = logging.getLogger(__name__)

#: python-can interfaces that filter in the kernel (module docstring).
KERNEL_FILTERS = frozenset({"socketcan"})


class CanPipeline:
    def __init__(self, bus_settings: Sequence[Mapping[str, Any]], can_config: Mapping[str, Any] | None,
                 *, put_samples: Callable[[list[Sample]], None], put_frames: Callable[[FrameBatch], None],
                 frame_listeners: Sequence[Callable[[FrameBatch], None]] = (),
                 clock_us: Callable[[], int] | None = None):
        """``clock_us``: the agent's clock, which stamps frames whose own timestamp it does not
        trust (drivers/can.py ``trusted_timestamp``)."""
        self._put_samples = put_samples
        self._put_frames = put_frames
        # Every received frame, before decoding (e.g. bus activity for power management).
        self.frame_listeners: list[Callable[[FrameBatch], None]] = list(frame_listeners)
        self._captures: list[Callable[[FrameBatch], None]] = []
        self._can_config = can_config
        # One decoder per DBC (None: buses without one, raw capture only).
        self._groups: dict[str | None, tuple[Database | None, list[str]]] = {}
        #: Buses whose interface applies acceptance filters in the kernel.
        self._kernel_filtered = {b["name"] for b in bus_settings if b.get("interface") in KERNEL_FILTERS}
        for b in bus_settings:
            path = b.get("dbc")
            if path not in self._groups:
                self._groups[path] = (load_dbc(path) if path else None, [])
            self._groups[path][1].append(b["name"])
        self._decoders: list[CanDecoder] = []
        self.problems: list[str] = []
        self.apply_can_config(can_config)
        self.reader = CanReader.from_settings(bus_settings, self._on_frames, self._filters(), clock_us=clock_us)

    def apply_config(self, doc: Mapping[str, Any]) -> list[str]:
        """The ``can`` part of a cloud config (PROTOCOL §4)."""
        return self.apply_can_config(doc.get("can"))

    def apply_can_config(self, can_config: Mapping[str, Any] | None) -> list[str]:
        self._can_config = can_config
        decoders = [CanDecoder(db, can_config, buses=names) for db, names in self._groups.values()]
        # A signal is a problem only if no DBC has it; raw-id problems are the same for all.
        # Buses without a DBC have no say while some bus has one.
        voters = [d for d, (db, _) in zip(decoders, self._groups.values()) if db is not None] or decoders
        problems = set(voters[0].problems) if voters else set()
        for d in voters[1:]:
            problems &= set(d.problems)
        self._decoders = decoders  # swapped whole: the receive path never sees a half-built table
        self.problems = sorted(problems)
        if hasattr(self, "reader") and not self._captures:
            self.reader.set_filters(self._filters())
        return self.problems

    def _filters(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for d, (_, names) in zip(self._decoders, self._groups.values()):
            f = d.can_filters
            for name in names:
                # None = receive everything (raw capture of all ids, or no kernel filtering).
                # python-can reads [] as "no filtering" too, so a bus with nothing configured
                # is read and ignored.
                out[name] = (f or None) if name in self._kernel_filtered else None
        return out

    def add_capture(self, listener: Callable[[FrameBatch], None]) -> Callable[[], None]:
        """``listener(batch)`` sees every frame the buses receive (iterate a batch for
        :class:`~drivers.core.model.Frame` objects), the acceptance filters
        lifted while any capture runs (``dongle capture``). Returns the function that ends it."""
        if not self._captures:
            self.reader.set_filters(None)
        self._captures.append(listener)

        def remove() -> None:
            if listener in self._captures:
                self._captures.remove(listener)
            if not self._captures:
                self.reader.set_filters(self._filters())
        return remove

    def _on_frames(self, batch: FrameBatch) -> None:
        for listener in (*self.frame_listeners, *self._captures):
            listener(batch)
        decoders = self._decoders
        if not decoders:
            return
        samples: list[Sample] = []
        for d in decoders:
            d.decode_batch(batch, samples)
        if samples:
            self._put_samples(samples)
        raw = decoders[0].raw_of(batch)
        if raw is not None:
            self._put_frames(raw)

    def start(self) -> None:
        self.reader.start()

    def stop(self) -> None:
        self.reader.stop()

    def status(self) -> dict:
        return {"buses": self.reader.status(), "decoders": [d.stats for d in self._decoders],
                "problems": self.problems}
