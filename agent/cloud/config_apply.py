"""The cloud config in force (PROTOCOL §4 ``config``) and how a new one takes effect.

:class:`ActiveConfig` holds the document every component reads (``current()``), persisted in
the store. :class:`ConfigApplier` is the ``down/config`` handler: a newer document is applied as
a whole — acquisition, upload interval, raw capture and the broker endpoint switch together —
and each component says what it could not apply (a PID the car lacks, a DBC message that does
not exist), which goes back in the ack's ``result.problems``.

Order (agent/cloud/downlink.py). Inside the downlink worker's transaction, :meth:`handle` only
decides and stores: the document becomes the stored active config, and the ack it is owed is
recorded (meta ``config_ack_owed``) in that same transaction. After the commit the document is
applied to the running components (outside the store's lock: a withdrawn consent's deletion and
WAL flush, a collector's restart) and the ``applied`` ack, with what did not apply, is queued in
one transaction with the owed record's removal. An agent that dies in between starts with the
stored document, applies it, and sends the owed ack then: exactly one ack either way.

A document that moves the broker link (``link.broker_url``) is put on probation: it is acked
``applied`` only once the device is connected with it, or rolled back to the last good document
after ``rollback_s`` and acked ``failed`` (PROTOCOL §4: "A config that leaves the device unable to
reach the broker is rolled back"). The probation is recorded in the same transaction as the
document, so a restart during probation (or before it began) resumes it.

What did not apply goes back in ``result.problems``: at most :data:`MAX_PROBLEMS` texts of at
most :data:`MAX_PROBLEM_CHARS` characters (control characters escaped), then one saying how many
more there were, so the ack always fits an uplink envelope whatever the document names.
"""
from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

from agent.cloud import cloudconfig
from agent.cloud.downlink import Outcome
from drivers.core.text import safe_text

log = logging.getLogger(__name__)

Applier = Callable[[dict], list[str]]

META_ACK_OWED = "config_ack_owed"
META_PROBATION = "config_probation"
MAX_PROBLEMS = 20
MAX_PROBLEM_CHARS = 300


def problems_result(problems: Sequence[str]) -> dict | None:
    """The ack's ``result`` for what did not apply (None when everything did), bounded."""
    if not problems:
        return None
    out = [safe_text(p, MAX_PROBLEM_CHARS) for p in problems[:MAX_PROBLEMS]]
    if len(problems) > MAX_PROBLEMS:
        out.append(f"... and {len(problems) - MAX_PROBLEMS} more")
    return {"problems": out}


def endpoint(doc: dict, local: tuple[str, int]) -> tuple[str, int]:
    """The broker to use: the cloud config's ``link.broker_url`` if set, else the local one.
    Raises ValueError for a port out of range."""
    url = (doc.get("link") or {}).get("broker_url")
    if url:
        u = urlsplit(url)
        port = u.port  # raises ValueError when out of range
        return u.hostname or "", 8883 if port is None else port
    return local


class ActiveConfig:
    """The cloud config in force: the store's active document, else the shipped default."""

    def __init__(self, store):
        self._store = store
        self._doc = store.active_config() or cloudconfig.default_config()

    def current(self) -> dict:
        return self._doc

    @property
    def version(self) -> int:
        return int(self._doc.get("version", 0))

    def replace(self, doc: dict) -> None:
        self._store.save_config(doc)
        self._doc = doc

    def use(self, doc: dict) -> None:
        """Makes ``doc`` the one in force in memory (it is already stored)."""
        self._doc = doc


class ConfigApplier:
    """Applies cloud configs to the components (``appliers``, by name) and the MQTT link."""

    def __init__(self, active: ActiveConfig, store, link, *,
                 appliers: Sequence[tuple[str, Applier]], local_endpoint: tuple[str, int],
                 rollback_s: float, send_ack: Callable[..., int], wake_uplink: Callable[[], None]):
        self.active = active
        self._store = store
        self._link = link
        self._appliers = list(appliers)
        self._local_endpoint = local_endpoint
        self._rollback_s = rollback_s
        self._send_ack = send_ack
        self._wake_uplink = wake_uplink
        self._lock = threading.RLock()
        self._probation: dict | None = None

    # -- the endpoint -----------------------------------------------------------------------
    def endpoint(self, doc: dict) -> tuple[str, int]:
        return endpoint(doc, self._local_endpoint)

    # -- applying -----------------------------------------------------------------------------
    def apply(self, doc: dict, *, stored: bool = False) -> list[str]:
        """Makes ``doc`` the active config at run time, as a whole (``stored``: it is the
        stored active config already). Returns what did not apply. Outside any transaction."""
        problems: list[str] = []
        with self._lock:
            old_endpoint = self.endpoint(self.active.current())
            if stored:
                self.active.use(doc)
            else:
                self.active.replace(doc)
            for name, applier in self._appliers:
                try:
                    problems += [f"{name}: {p}" for p in (applier(doc) or [])]
                except Exception as e:  # one component's bug must not leave the others unapplied
                    log.exception("config v%s: applying to %s failed", doc.get("version"), name)
                    problems.append(f"{name}: internal error: {type(e).__name__}")
            if self.endpoint(doc) != old_endpoint:
                self._link.reconnect_to(*self.endpoint(doc))
        self._wake_uplink()
        self._link.publish_status()
        return problems

    def handle(self, opened) -> Outcome:
        """The ``down/config`` handler (agent/cloud/downlink.py): inside the worker's
        transaction; decides and stores, applies after the commit."""
        doc = opened.body
        version, current = doc["version"], self.active.version
        if version == current:
            return Outcome("duplicate", config_version=current)
        if version < current:
            return Outcome("rejected", reason=f"version {version} is not newer than the active {current}",
                           config_version=current)
        try:
            endpoint = self.endpoint(doc)
            if not 0 < endpoint[1] < 65536:
                raise ValueError("port out of range")
        except ValueError as e:
            return Outcome("rejected", reason=f"link.broker_url: {e}", config_version=current)
        previous = copy.deepcopy(self.active.current())
        self._store.save_config(doc)
        if endpoint != self.endpoint(previous):
            # Acknowledged only once the device is connected with it (probation).
            self._store.set_meta(META_PROBATION, {"doc": doc, "previous": previous, "ref_seq": opened.seq})
            return Outcome("applied", config_version=version, send_ack=False,
                           after_commit=lambda: self._start_probation(doc, previous, opened.seq))
        self._store.set_meta(META_ACK_OWED, {"ref_seq": opened.seq, "version": version})
        return Outcome("applied", config_version=version, send_ack=False,
                       after_commit=lambda: self._apply_and_ack(doc, opened.seq))

    def _apply_and_ack(self, doc: dict, ref_seq: int) -> None:
        """After the commit: applies the stored ``doc`` and queues its owed ``applied`` ack."""
        problems = self.apply(doc, stored=True)
        with self._store.batch():
            self._send_ack("config", ref_seq, "applied", config_version=doc["version"],
                           result=problems_result(problems))
            self._store.set_meta(META_ACK_OWED, None)
        log.info("config v%s applied%s", doc["version"], f" ({len(problems)} problems)" if problems else "")

    # -- the component: at start, and probation ----------------------------------------------
    def start(self) -> None:
        """Started just before the downlink worker (agent/compose.py), so that an owed ack or a
        probation is taken up before any new config is."""
        self.resume()

    def stop(self) -> None:
        pass

    def apply_config(self, doc: dict) -> list[str]:
        return []

    def status(self) -> dict:
        with self._lock:
            p = self._probation
        return {"version": self.active.version,
                "probation": None if p is None else {"version": p["doc"].get("version"), "ref_seq": p["ref_seq"]}}

    def resume(self) -> None:
        """At start: sends the ack of a config committed but not yet acked when the agent
        stopped, and resumes the probation of a link-moving config it stopped during."""
        owed = self._store.get_meta(META_ACK_OWED)
        if owed:
            log.warning("config v%s: stored before the agent stopped, not yet acked; acking now", owed["version"])
            self._apply_and_ack(self.active.current(), owed["ref_seq"])
        pending = self._store.get_meta(META_PROBATION)
        if pending and self.active.version != pending["doc"]["version"]:
            # Rolled back already (the stored config is the previous one); only the ack is owed.
            self._fail_probation(pending["doc"], self.active.current(), pending["ref_seq"])
        elif pending:
            log.warning("resuming the probation of config v%s", pending["doc"]["version"])
            self._start_probation(pending["doc"], pending["previous"], pending["ref_seq"])

    def _start_probation(self, doc: dict, previous: dict, ref_seq: int) -> None:
        with self._lock:
            # The record (meta config_probation) was committed with the document: a restart
            # during probation resumes it (and still acks exactly once).
            self._probation = {"doc": doc, "previous": previous, "ref_seq": ref_seq,
                               "deadline": time.monotonic() + self._rollback_s,
                               "connects_before": self._link.stats["connects"]}
            self._probation["problems"] = self.apply(doc, stored=True)
        log.info("config v%s moves the broker link; on probation for %ss", doc["version"], self._rollback_s)

    def tick(self) -> None:
        """Called by the agent's supervisor twice a second: ends a probation either way."""
        with self._lock:
            p = self._probation
            if p is None:
                return
            # Connected again after the switch: a session to the new endpoint has been accepted.
            if self._link.connected and self._link.stats["connects"] > p["connects_before"]:
                self._probation = None
                with self._store.batch():
                    self._send_ack("config", p["ref_seq"], "applied", config_version=p["doc"]["version"],
                                   result=problems_result(p["problems"]))
                    self._store.set_meta(META_PROBATION, None)
                log.info("config v%s: broker reachable, applied", p["doc"]["version"])
                return
            if time.monotonic() < p["deadline"]:
                return
            self._probation = None
            bad, good = p["doc"], p["previous"]
            log.error("config v%s: broker not reachable within %ss; rolling back to v%s",
                      bad["version"], self._rollback_s, good.get("version"))
            self.apply(good)
            self._fail_probation(bad, good, p["ref_seq"])

    def _fail_probation(self, bad: dict, good: dict, ref_seq: int) -> None:
        with self._store.batch():
            self._send_ack("config", ref_seq, "failed", config_version=good.get("version", 0),
                           reason=f"broker not reachable within {self._rollback_s} s with config "
                                  f"v{bad['version']}; rolled back to v{good.get('version', 0)}")
            self._store.set_meta(META_PROBATION, None)
