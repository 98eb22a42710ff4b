"""The device's install layout and the power-cut safe two-slot install.

::

    /opt/dongle/                   Layout.root (configurable; tests use a tmp dir): root's,
                                   read-only for the agent
      slots/<version>/             one complete agent environment per version (a venv)
      slots/<version>.partial/     an install in progress: never run, removed on the next try
      current -> slots/<version>   what systemd starts (ExecStart=/opt/dongle/current/bin/...)
      previous -> slots/<version>  the last good version, kept for rollback
      venv -> current              compatibility with ExecStart=/opt/dongle/venv/bin/dongle-agent
      update/state.json            the install state (agent.update.state)
      update/tuf/                  the installer's own trusted TUF metadata
    /var/lib/dongle/update/        Layout.work: the agent's (it writes nothing else of these)
      state.json                   its work state: pending releases, MCU counters, the request
      staging/<algo>-<hash>.part   resumable downloads, named by the signed hash
      staging/<algo>-<hash>        verified downloads, for the installer to verify again
      staging/metadata/            the TUF metadata the agent verified them with
      request.json                 what the agent asks the installer to do (agent.update.request)

Invariants, whatever the moment of a power cut:

* ``current`` always names a complete slot. A slot becomes visible under its final name only
  by ``rename(2)`` of its ``.partial`` directory after every file and directory in it was
  fsynced; the directory holding the new name is fsynced after the rename.
* ``current`` and ``previous`` are replaced with ``rename(2)`` of a freshly made symlink over
  them (atomic), then ``fsync`` of the root directory.
* ``previous`` is moved before ``current``: after a cut in between both name the old version,
  which is safe.

A slot is made a real venv on the device (``finalize``): ``bin/python3`` links to the device's
interpreter and ``pyvenv.cfg`` names its directory, so the bundle itself holds no absolute path.
The bytecode is compiled here too (``/opt`` is read-only at run time).
"""
from __future__ import annotations

import compileall
import logging
import os
import re
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from agent.update import bundle

log = logging.getLogger(__name__)

#: A plain version (config/schemas/release.json ``$defs.version`` says the same): alphanumeric
#: segments joined by one of ``.+_-``, at most 64 characters, not ending in ``.partial``.
VERSION_RE = re.compile(r"^[0-9A-Za-z]+([.+_-][0-9A-Za-z]+)*$")
VERSION_MAX = 64
BUNDLE_COPY = ".bundle.tar.zst"   # the installed bundle, kept as the base of the next delta


class SlotError(Exception):
    """A slot that cannot be installed or activated."""


def check_version(version: object) -> str:
    """``version`` if it is a plain version (it names a directory), else SlotError."""
    if not isinstance(version, str) or len(version) > VERSION_MAX \
            or not VERSION_RE.fullmatch(version) or version.endswith(".partial"):
        raise SlotError(f"invalid version {str(version)[:80]!r}: not a plain version "
                        f"(alphanumeric segments joined by . + _ -, at most {VERSION_MAX} characters)")
    return version


@dataclass(frozen=True)
class Layout:
    root: Path
    python: str = "/usr/bin/python3"   # the device's interpreter the venvs are based on
    #: The agent's own update directory (None: ``<root>/work``, for tools and tests that keep
    #: both in one tree; on a device it is /var/lib/dongle/update, see UpdateSettings.work_dir).
    work_dir: Path | None = None

    @property
    def work(self) -> Path:
        return Path(self.work_dir) if self.work_dir is not None else self.root / "work"

    @property
    def staging(self) -> Path:
        return self.work / "staging"

    @property
    def staged_metadata(self) -> Path:
        return self.staging / "metadata"

    @property
    def request_file(self) -> Path:
        return self.work / "request.json"

    @property
    def work_state_file(self) -> Path:
        return self.work / "state.json"

    @property
    def installer_metadata(self) -> Path:
        return self.update_dir / "tuf"

    def staged_name(self, hashes: Mapping[str, str]) -> str:
        """A verified target's name in the staging area: its signed hash, never its path (a
        target re-published under the same path must not resume onto the old bytes)."""
        algo = "sha256" if "sha256" in hashes else min(hashes)
        digest = hashes[algo]
        if not re.fullmatch(r"[0-9a-f]{16,128}", digest) or not re.fullmatch(r"[a-z0-9_-]{1,16}", algo):
            raise SlotError(f"unusable target hash {algo}:{digest[:80]!r}")
        return f"{algo}-{digest}"

    def staged_file(self, hashes: Mapping[str, str]) -> Path:
        return self.staging / self.staged_name(hashes)

    def part_file(self, hashes: Mapping[str, str]) -> Path:
        """The resumable download of that target (renamed to :meth:`staged_file` once verified)."""
        return self.staging / (self.staged_name(hashes) + ".part")

    @property
    def slots(self) -> Path:
        return self.root / "slots"

    @property
    def current(self) -> Path:
        return self.root / "current"

    @property
    def previous(self) -> Path:
        return self.root / "previous"

    @property
    def update_dir(self) -> Path:
        return self.root / "update"

    @property
    def state_file(self) -> Path:
        return self.update_dir / "state.json"

    def slot(self, version: str) -> Path:
        return self.slots / check_version(version)

    def _link_version(self, link: Path) -> str | None:
        try:
            target = os.readlink(link)
        except OSError:
            return None
        name = Path(target).name
        return name if (self.slots / name).is_dir() else None

    def current_version(self) -> str | None:
        return self._link_version(self.current)

    def previous_version(self) -> str | None:
        return self._link_version(self.previous)

    def installed(self) -> list[str]:
        if not self.slots.is_dir():
            return []
        return sorted(p.name for p in self.slots.iterdir()
                      if p.is_dir() and not p.name.endswith(".partial"))


# --- durability helpers -------------------------------------------------------------------------

def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file, then every directory bottom-up."""
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                continue
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Writes ``path`` whole or not at all, with exactly ``mode``: the umask does not apply (the
    root hooks run under the agent unit's UMask=0027, which made the install state 0640 root's,
    unreadable to the agent)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def set_link(link: Path, target: str) -> None:
    """Points ``link`` at ``target`` atomically (symlink + rename(2) + fsync of the directory)."""
    tmp = link.with_name(f".{link.name}.new")
    try:
        tmp.unlink()
    except FileNotFoundError:
        pass
    os.symlink(target, tmp)
    os.replace(tmp, link)
    fsync_dir(link.parent)


def remove_link(link: Path) -> None:
    try:
        link.unlink()
    except FileNotFoundError:
        return
    fsync_dir(link.parent)


# --- install --------------------------------------------------------------------------------------

def prepare(layout: Layout) -> None:
    """The installer's directories (root's on a device)."""
    for d in (layout.root, layout.slots, layout.update_dir):
        d.mkdir(parents=True, exist_ok=True)


def prepare_work(layout: Layout) -> None:
    """The agent's directories (OSError if it cannot write them)."""
    for d in (layout.work, layout.staging):
        d.mkdir(parents=True, exist_ok=True)
    probe = layout.work / ".writable"
    probe.write_bytes(b"")
    probe.unlink()


def finalize(slot: Path, python: str, *, compile_bytecode: bool = True) -> None:
    """Turns an extracted bundle into a venv for this device's interpreter."""
    bindir = slot / "bin"
    bindir.mkdir(exist_ok=True)
    for name in ("python3", "python"):
        link = bindir / name
        if not link.is_symlink():
            os.symlink(python, link)
    home = os.path.dirname(python)
    ver = "%d.%d.%d" % sys.version_info[:3]
    (slot / "pyvenv.cfg").write_text(
        f"home = {home}\ninclude-system-site-packages = false\nversion = {ver}\n")
    if compile_bytecode:
        # Timestamp-checked bytecode (the default): what install.sh's pip writes too, and a
        # module linked unchanged from the previous slot keeps its valid .pyc (same inode, same
        # mtime), which compile_dir then skips.
        for site in slot.glob("lib/python*/site-packages"):
            compileall.compile_dir(str(site), quiet=1, workers=1)


def install(layout: Layout, version: str, tar: bytes, *, compressed: bytes | None = None,
            compile_bytecode: bool = True) -> Path:
    """Installs ``tar`` (an uncompressed bundle) as ``slots/<version>``; returns the slot.

    Idempotent: an existing complete slot is kept; a leftover ``.partial`` is discarded and
    redone. ``compressed`` (the bundle as downloaded) is kept in the slot as the base of the
    next delta; if not given, the tar is compressed quickly here. Files the current slot has
    with the same bytes are hard-linked from it (bundle.extract), with their bytecode.
    """
    prepare(layout)
    final = layout.slot(version)
    if final.is_dir():
        log.info("update: slot %s is already installed", version)
        return final
    partial = final.with_name(final.name + ".partial")
    if partial.exists():
        log.info("update: discarding an interrupted install of %s", version)
        shutil.rmtree(partial)
    partial.mkdir()
    current = layout.current_version()
    linked = bundle.extract(tar, partial, reuse=layout.slot(current) if current else None)
    finalize(partial, layout.python, compile_bytecode=compile_bytecode)
    (partial / BUNDLE_COPY).write_bytes(compressed if compressed is not None
                                        else bundle.compress(tar, level=3))
    fsync_tree(partial)
    os.rename(partial, final)
    fsync_dir(layout.slots)
    log.info("update: installed slot %s (%d files shared with %s)", version, linked, current)
    return final


def installed_tar(layout: Layout, version: str) -> bytes | None:
    """The uncompressed bundle a slot was installed from (the base for deltas), if kept."""
    try:
        return bundle.decompress((layout.slot(version) / BUNDLE_COPY).read_bytes())
    except (OSError, bundle.BundleError, SlotError) as e:
        log.warning("update: no usable bundle copy of %s: %s", version, e)
        return None


def activate(layout: Layout, version: str) -> str | None:
    """Makes ``version`` current and the old current ``previous``; returns the old version."""
    if not layout.slot(version).is_dir():
        raise SlotError(f"slot {version} is not installed")
    old = layout.current_version()
    if old == version:
        return old
    if old is not None:
        set_link(layout.previous, f"slots/{old}")
    set_link(layout.current, f"slots/{version}")
    venv = layout.root / "venv"
    if not venv.is_symlink() and not venv.exists():
        set_link(venv, "current")
    log.info("update: current is now %s (previous %s)", version, old)
    return old


def roll_back(layout: Layout) -> tuple[str | None, str | None]:
    """Makes ``previous`` current again; returns (bad version, restored version)."""
    bad, good = layout.current_version(), layout.previous_version()
    if good is None:
        raise SlotError("no previous slot to roll back to")
    set_link(layout.current, f"slots/{good}")
    remove_link(layout.previous)
    log.warning("update: rolled back from %s to %s", bad, good)
    return bad, good


def gc(layout: Layout, keep: set[str] | None = None) -> list[str]:
    """Removes slots other than current, previous and ``keep``, and interrupted installs."""
    keep = set(keep or ())
    keep |= {v for v in (layout.current_version(), layout.previous_version()) if v}
    removed = []
    if not layout.slots.is_dir():
        return removed
    for p in layout.slots.iterdir():
        if p.name in keep:
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p.name)
    if removed:
        fsync_dir(layout.slots)
        log.info("update: removed old slots %s", ", ".join(sorted(removed)))
    return removed
