"""The installer: the small privileged side of updates (``dongle-update apply``).

dongle-update-install.service runs it as root, sandboxed (no network, writes only /opt/dongle),
whenever dongle-update-install.path sees the agent's request change (agent.update.request). It
trusts nothing the agent says:

* ``install``: the TUF metadata is verified again from the pinned root (``keys/tuf_root.json``)
  against the installer's own trusted copies (``<root>/update/tuf``: version rollback and freeze
  memory the agent cannot touch), from the files the agent staged; the target's signed custom
  fields must carry the request's version and counter and this device's hardware id; the
  counter must be above the installed and the blocked one; no trial may be running; the staged
  bytes must have the signed length and hash, the unpacked tar the signed ``tar_sha256`` (a
  delta is applied to the installer's own copy of the current slot's bundle). Then the slot is
  installed, the trial recorded and ``current`` flipped (agent.update.updater.install_slot,
  activate_on_trial); ``installed`` and ``trial`` are queued as reports.
* ``good``: ends the trial of that version (it must be the one on trial and current).
* ``rollback``: rolls that version's trial back.

The outcome goes to the install state's ``last_request`` (``done``, ``rejected`` with the
reason, ``ignored`` or ``error``); a rejection is also queued as a ``rejected`` report. The agent,
which reads both, restarts itself when ``current`` no longer names the slot it runs (exit 75:
``RestartForceExitStatus=75``), so this unit needs no access to systemd.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from agent.update import bundle, request, slots, state, trial
from agent.update.slots import Layout
from agent.update.trial import update_event
from agent.update.tuf_errors import TufError

if TYPE_CHECKING:
    from agent.settings import UpdateSettings

log = logging.getLogger(__name__)

DONE, REJECTED, IGNORED, ERROR = "done", "rejected", "ignored", "error"


@contextlib.contextmanager
def _exclusive(layout: Layout) -> Iterator[None]:
    """One installer at a time (the unit, or `dongle-update install` by hand)."""
    layout.update_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(layout.update_dir / "install.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def apply(settings: UpdateSettings) -> dict[str, Any] | None:
    """Handles the agent's request once (``settings``: agent.toml's [update], root's file);
    returns the outcome recorded (None: nothing to do)."""
    layout = settings.layout()
    slots.prepare(layout)
    with _exclusive(layout):
        try:
            req = request.read(layout)
        except (OSError, request.RequestError) as e:
            log.error("update: unusable request: %s", e)
            return _record(layout, {"id": None, "action": None}, ERROR, f"unusable request: {e}")
        if req is None:
            log.info("update: no request")
            return None
        last = state.load(layout).get("last_request") or {}
        if last.get("id") == req["id"]:
            log.info("update: request %s was handled already (%s)", req["id"], last.get("result"))
            return None
        log.info("update: request %s: %s", req["id"], req["action"])
        try:
            if req["action"] == "install":
                result, reason = _install(layout, req["release"], settings)
            elif req["action"] == "good":
                done = trial.mark_good(layout, req["version"])
                result, reason = (DONE, None) if done else (IGNORED, f"{req['version']} is not on trial")
            else:
                done = trial.roll_back(layout, req["reason"], req["version"])
                result, reason = (DONE, None) if done else (IGNORED, f"{req['version']} is not on trial")
        except Exception as e:  # noqa: BLE001 - recorded for the agent, which retries
            log.exception("update: request %s failed", req["id"])
            result, reason = ERROR, f"{type(e).__name__}: {e}"
        return _record(layout, req, result, reason)


def _record(layout: Layout, req: Mapping[str, Any], result: str, reason: str | None) -> dict:
    out = {"id": req.get("id"), "action": req.get("action"), "result": result,
           "reason": None if reason is None else reason[:500], "ts": trial.now_ms()}
    with state.locked(layout) as st:
        st["last_request"] = out
        if result == REJECTED and req.get("action") == "install":
            rel = req["release"]
            state.add_report(st, update_event("agent", layout.current_version(), rel["version"],
                                              "rejected", f"installer: {reason}"))
    log.log(logging.WARNING if result in (REJECTED, ERROR) else logging.INFO,
            "update: request %s (%s): %s%s", out["id"], out["action"], result,
            f": {reason}" if reason else "")
    return out


def _installed_slot(layout: Layout, version: str, counter: int) -> bool | str:
    """True if ``slots/<version>`` is this release's (its MANIFEST names the counter), False if
    there is none (an older one of the same version that is neither current nor previous is
    removed first), or the reason it cannot be replaced."""
    slot = layout.slot(version)
    if not slot.is_dir():
        return False
    try:
        manifest = bundle.read_manifest_file(slot)
    except bundle.BundleError:
        manifest = {}
    if manifest.get("release_counter") == counter:
        return True
    if version == layout.previous_version():
        return f"{version} is the previous slot (from counter {manifest.get('release_counter')})"
    log.info("update: removing slot %s of another release (counter %s)", version,
             manifest.get("release_counter"))
    shutil.rmtree(slot)
    slots.fsync_dir(layout.slots)
    return False


def _install(layout: Layout, release: Mapping[str, Any],
             settings: UpdateSettings) -> tuple[str, str | None]:
    from agent.update.tuf_client import StagedSource
    from agent.update.updater import (BLOCKED, STALE_COUNTER, Rejected, activate_on_trial,
                                      check_target, fetch_agent, install_slot)

    version, counter = release["version"], int(release["release_counter"])
    st = state.load(layout)
    t = st.get("trial")
    if t and t.get("version") == layout.current_version():
        return REJECTED, f"{STALE_COUNTER}: {t['version']} is on trial"
    agent = st["agent"]
    if counter <= int(agent.get("release_counter", 0)):
        return REJECTED, f"{STALE_COUNTER}: release_counter {counter} is not above the " \
                         f"installed {agent.get('release_counter', 0)}"
    if counter <= int(agent.get("blocked_counter", 0)):
        return REJECTED, f"{BLOCKED}: release_counter {counter} was rolled back"
    if layout.current_version() == version:
        return IGNORED, f"{version} is current already"
    kept = _installed_slot(layout, version, counter)
    if isinstance(kept, str):
        return REJECTED, kept
    source = StagedSource(layout, settings.tuf_root)
    hardware_id = settings.hardware_id
    try:
        if kept:   # installed by an earlier run, cut before the flip: the release must verify
            via = "kept"
            check_target(source.target_info(release["target"]), release, hardware_id, "bundle")
        else:
            tar, compressed, via = fetch_agent(source, layout, release, hardware_id,
                                               max_bytes=settings.max_bundle_bytes)
            install_slot(layout, release, tar, compressed,
                         compile_bytecode=settings.compile_bytecode)
        old = activate_on_trial(layout, release, max_starts=settings.max_starts)
    except TufError as e:
        if e.retryable:
            return ERROR, str(e)
        return REJECTED, str(e)
    except Rejected as e:
        return REJECTED, str(e)
    with state.locked(layout) as st:
        state.add_report(st, update_event("agent", old, version, "installed", via=via))
        state.add_report(st, update_event("agent", old, version, "trial"))
    log.info("update: %s installed (%s) and current, on trial (previous %s)", version, via, old)
    return DONE, None
