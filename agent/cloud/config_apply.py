"""The cloud config in force (PROTOCOL §4 ``config``) and how a new one takes effect.

:class:`ActiveConfig` holds the document every component reads (``current()``), persisted in
the store. :class:`ConfigApplier` is the ``down/config`` handler: a newer document is applied as
a whole — acquisition, upload interval, raw capture and the broker endpoint switch together —
and each component says what it could not apply (a PID the car lacks, a DBC message that does
not exist), which goes back in the ack's ``result.problems``.

A document that moves the broker link (``link.broker_url``) is put on probation: it is acked
``applied`` only once the device is connected with it, or rolled back to the last good document
after ``rollback_s`` and acked ``failed`` (PROTOCOL §4: "A config that leaves the device unable to
reach the broker is rolled back"). A restart during probation resumes it.
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

log = logging.getLogger(__name__)

Applier = Callable[[dict], list[str]]


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
    def apply(self, doc: dict) -> list[str]:
        """Makes ``doc`` the active config at run time, as a whole. Returns what did not apply."""
        problems: list[str] = []
        with self._lock:
            old_endpoint = self.endpoint(self.active.current())
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
        """The ``down/config`` handler (agent/cloud/downlink.py)."""
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
        if endpoint != self.endpoint(previous):
            # Acknowledged only once the device is connected with it (probation).
            self._store.save_config(doc)
            return Outcome("applied", config_version=version, send_ack=False,
                           after_commit=lambda: self._start_probation(doc, previous, opened.seq))
        problems = self.apply(doc)
        return Outcome("applied", config_version=version, result={"problems": problems} if problems else None)

    # -- probation ------------------------------------------------------------------------------
    def resume(self) -> None:
        """At start: resumes the probation of a link-moving config the agent stopped during."""
        pending = self._store.get_meta("config_probation")
        if pending:
            log.warning("resuming the probation of config v%s", pending["doc"]["version"])
            self._start_probation(pending["doc"], pending["previous"], pending["ref_seq"])

    def _start_probation(self, doc: dict, previous: dict, ref_seq: int) -> None:
        with self._lock:
            # Persisted: a restart during probation resumes it (and still acks exactly once).
            self._store.set_meta("config_probation", {"doc": doc, "previous": previous, "ref_seq": ref_seq})
            self._probation = {"doc": doc, "previous": previous, "ref_seq": ref_seq,
                               "deadline": time.monotonic() + self._rollback_s,
                               "connects_before": self._link.stats["connects"]}
            self._probation["problems"] = self.apply(doc)
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
                self._store.set_meta("config_probation", None)
                self._send_ack("config", p["ref_seq"], "applied", config_version=p["doc"]["version"],
                               result={"problems": p["problems"]} if p["problems"] else None)
                log.info("config v%s: broker reachable, applied", p["doc"]["version"])
                return
            if time.monotonic() < p["deadline"]:
                return
            self._probation = None
            self._store.set_meta("config_probation", None)
            bad, good = p["doc"], p["previous"]
            log.error("config v%s: broker not reachable within %ss; rolling back to v%s",
                      bad["version"], self._rollback_s, good.get("version"))
            self.apply(good)
            self._send_ack("config", p["ref_seq"], "failed", config_version=good.get("version", 0),
                           reason=f"broker not reachable within {self._rollback_s} s with config "
                                  f"v{bad['version']}; rolled back to v{good.get('version', 0)}")
