"""Requests from the agent to the installer: the one channel across the privilege boundary.

The agent cannot write its installed code (/opt/dongle is root's and read-only in its unit). What
it may ask for, it writes to ``<work>/request.json`` (its own directory, /var/lib/dongle/update):

    {"format": 1, "id": "<16 hex>", "action": "install", "ts": <ms>,
     "release": {"component": "agent", "version", "release_counter", "target",
                 "delta_from"?, "delta_target"?}}
    {"format": 1, "id": ..., "action": "good", "version": <the version on trial>}
    {"format": 1, "id": ..., "action": "rollback", "version": <on trial>, "reason": <text>}

dongle-update-install.path starts dongle-update-install.service when the file changes; the
installer (agent.update.installer, as root) handles it and records the outcome in the install
state (``last_request``: id, action, result, reason), which the agent reads. A request is a
wish, never evidence: for ``install`` the installer believes only the TUF metadata (verified
again from the pinned root, with its own rollback/freeze memory) and the bytes whose signed
hashes it names; ``good`` and ``rollback`` only end the trial that is running.

The agent copies the TUF metadata it verified with into ``<work>/staging/metadata/`` and the
verified targets are ``<work>/staging/<algo>-<hash>``: the installer reads them from there
(:func:`read_staged`: no symbolic link followed at any level below the work directory's parent,
regular files only, bounded sizes) without any network access.

If the installer does not answer (a power cut while it ran, a trigger lost while it was busy),
the agent writes the same request again (:func:`touch`); the installer does each id once.
"""
from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.update import slots
from agent.update.slots import Layout, write_atomic

log = logging.getLogger(__name__)

FORMAT = 1
ACTIONS = ("install", "good", "rollback")
MAX_REQUEST = 16 * 1024
MAX_METADATA = 4 * 1024 * 1024
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_ID = re.compile(r"^[0-9a-f]{16}$")
_RELEASE_KEYS = ("component", "version", "release_counter", "target", "delta_from", "delta_target")


class RequestError(Exception):
    """A request or staged file the installer will not use."""


def new_id() -> str:
    return secrets.token_hex(8)


# --- the agent's side ------------------------------------------------------------------------------

def stage_metadata(layout: Layout, metadata_dir: Path) -> list[str]:
    """Copies the TUF metadata the agent trusts now (ngclient's cache: ``root_history/N.root.json``,
    ``timestamp.json``, ``snapshot.json``, ``targets.json``, delegated roles) into the staging
    area, under the names a repository serves them by. Returns the names."""
    out = layout.staged_metadata
    tmp = out.with_name(out.name + ".new")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    names = []
    for p in sorted(Path(metadata_dir, "root_history").glob("*.root.json")):
        shutil.copyfile(p, tmp / p.name)
        names.append(p.name)
    for p in sorted(Path(metadata_dir).glob("*.json")):
        if p.name != "root.json" and not p.is_symlink():
            shutil.copyfile(p, tmp / p.name)
            names.append(p.name)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return names


def write(layout: Layout, action: str, **fields: Any) -> dict[str, Any]:
    """Writes a new request (replacing any other) and returns it."""
    if action not in ACTIONS:
        raise ValueError(f"unknown request action {action!r}")
    from agent.update.trial import now_ms
    req = {"format": FORMAT, "id": new_id(), "action": action, "ts": now_ms(), **fields}
    layout.work.mkdir(parents=True, exist_ok=True)
    write_atomic(layout.request_file, json.dumps(req, sort_keys=True).encode(), mode=0o640)
    log.info("update: asked the installer to %s (request %s)", action, req["id"])
    return req


def touch(layout: Layout) -> None:
    """Writes the request again (same id): a new trigger for the installer."""
    write_atomic(layout.request_file, layout.request_file.read_bytes(), mode=0o640)


def outcome(layout: Layout, req_id: str) -> dict[str, Any] | None:
    """The installer's record of request ``req_id`` once it has handled it, else None."""
    from agent.update import state
    last = state.load(layout).get("last_request") or {}
    return last if last.get("id") == req_id else None


# --- the installer's side ----------------------------------------------------------------------

def read_staged(layout: Layout, rel: str, limit: int) -> bytes:
    """The bytes of ``<work>/<rel>``, read as root from a directory the agent owns: every path
    component below the work directory's parent is opened without following symbolic links,
    the file must be a regular one of at most ``limit`` bytes. RequestError otherwise
    (FileNotFoundError when it is not there)."""
    parts = [layout.work.name, *rel.split("/")]
    for name in parts:
        if not _NAME.match(name) or ".." in name:
            raise RequestError(f"not a staged file name: {rel!r}")
    fd = os.open(layout.work.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in parts[:-1]:
            nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nfd
        try:
            ffd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
        except OSError as e:
            if e.errno == 40:   # ELOOP: a symbolic link
                raise RequestError(f"{rel} is a symbolic link") from e
            raise
    except NotADirectoryError as e:
        raise RequestError(f"{rel}: a path component is not a directory") from e
    finally:
        os.close(fd)
    try:
        st = os.fstat(ffd)
        if not stat.S_ISREG(st.st_mode):
            raise RequestError(f"{rel} is not a regular file")
        if st.st_size > limit:
            raise RequestError(f"{rel} has {st.st_size} bytes, more than {limit}")
        chunks, left = [], limit + 1
        while left > 0 and (chunk := os.read(ffd, min(left, 1 << 20))):
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        if len(data) > limit:
            raise RequestError(f"{rel} grows beyond {limit} bytes")
        return data
    finally:
        os.close(ffd)


def _text(value: Any, what: str, limit: int = 256) -> str:
    if not isinstance(value, str) or not value or len(value) > limit or not value.isprintable():
        raise RequestError(f"{what} must be printable text of 1-{limit} characters")
    return value


def validate(doc: Any) -> dict[str, Any]:
    """The request if it is well formed (types, bounds, plain versions), else RequestError."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise RequestError("not a format 1 request")
    if not isinstance(doc.get("id"), str) or not _ID.match(doc["id"]):
        raise RequestError("no valid id")
    action = doc.get("action")
    if action not in ACTIONS:
        raise RequestError(f"unknown action {str(action)[:40]!r}")
    out: dict[str, Any] = {"id": doc["id"], "action": action}
    try:
        if action == "install":
            rel = doc.get("release")
            if not isinstance(rel, dict) or rel.get("component") != "agent":
                raise RequestError("install needs an agent release")
            counter = rel.get("release_counter")
            if not isinstance(counter, int) or isinstance(counter, bool) or not 0 < counter < 2**64:
                raise RequestError("release_counter must be a positive integer")
            release = {"component": "agent", "version": slots.check_version(rel.get("version")),
                       "release_counter": counter, "target": _text(rel.get("target"), "target")}
            if "delta_target" in rel or "delta_from" in rel:
                release["delta_target"] = _text(rel.get("delta_target"), "delta_target")
                release["delta_from"] = slots.check_version(rel.get("delta_from"))
            out["release"] = release
        else:
            out["version"] = slots.check_version(doc.get("version"))
            if action == "rollback":
                out["reason"] = _text(doc.get("reason"), "reason", 500)
    except slots.SlotError as e:
        raise RequestError(str(e)) from e
    return out


def read(layout: Layout) -> dict[str, Any] | None:
    """The request waiting for the installer (validated), None if there is none."""
    try:
        data = read_staged(layout, "request.json", MAX_REQUEST)
    except FileNotFoundError:
        return None
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise RequestError(f"request.json is not JSON: {e}") from e
    return validate(doc)


def release_fields(release: Mapping[str, Any]) -> dict[str, Any]:
    """What of a ``down/release`` body an install request carries."""
    return {k: release[k] for k in _RELEASE_KEYS if k in release}
