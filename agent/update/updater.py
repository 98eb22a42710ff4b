"""The agent's updater: ``down/release`` handler, download worker, trial monitor.

Wiring (agent/compose.py)::

    up = Updater(UpdateSettings(root=Path("/opt/dongle"), work_dir=data_dir / "update",
                                tuf_root=keys_dir / "tuf_root.json", metadata_dir=data_dir / "tuf"),
                 emit_event=store_event, parked=lambda: not ignition_on, supply_v=mcu_supply,
                 health=lambda: {"store": True, "broker": link.connected, "vehicle": ...},
                 restart=agent_exit_for_restart, mcu=lambda: mcu_link, agent_version=VERSION)
    downlink handlers["release"] = up.handle_release
    up.start() ... up.stop(); up.status()

The handler answers synchronously from what it can check without the network (component,
version, counters, a trial in progress) and persists the release as *pending*; the ack is
``accepted`` or ``rejected`` with the reason. Everything that needs the repository (TUF
verification, hardware id, custom fields, bytes) happens in the worker.

The agent cannot change its installed code (docs/updates.md, "Privilege"): the worker downloads
and verifies into its staging area, then, once the release's conditions hold, asks the installer
(agent.update.request: ``install``), which verifies everything again as root and flips
``current``. The trial monitor's verdicts (``good``, ``rollback``) are requests too. The
installer's reports (``installed``, ``trial``, ``good``, ``rolled_back``, ``rejected``) are sent
as ``update`` events by :meth:`Updater.flush_reports`; the worker sends ``downloading`` (with
``bytes_done``/``bytes_total``) and its own ``rejected``. Whenever ``current`` no longer names
the slot this agent was started from, it asks for a restart (exit 75).
"""
from __future__ import annotations

import hashlib
import logging
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from agent.settings import UpdateSettings
from drivers.core.clock import Clock
from agent.cloud.downlink import Outcome
from agent.update import bundle, delta, request, slots, state, trial
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
#: A request the installer has not answered is written again after this long (a lost trigger,
#: a power cut while it ran).
REQUEST_RETOUCH_S = 30.0


class Rejected(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


Progress = Callable[[int, int], None]


# --- the pipeline (the agent before asking, the installer again, `dongle-update install`) --------

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


def fetch_agent(source: Any, layout: Layout, release: Mapping[str, Any], hardware_id: str,
                *, max_bytes: int, progress: Progress | None = None) -> tuple[bytes, bytes | None, str]:
    """The release's verified bundle from ``source`` (agent.update.tuf_client: NetworkSource in
    the agent, StagedSource in the installer): the delta first when it applies to the current
    slot, the full bundle as fallback.

    Returns (uncompressed tar, compressed bundle or None, "delta"/"full"). Raises
    :class:`TufError` or :class:`Rejected`.
    """
    current = layout.current_version()
    if release.get("delta_target") and release.get("delta_from") == current and current:
        try:
            info = source.target_info(release["delta_target"])
            custom = check_target(info, release, hardware_id, "delta")
            if custom.get("delta_from") != current:
                raise Rejected(TARGET_MISMATCH, f"delta is from {custom.get('delta_from')}")
            base = slots.installed_tar(layout, current)
            if base is None:
                raise Rejected(INSTALL_FAILED, f"no copy of the {current} bundle to patch")
            patch = source.fetch(info, progress)
            tar = delta.apply_delta(base, patch, min(max_bytes, int(custom["tar_size"])))
            if hashlib.sha256(tar).hexdigest() != custom.get("tar_sha256"):
                raise Rejected(INSTALL_FAILED, "patched bundle does not match its signed hash")
            return tar, None, "delta"
        except (TufError, Rejected, delta.DeltaError, KeyError) as e:
            if isinstance(e, TufError) and e.retryable:
                raise
            log.warning("update: delta unusable (%s); falling back to the full bundle", e)
    info = source.target_info(release["target"])
    custom = check_target(info, release, hardware_id, "bundle")
    data = source.fetch(info, progress)
    try:
        tar = bundle.decompress(data, max_bytes)
    except bundle.BundleError as e:
        raise Rejected(INSTALL_FAILED, str(e)) from e
    if hashlib.sha256(tar).hexdigest() != custom.get("tar_sha256"):
        raise Rejected(INSTALL_FAILED, "bundle content does not match its signed tar hash")
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
        #: The slot this agent was started from (systemd resolved ``current`` just before).
        self.running = self.layout.current_version()
        self.monitor = trial.TrialMonitor(self.layout, health, stable_s=settings.stable_s,
                                          trial_s=settings.trial_s, monotonic=monotonic,
                                          running=self.running)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._retry_at: dict[str, float] = {}
        self._mono = monotonic
        self._touched_at: float | None = None   # when the outstanding request was last written
        self._restart_asked = False
        #: (version, counter) downloaded and verified -> the target used (delta or bundle)
        self._staged: dict[tuple[str, int], str] = {}
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

    def _source(self, repository: str):
        from agent.update.tuf_client import NetworkSource
        return NetworkSource(self.tuf, repository, self.layout)

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
        installed_state = state.load(self.layout)
        with state.work_locked(self.layout) as st:
            installed = (installed_state if comp == "agent" else st)[comp]
            if counter <= int(installed.get("release_counter", 0)):
                return Outcome("rejected", reason=(
                    f"{STALE_COUNTER}: release_counter {counter} is not above the installed "
                    f"{installed.get('release_counter', 0)}"))
            if counter <= int(installed.get("blocked_counter", 0)):
                return Outcome("rejected", reason=(
                    f"{BLOCKED}: release_counter {counter} was rolled back; "
                    "waiting for a higher one"))
            t = installed_state.get("trial")
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
        slots.prepare_work(self.layout)
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
        """Sends the reports the installer, the hooks and the rollback unit queued in the install
        state, those above the last one sent (kept in the work state). Returns how many."""
        reports = state.load(self.layout)
        queued = [r for r in reports.get("reports", []) if isinstance(r, dict) and "id" in r]
        with state.work_locked(self.layout) as wk:
            sent = int(wk.get("reports_sent") or 0)
            if int(reports.get("next_report") or 1) - 1 < sent:
                sent = 0            # the install state was started afresh
            new = [r for r in queued if int(r["id"]) > sent]
            for r in new:
                self.emit_event(r["body"])
            if new:
                wk["reports_sent"] = max(int(r["id"]) for r in new)
        return len(new)

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
        """One pass: reports, restart, the trial monitor, the request to the installer, then each
        pending release. Returns what happened."""
        self.flush_reports()
        if self._restart_due():
            return ["agent:restart"]
        done: list[str] = []
        verdict = self.monitor.tick()
        if verdict == "good":
            self._ask("good", version=self.running)
            done.append("agent:good")
        elif verdict == "rollback":
            self._ask("rollback", version=self.running, reason=self.monitor.reason)
            done.append("agent:rollback")
        waiting = self._follow_request()
        if waiting:
            done.append(f"agent:{waiting}")
        self._drop_finished()
        pending = state.load_work(self.layout)["pending"]
        for comp in ("agent", "mcu"):
            item = pending.get(comp)
            if item and self._mono() >= self._retry_at.get(comp, 0) \
                    and not (comp == "agent" and waiting):
                done.append(f"{comp}:{self._process(comp, item['release'])}")
        if not pending and not waiting:
            self._clear_staging()
        return done

    def _restart_due(self) -> bool:
        """``current`` moved away from the slot this agent runs (installed on trial, rolled
        back): restart into it (once; systemd starts the new ``current``)."""
        cur = self.layout.current_version()
        if cur is None or cur == self.running:
            return False
        if not self._restart_asked:
            self._restart_asked = True
            log.info("update: current is %s, this agent runs %s: restarting", cur, self.running)
            self.activity = {"component": "agent", "to": cur, "state": "restarting"}
            self._restart()
        return True

    # --- requests to the installer ----------------------------------------------------------------

    def _ask(self, action: str, **fields: Any) -> dict:
        req = request.write(self.layout, action, **fields)
        with state.work_locked(self.layout) as wk:
            wk["request"] = {k: req[k] for k in ("id", "action", "ts")}
            wk["request"]["version"] = fields.get("version") or fields.get("release", {}).get("version")
        self._touched_at = self._mono()
        return req

    def _follow_request(self) -> str | None:
        """What the outstanding request waits for (None: there is none). Handles its outcome."""
        wk = state.load_work(self.layout)
        req = wk.get("request")
        if not req:
            return None
        out = request.outcome(self.layout, req["id"])
        if out is None:
            if self._touched_at is None or self._mono() - self._touched_at >= REQUEST_RETOUCH_S:
                try:
                    on_disk = request.read(self.layout)
                except (OSError, request.RequestError):
                    on_disk = None
                if on_disk is not None and on_disk["id"] == req["id"]:
                    request.touch(self.layout)
                    log.info("update: installer has not answered request %s: asked again",
                             req["id"])
                else:   # lost (the work directory was cleaned): give up on it
                    with state.work_locked(self.layout) as w:
                        w["request"] = None
                    return None
                self._touched_at = self._mono()
            self.activity = {"component": "agent", "to": req.get("version"),
                             "state": "installing" if req["action"] == "install" else req["action"]}
            return f"waiting (installer: {req['action']})"
        with state.work_locked(self.layout) as w:
            w["request"] = None
        self._touched_at = None
        result, reason = out.get("result"), out.get("reason")
        log.info("update: installer: %s %s: %s%s", req["action"], req.get("version"), result,
                 f" ({reason})" if reason else "")
        if req["action"] == "install" and result == "rejected":
            self._drop_pending("agent", req.get("version"))
        elif result == "error":
            self._retry_at["agent"] = self._mono() + self.settings.retry_s
        if req["action"] == "install":
            self._staged.clear()
        self.flush_reports()
        return None

    def _drop_pending(self, comp: str, version: str | None) -> None:
        with state.work_locked(self.layout) as st:
            item = st["pending"].get(comp)
            if item and (version is None or item["release"]["version"] == version):
                st["pending"].pop(comp, None)

    def _drop_finished(self) -> None:
        """A pending agent release the install state shows as done (good) or rolled back."""
        agent = state.load(self.layout)["agent"]
        with state.work_locked(self.layout) as st:
            item = st["pending"].get("agent")
            if item:
                n = int(item["release"]["release_counter"])
                if n <= int(agent.get("release_counter", 0)) or n <= int(agent.get("blocked_counter", 0)):
                    st["pending"].pop("agent")

    def _clear_staging(self) -> None:
        if self.layout.staging.is_dir() and any(self.layout.staging.iterdir()):
            shutil.rmtree(self.layout.staging, ignore_errors=True)
            self._staged.clear()

    # --- pending releases -------------------------------------------------------------------------

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
        frm = state.counters(self.layout, comp).get("version") or (
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
            log.error("update: %s %s failed: %s (retrying)", comp, release["version"], e)
            return "retry"

    def _reject(self, comp: str, release: Mapping[str, Any], frm: str | None, reason: str,
                detail: str) -> str:
        log.warning("update: %s %s rejected: %s: %s", comp, release["version"], reason, detail)
        with state.work_locked(self.layout) as st:
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
        key = (version, int(release["release_counter"]))
        source = self._source(release["repository"])

        def fetch() -> None:
            self.emit_event(update_event("agent", frm, version, "downloading"))
            _, _, via = fetch_agent(source, self.layout, release, s.hardware_id,
                                    max_bytes=s.max_bundle_bytes,
                                    progress=self._progress("agent", release, frm))
            self._staged[key] = release["delta_target"] if via == "delta" else release["target"]

        if key not in self._staged:
            fetch()   # downloading is fine while driving; only the switch waits for conditions
        on_trial = trial.active(self.layout)
        if on_trial and on_trial["version"] != version:
            # Never switch away from a version still on trial: "previous" would then be one that
            # never proved itself, and a rollback would land on it. The download is kept.
            return self._waiting("agent", release, f"trial of {on_trial['version']}")
        why = self._conditions(release)
        if why:
            return self._waiting("agent", release, why)
        # The metadata refreshed once more (it is what the installer gets to see): the staged
        # bytes must still be the signed ones, else (re-published meanwhile) fetched again.
        info = source.target_info(self._staged[key])
        if not self.layout.staged_file(info.hashes).is_file():
            fetch()
        request.stage_metadata(self.layout, s.metadata_dir)
        self._ask("install", release=request.release_fields(release))
        self.activity = {"component": "agent", "to": version, "state": "installing"}
        log.info("update: %s downloaded and verified; asked the installer", version)
        return "requested"

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
        source = self._source(release["repository"])
        info = source.target_info(release["target"])
        custom = check_target(info, release, self.settings.mcu_hardware_id, "image")
        image = source.fetch(info, self._progress("mcu", release, frm))
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
            with state.work_locked(self.layout) as st:
                state.block(st, "mcu", int(release["release_counter"]))
                st["pending"].pop("mcu", None)
            self.emit_event(update_event("mcu", frm, version, "rolled_back", f"mcu: {e}"))
            return "rolled_back"
        except McuError as e:
            raise TufError(DOWNLOAD_FAILED, f"MCU link: {e}") from e  # resumable: retry
        with state.work_locked(self.layout) as st:
            state.raise_counter(st, "mcu", int(release["release_counter"]), running)
            st["pending"].pop("mcu", None)
        self.emit_event(update_event("mcu", frm, version, "good"))
        self.activity = {"component": "mcu", "to": version, "state": "good"}
        return "good"

    # --- status -----------------------------------------------------------------------------------

    def apply_config(self, doc: dict) -> list[str]:
        return []

    def status(self) -> dict:
        st = state.load(self.layout)
        wk = state.load_work(self.layout)
        return {
            "agent": {**st["agent"], "current": self.layout.current_version(),
                      "previous": self.layout.previous_version(), "running": self.running},
            "mcu": wk["mcu"],
            "pending": {c: {"version": p["release"]["version"],
                            "release_counter": p["release"]["release_counter"]}
                        for c, p in wk["pending"].items()},
            "trial": ({**st["trial"], **self.monitor.status()} if st.get("trial") else None),
            "request": wk.get("request"),
            "last_request": st.get("last_request"),
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
    req, last = st.get("request"), st.get("last_request")
    if req:
        lines.append(f"request  {req.get('action')} {req.get('version') or ''} (waiting for the installer)")
    if last:
        lines.append(f"installer {last.get('action')}: {last.get('result')}"
                     + (f" ({last['reason']})" if last.get("reason") else ""))
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
