"""Location collection: gpsd fixes → the owner's consent → encrypted rows → telemetry ``positions``.

Only while :class:`agent.privacy.Privacy` says location may be collected does a
:class:`drivers.gnss.GnssReader` run; otherwise nothing is read from gpsd. Each fix passes the
gate again at arrival, then the rate of the mode in force:

- ``coarse``: latitude/longitude rounded to 2 decimals *before* storing, at most one fix per
  60 s of the agent's clock, ``prec_m`` 1000;
- ``precise``: as measured, at most 1 Hz: a fix is kept when the receiver's time is ≥ 1 s after
  the last kept one (a 1 Hz receiver yields every fix, a 10 Hz one every tenth, RMC and GGA of
  one epoch count once) and it arrived ≥ 0.95 s after it (a replayed backlog cannot burst);
  ``prec_m`` is the receiver's error estimate, or :data:`UNKNOWN_PREC_M` when it gives none.

Rows (table ``location_positions``) hold the fix encrypted under the data key
(:mod:`agent.datakey`); only the arrival time is in clear, for retention. They leave in the
telemetry body's ``positions`` (PROTOCOL §4): :meth:`Location.contribute` runs inside the
sealing transaction and deletes the rows it takes in that same transaction. When no telemetry
is being sealed (no OBD or CAN data, e.g. parked), :meth:`Location.flush` seals a
positions-only telemetry envelope. Which envelopes carry positions is recorded
(``location_sealed``) so that, when location stops, envelopes not yet acknowledged are dropped
from the outbox too (and a ``buffer_evicted`` event explains the gap).
"""
from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable

from agent.owner import privacy as pv
from drivers.core.clock import Clock, is_provisional_ms
from agent.owner.datakey import DataKey

log = logging.getLogger(__name__)

TABLE = "location_positions"
SEALED = "location_sealed"
AAD = TABLE.encode()
UNKNOWN_PREC_M = 30          # receivers without an error estimate: a standalone fix's usual 95 %
MAX_PER_BODY = 600           # positions per telemetry body (well inside the 128 KiB limit)
PRIO_TELEMETRY = 5


class Location:
    def __init__(self, store, privacy: pv.Privacy, datakey: DataKey, *,
                 reader_factory: Callable[..., object] | None = None, gpsd_host: str = "127.0.0.1",
                 gpsd_port: int = 2947, clock: Clock | None = None,
                 seal: Callable[[str, dict, int], bytes] | None = None,
                 interval_s: Callable[[], float] = lambda: 5.0, wake_uplink: Callable[[], None] = lambda: None,
                 emit_event: Callable[[dict], None] = lambda body: None):
        self.store = store
        self.privacy = privacy
        self.datakey = datakey
        self.gpsd_host, self.gpsd_port = gpsd_host, gpsd_port
        self._reader_factory = reader_factory or self._default_reader
        self._clock = clock or Clock()
        self._seal = seal
        self._interval_s = interval_s
        self._wake = wake_uplink
        self._emit = emit_event
        self._lock = threading.RLock()
        self._mode = "off"
        self._reader = None
        self._last_kept: tuple[int, int | None] | None = None  # (t_ms, gnss_ms) of the last kept fix
        self.gnss_state = "stopped"
        self.kept = 0
        self.dropped_gate = 0
        self.dropped_rate = 0
        self.sent = 0
        self.errors = 0
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        store.create_tables(f"{TABLE} (id INTEGER PRIMARY KEY, t_ms INTEGER, blob BLOB)",
                            f"{SEALED} (seq INTEGER PRIMARY KEY, n INTEGER, created_ms INTEGER)")
        privacy.register("location", self)

    def _default_reader(self, on_fix, on_state):
        from drivers.gnss import GnssReader
        return GnssReader(on_fix, host=self.gpsd_host, port=self.gpsd_port, on_state=on_state, clock=self._clock)

    # -- privacy handler ------------------------------------------------------------------
    def on_collecting(self, mode: str) -> None:
        with self._lock:
            if mode != self._mode:
                self._last_kept = None
            self._mode = mode
            if self._reader is None:
                self._reader = self._reader_factory(self._on_fix, self._on_state)
                self._reader.start()
                log.info("location: collecting (%s) from gpsd %s:%s", mode, self.gpsd_host, self.gpsd_port)

    def on_stopped(self) -> None:
        with self._lock:
            self._mode = "off"
            reader, self._reader = self._reader, None
            self._last_kept = None
        if reader is not None:
            reader.stop()
            log.info("location: collection stopped; gpsd is not read")

    def purge_unsent(self) -> int:
        """Deletes every position not yet acknowledged by the broker: rows not yet sealed, and
        sealed envelopes that carry positions still in the outbox. Returns the positions deleted."""
        with self.store.batch() as c:
            n = c.execute(f"DELETE FROM {TABLE}").rowcount
            n += self._evict_sealed(c)
        return n

    def purge_all(self) -> int:
        # Positions leave the device when sent (the rows are deleted as they are sealed, the
        # envelopes when acknowledged): what is held is exactly what is not yet sent.
        return self.purge_unsent()

    def purge_older(self, cutoff_ms: int) -> int:
        with self.store.batch() as c:
            n = c.execute(f"DELETE FROM {TABLE} WHERE t_ms < ?", (cutoff_ms,)).rowcount
            n += self._evict_sealed(c, older_than=cutoff_ms)
        return n

    def _evict_sealed(self, c, older_than: int | None = None) -> int:
        """Drops unacknowledged envelopes that carry positions; a ``buffer_evicted`` event per
        run of consecutive seqs explains the gap to the cloud."""
        where, params = ("WHERE created_ms < ?", (older_than,)) if older_than is not None else ("", ())
        rows = c.execute(f"SELECT seq, n FROM {SEALED} {where} ORDER BY seq", params).fetchall()
        if not rows:
            return 0
        have = {r[0] for r in c.execute(f"SELECT seq FROM outbox WHERE seq IN (SELECT seq FROM {SEALED})")}
        c.execute(f"DELETE FROM {SEALED} {where}", params)
        evicted = [(seq, n) for seq, n in rows if seq in have]
        if not evicted:
            return 0
        c.executemany("DELETE FROM outbox WHERE seq=?", [(seq,) for seq, _ in evicted])
        runs: list[list[int]] = []
        for seq, _ in evicted:
            if runs and seq == runs[-1][1] + 1:
                runs[-1][1] = seq
            else:
                runs.append([seq, seq])
        for a, b in runs:
            self._emit({"type": "buffer_evicted", "ts": self._clock.now_ms(), "from_seq": a, "to_seq": b,
                        "count": b - a + 1, "reason": "privacy: location data withdrawn by its owner"})
        return sum(n for _, n in evicted)

    # -- collection -----------------------------------------------------------------------
    def _on_state(self, state: str) -> None:
        self.gnss_state = state

    def _on_fix(self, fix) -> None:
        mode = self.privacy.mode("location")   # the gate at the point of collection
        with self._lock:
            if mode == "off" or self._mode == "off":
                self.dropped_gate += 1
                return
            if is_provisional_ms(fix.t_ms):     # no true time yet: a position without a time is useless
                self.dropped_gate += 1
                return
            if not self._rate_ok(mode, fix):
                self.dropped_rate += 1
                return
            self._last_kept = (fix.t_ms, fix.gnss_ms)
            if mode == "coarse":
                row = {"lat": pv.coarsen(fix.lat), "lon": pv.coarsen(fix.lon), "prec_m": pv.COARSE_PREC_M,
                       "mode": mode}
            else:
                prec = fix.prec_m if fix.prec_m is not None else UNKNOWN_PREC_M
                row = {"lat": fix.lat, "lon": fix.lon, "prec_m": int(math.ceil(prec)), "mode": mode}
            row["speed"] = round(fix.speed, 2) if fix.speed is not None else 0.0
            row["course"] = round(fix.course, 1) if fix.course is not None else 0.0
        try:
            blob = self.datakey.seal_obj(row, AAD)
            with self.store.batch() as c:
                c.execute(f"INSERT INTO {TABLE}(t_ms, blob) VALUES (?, ?)", (fix.t_ms, blob))
            self.kept += 1
        except Exception as e:
            self.errors += 1
            self.last_error = f"{type(e).__name__}: {e}"
            log.error("location: could not store a fix: %s", e)

    def _rate_ok(self, mode: str, fix) -> bool:
        last = self._last_kept
        if last is None:
            return True
        last_t, last_gnss = last
        if mode == "coarse":
            return fix.t_ms - last_t >= pv.COARSE_MIN_INTERVAL_MS
        if fix.gnss_ms is not None and last_gnss is not None \
                and 0 <= fix.gnss_ms - last_gnss < pv.PRECISE_MIN_INTERVAL_MS:
            return False   # the same epoch again (RMC and GGA), or a faster receiver
        return fix.t_ms - last_t >= pv.PRECISE_MIN_INTERVAL_MS - pv.ARRIVAL_SLACK_MS

    # -- sending --------------------------------------------------------------------------
    def contribute(self, body: dict) -> dict:
        """Uplink body hook, inside the sealing transaction: takes the unsent positions into
        ``body["positions"]`` and deletes them in that transaction (rolled back with it if the
        envelope cannot be sealed). Rebases ``t0`` if a position is older than the samples."""
        if body.get("type") is not None or "signals" not in body:
            return body
        mode = self.privacy.mode("location")
        if mode == "off":
            return body
        with self.store.batch() as c:
            taken = self._take(c, body, mode)
            if taken is None:
                return body
            pos, first = taken
            seq = self.store.last_uplink_seq   # the seq being sealed (taken before the body is built)
            c.execute(f"INSERT OR REPLACE INTO {SEALED}(seq, n, created_ms) VALUES (?,?,?)",
                      (seq, len(pos["t"]), first))
        body["positions"] = pos
        return body

    def _take(self, c, body: dict, mode: str) -> tuple[dict, int] | None:
        rows = c.execute(f"SELECT id, t_ms, blob FROM {TABLE} ORDER BY t_ms, id LIMIT ?",
                         (MAX_PER_BODY,)).fetchall()
        if not rows:
            return None
        fixes = []
        for rid, t_ms, blob in rows:
            try:
                fixes.append((t_ms, self.datakey.open_obj(blob, AAD)))
            except Exception as e:   # a row from before a key change cannot be read: drop it
                log.warning("location: dropping an unreadable position row: %s", e)
        c.execute(f"DELETE FROM {TABLE} WHERE id IN ({','.join('?' * len(rows))})", [r[0] for r in rows])
        if not fixes:
            return None
        t0 = int(body.get("t0") or 0)
        first = min(t for t, _ in fixes)
        if not body.get("signals") and not body.get("frames"):
            t0 = first
        elif first < t0:
            _rebase(body, first)
            t0 = first
        body["t0"] = t0
        pos = {"t": [t - t0 for t, _ in fixes], "lat": [f["lat"] for _, f in fixes],
               "lon": [f["lon"] for _, f in fixes], "speed": [f["speed"] for _, f in fixes],
               "course": [f["course"] for _, f in fixes],
               "prec_m": max(int(f["prec_m"]) for _, f in fixes)}
        if any(f.get("mode") != "coarse" for _, f in fixes) and mode == "coarse":
            pos = pv.enforce_positions(pos, "coarse")   # collected precise, now coarse: coarsen
            if pos is None:
                return None
        self.sent += len(pos["t"])
        return pos, first

    def pending(self) -> int:
        return self.store.query(f"SELECT count(*) FROM {TABLE}")[0][0]

    def flush(self, min_age_ms: int | None = None) -> int | None:
        """Seals a positions-only telemetry envelope if positions have waited longer than
        ``min_age_ms`` (default: twice the upload interval) without telemetry taking them."""
        if self._seal is None or self.privacy.mode("location") == "off":
            return None
        age = min_age_ms if min_age_ms is not None else int(2000 * self._interval_s())
        oldest = self.store.query(f"SELECT min(t_ms) FROM {TABLE}")[0][0]
        if oldest is None or self._clock.now_ms() - oldest < age:
            return None

        def build(seq: int) -> bytes:
            body = self.contribute({"t0": 0, "signals": []})
            body = self.privacy.body_filter(body)
            if not body or "positions" not in body:
                raise _Nothing()
            return self._seal("telemetry", body, seq)

        try:
            seq = self.store.enqueue(build, "up/telemetry", PRIO_TELEMETRY)
        except _Nothing:
            return None
        self._wake()
        return seq

    # -- lifecycle ------------------------------------------------------------------------
    def location_active(self) -> bool:
        """True while location is being collected (gpsd read under a consent): the LED."""
        with self._lock:
            return self._mode != "off" and self._reader is not None and self.privacy.mode("location") != "off"

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="location", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(5)
        self.on_stopped()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            try:
                self.flush()
                if self.store.query(f"SELECT count(*) FROM {SEALED}")[0][0]:
                    with self.store.batch() as c:   # forget envelopes the broker has acknowledged
                        c.execute(f"DELETE FROM {SEALED} WHERE seq NOT IN (SELECT seq FROM outbox)")
            except Exception as e:
                self.errors += 1
                self.last_error = f"{type(e).__name__}: {e}"
                log.exception("location: flush failed")
                self._stop.wait(5.0)

    def status(self) -> dict:
        reader = self._reader
        return {"mode": self._mode, "active": self.location_active(), "gnss": reader.status() if reader else
                {"state": "stopped"}, "kept": self.kept, "sent": self.sent, "pending": self.pending(),
                "dropped_gate": self.dropped_gate, "dropped_rate": self.dropped_rate, "errors": self.errors,
                "last_error": self.last_error}


class _Nothing(Exception):
    """Nothing to seal after all (the rows went, or the gate closed)."""


def _rebase(body: dict, t0: int) -> None:
    shift = int(body["t0"]) - t0
    for sig in body.get("signals", []):
        sig["t"] = [t + shift for t in sig["t"]]
    for grp in body.get("frames", []):
        if "dt" in grp:   # PROTOCOL rev 1.1 steps: only the first is an offset from t0
            grp["dt"][0] += shift * 1000
        else:
            grp["t"] = [t + shift * 1000 for t in grp["t"]]
