"""``dongle capture``: raw CAN frames to a candump log (docs/technician.md §7)."""
from __future__ import annotations

import argparse
import sys
import time

from agent.cli.common import EXIT_USAGE, add_command, emit, fail, settings_of
from agent.settings import Settings
from agent.technician import control
from agent.technician.control import AgentNotRunning, ClientError


class Progress:
    """A one-line progress bar on stderr (only when it is a terminal)."""

    def __init__(self, total_s: float, enabled: bool):
        self.total_s = total_s
        self.enabled = enabled and sys.stderr.isatty()

    def show(self, elapsed_s: float, frames: int) -> None:
        if not self.enabled:
            return
        frac = min(1.0, elapsed_s / self.total_s) if self.total_s else 1.0
        bar = "#" * int(frac * 30)
        print(f"\r[{bar:<30}] {elapsed_s:5.1f}/{self.total_s:g} s  {frames} frames", end="",
              file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.enabled:
            print(file=sys.stderr)


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


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "capture", help="record raw CAN frames to a candump log file")
    p.add_argument("--seconds", type=float, required=True, metavar="N")
    p.add_argument("--out", required=True, metavar="FILE", help="candump -L log file to write")
    p.add_argument("--bus", action="append", metavar="NAME", help="only this bus (repeatable)")
    p.add_argument("--direct", action="store_true",
                   help="open the interfaces here even if the agent runs (socketcan allows both)")
    p.set_defaults(func=cmd_capture)

