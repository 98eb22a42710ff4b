"""CAN path capacity on the real RAV4 drive (comma2k19, 135,468 frames per pass).

Stages, each repeated to at least ``--frames`` frames (default 1e6):

1. ``logreader``: a bare ``can.LogReader`` loop over the decompressed candump log — the floor
   any reader of this text pays.
2. ``pipeline``: the same LogReader loop, each message converted to ``Frame`` exactly as the live
   reader does (``drivers.can.frame_from_message``), batched like ``CanReader`` delivers, decoded by
   ``CanDecoder`` (about 20 DBC signals at 0.1 s periods) and every frame kept by raw capture in
   per-bus columns (PROTOCOL §4 telemetry ``frames``). Target: >= 100,000 frames/s and >= 40 % of
   stage 1.
3. ``pipeline-only``: stage 2 without the text parsing (messages preloaded in memory): the capacity
   of our own code.

Recorded timestamps are seconds since boot; the bench shifts them onto today's epoch (each pass a
minute later) so periodic sampling emits what a real drive would (about 600 samples per signal per
pass), rather than stamping frames with the wall clock.

Later stages (store, sealing) are added by passing ``sinks`` to :func:`run_pipeline`: each sink is
called with every batch's ``(samples, raw_frames)``; or by appending to ``STAGES``.

    .venv/bin/python bench/bench_can.py [--frames N] [--markdown]
"""
from __future__ import annotations

import argparse
import gzip
import logging
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import can

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agent.vehicle.can_decode import CanDecoder  # noqa: E402
from drivers.core.model import Frame, Sample  # noqa: E402
from drivers.can import frame_from_message, load_dbc  # noqa: E402
from scripts.testbed.shared_data import SHARED_DATA

log = logging.getLogger(__name__)

DATA = SHARED_DATA / "comma2k19_rav4"
LOG_GZ = DATA / "comma2k19_rav4_seg40_candump.log.gz"
DBC = ROOT / "config" / "dbc" / "toyota_new_mc_pt_generated.dbc"
BATCH = 2_000
TARGET_FPS = 100_000
TARGET_RATIO = 0.40
PASS_SHIFT_S = 60.0

#: A realistic telematics selection: 20 signals from 10 messages seen on can0, 0.1 s periods.
SIGNALS = [
    ("WHEEL_SPEEDS", "WHEEL_SPEED_FL"), ("WHEEL_SPEEDS", "WHEEL_SPEED_FR"),
    ("WHEEL_SPEEDS", "WHEEL_SPEED_RL"), ("WHEEL_SPEEDS", "WHEEL_SPEED_RR"),
    ("STEER_ANGLE_SENSOR", "STEER_ANGLE"), ("STEER_ANGLE_SENSOR", "STEER_FRACTION"),
    ("STEER_ANGLE_SENSOR", "STEER_RATE"),
    ("KINEMATICS", "YAW_RATE"), ("KINEMATICS", "ACCEL_X"), ("KINEMATICS", "ACCEL_Y"),
    ("ENGINE_RPM", "RPM"), ("SPEED", "SPEED"),
    ("BRAKE_MODULE", "BRAKE_PRESSED"), ("BRAKE_MODULE", "BRAKE_PRESSURE"),
    ("GAS_PEDAL", "GAS_PEDAL"), ("GAS_PEDAL", "ETQREAL"),
    ("PCM_CRUISE", "CRUISE_ACTIVE"), ("PCM_CRUISE_2", "SET_SPEED"),
    ("STEER_TORQUE_SENSOR", "STEER_TORQUE_DRIVER"), ("STEER_TORQUE_SENSOR", "STEER_TORQUE_EPS"),
]
CONFIG = {
    "signals": [{"name": f"{m}.{s}", "message": m, "signal": s, "period_s": 0.1} for m, s in SIGNALS],
    "raw": {"enabled": True, "ids": []},
}


@dataclass
class Result:
    stage: str
    frames: int
    wall_s: float
    cpu_s: float
    samples: int = 0
    raw: int = 0

    @property
    def fps(self) -> float:
        return self.frames / self.wall_s

    @property
    def cpu_s_per_million(self) -> float:
        return self.cpu_s / self.frames * 1e6


def _timed(stage: str, fn: Callable[[], tuple[int, int, int]]) -> Result:
    wall0, cpu0 = time.perf_counter(), time.process_time()
    frames, samples, raw = fn()
    return Result(stage, frames, time.perf_counter() - wall0, time.process_time() - cpu0, samples, raw)


def run_logreader(path: Path, passes: int) -> Result:
    def loop() -> tuple[int, int, int]:
        n = 0
        for _ in range(passes):
            with can.LogReader(str(path)) as reader:
                for _msg in reader:
                    n += 1
        return n, 0, 0
    return _timed("logreader", loop)


class RawColumns:
    """Raw capture as the telemetry body wants it: per bus, parallel columns."""

    def __init__(self) -> None:
        self.buses: dict[str, tuple[list[int], list[int], list[bool], list[bytes]]] = {}
        self.count = 0  # frames captured in total, across clear()

    def clear(self) -> None:
        """What an upload does: the columns go, the count stays."""
        self.buses = {}

    def add(self, frames: Iterable[Frame], wants: Callable[[Frame], bool]) -> None:
        buses = self.buses
        for f in frames:
            if wants(f):
                cols = buses.get(f.bus)
                if cols is None:
                    cols = buses[f.bus] = ([], [], [], [])
                cols[0].append(f.t_us)
                cols[1].append(f.can_id)
                cols[2].append(f.extended)
                cols[3].append(f.data)
                self.count += 1


Sink = Callable[[list[Sample], list[Frame]], None]


def _process(messages: Callable[[int], Iterable[can.Message]], passes: int, decoder: CanDecoder,
             sinks: Sequence[Sink]) -> tuple[int, int, int]:
    epoch_shift = time.time() - 86_400.0  # recorded boot-relative time → yesterday, epoch
    raw = RawColumns()
    n = n_samples = 0
    feed_many, wants = decoder.feed_many, decoder.wants_raw
    for p in range(passes):
        shift = epoch_shift + p * PASS_SHIFT_S
        batch: list[Frame] = []
        for msg in messages(p):
            msg.timestamp += shift
            batch.append(frame_from_message(msg.channel, msg))
            if len(batch) >= BATCH:
                samples = feed_many(batch)
                raw.add(batch, wants)
                for sink in sinks:
                    sink(samples, batch)
                n += len(batch)
                n_samples += len(samples)
                batch = []
                if n % 100_000 < BATCH:  # about an upload's worth: hand the columns over
                    raw.clear()
        if batch:
            samples = feed_many(batch)
            raw.add(batch, wants)
            for sink in sinks:
                sink(samples, batch)
            n += len(batch)
            n_samples += len(samples)
    return n, n_samples, raw.count


def run_pipeline(path: Path, passes: int, sinks: Sequence[Sink] = ()) -> tuple[Result, CanDecoder]:
    decoder = CanDecoder(load_dbc(DBC), CONFIG)
    if decoder.problems:
        raise SystemExit(f"bench config problems: {decoder.problems}")

    def messages(_p: int) -> Iterable[can.Message]:
        with can.LogReader(str(path)) as reader:
            yield from reader

    return _timed("pipeline", lambda: _process(messages, passes, decoder, sinks)), decoder


def run_pipeline_only(path: Path, passes: int) -> Result:
    with can.LogReader(str(path)) as reader:
        recorded = [(m.timestamp, m.channel, m.arbitration_id, m.is_extended_id, bytes(m.data))
                    for m in reader]
    decoder = CanDecoder(load_dbc(DBC), CONFIG)
    pre = [[can.Message(timestamp=t, channel=c, arbitration_id=i, is_extended_id=e, data=d)
            for t, c, i, e, d in recorded] for _ in range(passes)]  # fresh objects per pass
    return _timed("pipeline-only", lambda: _process(lambda p: pre[p], passes, decoder, ()))


STAGES: list[str] = ["logreader", "pipeline", "pipeline-only"]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, python-can {can.__version__}, "
            f"cantools {__import__('cantools').__version__}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=float, default=1e6, help="at least this many frames per stage")
    ap.add_argument("--markdown", action="store_true", help="also print a markdown table")
    args = ap.parse_args(argv)
    if not LOG_GZ.exists():
        print(f"recording missing: {LOG_GZ}", file=sys.stderr)
        return 2
    tmpdir = Path(tempfile.mkdtemp(prefix="bench_can_"))
    try:
        path = tmpdir / "rav4.log"
        with gzip.open(LOG_GZ, "rb") as src, open(path, "wb") as dst:
            shutil.copyfileobj(src, dst)
        with can.LogReader(str(path)) as reader:
            per_pass = sum(1 for _ in reader)
        passes = math.ceil(args.frames / per_pass)
        print(f"machine: {machine()}")
        print(f"recording: {per_pass} frames per pass, {passes} passes, "
              f"{len(SIGNALS)} signals at 0.1 s, raw capture of all ids")
        bare = run_logreader(path, passes)
        full, decoder = run_pipeline(path, passes)
        only = run_pipeline_only(path, passes)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)

    rows = [bare, full, only]
    print(f"{'stage':<14} {'frames':>9} {'wall s':>7} {'frames/s':>10} {'CPU s/1M':>9} {'samples':>8} {'raw':>9}")
    for r in rows:
        print(f"{r.stage:<14} {r.frames:>9} {r.wall_s:>7.2f} {r.fps:>10,.0f} {r.cpu_s_per_million:>9.2f} "
              f"{r.samples:>8} {r.raw:>9}")
    ratio = full.fps / bare.fps
    ok_fps, ok_ratio = full.fps >= TARGET_FPS, ratio >= TARGET_RATIO
    print(f"pipeline: {full.fps:,.0f} frames/s (target >= {TARGET_FPS:,}: {'met' if ok_fps else 'MISSED'}); "
          f"{ratio:.0%} of the bare LogReader loop (target >= {TARGET_RATIO:.0%}: "
          f"{'met' if ok_ratio else 'MISSED'})")
    print(f"pipeline-only (no text parsing): {only.fps:,.0f} frames/s, "
          f"{only.cpu_s_per_million:.2f} CPU s per million frames")
    print(f"pipeline decoder stats: {decoder.stats}")
    if args.markdown:
        print("\n| stage | frames | wall s | frames/s | CPU s per 1M frames |\n|---|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r.stage} | {r.frames:,} | {r.wall_s:.2f} | {r.fps:,.0f} | {r.cpu_s_per_million:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
