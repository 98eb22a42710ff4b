"""The agent's updater: ``down/release`` handler, download/install worker, trial monitor.

Wiring (agent/compose.py)::

    up = Updater(UpdateSettings(root=Path("/opt/dongle"), tuf_root=keys_dir / "tuf_root.json",
                                metadata_dir=data_dir / "tuf", ca_file=...),
                 emit_event=store_event, parked=lambda: not ignition_on, supply_v=mcu_supply,
                 health=lambda: {"store": True, "broker": link.connected, "vehicle": ...},
                 restart=agent_exit_for_restart, mcu=lambda: mcu_link, agent_version=VERSION)
    downlink handlers["release"] = up.handle_release
    up.start() ... up.stop(); up.status()

The handler answers synchronously from what it can check without the network (component,
counters, a trial in progress) and persists the release as *pending*; the ack is
``accepted`` or ``rejected`` with the reason. Everything that needs the repository (TUF
verification, hardware id, custom fields, bytes) happens in the worker, whose outcome is an
``update`` event: ``downloading`` (with ``bytes_done``/``bytes_total``), ``installed``,
``trial``, ``good``, ``rolled_back`` or ``rejected`` with the reason.
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.settings import UpdateSettings
from drivers.core.clock import Clock
from agent.cloud.downlink import Outcome
from agent.update import bundle, delta, slots, state, trial
from agent.update.slots import Layout
from agent.update.trial import update_event
from agent.update.tuf_errors import DOWNLOAD_FAILED, TufError

if TYPE_CHECKING:
    from agent.update.tuf_client import TufClient

log = logging.getLogger(__name__)

WRONG_HARDWARE = "wrong_hardware"
TARGET_MISMATCH = "target_mismatch"
STALE_COUNTER = "stale_counter"
BLOCKED = "blocked_counter"
INSTALL_FAILED = "install_failed"
MCU_REJECTED = "mcu_rejected"
INVALID_VERSION = "invalid_version"


class Rejected(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


Progress = Callable[[int, int], None]


# --- the pipeline (also run by `dongle-update install`) ----------------------------------------

def check_target(info: Any, release: Mapping[str, Any], hardware_id: str, kind: str) -> dict:
    """Checks a target's signed custom fields against the release; returns them."""
    custom = dict(info.custom or {})
    if hardware_id not in (custom.get("hardware_ids") or []):
        raise Rejected(WRONG_HARDWARE, f"{info.path} is for {custom.get('hardware_ids')}, "
                                       f"this device is {hardware_id}")
    for key in ("component", "version", "release_counter"):
        if custom.get(key) != release.get(key):
            raise Rejected(TARGET_MISMATCH, f"{info.path}: signed {key} {custom.get(key)!r} "
                                            f"differs from the release's {release.get(key)!r}")
    if custom.get("kind") != kind:
        raise Rejected(TARGET_MISMATCH, f"{info.path} is a {custom.get('kind')!r}, not a {kind}")
    return custom


def _part(layout: Layout, info: Any) -> Path:
    """The resumable download of a target, named by its signed hash (never by its path: a
    target re-published under the same path must not resume onto the old bytes)."""
    from agent.update.tuf_client import part_name
    return layout.downloads / part_name(info)


def fetch_agent(tuf: TufClient, layout: Layout, release: Mapping[str, Any], hardware_id: str,
                *, max_bytes: int, progress: Progress | None = None) -> tuple[bytes, bytes | None, str]:
    """Downloads and verifies the release's bundle (delta first, full as fallback).

    Returns (uncompressed tar, compressed bundle or None, "delta"/"full"). Raises
    :class:`TufError` or :class:`Rejected`.
    """
    repo = release["repository"]
    current = layout.current_version()
    if release.get("delta_target") and release.get("delta_from") == current and current:
        try:
            info, url = tuf.target_info(repo, release["delta_target"])
            custom = check_target(info, release, hardware_id, "delta")
            if custom.get("delta_from") != current:
                raise Rejected(TARGET_MISMATCH, f"delta is from {custom.get('delta_from')}")
            base = slots.installed_tar(layout, current)
            if base is None:
                raise Rejected(INSTALL_FAILED, f"no copy of the {current} bundle to patch")
            patch = tuf.download(info, url, _part(layout, info), progress)
            tar = delta.apply_delta(base, patch, min(max_bytes, int(custom["tar_size"])))
            if hashlib.sha256(tar).hexdigest() != custom.get("tar_sha256"):
                raise Rejected(INSTALL_FAILED, "patched bundle does not match its signed hash")
            _part(layout, info).unlink(missing_ok=True)
            return tar, None, "delta"
        except (TufError, Rejected, delta.DeltaError, KeyError) as e:
            if isinstance(e, TufError) and e.retryable:
                raise
            log.warning("update: delta unusable (%s); falling back to the full bundle", e)
    info, url = tuf.target_info(repo, release["target"])
    custom = check_target(info, release, hardware_id, "bundle")
    data = tuf.download(info, url, _part(layout, info), progress)
    try:
        tar = bundle.decompress(data, max_bytes)
    except bundle.BundleError as e:
        raise Rejected(INSTALL_FAILED, str(e)) from e
    if hashlib.sha256(tar).hexdigest() != custom.get("tar_sha256"):
        raise Rejected(INSTALL_FAILED, "bundle content does not match its signed tar hash")
    _part(layout, info).unlink(missing_ok=True)
    return tar, data, "full"


def install_slot(layout: Layout, release: Mapping[str, Any], tar: bytes,
                 compressed: bytes | None, *, compile_bytecode: bool = True) -> None:
    """Installs the release's slot (not active). Idempotent."""
    manifest = bundle.read_manifest(tar)
    if manifest.get("version") != release["version"]:
        raise Rejected(TARGET_MISMATCH, f"bundle manifest says {manifest.get('version')!r}")
    slots.install(layout, release["version"], tar, compressed=compressed,
                  compile_bytecode=compile_bytecode)


def activate_on_trial(layout: Layout, release: Mapping[str, Any], *,
                      max_starts: int = trial.MAX_STARTS) -> str | None:
    """Records the trial, then flips ``current`` to the installed slot. Idempotent. Returns
    the version that was current before."""
    version = release["version"]
    old = layout.current_version()
    if old == version:
        t = state.load(layout).get("trial") or {}
        return t.get("from")
    trial.begin(layout, version, old, int(release["release_counter"]), max_starts=max_starts)
    slots.activate(layout, version)
    return old


# --- the Updater ---------------------------------------------------------------------------------

class Updater:
    def __init__(self, settings: UpdateSettings, *, emit_event: Callable[[dict], None],
                 parked: Callable[[], bool | None] = lambda: None,
                 supply_v: Callable[[], float | None] = lambda: None,
                 health: trial.Health = lambda: {},
                 restart: Callable[[], None] = lambda: None,
                 mcu: Callable[[], Any] = lambda: None,
                 agent_version: str | None = None,
                 tuf: TufClient | None = None,
                 clock: Clock | None = None, clock_synced: Callable[[], bool] | None = None,
                 monotonic: Callable[[], float] = time.monotonic):
        self.settings = settings
        self.layout = settings.layout()
        self.emit_event = emit_event
        self._parked = parked
        self._supply_v = supply_v
        self._restart = restart
        self._mcu = mcu
        self.agent_version = agent_version
        self._tuf = tuf
        self._clock = clock or Clock()
        self._synced = clock_synced or self._clock.is_synced
        self.monitor = trial.TrialMonitor(self.layout, health, stable_s=settings.stable_s,
                                          trial_s=settings.trial_s, monotonic=monotonic)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._retry_at: dict[str, float] = {}
        self._mono = monotonic
        self.activity: dict[str, Any] = {}

    @property
    def tuf(self) -> TufClient:
        """The TUF client, built when first needed: python-tuf and urllib3 are imported only
        once a release is being fetched (an agent that is not updating does without them)."""
        if self._tuf is None:
            from agent.update.tuf_client import TufClient
            s = self.settings
            self._tuf = TufClient(s.metadata_dir, s.tuf_root, ca_file=s.ca_file, rate_bps=s.rate_bps)
        return self._tuf

    # --- downlink handler -----------------------------------------------------------------------

    def handle_release(self, opened: Any) -> Outcome:
        body = opened.body
        comp, version, counter = body["component"], body["version"], int(body["release_counter"])
        # The downlink has held the body against config/schemas/release.json, which says what a
        # version is; checked again here because a version names a directory.
        for key in ("version", "delta_from"):
            if key in body:
                try:
                    slots.check_version(body[key])
                except slots.SlotError as e:
                    return Outcome("rejected", reason=f"{INVALID_VERSION}: {key}: {e}")
        with state.locked(self.layout) as st:
            installed = st[comp]
            if counter <= int(installed.get("release_counter", 0)):
                return Outcome("rejected", reason=(
                    f"{STALE_COUNTER}: release_counter {counter} is not above the installed "
                    f"{installed.get('release_counter', 0)}"))
            if counter <= int(installed.get("blocked_counter", 0)):
                return Outcome("rejected", reason=(
                    f"{BLOCKED}: release_counter {counter} was rolled back; "
                    "waiting for a higher one"))
            t = st.get("trial")
            if comp == "agent" and t and int(t["release_counter"]) >= counter:
                return Outcome("rejected", reason=(
                    f"{STALE_COUNTER}: {t['version']} (counter {t['release_counter']}) "
                    "is on trial"))
            prev = st["pending"].get(comp)
            if prev and int(prev["release"]["release_counter"]) > counter:
                return Outcome("rejected", reason=(
                    f"{STALE_COUNTER}: counter {prev['release']['release_counter']} is pending"))
            st["pending"][comp] = {"release": dict(body), "seq": opened.seq,
                                   "accepted_ms": self._clock.now_ms()}
        log.info("update: accepted %s %s (counter %d)", comp, version, counter)
        self._retry_at.pop(comp, None)
        return Outcome("accepted", after_commit=self._wake.set)

    # --- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        slots.prepare(self.layout)
        self.flush_reports()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="updater", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def wake(self) -> None:
        self._wake.set()

    def flush_reports(self) -> int:
        """Sends the reports that code outside the agent queued (rollbacks)."""
        with state.locked(self.layout) as st:
            reports, st["reports"] = list(st.get("reports", [])), []
        for body in reports:
            self.emit_event(body)
        return len(reports)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except Exception:  # noqa: BLE001 - the worker must survive anything
                log.exception("update: worker step failed")
            self._wake.wait(self.settings.poll_s)
            self._wake.clear()

    # --- the work ---------------------------------------------------------------------------------

    def step(self) -> list[str]:
        """One pass: trial monitor, then each pending release. Returns what happened."""
        done: list[str] = []
        verdict = self.monitor.tick()
        if verdict == "good":
            t = self.monitor.finished or {}
            self.emit_event(update_event("agent", t.get("from"), t.get("version", "?"), "good"))
            slots.gc(self.layout)
            done.append("agent:good")
        elif verdict == "rolled_back":
            self.flush_reports()
            done.append("agent:rolled_back")
            self._restart()
            return done
        pending = state.load(self.layout)["pending"]
        for comp in ("agent", "mcu"):
            item = pending.get(comp)
            if item and self._mono() >= self._retry_at.get(comp, 0):
                done.append(f"{comp}:{self._process(comp, item['release'])}")
        return done

    def _waiting(self, comp: str, release: Mapping[str, Any], why: str) -> str:
        self.activity = {"component": comp, "to": release["version"], "state": "waiting",
                         "waiting_for": why}
        return f"waiting ({why})"

    def _conditions(self, release: Mapping[str, Any]) -> str | None:
        cond = release.get("conditions", {})
        if cond.get("parked"):
            parked = self._parked()
            if parked is not True:
                return "parked" if parked is False else "parked (unknown)"
        min_v = cond.get("min_supply_v") or 0
        if min_v:
            v = self._supply_v()
            if v is None or v < min_v:
                return f"supply >= {min_v} V (now {v})"
        return None

    def _process(self, comp: str, release: Mapping[str, Any]) -> str:
        try:
            slots.check_version(release["version"])
        except slots.SlotError as e:     # pending from before versions were checked
            return self._reject(comp, release, None, INVALID_VERSION, str(e))
        if release.get("not_before") and self._clock.now_ms() < int(release["not_before"]):
            return self._waiting(comp, release, "not_before")
        if not self._synced():
            return self._waiting(comp, release, "clock sync (TUF expiry needs the time)")
        if comp == "agent":
            t = trial.active(self.layout)
            if t and t["version"] == release["version"]:
                return "on trial"
        frm = state.load(self.layout)[comp].get("version") or (
            self.layout.current_version() if comp == "agent" else None) or self.agent_version
        try:
            if comp == "agent":
                return self._process_agent(release, frm)
            return self._process_mcu(release, frm)
        except TufError as e:
            if e.retryable:
                self._retry_at[comp] = self._mono() + self.settings.retry_s
                self.activity = {"component": comp, "to": release["version"], "state": "retrying",
                                 "error": str(e)}
                log.warning("update: %s %s: %s (retrying)", comp, release["version"], e)
                return "retry"
            return self._reject(comp, release, frm, e.reason, e.detail)
        except Rejected as e:
            return self._reject(comp, release, frm, e.reason, e.detail)
        except (OSError, slots.SlotError, bundle.BundleError) as e:
            self._retry_at[comp] = self._mono() + self.settings.retry_s
            log.error("update: installing %s %s failed: %s (retrying)", comp, release["version"], e)
            return "retry"

    def _reject(self, comp: str, release: Mapping[str, Any], frm: str | None, reason: str,
                detail: str) -> str:
        log.warning("update: %s %s rejected: %s: %s", comp, release["version"], reason, detail)
        with state.locked(self.layout) as st:
            if (st["pending"].get(comp) or {}).get("release", {}).get("release_counter") == \
                    release["release_counter"]:
                st["pending"].pop(comp, None)
        self.emit_event(update_event(comp, frm, release["version"], "rejected",
                                     f"{reason}: {detail}"))
        self.activity = {"component": comp, "to": release["version"], "state": "rejected",
                         "reason": reason}
        return f"rejected ({reason})"

    def _progress(self, comp: str, release: Mapping[str, Any], frm: str | None) -> Progress:
        marks = {25, 50, 75}
        sent: set[int] = set()

        def progress(done: int, total: int) -> None:
            self.activity = {"component": comp, "to": release["version"], "state": "downloading",
                             "bytes_done": done, "bytes_total": total}
            pct = done * 100 // max(total, 1)
            for m in sorted(marks - sent):
                if pct >= m:
                    sent.add(m)
                    self.emit_event(update_event(comp, frm, release["version"], "downloading",
                                                 bytes_done=done, bytes_total=total))
                    break
        return progress

    def _process_agent(self, release: Mapping[str, Any], frm: str | None) -> str:
        version = release["version"]
        s = self.settings
        how = "kept"
        if not self.layout.slot(version).is_dir():
            # Downloading is fine while driving; only the switch waits for the conditions.
            self.emit_event(update_event("agent", frm, version, "downloading"))
            tar, compressed, how = fetch_agent(self.tuf, self.layout, release, s.hardware_id,
                                               max_bytes=s.max_bundle_bytes,
                                               progress=self._progress("agent", release, frm))
            install_slot(self.layout, release, tar, compressed,
                         compile_bytecode=s.compile_bytecode)
            self.emit_event(update_event("agent", frm, version, "installed", via=how))
        on_trial = trial.active(self.layout)
        if on_trial and on_trial["version"] != version:
            # Never switch away from a version still on trial: "previous" would then be one that
            # never proved itself, and a rollback would land on it. The download is kept.
            return self._waiting("agent", release, f"trial of {on_trial['version']}")
        why = self._conditions(release)
        if why:
            return self._waiting("agent", release, why)
        old = activate_on_trial(self.layout, release, max_starts=s.max_starts)
        self.emit_event(update_event("agent", old or frm, version, "trial"))
        self.activity = {"component": "agent", "to": version, "state": "trial"}
        log.info("update: %s installed (%s); restarting into it on trial", version, how)
        self._restart()
        return "trial"

    def _process_mcu(self, release: Mapping[str, Any], frm: str | None) -> str:
        from firmware_bridge.port import FirmwareRejected, FirmwareRolledBack, McuError

        version = release["version"]
        link = self._mcu()
        if link is None:
            return self._waiting("mcu", release, "MCU link")
        why = self._conditions(release)
        if why:
            return self._waiting("mcu", release, why)
        self.emit_event(update_event("mcu", frm, version, "downloading"))
        info, url = self.tuf.target_info(release["repository"], release["target"])
        custom = check_target(info, release, self.settings.mcu_hardware_id, "image")
        image = self.tuf.download(info, url, _part(self.layout, info),
                                  self._progress("mcu", release, frm))
        try:
            signature = bytes.fromhex(custom["mcu_signature"])
        except (KeyError, ValueError) as e:
            raise Rejected(TARGET_MISMATCH, f"{info.path}: no valid mcu_signature") from e
        self.emit_event(update_event("mcu", frm, version, "installed"))

        def flash_progress(done: int, total: int) -> None:
            self.activity = {"component": "mcu", "to": version, "state": "flashing",
                             "bytes_done": done, "bytes_total": total}
        try:
            running = link.update_firmware(image, signature, flash_progress,
                                           trial_s=self.settings.mcu_trial_s)
        except FirmwareRejected as e:
            raise Rejected(MCU_REJECTED, str(e)) from e
        except FirmwareRolledBack as e:
            with state.locked(self.layout) as st:
                state.block(st, "mcu", int(release["release_counter"]))
                st["pending"].pop("mcu", None)
            self.emit_event(update_event("mcu", frm, version, "rolled_back", f"mcu: {e}"))
            return "rolled_back"
        except McuError as e:
            raise TufError(DOWNLOAD_FAILED, f"MCU link: {e}") from e  # resumable: retry
        with state.locked(self.layout) as st:
            state.raise_counter(st, "mcu", int(release["release_counter"]), running)
            st["pending"].pop("mcu", None)
        _part(self.layout, info).unlink(missing_ok=True)
        self.emit_event(update_event("mcu", frm, version, "good"))
        self.activity = {"component": "mcu", "to": version, "state": "good"}
        return "good"

    # --- status -----------------------------------------------------------------------------------

    def apply_config(self, doc: dict) -> list[str]:
        return []

    def status(self) -> dict:
        st = state.load(self.layout)
        return {
            "agent": {**st["agent"], "current": self.layout.current_version(),
                      "previous": self.layout.previous_version()},
            "mcu": st["mcu"],
            "pending": {c: {"version": p["release"]["version"],
                            "release_counter": p["release"]["release_counter"]}
                        for c, p in st["pending"].items()},
            "trial": ({**st["trial"], **self.monitor.status()} if st.get("trial") else None),
            "activity": dict(self.activity),
            "bytes_downloaded": self._tuf.bytes_downloaded if self._tuf else 0,
        }


def format_status(st: Mapping[str, Any]) -> str:
    """The ``update`` section of ``dongle status``."""
    lines = []
    a = st.get("agent", {})
    lines.append(f"agent    {a.get('current') or a.get('version') or '?'} "
                 f"(counter {a.get('release_counter', 0)}, previous {a.get('previous') or '-'})")
    m = st.get("mcu", {})
    lines.append(f"mcu      {m.get('version') or '?'} (counter {m.get('release_counter', 0)})")
    for comp, p in (st.get("pending") or {}).items():
        lines.append(f"pending  {comp} {p['version']} (counter {p['release_counter']})")
    t = st.get("trial")
    if t:
        lines.append(f"trial    {t['version']}: start {t.get('starts', 0)}/{t.get('max_starts')}, "
                     f"healthy for {t.get('healthy_since_s') or 0} s")
    act = st.get("activity") or {}
    if act:
        extra = ""
        if act.get("bytes_total"):
            extra = f" {act['bytes_done']}/{act['bytes_total']} bytes " \
                    f"({act['bytes_done'] * 100 // act['bytes_total']}%)"
        if act.get("waiting_for"):
            extra = f" for {act['waiting_for']}"
        lines.append(f"activity {act.get('component')} {act.get('to')}: {act.get('state')}{extra}")
    return "\n".join(lines)
