"""Both UDS paths against the simulated EV (scripts/vehicle_sim/ev_ecu_sim.py) on python-can virtual buses.

The simulator is a can-isotp server driven by the same profiles; expected values come from its
scenario (what it encoded), so every assertion compares a decoded reading with the value the
simulated car put on the bus. Faults are injected below ISO-TP (frames dropped or with a wrong
sequence number), in UDS (0x78 pending, 0x31, 0x11) and by silence. The ELM327 path goes
through scripts/vehicle_sim/elm_pty.py (a pty speaking ELM327 in front of the same bus). Each test uses
its own virtual channel name, so parallel runs do not meet.
"""
from __future__ import annotations

import uuid

import can
import pytest

from agent.vehicle.ev import EvReader, SIGNALS
from agent.vehicle.ev_profile import load_profiles
from drivers.elm_isotp import ElmIsoTp
from drivers.uds import Target, UdsClient
from scripts.vehicle_sim.elm_pty import ElmPty
from scripts.vehicle_sim.ev_ecu_sim import EcuSimulator, Scenario

pytestmark = pytest.mark.timeout(120)

PROFILES = load_profiles()
T = 1_780_000_000_000


@pytest.fixture
def channel() -> str:
    return f"ev-{uuid.uuid4().hex[:8]}"


def sim_and_client(channel: str, profile: str, scenario: Scenario | None = None, **kw):
    sim_bus = can.Bus(interface="virtual", channel=channel)
    cli_bus = can.Bus(interface="virtual", channel=channel)
    sim = EcuSimulator(sim_bus, PROFILES[profile], scenario or Scenario(), clock=lambda: T, **kw).start()
    client = UdsClient(cli_bus, owns_bus=True, p2_s=0.4, p2_star_s=1.0, request_timeout_s=3.0)
    return sim, sim_bus, client


def read_all(client, profile: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for req in PROFILES[profile].requests:
        o = client.read(req)
        assert o.ok, (req.key, o)
        out.update(req.decode(o.response))
    return out


def close_to(expected: dict[str, float], got: dict[str, float], profile: str) -> None:
    fields = {f.name: f for r in PROFILES[profile].requests for f in r.fields}
    for name, value in got.items():
        f = fields[name]
        step = f.factor / f.divisor
        assert value == pytest.approx(expected[name], abs=abs(step) * 0.51 + 1e-9), name


@pytest.mark.parametrize("profile", ["hyundai_egmp", "hyundai_kona_niro", "nissan_leaf",
                                     "chevrolet_bolt", "vw_meb", "obd_5b"])
def test_python_can_path_reads_every_request_of_every_profile(channel, profile) -> None:
    sim, sim_bus, client = sim_and_client(channel, profile, Scenario(weak_cell=7, weak_cell_mv=60))
    try:
        got = read_all(client, profile)
        expected = sim.values()
        close_to(expected, got, profile)
        assert {n for n in got} >= {n for r in PROFILES[profile].requests for f in r.fields
                                    for n in [f.name] if f.when_len is None and f.name in expected
                                    and f.lo <= expected[f.name] <= f.hi}
        if profile == "hyundai_egmp":
            assert got["ev.cell_v.7"] == pytest.approx(got["ev.cell_v.8"] - 0.06, abs=0.021)
        assert client.stats.positive == len(PROFILES[profile].requests)
        assert client.stats.timeouts == client.stats.invalid == 0
    finally:
        client.close(); sim.stop(); sim_bus.shutdown()


def test_29bit_normal_fixed_addressing_round_trip(channel) -> None:
    """18DA<TA><SA>: a tester and a can-isotp ECU that both use normal-fixed addresses."""
    import isotp
    ecu_bus = can.Bus(interface="virtual", channel=channel)
    stack = isotp.CanStack(ecu_bus, address=isotp.Address(isotp.AddressingMode.NormalFixed_29bits,
                                                          target_address=0xFB, source_address=0xEE))
    stack.start()
    client = UdsClient(can.Bus(interface="virtual", channel=channel), owns_bus=True, p2_s=1.0)
    try:
        vin = b"YV2RT40A5FB123456"
        import threading
        def serve():
            req = stack.recv(block=True, timeout=5)
            if req == b"\x22\xF1\x90":
                stack.send(b"\x62\xF1\x90" + vin)
        threading.Thread(target=serve, daemon=True).start()
        o = client.request(Target(0x18DAEEFB, 0x18DAFBEE, "normal_fixed_29bit"), b"\x22\xF1\x90")
        assert o.ok and o.response[3:] == vin
    finally:
        client.close(); stack.stop(); ecu_bus.shutdown()


def test_response_pending_then_the_answer(channel) -> None:
    sim, sim_bus, client = sim_and_client(channel, "hyundai_egmp")
    try:
        req = PROFILES["hyundai_egmp"].request("bms_0105")
        sim.pending("bms_0105", count=2)
        o = client.read(req)
        assert o.ok and o.pending == 2
        assert req.decode(o.response)["ev.soh"] == pytest.approx(sim.scenario.soh(T), abs=0.051)
        assert client.stats.pending == 2
    finally:
        client.close(); sim.stop(); sim_bus.shutdown()


def test_negative_answers_and_silence_are_counted_and_give_no_value(channel) -> None:
    sim, sim_bus, client = sim_and_client(channel, "hyundai_egmp")
    try:
        prof = PROFILES["hyundai_egmp"]
        sim.nrc("bms_010C", 0x31)
        o = client.read(prof.request("bms_010C"))
        assert not o.ok and o.error == "negative" and o.nrc == 0x31 and o.unsupported
        o = client.request(Target(0x7E4, 0x7EC), bytes([0x21, 0x01]))  # service the BMS lacks
        assert o.error == "negative" and o.nrc == 0x11
        o = client.request(Target(0x7E4, 0x7EC), bytes([0x22, 0xF1, 0x00]))  # unknown DID
        assert o.error == "negative" and o.nrc == 0x31
        sim.silence("bms_0101", times=1)
        o = client.read(prof.request("bms_0101"))
        assert not o.ok and o.error == "timeout" and o.response is None
        o = client.request(Target(0x7E5, 0x7ED), bytes([0x22, 0x01, 0x01]))  # nobody there
        assert o.error == "timeout"
        assert client.stats.negative[0x31] == 2 and client.stats.negative[0x11] == 1
        assert client.stats.timeouts == 2
        assert client.read(prof.request("bms_0101")).ok  # and the next one is fine
    finally:
        client.close(); sim.stop(); sim_bus.shutdown()


@pytest.mark.parametrize("fault", ["drop_cf", "corrupt_sn"])
def test_lost_or_corrupted_consecutive_frames_never_give_a_value(channel, fault) -> None:
    sim, sim_bus, client = sim_and_client(channel, "hyundai_egmp")
    try:
        req = PROFILES["hyundai_egmp"].request("bms_0101")
        for index in (1, 4, 8):
            getattr(sim, fault)("bms_0101", index=index)
            o = client.read(req)
            assert not o.ok and o.response is None, (fault, index, o)
        assert client.stats.lost_frames >= 2 or client.stats.transport_errors, client.stats
        assert sim.frames_dropped + sim.frames_corrupted == 3
        o = client.read(req)
        assert o.ok and req.decode(o.response)["ev.soc_bms"] == pytest.approx(sim.values()["ev.soc_bms"])
    finally:
        client.close(); sim.stop(); sim_bus.shutdown()


# -- ELM327 path ----------------------------------------------------------------------------------

@pytest.fixture
def elm_car(channel):
    def make(profile: str, scenario: Scenario | None = None):
        sim_bus = can.Bus(interface="virtual", channel=channel)
        sim = EcuSimulator(sim_bus, PROFILES[profile], scenario or Scenario(), clock=lambda: T).start()
        front = ElmPty({"interface": "virtual", "channel": channel}).start()
        made.append((sim, sim_bus, front))
        return sim, front
    made: list = []
    yield make
    for sim, sim_bus, front in made:
        front.stop(); sim.stop(); sim_bus.shutdown()


@pytest.mark.parametrize("profile", ["hyundai_egmp", "nissan_leaf", "vw_meb"])
def test_elm327_path_reads_the_same_car(elm_car, profile) -> None:
    sim, front = elm_car(profile, Scenario(weak_cell=3, weak_cell_mv=80))
    with ElmIsoTp.open_serial(front.path, p2_s=0.3) as elm:
        got = read_all(elm, profile)
        assert elm.adapter and "ELM327" in elm.adapter
    close_to(sim.values(), got, profile)
    assert "ATFCSM1" in front.commands and "ATH1" in front.commands
    if profile == "vw_meb":
        assert "ATSP7" in front.commands and "ATCP17" in front.commands


def test_elm327_path_pending_negative_and_lost_frames(elm_car) -> None:
    sim, front = elm_car("hyundai_egmp")
    prof = PROFILES["hyundai_egmp"]
    with ElmIsoTp.open_serial(front.path, p2_s=0.3) as elm:
        sim.pending("bms_0105", count=1)
        o = elm.read(prof.request("bms_0105"))
        assert o.ok and o.pending >= 1
        sim.nrc("bms_010C", 0x31, times=1)
        o = elm.read(prof.request("bms_010C"))
        assert o.error == "negative" and o.nrc == 0x31
        sim.drop_cf("bms_0101", index=3)
        o = elm.read(prof.request("bms_0101"))
        assert not o.ok and o.response is None
        sim.silence("bms_0102", times=1)
        assert elm.read(prof.request("bms_0102")).error == "timeout"
        assert elm.read(prof.request("bms_0101")).ok
        assert elm.stats.lost_frames >= 1 or elm.stats.transport_errors


# -- the reader ------------------------------------------------------------------------------------

def test_reader_selects_the_profile_polls_only_while_awake_and_emits_ev_samples(channel) -> None:
    sim, sim_bus, client = sim_and_client(channel, "chevrolet_bolt")
    sim.nrc("bms_41A3", 0x31)  # a 2019+ Bolt: only the newer capacity DID answers
    awake = [False]
    batches: list = []
    snaps: list = []
    profiles_seen: list = []
    reader = EvReader(lambda: client, batches.append, lambda: awake[0], on_snapshot=snaps.append,
                      on_profile=profiles_seen.append, clock=lambda: T)
    try:
        assert reader.apply_config({"ev": {"profile": "auto", "period_s": 30}}) == []
        reader.set_vehicle("1G1FW6S08H4100001")
        assert reader.poll_once() is None and client.stats.requests == 0   # asleep: nothing sent
        awake[0] = True
        for _ in range(4):
            snap = reader.poll_once()
        assert profiles_seen == ["chevrolet_bolt"] and reader.profile == "chevrolet_bolt"
        names = {s.name for s in batches[-1]}
        assert {"ev.soc_bms", "ev.soc_display", "ev.pack_v", "ev.capacity_ah", "ev.batt_t"} <= names
        assert all(n.split(".")[0] == "ev" and ".".join(n.split(".")[:2]) in SIGNALS for n in names)
        assert all(s.t_ms == T for s in batches[-1])
        assert reader.status()["unsupported"] == ["bms_41A3"]
        before = sim.served["bms_41A3"]
        reader.poll_once()
        assert sim.served["bms_41A3"] == before   # no longer asked
        assert snaps[-1].vehicle == "1G1FW6S08H4100001"
        assert reader.apply_config({"ev": {"profile": "off", "period_s": 30}}) == []
        assert reader.poll_once() is None
        assert reader.apply_config({"ev": {"profile": "tesla", "period_s": -1}})  # two problems
    finally:
        reader.stop(); sim.stop(); sim_bus.shutdown()


def test_reader_probes_when_the_vin_is_unknown_and_finds_none_on_a_petrol_car(channel) -> None:
    # An E-GMP car with an unknown VIN: probing finds it (010A answers only there).
    sim, sim_bus, client = sim_and_client(channel, "hyundai_egmp")
    reader = EvReader(lambda: client, lambda s: None, lambda: True, clock=lambda: T)
    try:
        snap = reader.poll_once()
        assert reader.profile == "hyundai_egmp"
        assert snap.values["ev.cell_v_spread"] == pytest.approx(0.0, abs=20)
    finally:
        reader.stop(); sim.stop(); sim_bus.shutdown()
    # Nothing answers: no profile, and no second round of probes for the same VIN.
    bus = can.Bus(interface="virtual", channel=channel + "x")
    client = UdsClient(bus, owns_bus=True, p2_s=0.05, request_timeout_s=0.2)
    reader = EvReader(lambda: client, lambda s: None, lambda: True, clock=lambda: T)
    try:
        reader.set_vehicle("WF0XXXGCDX1234567")  # a Ford: only the generic profile is tried
        assert reader.poll_once() is None and reader.profile is None
        n = client.stats.requests
        assert n == 1
        assert reader.poll_once() is None and client.stats.requests == n
    finally:
        reader.stop()
