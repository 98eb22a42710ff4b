"""``dongle capture`` (raw CAN frames to a candump log) and ``dongle decode`` (a log's frames
through a DBC, offline): docs/technician.md §7.

``decode`` reads candump, ASC, BLF (and the other formats of python-can's ``can.LogReader``,
gzipped too) and decodes with the agent's own decoder (agent/vehicle/can_decode.CanDecoder),
so the samples are those telemetry would carry: the same sampling (``--period``, the cloud
config's ``period_s``; 0 = on change), names ``MESSAGE.SIGNAL``, the DBC's units, values at the
signal's resolution.
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

from agent.cli.common import EXIT_USAGE, ProgressBar, add_command, emit, fail, note, settings_of
from agent.settings import Settings
from agent.technician import control, resolution
from agent.technician.control import AgentNotRunning, ClientError


class Progress(ProgressBar):
    """The capture's bar: seconds of the capture and frames so far."""

    def __init__(self, total_s: float, enabled: bool):
        super().__init__(enabled)
        self.total_s = total_s

    def show(self, elapsed_s: float, frames: int) -> None:  # type: ignore[override]
        frac = elapsed_s / self.total_s if self.total_s else 1.0
        super().show(frac, f"{elapsed_s:5.1f}/{self.total_s:g} s  {frames} frames")


def _writer(out: str):
    import can
    return can.CanutilsLogWriter(out)


def _message(bus: str, t_us: int, can_id: int, ext: bool, data: bytes):
    import can
    return can.Message(timestamp=t_us / 1e6, arbitration_id=can_id, is_extended_id=bool(ext), data=data, channel=bus)


def _capture_direct(args, s: Settings, progress: Progress) -> dict:
    from drivers.can import open_bus
    buses = [b for b in s.can.buses if not args.bus or b.get("name") in args.bus]
    if not buses:
        raise ClientError("no_adapter", f"no adapter: no CAN bus {'named ' + ', '.join(args.bus) + ' ' if args.bus else ''}"
                                        f"is configured in {s.path} ([[can.buses]])")
    opened = []
    try:
        for b in buses:
            try:
                opened.append((b["name"], open_bus(b)))
            except Exception as e:
                raise ClientError("no_adapter", f"no adapter: cannot open CAN bus {b['name']} "
                                                f"({b.get('interface')} {b.get('channel', '')}): {e}") from None
        writer = _writer(args.out)
        n, start = 0, time.monotonic()
        try:
            while (elapsed := time.monotonic() - start) < args.seconds:
                got = False
                for name, bus in opened:
                    msg = bus.recv(0.05 if len(opened) == 1 else 0.0)
                    if msg is not None and not msg.is_error_frame:
                        msg.channel = name
                        writer.on_message_received(msg)
                        n += 1
                        got = True
                if not got and len(opened) > 1:
                    time.sleep(0.005)
                progress.show(elapsed, n)
        finally:
            writer.stop()
        return {"frames": n, "buses": [name for name, _ in opened], "seconds": args.seconds, "via": "direct"}
    finally:
        for _, bus in opened:
            bus.shutdown()


def cmd_capture(args: argparse.Namespace) -> int:
    if args.seconds <= 0:
        print("dongle: --seconds must be above 0", file=sys.stderr)
        return EXIT_USAGE
    progress = Progress(args.seconds, not args.json)
    try:
        s = settings_of(args)
        try:
            if args.direct:
                raise AgentNotRunning("no_agent", "direct capture asked for")
            writer = None
            count = [0]

            def interim(m: dict) -> None:
                nonlocal writer
                if writer is None:
                    writer = _writer(args.out)
                for bus, t_us, can_id, ext, data in m.get("frames", []):
                    if args.bus and bus not in args.bus:
                        continue
                    writer.on_message_received(_message(bus, t_us, can_id, ext, bytes.fromhex(data)))
                    count[0] += 1
                progress.show(m.get("elapsed_s", 0.0), count[0])

            try:
                res = control.call(s.control.socket, "capture", timeout=args.seconds + 30, on_interim=interim,
                                   group=s.control.group, seconds=args.seconds)
            finally:
                if writer is not None:
                    writer.stop()
            if writer is None:
                _writer(args.out).stop()  # an empty capture is still a (valid, empty) file
            res = {**res, "frames": count[0], "via": "agent"}
        except AgentNotRunning:
            res = _capture_direct(args, s, progress)
    except ClientError as e:
        progress.done()
        return fail(args, e)
    except OSError as e:
        progress.done()
        return fail(args, ClientError("failed", f"cannot write {args.out}: {e.strerror or e}"))
    progress.done()
    res["out"] = str(args.out)
    return emit(args, res, lambda r: f"{r['frames']} frames from {', '.join(r['buses']) or 'no bus'} in "
                                     f"{args.seconds:g} s written to {args.out} (candump log, {r['via']})")


# --------------------------------------------------------------------------------------------
# decode
# --------------------------------------------------------------------------------------------

def _wanted_signals(db, names: list[str] | None) -> list[tuple[str, str, float | None, str]]:
    """``(message, signal, resolution, unit)`` for ``--signal`` names (``SIGNAL`` or
    ``MESSAGE.SIGNAL``), or every signal of the DBC."""
    every = [(m.name, sig.name, resolution.can_signal_step(sig), sig.unit or "")
             for m in db.messages if not m.is_container for sig in m.signals]
    if not names:
        return every
    out = []
    for name in names:
        msg, _, sig = name.rpartition(".")
        found = [w for w in every if w[1] == sig and (not msg or w[0] == msg)]
        if not found:
            raise ClientError("bad_request", f"no signal {name!r} in the DBC (give SIGNAL or MESSAGE.SIGNAL)")
        if len(found) > 1:
            raise ClientError("bad_request", f"signal {name!r} is in several messages "
                                             f"({', '.join(w[0] for w in found)}): give MESSAGE.SIGNAL")
        out += [w for w in found if w not in out]
    return out


def _frames(path: str, skipped: list[int]):
    """The data frames of a log as the agent's Frames (bus = the log's channel, time = the log's)."""
    import can
    from drivers.core.model import Frame
    for msg in can.LogReader(path):
        if msg.is_error_frame or msg.is_remote_frame:
            skipped[0] += 1
            continue
        yield Frame("" if msg.channel is None else str(msg.channel), int(round(msg.timestamp * 1e6)),
                    msg.arbitration_id, bool(msg.is_extended_id), bytes(msg.data))


def decode_log(path: str, db, wanted, *, period_s: float, buses: list[str] | None):
    """Yields ``{"t_s", "name", "value", "unit"}`` per sample, then returns the decoder's counts."""
    from agent.vehicle.can_decode import CanDecoder
    config = {"signals": [{"name": f"{m}.{sig}", "message": m, "signal": sig, "period_s": period_s}
                          for m, sig, _, _ in wanted], "raw": {"enabled": False}}
    decoder = CanDecoder(db, config, buses=buses or None)
    steps = {f"{m}.{sig}": step for m, sig, step, _ in wanted}
    skipped = [0]
    batch = []
    for frame in _frames(path, skipped):
        batch.append(frame)
        if len(batch) >= 1000:
            yield from _samples(decoder.feed_many(batch), steps)
            batch = []
    yield from _samples(decoder.feed_many(batch), steps)
    return {**decoder.stats, "error_or_remote_frames": skipped[0], "problems": decoder.problems}


def _samples(samples, steps):
    for s in samples:
        yield {"t_s": s.t_ms / 1000, "name": s.name, "value": resolution.shown(s.value, steps.get(s.name)),
               "unit": s.unit}


def _clock_time(t_s: float) -> str:
    """A sample's time for people: the local time of day where the log has epoch times (a
    capture by the dongle), else the log's own seconds (time since the logger booted)."""
    if 1_500_000_000 <= t_s <= 4_102_444_800:
        return time.strftime("%H:%M:%S", time.localtime(t_s)) + f".{int(t_s * 1000) % 1000:03d}"
    return f"{t_s:.3f}"


def _summary(stats: dict, n: int, log: str) -> str:
    out = f"{n} samples from {stats.get('frames', 0)} frames of {log} ({stats.get('decoded', 0)} decoded"
    if stats.get("unknown_id"):
        out += f", {stats['unknown_id']} of ids not in the DBC"
    if stats.get("other_bus"):
        out += f", {stats['other_bus']} of other buses"
    out += ")"
    for key, what in (("length_mismatch", "length differs from the DBC"), ("decode_error", "cannot be decoded")):
        if stats.get(key):
            out += f"\n{what}: " + ", ".join(f"0x{i:X} ({c} frames)" for i, c in sorted(stats[key].items()))
    return out


def cmd_decode(args: argparse.Namespace) -> int:
    from drivers.can import DbcError, load_dbc
    if args.period < 0:
        print("dongle: --period must not be negative", file=sys.stderr)
        return EXIT_USAGE
    if args.json and args.csv:
        print("dongle: --json or --csv, not both", file=sys.stderr)
        return EXIT_USAGE
    try:
        if not Path(args.log).is_file():
            raise ClientError("no_file", f"no log file {args.log}")
        try:
            db = load_dbc(args.dbc)
        except DbcError as e:
            raise ClientError("bad_file", str(e)) from None
        wanted = _wanted_signals(db, args.signal)
        steps = {f"{m}.{sig}": step for m, sig, step, _ in wanted}
        samples = decode_log(args.log, db, wanted, period_s=args.period, buses=args.bus)
        if args.json:
            out, stats = [], {}
            while True:
                try:
                    out.append(next(samples))
                except StopIteration as stop:
                    stats = stop.value
                    break
            return emit(args, {"log": str(args.log), "dbc": str(args.dbc), "period_s": args.period,
                               "signals": {name: {"resolution": step} for name, step in steps.items()},
                               "samples": out, "stats": stats})
        writer = csv.writer(sys.stdout, lineterminator="\n") if args.csv else None
        if writer:
            writer.writerow(["t_s", "signal", "value", "unit"])
        else:
            print(f"{'time':>14}  {'signal':<40}  {'value':>12}  unit")
        n = 0
        while True:
            try:
                s = next(samples)
            except StopIteration as stop:
                stats = stop.value
                break
            n += 1
            value = resolution.text(s["value"], steps.get(s["name"]))
            if writer:
                writer.writerow([f"{s['t_s']:.3f}", s["name"], value, s["unit"]])
            else:
                print(f"{_clock_time(s['t_s']):>14}  {s['name']:<40}  {value:>12}  {s['unit']}")
        sys.stdout.flush()
        note(_summary(stats, n, args.log))
        return 0
    except ClientError as e:
        return fail(args, e)
    except BrokenPipeError:   # stdout's reader went away (main.py ends quietly)
        raise
    except (OSError, ValueError) as e:   # python-can: an unknown suffix, an unreadable or damaged log
        return fail(args, ClientError("bad_file", f"cannot read {args.log}: {e}"))


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "capture", help="record raw CAN frames to a candump log file")
    p.add_argument("--seconds", type=float, required=True, metavar="N")
    p.add_argument("--out", required=True, metavar="FILE", help="candump -L log file to write")
    p.add_argument("--bus", action="append", metavar="NAME", help="only this bus (repeatable)")
    p.add_argument("--direct", action="store_true",
                   help="open the interfaces here even if the agent runs (socketcan allows both)")
    p.set_defaults(func=cmd_capture)

    p = add_command(sub, "decode", help="decode a CAN log (candump, ASC, BLF) with a DBC, as telemetry would",
                    description="Read LOG with python-can's log readers (candump -L .log, .asc, .blf, .csv, "
                                ".trc, also gzipped) and decode it with the agent's own decoder: the samples "
                                "telemetry would carry for these signals (names MESSAGE.SIGNAL, the DBC's "
                                "units, values at each signal's resolution). A summary goes to stderr.")
    p.add_argument("log", metavar="LOG", help="the capture, e.g. from dongle capture")
    p.add_argument("--dbc", required=True, metavar="FILE", help="the DBC to decode with")
    p.add_argument("--signal", action="append", metavar="NAME",
                   help="SIGNAL or MESSAGE.SIGNAL, repeatable (default: every signal of the DBC)")
    p.add_argument("--bus", action="append", metavar="NAME",
                   help="decode only frames of this channel of the log, repeatable (default: all)")
    p.add_argument("--period", type=float, default=0.0, metavar="S",
                   help="sample as the cloud config's period_s would: at most one value per S seconds "
                        "(default 0: every change)")
    p.add_argument("--csv", action="store_true", help="CSV on stdout: t_s,signal,value,unit")
    p.set_defaults(func=cmd_decode)

