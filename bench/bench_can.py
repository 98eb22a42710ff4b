"""CAN ingest capacity on the real RAV4 drive (comma2k19, 135,468 frames on four buses per pass).

Stages, each at least ``--frames`` frames (default 1e6), each run ``--runs`` times (default 3,
interleaved; the median is reported):

1. ``logreader`` (the baseline): a bare ``can.LogReader`` loop over the decompressed candump log,
   the floor any reader of this text pays.
2. ``agent``: the whole ingest path as the agent runs it, end to end: the same LogReader loop, each
   message handed to the agent's ``CanReader`` exactly as its receive thread does
   (``CanReader.accept``: checked, stamped, queued), the reader's consumer pass
   (``CanReader.drain``: one batch of columns per bus) into ``CanPipeline`` (20 DBC signals at
   0.1 s on can0, decoded only when due; raw capture of every id on all four buses), ``Ingest``
   (group commit into the SQLite store every 0.25 s of wall time, as its thread does), and the
   ``Uplink`` sealing full 128 KiB envelopes as it does offline (CBOR, zstd ``TELEMETRY_ZSTD``,
   HPKE, Ed25519) until nothing is left. Goal: >= 100,000 frames/s and >= 40 % of stage 1.
3. ``no-store``: stage 2 without the store and the sealing (what reaches ``put_frames`` is
   dropped): the share of the reader and the decoder.
4. ``agent-only``: stage 2 without the text parsing (messages preloaded in memory): the capacity
   of the agent's own code.

One thread does it all, in order (the daemon spreads the same calls over its reader, ingest and
uplink threads; bench/bench_car.py measures the daemon itself). Recorded timestamps are seconds
since boot; the bench shifts them onto yesterday's epoch (each pass a minute later), so periodic
sampling emits what a real drive would (600 samples per signal per minute). The store lives in a
temporary directory on the machine's disk (a Pi writes to its SD card).

    .venv/bin/python bench/bench_can.py [--frames N] [--runs 3] [--markdown]
"""
from __future__ import annotations

import argparse
import gzip
import logging
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import can

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey  # noqa: E402

from agent.outbox.ingest import Ingest  # noqa: E402
from agent.outbox.store import Store  # noqa: E402
from agent.outbox.uplink import Sealer, Uplink  # noqa: E402
from agent.vehicle.can_pipeline import CanPipeline  # noqa: E402
from scripts.testbed.shared_data import SHARED_DATA  # noqa: E402

log = logging.getLogger(__name__)

DATA = SHARED_DATA / "comma2k19_rav4"
LOG_GZ = DATA / "comma2k19_rav4_seg40_candump.log.gz"
DBC = ROOT / "config" / "dbc" / "toyota_new_mc_pt_generated.dbc"
BUSES = ("can0", "can1", "can128", "can129")
BATCH = 4_000          # the reader's batch_max: a consumer pass at most every this many frames
COMMIT_S = 0.25        # Ingest's window_s
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


class NoLink:
    """The uplink offline: it seals full envelopes and keeps them (publishing is not measured)."""
    connected = False


@dataclass
class Result:
    stage: str
    frames: int
    wall_s: float
    cpu_s: float
    samples: int = 0
    sealed: int = 0
    envelopes: int = 0
    wire_bytes: int = 0
    decoded: int = 0

    @property
    def fps(self) -> float:
        return self.frames / self.wall_s

    @property
    def cpu_us(self) -> float:
        return self.cpu_s / self.frames * 1e6


def _timed(stage: str, fn: Callable[[], dict]) -> Result:
    wall0, cpu0 = time.perf_counter(), time.process_time()
    out = fn()
    return Result(stage, wall_s=time.perf_counter() - wall0, cpu_s=time.process_time() - cpu0, **out)


def _messages(path: Path, passes: int) -> Iterable[can.Message]:
    """The recording ``passes`` times, on epoch time (yesterday, one minute later per pass)."""
    shift = time.time() - 86_400.0
    for p in range(passes):
        with can.LogReader(str(path)) as reader:
            for msg in reader:
                msg.timestamp += shift + p * PASS_SHIFT_S
                yield msg


def run_logreader(path: Path, passes: int) -> Result:
    def loop() -> dict:
        n = 0
        for _ in range(passes):
            with can.LogReader(str(path)) as reader:
                for _msg in reader:
                    n += 1
        return {"frames": n}
    return _timed("logreader", loop)


def run_agent(stage: str, messages: Callable[[], Iterable[can.Message]], tmp: Path, *,
              store: bool = True) -> Result:
    """Stage 2 (``store``) or 3 (not): see the module docstring."""
    db = tmp / f"{uuid.uuid4().hex}.db"
    st = Store(db)
    ingest = Ingest(st, window_s=COMMIT_S)
    sealer = Sealer("bench-0001", Ed25519PrivateKey.generate(), X25519PrivateKey.generate().public_key())
    uplink = Uplink(st, NoLink(), sealer, interval_s=lambda: 1)
    settings = [{"name": b, "interface": "virtual", "channel": f"bench-{uuid.uuid4().hex}",
                 **({"dbc": str(DBC)} if b == "can0" else {})} for b in BUSES]
    counted = {"samples": 0}

    def put_samples(samples):
        counted["samples"] += len(samples)
        if store:
            ingest.put_samples(samples)

    pipe = CanPipeline(settings, CONFIG, put_samples=put_samples,
                       put_frames=ingest.put_frames if store else (lambda f: None))
    if pipe.problems:
        raise SystemExit(f"bench config problems: {pipe.problems}")
    reader = pipe.reader   # not started: this thread does what its threads do
    accept, drain = reader.accept, reader.drain

    def loop() -> dict:
        n = 0
        next_commit = time.monotonic() + COMMIT_S
        for msg in messages():
            accept(msg.channel, msg)
            n += 1
            if n % BATCH == 0:
                drain()
                if store and time.monotonic() >= next_commit:
                    ingest.flush()
                    uplink.seal_offline()
                    next_commit = time.monotonic() + COMMIT_S
        while drain()[0]:
            pass
        if store:
            ingest.flush()
            uplink.seal_telemetry()
        return {"frames": n}

    try:
        r = _timed(stage, loop)
    finally:
        pipe.stop()
    r.samples = counted["samples"]
    r.decoded = pipe.status()["decoders"][0]["decoded"]
    if store:
        items = st.outbox_items(100_000)
        r.envelopes, r.wire_bytes = len(items), sum(len(i.payload) for i in items)
        r.sealed = ingest.stored["frames"]
        left = st.counts()
        if left["frames"] or left["samples"]:
            raise SystemExit(f"bench: rows left unsealed: {left}")
    drops = sum(b["drops"] for b in reader.status().values())
    if drops:
        raise SystemExit(f"bench: the reader dropped {drops} frames")
    st.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    return r


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
    ap.add_argument("--runs", type=int, default=3, help="runs per stage (median reported)")
    ap.add_argument("--markdown", action="store_true", help="also print a markdown table")
    args = ap.parse_args(argv)
    if not LOG_GZ.exists():
        print(f"recording missing: {LOG_GZ}", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="bench_can_"))
    runs: dict[str, list[Result]] = {s: [] for s in ("logreader", "agent", "no-store", "agent-only")}
    try:
        path = tmp / "rav4.log"
        with gzip.open(LOG_GZ, "rb") as src, open(path, "wb") as dst:
            shutil.copyfileobj(src, dst)
        with can.LogReader(str(path)) as reader:
            recorded = [(m.timestamp, m.channel, m.arbitration_id, m.is_extended_id, bytes(m.data))
                        for m in reader]
        passes = math.ceil(args.frames / len(recorded))
        print(f"machine: {machine()}")
        print(f"recording: {len(recorded)} frames per pass, {passes} passes, {len(SIGNALS)} signals at "
              f"0.1 s on can0, raw capture of all ids on {len(BUSES)} buses; {args.runs} runs per stage")

        def preloaded() -> Iterable[can.Message]:
            shift = time.time() - 86_400.0
            msgs = [can.Message(timestamp=t + shift + p * PASS_SHIFT_S, channel=c, arbitration_id=i,
                                is_extended_id=e, data=d) for p in range(passes) for t, c, i, e, d in recorded]
            t0 = time.perf_counter()
            yield from msgs
            preloaded.build_s = time.perf_counter() - t0  # type: ignore[attr-defined]

        for _ in range(args.runs):
            runs["logreader"].append(run_logreader(path, passes))
            runs["agent"].append(run_agent("agent", lambda: _messages(path, passes), tmp))
            runs["no-store"].append(run_agent("no-store", lambda: _messages(path, passes), tmp, store=False))
            msgs = list(preloaded())  # built outside the timed part
            runs["agent-only"].append(run_agent("agent-only", lambda: iter(msgs), tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    med = {s: sorted(rs, key=lambda r: r.fps)[len(rs) // 2] for s, rs in runs.items()}
    print(f"\n{'stage':<11} {'frames':>9} {'frames/s (median)':>18} {'runs':>26} {'CPU µs/frame':>13} "
          f"{'samples':>8} {'decodes':>8}")
    for s, r in med.items():
        spread = " ".join(f"{x.fps / 1000:,.0f}k" for x in runs[s])
        print(f"{s:<11} {r.frames:>9} {r.fps:>18,.0f} {spread:>26} {r.cpu_us:>13.2f} {r.samples:>8} {r.decoded:>8}")
    base, agent = med["logreader"], med["agent"]
    ratio = agent.fps / base.fps
    print(f"\nagent ingest end to end: {agent.fps:,.0f} frames/s (goal >= {TARGET_FPS:,}: "
          f"{'met' if agent.fps >= TARGET_FPS else 'MISSED'}), {ratio:.0%} of the bare LogReader loop's "
          f"{base.fps:,.0f} frames/s in the same run (goal >= {TARGET_RATIO:.0%}: "
          f"{'met' if ratio >= TARGET_RATIO else 'MISSED'})")
    per = statistics.median(x.cpu_us for x in runs["agent"]) - statistics.median(x.cpu_us for x in runs["logreader"])
    print(f"agent's own CPU per frame beyond the parsing: {per:.2f} µs (agent-only, no parsing: "
          f"{med['agent-only'].cpu_us:.2f} µs; no store/seal: "
          f"{med['no-store'].cpu_us - med['logreader'].cpu_us:.2f} µs)")
    print(f"sealed: {agent.sealed} frames and {agent.samples} samples in {agent.envelopes} envelopes, "
          f"{agent.wire_bytes / max(1, agent.sealed):.2f} wire bytes per frame")
    if args.markdown:
        print("\n| stage | frames | frames/s (median of runs) | runs | CPU µs per frame |\n|---|---:|---:|---|---:|")
        for s, r in med.items():
            spread = ", ".join(f"{x.fps:,.0f}" for x in runs[s])
            print(f"| {s} | {r.frames:,} | {r.fps:,.0f} | {spread} | {r.cpu_us:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
