"""A simulated EV battery ECU set: answers UDS over ISO-TP on a python-can bus.

Driven by an EV profile (``config/ev_profiles``: which ECUs, which identifiers, the byte layout
of each answer — the simulator *encodes* with the same field definitions the agent decodes with)
and a :class:`Scenario` (SOC, SOH, temperatures over time, a slowly decaying SOH, a weak cell).
Each ECU address of the profile gets a can-isotp ``TransportLayer`` in the server role; its link
layer functions are ours so faults can be injected below ISO-TP:

- :meth:`EcuSimulator.drop_cf` — a consecutive frame of the next answer(s) is not sent (the
  tester sees a sequence gap or times out);
- :meth:`EcuSimulator.corrupt_sn` — a consecutive frame goes out with a wrong sequence number;
- :meth:`EcuSimulator.pending` — ``7F xx 78`` (response pending) before the answer;
- :meth:`EcuSimulator.nrc` — a negative answer instead; :meth:`EcuSimulator.silence` — none;
- ``latency_s`` — every answer is delayed (a real ECU takes 5-50 ms).

Unknown identifiers get ``7F xx 31`` (request out of range), unknown services ``7F xx 11``.

Time: the scenario is a function of a clock (``clock() -> ms``), so a test can step through a
year without sleeping. An ELM327 front end on a pty (:mod:`scripts.elm_pty`) can sit in front
of the same bus, so the ELM327 path reaches the same simulated car.

CLI (demo): ``python -m scripts.vehicle_sim.ev_ecu_sim --profile hyundai_egmp --interface virtual
--channel ev0 [--elm]`` runs until SIGINT; with ``--elm`` it prints the pty path of the ELM327
front end on stdout.
"""
from __future__ import annotations

import argparse
import logging
import math
import queue
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import can
import isotp

from drivers.core.clock import Clock

now_ms = Clock().now_ms
from agent.vehicle.ev_profile import Profile, Request, load_profiles

log = logging.getLogger(__name__)

DAY_MS = 86_400_000


@dataclass
class Scenario:
    """The simulated battery as a function of time (ms since the epoch).

    SOH falls linearly from ``soh_start`` at ``start_ms`` by ``soh_per_year`` (negative) per
    365 days; SOC cycles between 20 and 90 % every ``soc_period_days``; pack temperature
    follows a yearly and a daily swing around ``temp_mean_c``. ``weak_cell`` (1-based index)
    sits ``weak_cell_mv`` below the others, growing by ``weak_cell_mv_per_year``.
    """

    start_ms: int = 1_767_225_600_000  # 2026-01-01
    soh_start: float = 96.0
    soh_per_year: float = -2.0
    soc_period_days: float = 2.0
    temp_mean_c: float = 15.0
    temp_year_swing_c: float = 10.0
    temp_day_swing_c: float = 3.0
    weak_cell: int | None = None
    weak_cell_mv: float = 0.0
    weak_cell_mv_per_year: float = 0.0
    km_per_day: float = 40.0
    odometer_start_km: float = 20_000.0
    nominal_ah: float = 180.0
    charging: bool = False
    current_a: float = 12.0
    overrides: dict[str, float] = field(default_factory=dict)

    def days(self, t_ms: int) -> float:
        return (t_ms - self.start_ms) / DAY_MS

    def soh(self, t_ms: int) -> float:
        return self.soh_start + self.soh_per_year * self.days(t_ms) / 365.0

    def state(self, t_ms: int, n_cells: int, modules: tuple[int, ...] = (1, 2, 3, 4, 5)) -> dict[str, float]:
        d = self.days(t_ms)
        soc = 55.0 + 35.0 * math.sin(2 * math.pi * d / self.soc_period_days)
        temp = (self.temp_mean_c + self.temp_year_swing_c * math.sin(2 * math.pi * d / 365.0)
                + self.temp_day_swing_c * math.sin(2 * math.pi * d))
        cell = 3.45 + 0.0085 * soc  # open-circuit voltage of an NMC cell, roughly
        cells = {f"ev.cell_v.{i}": cell for i in range(1, n_cells + 1)}
        if self.weak_cell and n_cells:
            sag = (self.weak_cell_mv + self.weak_cell_mv_per_year * d / 365.0) / 1000.0
            cells[f"ev.cell_v.{self.weak_cell}"] = cell - sag
        volts = sorted((v, int(k.rsplit(".", 1)[1])) for k, v in cells.items()) or [(cell, 1)]
        soh = self.soh(t_ms)
        odo = self.odometer_start_km + self.km_per_day * d
        charged = odo * 0.17 * 1.08
        values: dict[str, float] = {
            "ev.soc_bms": round(soc * 2) / 2, "ev.soc_display": round(min(100.0, soc * 1.04) * 2) / 2,
            "ev.soh": soh, "ev.hx": soh, "ev.capacity_ah": self.nominal_ah * soh / 100.0,
            "ev.pack_v": sum(v for v, _ in volts) if n_cells else 96 * cell,
            "ev.pack_i": -self.current_a if self.charging else self.current_a,
            "ev.charging": 1.0 if self.charging else 0.0,
            "ev.batt_t_max": round(temp + 1), "ev.batt_t_min": round(temp - 1), "ev.batt_t": round(temp),
            "ev.batt_t_max_no": 3, "ev.batt_t_min_no": 7,
            "ev.cell_v_max": volts[-1][0], "ev.cell_v_max_no": volts[-1][1],
            "ev.cell_v_min": volts[0][0], "ev.cell_v_min_no": volts[0][1],
            "ev.cell_v_dev": volts[-1][0] - volts[0][0],
            "ev.aux_v": 14.1 if self.charging else 12.6,
            "ev.odometer_km": round(odo), "ev.charged_kwh": charged, "ev.discharged_kwh": charged * 0.93,
            "ev.charged_ah": charged * 1000 / 700, "ev.discharged_ah": charged * 930 / 700,
        }
        for i in modules:
            values[f"ev.module_t.{i}"] = round(temp + (i % 3) - 1)
        values.update(cells)
        values.update(self.overrides)
        return values


@dataclass
class _Fault:
    kind: str            # "drop_cf", "corrupt_sn", "pending", "nrc", "silence"
    times: int           # how many answers it applies to (-1 = always)
    arg: int = 1


class _Ecu:
    """One simulated ECU address: a can-isotp server stack and a worker thread."""

    def __init__(self, sim: EcuSimulator, tx: int, rx: int, addressing: str):
        self.sim = sim
        self.tester_tx, self.tester_rx, self.addressing = tx, rx, addressing
        self.requests = [r for r in sim.profile.requests
                         if (r.tx, r.rx, r.addressing) == (tx, rx, addressing)]
        if addressing == "normal_11bit":
            address = isotp.Address(isotp.AddressingMode.Normal_11bits, txid=rx, rxid=tx)
        else:
            address = isotp.Address(isotp.AddressingMode.Normal_29bits, txid=rx, rxid=tx)
        self._rxq: queue.Queue[can.Message] = queue.Queue()
        self._cf_index = 0
        self._drop_at: int | None = None
        self._corrupt_at: int | None = None
        self.stack = isotp.TransportLayer(rxfn=self._rx, txfn=self._tx, address=address,
                                          params={"stmin": 0, "blocksize": 0, "tx_padding": 0xAA,
                                                  "tx_data_min_length": 8,
                                                  "rx_consecutive_frame_timeout": 1000,
                                                  "rx_flowcontrol_timeout": 1000,
                                                  "override_receiver_stmin": 0})
        self.thread: threading.Thread | None = None

    # link layer for can-isotp
    def on_message(self, msg: can.Message) -> None:
        if msg.arbitration_id == self.tester_tx and msg.is_extended_id == (self.addressing != "normal_11bit"):
            self._rxq.put(msg)

    def _rx(self, timeout: float) -> isotp.CanMessage | None:
        try:
            msg = self._rxq.get(timeout=timeout)
        except queue.Empty:
            return None
        return isotp.CanMessage(arbitration_id=msg.arbitration_id, data=bytes(msg.data),
                                extended_id=msg.is_extended_id, dlc=msg.dlc)

    def _tx(self, msg: isotp.CanMessage) -> None:
        data = bytearray(msg.data)
        pci = data[0] >> 4 if data else 0
        if pci == 1:
            self._cf_index = 0
        elif pci == 2:
            self._cf_index += 1
            if self._drop_at == self._cf_index:
                self.sim.frames_dropped += 1
                return
            if self._corrupt_at == self._cf_index:
                data[0] = 0x20 | ((data[0] + 5) & 0x0F)
                self.sim.frames_corrupted += 1
        self.sim.bus.send(can.Message(arbitration_id=msg.arbitration_id, data=bytes(data),
                                      is_extended_id=msg.is_extended_id))

    def start(self) -> None:
        self.stack.start()
        self.thread = threading.Thread(target=self._serve, name=f"ecu-{self.tester_rx:X}", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        if self.thread is not None:
            self.thread.join(2.0)
        self.stack.stop()

    def _serve(self) -> None:
        while not self.sim._stop.is_set():
            payload = self.stack.recv(block=True, timeout=0.1)
            if payload is None:
                continue
            try:
                self._answer(bytes(payload))
            except Exception:  # noqa: BLE001 - the simulator must keep serving
                log.exception("simulated ECU %X failed on %s", self.tester_rx, bytes(payload).hex())

    def _answer(self, payload: bytes) -> None:
        sim = self.sim
        sid = payload[0]
        req = next((r for r in self.requests if r.payload == payload), None)
        key = req.key if req else f"{payload.hex()}"
        sim.served[key] += 1
        fault = sim._take_fault(key)
        if sim.latency_s:
            time.sleep(sim.latency_s)
        if fault and fault.kind == "silence":
            return
        if fault and fault.kind == "nrc":
            self._send(bytes([0x7F, sid, fault.arg]))
            return
        if req is None:
            known = {r.service for r in self.requests}
            self._send(bytes([0x7F, sid, 0x31 if sid in known else 0x11]))
            return
        if fault and fault.kind == "pending":
            for _ in range(fault.arg):
                self._send(bytes([0x7F, sid, 0x78]))
                time.sleep(sim.pending_gap_s)
        self._drop_at = fault.arg if fault and fault.kind == "drop_cf" else None
        self._corrupt_at = fault.arg if fault and fault.kind == "corrupt_sn" else None
        self._send(sim.answer(req))

    def _send(self, data: bytes) -> None:
        self.stack.send(data)
        deadline = time.monotonic() + 5.0
        while self.stack.transmitting() and time.monotonic() < deadline:
            time.sleep(0.001)


class EcuSimulator:
    """Every ECU of ``profile`` on ``bus``, answering from ``scenario`` at ``clock()``."""

    def __init__(self, bus: can.BusABC, profile: Profile, scenario: Scenario | None = None, *,
                 clock: Callable[[], int] = now_ms, latency_s: float = 0.0,
                 lengths: Mapping[str, int] | None = None, pending_gap_s: float = 0.02):
        self.bus = bus
        self.profile = profile
        self.scenario = scenario or Scenario()
        self.clock = clock
        self.latency_s = latency_s
        self.pending_gap_s = pending_gap_s
        self.lengths = dict(lengths or {})
        self.served: Counter[str] = Counter()
        self.frames_dropped = 0
        self.frames_corrupted = 0
        self._faults: dict[str, list[_Fault]] = {}
        self._faults_lock = threading.Lock()
        self._stop = threading.Event()
        self.n_cells = sum(1 for f in profile.signals if f.startswith("ev.cell_v."))
        self.modules = tuple(int(f.rsplit(".", 1)[1]) for f in profile.signals
                             if f.startswith("ev.module_t."))
        targets = {(r.tx, r.rx, r.addressing) for r in profile.requests}
        self._ecus = [_Ecu(self, *t) for t in sorted(targets)]
        self._notifier: can.Notifier | None = None

    # -- what the car says ---------------------------------------------------------------------

    def values(self) -> dict[str, float]:
        return self.scenario.state(self.clock(), self.n_cells, self.modules)

    def answer(self, req: Request) -> bytes:
        return req.encode(self.values(), self.lengths.get(req.key))

    # -- faults --------------------------------------------------------------------------------

    def _add(self, key: str, fault: _Fault) -> None:
        with self._faults_lock:
            self._faults.setdefault(key, []).append(fault)

    def _take_fault(self, key: str) -> _Fault | None:
        with self._faults_lock:
            faults = self._faults.get(key)
            if not faults:
                return None
            fault = faults[0]
            if fault.times > 0:
                fault.times -= 1
                if fault.times == 0:
                    faults.pop(0)
            return fault

    def drop_cf(self, key: str, index: int = 1, times: int = 1) -> None:
        """The ``index``-th consecutive frame (1-based) of the next ``times`` answers is not sent."""
        self._add(key, _Fault("drop_cf", times, index))

    def corrupt_sn(self, key: str, index: int = 1, times: int = 1) -> None:
        self._add(key, _Fault("corrupt_sn", times, index))

    def pending(self, key: str, count: int = 1, times: int = 1) -> None:
        self._add(key, _Fault("pending", times, count))

    def nrc(self, key: str, code: int, times: int = -1) -> None:
        self._add(key, _Fault("nrc", times, code))

    def silence(self, key: str, times: int = -1) -> None:
        self._add(key, _Fault("silence", times))

    def clear_faults(self) -> None:
        with self._faults_lock:
            self._faults.clear()

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> EcuSimulator:
        self._stop.clear()
        self._notifier = can.Notifier(self.bus, [e.on_message for e in self._ecus], timeout=0.05)
        for ecu in self._ecus:
            ecu.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for ecu in self._ecus:
            ecu.stop()
        if self._notifier is not None:
            self._notifier.stop()
            self._notifier = None

    def __enter__(self) -> EcuSimulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="hyundai_egmp")
    parser.add_argument("--interface", default="virtual")
    parser.add_argument("--channel", default="ev0")
    parser.add_argument("--port", type=int, default=None, help="udp_multicast: UDP port")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--weak-cell", type=int, default=None)
    parser.add_argument("--elm", action="store_true", help="also serve an ELM327 front end on a pty")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    profile = load_profiles()[args.profile]
    bus_setting = {"interface": args.interface, "channel": args.channel}
    if args.port:
        bus_setting["port"] = args.port
    bus = can.Bus(**bus_setting, receive_own_messages=False)
    scenario = Scenario(weak_cell=args.weak_cell, weak_cell_mv=60.0 if args.weak_cell else 0.0,
                        start_ms=now_ms())
    sim = EcuSimulator(bus, profile, scenario, latency_s=args.latency_ms / 1000.0).start()
    front = None
    if args.elm:
        from scripts.vehicle_sim.elm_pty import ElmPty
        front = ElmPty(bus_setting).start()
        print(front.path, flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    if front is not None:
        front.stop()
    sim.stop()
    bus.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
