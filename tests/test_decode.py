"""`dongle decode` on the real RAV4 capture (../shared/data: a candump log of comma2k19, its opendbc
DBC): the agent's decoder against cantools' own decode of the same frames, the same capture as
ASC and BLF (written with python-can's writers), the refusals, and piping into head."""
from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import can
import cantools
import pytest

from agent.cli import main as cli
from scripts.testbed.shared_data import SHARED_DATA

RAV4 = SHARED_DATA / "comma2k19_rav4"
LOG = RAV4 / "comma2k19_rav4_seg40_candump.log.gz"
DBC = RAV4 / "toyota_new_mc_pt_generated.dbc"
SIGNALS = {"WHEEL_SPEEDS.WHEEL_SPEED_FL": 0.01, "STEER_ANGLE_SENSOR.STEER_ANGLE": 1.5,
           "ENGINE_RPM.RPM": 0.78125, "SPEED.SPEED": 0.01}

pytestmark = pytest.mark.skipif(not LOG.exists(), reason="the RAV4 capture (../shared/data) is not here")


def dongle(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    old = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        rc = cli.main(list(argv))
    finally:
        sys.stdout, sys.stderr = old
    return rc, out.getvalue(), err.getvalue()


def decode_json(log: Path, *argv: str) -> dict:
    rc, out, err = dongle("decode", str(log), "--dbc", str(DBC), *argv, "--json")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["ok"] is True
    return doc


def signal_args() -> list[str]:
    return [a for name in SIGNALS for a in ("--signal", name)]


def cantools_values(bus: str = "can0") -> dict[str, list[tuple[int, float]]]:
    """Per signal, (t_ms, value) of every frame that carries it: cantools' own decode."""
    db = cantools.database.load_file(str(DBC), strict=False)
    wanted = {}
    for name in SIGNALS:
        msg, sig = name.split(".")
        wanted.setdefault(db.get_message_by_name(msg).frame_id, []).append((name, sig))
    out: dict[str, list[tuple[int, float]]] = {name: [] for name in SIGNALS}
    for m in can.LogReader(str(LOG)):
        if m.channel != bus or m.arbitration_id not in wanted:
            continue
        values = db.decode_message(m.arbitration_id, m.data, decode_choices=False)
        for name, sig in wanted[m.arbitration_id]:
            out[name].append((int(round(m.timestamp * 1e6)) // 1000, values[sig]))
    return out


def test_on_change_samples_are_cantools_values_at_the_right_frames():
    doc = decode_json(LOG, "--bus", "can0", *signal_args())
    assert {n: s["resolution"] for n, s in doc["signals"].items()} == SIGNALS
    assert doc["stats"]["frames"] == 135_468 and doc["period_s"] == 0
    got: dict[str, list[tuple[int, float]]] = {name: [] for name in SIGNALS}
    units = {}
    for s in doc["samples"]:
        got[s["name"]].append((round(s["t_s"] * 1000), s["value"]))
        units[s["name"]] = s["unit"]
    assert units == {"WHEEL_SPEEDS.WHEEL_SPEED_FL": "km/h", "STEER_ANGLE_SENSOR.STEER_ANGLE": "deg",
                     "ENGINE_RPM.RPM": "rpm", "SPEED.SPEED": "km/h"}
    for name, frames in cantools_values().items():
        step = SIGNALS[name]
        at: dict[int, list[float]] = {}
        for t, v in frames:
            at.setdefault(t, []).append(v)   # the log has a few frames of one id in the same ms
        # every sample is cantools' value of a frame at its time, at the signal's resolution ...
        assert got[name], name
        for t, v in got[name]:
            assert any(abs(v - x) <= step / 2 + 1e-9 for x in at[t]), (name, t, v, at[t])
        # ... and every change of the value is a sample (holding the last sample rebuilds the signal)
        changes = [t for (t, v), (_, prev) in zip(frames[1:], frames) if v != prev]
        assert set(changes) <= {t for t, _ in got[name]}, name
        assert got[name][0][0] == frames[0][0]
    speeds = [v for _, v in got["WHEEL_SPEEDS.WHEEL_SPEED_FL"]]
    assert 28 < min(speeds) and max(speeds) < 73   # the README's 28.8–71.8 km/h


def test_period_sampling_takes_the_first_frame_of_each_slot():
    doc = decode_json(LOG, "--bus", "can0", "--period", "0.5", "--signal", "WHEEL_SPEEDS.WHEEL_SPEED_FL")
    frames = cantools_values()["WHEEL_SPEEDS.WHEEL_SPEED_FL"]
    expected, slot = [], None
    for t, v in frames:
        if t // 500 != slot:
            slot = t // 500
            expected.append((t, v))
    got = [(round(s["t_s"] * 1000), s["value"]) for s in doc["samples"]]
    assert [t for t, _ in got] == [t for t, _ in expected] and len(got) == pytest.approx(120, abs=2)
    assert [v for _, v in got] == pytest.approx([v for _, v in expected], abs=0.005)


def test_the_same_capture_as_asc_and_blf(tmp_path):
    """Frames of can0 for WHEEL_SPEEDS and ENGINE_RPM (10 s), written as candump, ASC and BLF."""
    db = cantools.database.load_file(str(DBC), strict=False)
    ids = {db.get_message_by_name(n).frame_id for n in ("WHEEL_SPEEDS", "ENGINE_RPM")}
    msgs = []
    for m in can.LogReader(str(LOG)):
        if m.channel == "can0" and m.arbitration_id in ids:
            if msgs and m.timestamp - msgs[0].timestamp > 10:
                break
            msgs.append(m)
    results = {}
    for suffix in (".log", ".asc", ".blf"):
        path = tmp_path / f"cut{suffix}"
        with can.Logger(str(path)) as writer:
            for m in msgs:
                writer.on_message_received(m)
        rc, out, err = dongle("decode", str(path), "--dbc", str(DBC), "--signal", "WHEEL_SPEED_FL",
                              "--signal", "ENGINE_RPM.RPM", "--csv")
        assert rc == 0, (suffix, err)
        rows = list(csv.reader(io.StringIO(out)))
        assert rows[0] == ["t_s", "signal", "value", "unit"]
        assert f"from {len(msgs)} frames of {path}" in err
        t0 = float(rows[1][0])
        results[suffix] = [(float(t) - t0, name, value, unit) for t, name, value, unit in rows[1:]]
    log = results[".log"]
    assert len(log) > 100
    assert {name for _, name, _, _ in log} == {"WHEEL_SPEEDS.WHEEL_SPEED_FL", "ENGINE_RPM.RPM"}
    for suffix in (".asc", ".blf"):
        other = results[suffix]
        assert [r[1:] for r in other] == [r[1:] for r in log], suffix
        # times kept by each format to the µs or 10 µs; a sample's is its frame's time in ms
        assert [r[0] for r in other] == pytest.approx([r[0] for r in log], abs=0.0015), suffix


def test_text_output_and_its_summary():
    rc, out, err = dongle("decode", str(LOG), "--dbc", str(DBC), "--bus", "can0", "--period", "10",
                          "--signal", "SPEED.SPEED")
    assert rc == 0, err
    lines = out.splitlines()
    # 46408.6 s to 46468.5 s: the 10 s slots (aligned to 0, as for telemetry) 4640 to 4646
    assert lines[0].split() == ["time", "signal", "value", "unit"] and len(lines) == 1 + 7
    assert [int(float(line.split()[0]) // 10) for line in lines[1:]] == list(range(4640, 4647))
    t, name, value, unit = lines[1].split()
    assert name == "SPEED.SPEED" and unit == "km/h" and len(value.partition(".")[2]) == 2
    assert err.startswith(f"7 samples from 135468 frames of {LOG}")
    assert "of other buses" in err


def test_refusals(tmp_path):
    bad = tmp_path / "bad.dbc"
    bad.write_text("BO_ nonsense\n")
    for argv, code, text in (
            (("decode", str(tmp_path / "none.log"), "--dbc", str(DBC)), "no_file", "no log file"),
            (("decode", str(LOG), "--dbc", str(bad)), "bad_file", "not a valid DBC file"),
            (("decode", str(LOG), "--dbc", str(DBC), "--signal", "NOPE"), "bad_request", "no signal 'NOPE'"),
            (("decode", str(LOG), "--dbc", str(DBC), "--signal", "STEER_ANGLE"), "bad_request",
             "give MESSAGE.SIGNAL")):
        rc, out, err = dongle(*argv, "--json")
        assert rc == 1, argv
        doc = json.loads(out)
        assert doc["ok"] is False and doc["code"] == code and text in doc["error"], doc
        assert err.startswith("dongle: ")
    (tmp_path / "x.unknown").write_text("1 2 3\n")
    rc, out, err = dongle("decode", str(tmp_path / "x.unknown"), "--dbc", str(DBC))
    assert rc == 1 and "cannot read" in err


def test_piping_decode_into_head(tmp_path):
    dongle_exe = Path(sys.executable).parent / "dongle"
    r = subprocess.run(["bash", "-c", f"'{dongle_exe}' decode '{LOG}' --dbc '{DBC}' --csv | head -n 2; "
                                      "echo \"exit ${PIPESTATUS[0]}\" >&2"],
                       capture_output=True, text=True, timeout=120)
    assert r.stdout.splitlines()[0] == "t_s,signal,value,unit" and len(r.stdout.splitlines()) == 2
    assert r.stderr == "exit 141\n", r.stderr
