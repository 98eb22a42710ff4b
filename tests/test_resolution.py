"""A signal's resolution from its source (python-OBD's decoders, the DBC's scale) and values
shown at it."""
from __future__ import annotations

import pytest

from agent.vehicle.resolution import (dbc_resolution, decimals, load_dbcs, pid_resolution, resolutions,
                                      show)
from config import __file__ as config_init
from pathlib import Path

DBC = Path(config_init).parent / "dbc" / "toyota_new_mc_pt_generated.dbc"


@pytest.mark.parametrize("pid, step", [
    ("RPM", 0.25), ("SPEED", 1.0), ("COOLANT_TEMP", 1.0), ("ENGINE_LOAD", 100 / 255),
    ("FUEL_LEVEL", 100 / 255), ("MAF", 0.01), ("CONTROL_MODULE_VOLTAGE", 0.001),
    ("TIMING_ADVANCE", 0.5), ("SHORT_FUEL_TRIM_1", 100 / 128), ("FUEL_RATE", 0.05),
    ("ELM_VOLTAGE", 0.1)])
def test_a_pids_resolution_is_python_obds_step_of_one_bit(pid, step):
    assert pid_resolution(pid) == pytest.approx(step)


@pytest.mark.parametrize("pid", ["FUEL_STATUS", "STATUS", "GET_DTC", "VIN", "NO_SUCH_PID"])
def test_no_resolution_for_what_is_not_a_number(pid):
    assert pid_resolution(pid) is None


def test_a_can_signals_resolution_is_its_dbc_scale_and_a_config_gives_both():
    dbs = load_dbcs([DBC, DBC.with_name("missing.dbc")])   # the missing one is logged, left out
    assert len(dbs) == 1
    assert dbc_resolution(dbs, "WHEEL_SPEEDS", "WHEEL_SPEED_FL") == pytest.approx(0.01)
    assert dbc_resolution(dbs, "STEER_ANGLE_SENSOR", "STEER_ANGLE") == pytest.approx(1.5)
    assert dbc_resolution(dbs, "NO_SUCH_MESSAGE", "X") is None
    config = {"obd": {"pids": [{"name": "engine.rpm", "pid": "RPM", "period_s": 1},
                               {"name": "fuel.status", "pid": "FUEL_STATUS", "period_s": 1}]},
              "can": {"signals": [{"name": "can.wheel", "message": "WHEEL_SPEEDS",
                                   "signal": "WHEEL_SPEED_RR", "period_s": 1}], "raw": {"enabled": False, "ids": []}}}
    assert resolutions(config, dbs) == pytest.approx({"engine.rpm": 0.25, "can.wheel": 0.01})
    assert resolutions(config) == pytest.approx({"engine.rpm": 0.25})   # no DBC: CAN unknown
    assert resolutions(None) == {}


@pytest.mark.parametrize("res, places", [(0.25, 2), (0.005, 3), (1.5, 1), (1.0, 0), (100 / 255, 1),
                                         (0.01, 2), (0.001, 3), (100 / 128, 1), (5.0, 0), (1e-9, 6)])
def test_decimals_of_a_resolution(res, places):
    assert decimals(res) == places


@pytest.mark.parametrize("value, res, text", [
    (33.72549019607843, 100 / 255, "33.7"), (50.599999999999994, 0.01, "50.6"), (1303.75, 0.25, "1303.75"),
    (750.0, 0.25, "750"), (-0.2, 1.5, "0"), (-1.5, 1.5, "-1.5"), (1 / 3, None, "0.333333"),
    (float("nan"), 0.1, "nan"), (12, 1.0, "12")])
def test_show(value, res, text):
    assert show(value, res) == text
