"""Replays a CAN recording onto a python-can bus (the car twin for tests, the demo and the bench).

Any format ``can.LogReader`` reads works (candump ``.log``, ``.asc``, ``.blf``, ``.trc``, also
gzipped); ``can.MessageSync`` keeps the recorded spacing, divided by ``speed``. Recorded timestamps
are whatever the recorder used (seconds since boot in comma2k19): the receiving side stamps the
frames with its own live clock (a virtual bus restamps on send, a kernel socket on receive).

    python -m scripts.vehicle_sim.replay FILE --interface virtual --channel X [--speed N] [--loop] [--only can0]
"""
from __future__ import annotations

import argparse
import logging
import sys
import signal
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import can

log = logging.getLogger(__name__)


@dataclass
class ReplayStats:
    sent: int = 0
    failed: int = 0
    skipped: int = 0   # recorded channels not selected, error frames
    passes: int = 0


class Sender:
    """Sends frames by recorded channel: ``bus`` and ``channel_map`` as :func:`replay` takes them.
    A failed send (full kernel buffer, adapter gone) is counted and logged once per
    :meth:`new_pass`; frames of unselected channels are counted as skipped. Shared with
    scripts/vehicle_sim/can_twin.py."""

    def __init__(self, bus: can.BusABC | Mapping[str, can.BusABC],
                 channel_map: Mapping[str, str] | None, stats: ReplayStats, *,
                 send_timeout_s: float = 1.0, what: str = "replay"):
        self.bus = bus
        self.channel_map = channel_map
        self.stats = stats
        self.send_timeout_s = send_timeout_s
        self.what = what
        self._single = isinstance(bus, can.BusABC)
        self._errors_logged = False

    def new_pass(self) -> None:
        self._errors_logged = False

    def send(self, msg: can.Message, channel: str) -> None:
        channel_map = self.channel_map
        if self._single:
            if channel_map is not None and channel not in channel_map:
                self.stats.skipped += 1
                return
            target = self.bus
        else:
            target = self.bus.get(channel_map.get(channel, "") if channel_map is not None else channel)
            if target is None:
                self.stats.skipped += 1
                return
        try:
            target.send(msg, timeout=self.send_timeout_s)
            self.stats.sent += 1
        except can.CanError as e:
            self.stats.failed += 1
            if not self._errors_logged:
                log.warning("%s: send failed (%s); counting further failures", self.what, e)
                self._errors_logged = True


def _scaled(messages: Iterable[can.Message], speed: float) -> Iterator[can.Message]:
    t0: float | None = None
    for msg in messages:
        if t0 is None:
            t0 = msg.timestamp
        msg.timestamp = t0 + (msg.timestamp - t0) / speed
        yield msg


def replay(log_path: str | Path, bus: can.BusABC | Mapping[str, can.BusABC], speed: float = 1.0,
           channel_map: Mapping[str, str] | None = None, loop: bool = False,
           stop_event: threading.Event | None = None, send_timeout_s: float = 1.0) -> ReplayStats:
    """Sends the recording's frames onto ``bus``; returns what was sent.

    ``speed``: 1.0 = recorded pace, 2.0 = twice as fast, 0 = as fast as possible.
    ``bus``: one bus for every frame, or a map name → bus. ``channel_map`` maps a recorded channel
    (``"can0"``) to a name in that map; with a single bus it selects which recorded channels are
    sent (the values are ignored). Without a map every recorded channel goes to the single bus
    (with a bus map, a recorded channel is sent to the bus of the same name, others are skipped).
    A failed send (full kernel buffer, adapter gone) is logged once per pass and counted; the
    replay carries on. ``stop_event`` ends it between frames.
    """
    if speed < 0:
        raise ValueError("speed must be >= 0")
    stats = ReplayStats()
    sender = Sender(bus, channel_map, stats, send_timeout_s=send_timeout_s)
    while True:
        sender.new_pass()
        with can.LogReader(str(log_path)) as reader:
            messages: Iterable[can.Message] = reader
            if speed > 0:
                messages = can.MessageSync(_scaled(reader, speed) if speed != 1.0 else reader,
                                           timestamps=True, skip=1.0)
            for msg in messages:
                if stop_event is not None and stop_event.is_set():
                    return stats
                if msg.is_error_frame:
                    stats.skipped += 1
                    continue
                sender.send(msg, str(msg.channel) if msg.channel is not None else "")
        stats.passes += 1
        if not loop or (stop_event is not None and stop_event.is_set()):
            return stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.vehicle_sim.replay", description=__doc__.split("\n\n")[0])
    p.add_argument("file", help="recording: .log (candump -L), .asc, .blf, ... optionally .gz")
    p.add_argument("--interface", default="virtual", help="python-can interface (default virtual)")
    p.add_argument("--channel", required=True, help="channel of that interface, e.g. vcan0")
    p.add_argument("--bitrate", type=int, default=None)
    p.add_argument("--port", type=int, default=None, help="udp_multicast: UDP port")
    p.add_argument("--speed", type=float, default=1.0, help="1 = recorded pace, 0 = as fast as possible")
    p.add_argument("--loop", action="store_true", help="start over at the end, until interrupted")
    p.add_argument("--only", action="append", metavar="CHANNEL",
                   help="replay only this recorded channel (repeatable), e.g. --only can0")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    kwargs = {"interface": args.interface, "channel": args.channel}
    if args.bitrate:
        kwargs["bitrate"] = args.bitrate
    if args.port:
        kwargs["port"] = args.port
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with can.Bus(**kwargs) as bus:
        try:
            stats = replay(args.file, bus, speed=args.speed,
                           channel_map={c: c for c in args.only} if args.only else None,
                           loop=args.loop, stop_event=stop)
        except KeyboardInterrupt:
            stop.set()
            return 130
    print(f"sent {stats.sent} frames in {stats.passes} pass(es); failed {stats.failed}, "
          f"skipped {stats.skipped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
