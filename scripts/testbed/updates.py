"""Software updates in the demo and the end-to-end tests (issue 11, docs/updates.md).

The cloud side: a TUF repository in the run directory, built with scripts/refcloud/release.py and served
over HTTPS with the dev CA by scripts/testbed/tuf_server.py. The device side: the install layout
(``opt/`` = /opt/dongle on a device), laid out at the first start as a slot like any other
("factory install"), and :class:`AgentService`, a small stand-in for systemd that runs the agent
from its ``current`` slot the way dongle-agent.service with the update drop-in does.

Run directory (next to scripts/testbed/devenv.py's layout)::

    tuf/          the TUF repository (metadata/, targets/)
    tuf-keys/     its keys: offline/ (root, targets = the release key), online/ (snapshot,
                  timestamp). Here for the demo only: on a real fleet the offline keys never
                  sit on a networked machine.
    tuf.json      {"url": ...} of the repository server while the demo runs
    opt/          the demo dongle's install layout: slots/<v>/, current, previous, update/
    opt-work/     its update work directory (on a device /var/lib/dongle/update)

Demo bundles are *code-only*: a slot holds the agent's own packages (agent, drivers,
firmware_bridge, config), a ``dongle_agent-<version>.dist-info`` (so the agent reports the
slot's version) and the launchers; the third-party dependencies are not copied but borrowed from
this checkout's virtualenv through ``dev-deps.pth`` (an absolute path: a demo shortcut; device
bundles are built with ``release.py agent --stage --deps``, which installs the locked aarch64
wheels of requirements.lock). A
release that changes a few modules is then a delta of a few KB.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from agent.update import bundle, slots, state
from agent.update.slots import Layout
from agent.update.trial import RESTART_EXIT_CODE
from scripts.testbed.devca import DevCA
from scripts.refcloud.release import AGENT_HW, ReleaseRepo, release_body, stage_agent
from scripts.testbed.tuf_server import TufServer

log = logging.getLogger(__name__)

BROKEN_MARK = "deliberately broken release"


def checkout_version() -> str:
    try:
        return importlib_metadata.version("dongle-agent")
    except importlib_metadata.PackageNotFoundError:
        return "0.1.0"


FACTORY_VERSION = checkout_version()


def base_python() -> str:
    """The interpreter the slots (venvs) are based on: this venv's base interpreter."""
    return getattr(sys, "_base_executable", None) or sys.executable


def deps_site() -> str:
    """Where the dependencies come from (the checkout's virtualenv)."""
    return sysconfig.get_paths()["purelib"]


# --- the repository ----------------------------------------------------------------------------

def repo_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "tuf"


def keys_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "tuf-keys"


def repository(run_dir: Path, repo: Path | None = None, keys: Path | None = None) -> ReleaseRepo:
    """The run directory's release repository, created (keys and version 1 of every role) on
    first use."""
    repo = Path(repo or repo_dir(run_dir))
    keys = Path(keys or keys_dir(run_dir))
    if not (repo / "metadata" / "root.json").exists():
        return ReleaseRepo.init(repo, keys)
    return ReleaseRepo(repo, keys)


def serve(run_dir: Path, ca: DevCA, repo: Path | None = None) -> TufServer:
    """Starts the HTTPS repository server on a free port and writes ``tuf.json``. Re-signs the
    timestamp first (what the repository host does periodically: it expires after a day)."""
    r = repository(run_dir, repo)
    r.refresh_timestamp()
    srv = TufServer(r.repo, ca).start()
    (Path(run_dir) / "tuf.json").write_text(json.dumps({"url": srv.url, "repo": str(r.repo)}))
    return srv


def repository_url(run_dir: Path) -> str:
    try:
        return json.loads((Path(run_dir) / "tuf.json").read_text())["url"]
    except (OSError, ValueError, KeyError):
        raise FileNotFoundError(f"{run_dir}/tuf.json: no repository server is running "
                                "(start the demo, or give --url)") from None


def agent_releases(repo: ReleaseRepo) -> dict[str, int]:
    """version -> release_counter of every agent bundle in the repository."""
    out = {}
    for path, info in repo.targets.signed.targets.items():
        custom = info.unrecognized_fields.get("custom") or {}
        if custom.get("component") == "agent" and custom.get("kind") == "bundle":
            out[custom["version"]] = int(custom["release_counter"])
    return out


# --- staging a demo bundle -----------------------------------------------------------------------

def stage(tree: Path, version: str, *, broken: bool = False, source: Path | None = None) -> Path:
    """Stages a code-only agent slot tree for ``version`` (see the module docstring)."""
    if tree.exists():
        shutil.rmtree(tree)
    site = stage_agent(tree, version=version, **({"source": source} if source else {}))
    (site / "dev-deps.pth").write_text(deps_site() + "\n")
    if broken:
        with open(site / "agent" / "daemon.py", "a") as f:
            f.write(f"\n\ndef main(argv=None):  # {BROKEN_MARK} (cloud_console release --broken)\n"
                    f"    raise RuntimeError({BROKEN_MARK + ': the agent crashes on start'!r})\n")
    return tree


@dataclass
class Built:
    version: str
    counter: int
    target: str
    delta_from: str | None = None
    delta_target: str | None = None

    def body(self, url: str, *, parked: bool = False, min_supply_v: float = 0) -> dict[str, Any]:
        """The ``down/release`` body announcing this release."""
        return release_body("agent", self.version, self.counter, url, self.target,
                            delta_from=self.delta_from, delta_target=self.delta_target,
                            parked=parked, min_supply_v=min_supply_v)


def build_release(run_dir: Path, version: str, *, counter: int | None = None,
                  broken: bool = False, delta_from: str | None = None,
                  repo: Path | None = None, keys: Path | None = None) -> Built:
    """Builds ``version`` of the agent from this checkout into the repository, with a delta from
    ``delta_from`` when that version is in the repository, and publishes new metadata.
    ``counter`` defaults to one above the highest agent counter in the repository."""
    r = repository(run_dir, repo, keys)
    known = agent_releases(r)
    if counter is None:
        counter = max(known.values(), default=0) + 1
    tree = stage(r.repo / ".staging" / version, version, broken=broken)
    deltas = [delta_from] if delta_from and delta_from in known and delta_from != version else []
    out = r.add_agent_release(version, counter, tree, hardware_ids=[AGENT_HW], delta_from=deltas)
    r.publish()
    shutil.rmtree(tree, ignore_errors=True)
    built = Built(version, counter, out["target"])
    if deltas:
        built.delta_from, built.delta_target = deltas[0], out[f"delta:{deltas[0]}"]
    log.info("release: agent %s (counter %d%s%s)", version, counter,
             ", broken" if broken else "", f", delta from {deltas[0]}" if deltas else "")
    return built


# --- the device: factory install ------------------------------------------------------------------

def install_root(run_dir: Path) -> Path:
    return Path(run_dir) / "opt"


def work_dir(root: Path) -> Path:
    """The demo dongle's update work directory (its /var/lib/dongle/update), beside ``root``."""
    return Path(root).parent / f"{Path(root).name}-work"


def factory_install(run_dir: Path, root: Path | None = None, version: str = FACTORY_VERSION, *,
                    compile_bytecode: bool = True, fresh: bool = False) -> Layout:
    """Lays the agent out as the first slot of ``root`` (once): the factory image is an
    ordinary release of this checkout (counter 1 in a fresh repository), installed as the
    device's current and only slot with its counter recorded. Deltas of later releases apply
    to it. ``fresh``: wipe the layout and install this checkout again as a new release
    (``<version>+<counter>``), as a technician re-flashing the dongle would."""
    root = Path(root or install_root(run_dir))
    layout = Layout(root, base_python(), work_dir(root))
    if fresh:
        shutil.rmtree(layout.root, ignore_errors=True)
        shutil.rmtree(layout.work, ignore_errors=True)
        counter = max(agent_releases(repository(run_dir)).values(), default=0) + 1
        version = f"{version}+{counter}"
    if layout.current_version() is not None:
        return layout
    r = repository(run_dir)
    known = agent_releases(r)
    if version not in known:
        build_release(run_dir, version)
        r = repository(run_dir)
        known = agent_releases(r)
    data = r.target_bytes(f"agent/{version}/bundle.tar.zst")
    slots.install(layout, version, bundle.decompress(data), compressed=data,
                  compile_bytecode=compile_bytecode)
    slots.activate(layout, version)
    with state.locked(layout) as st:
        state.raise_counter(st, "agent", known[version], version)
    log.info("factory install: agent %s in %s", version, layout.root)
    return layout


def settings_problem(layout: Layout, config: Path) -> str | None:
    """Whether the installed agent can read ``config`` (local settings written by this
    checkout's devenv may name keys an older slot does not know). None if it can."""
    code = ("import sys\nfrom agent import settings\ntry:\n    settings.load(sys.argv[1])\n"
            "except settings.SettingsError as e:\n    print(e)\n")
    try:
        r = subprocess.run([str(layout.current / "bin" / "python3"), "-P", "-c", code,
                            str(config)], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    return (r.stdout.strip() or r.stderr.strip()[-300:] or None) if r.stdout or r.returncode \
        else None


def update_settings(root: Path, **overrides: Any) -> dict[str, Any]:
    """The ``[update]`` section of the demo dongle's agent.toml (scripts/devenv.make_device)."""
    return {"enabled": True, "root": str(root), "work_dir": str(work_dir(root)),
            "ca_file": "ca.pem", "python": base_python(),
            "stable_s": 20.0, "trial_s": 180.0, "poll_s": 2.0, "retry_s": 10.0,
            "max_rate_kib_s": 0, **overrides}


# --- systemd, for the agent -----------------------------------------------------------------------

@dataclass
class Run:
    version: str | None
    result: str
    code: str
    status: str


class AgentService:
    """What systemd does with dongle-agent.service, the update drop-in and the installer's
    path unit, for one agent:

    * ``ExecStartPre=-current/bin/dongle-update prestart`` (counts trial starts, rolls a crash
      loop back), then ``ExecStart=current/bin/dongle-agent --config FILE`` resolved after it;
    * ``ExecStopPost=-current/bin/dongle-update poststop`` with ``$SERVICE_RESULT``,
      ``$EXIT_CODE``, ``$EXIT_STATUS`` as systemd sets them;
    * ``Restart=on-failure`` after ``restart_s`` (the unit: 10 s), ``RestartForceExitStatus=75``
      (the agent asks to be started again from another slot), ``RestartPreventExitStatus=2``;
    * ``StartLimitBurst=``/``StartLimitIntervalSec=``, and on failure ``OnFailure=`` →
      ``previous/bin/dongle-update rollback``, then a fresh start if it rolled back;
    * dongle-update-install.path: when the agent's request file changes,
      ``current/bin/dongle-update --config FILE apply`` (the installer), one run at a time.

    Not emulated: the watchdog (``WatchdogSec=``), ``Type=notify`` readiness, the sandboxing
    and the users: here the agent and the installer are the same user (the device VM tests,
    tests/device/, run the real units). The helpers get the install root as ``$DONGLE_ROOT``
    (on a device it is /opt/dongle).
    """

    def __init__(self, root: Path, config: Path, log_path: Path, *, restart_s: float = 0.5,
                 start_limit_burst: int = 10, start_limit_interval_s: float = 600,
                 stop_timeout_s: float = 30, args: tuple[str, ...] = ()):
        self.root = Path(root)
        self.layout = Layout(self.root, work_dir=work_dir(self.root))
        self.config = Path(config)
        self.log_path = Path(log_path)
        self.restart_s = restart_s
        self.burst, self.interval_s = start_limit_burst, start_limit_interval_s
        self.stop_timeout_s = stop_timeout_s
        self.args = tuple(args)
        self.runs: list[Run] = []
        self.installs: list[int] = []       # exit codes of the installer's runs
        self.failed = threading.Event()     # the unit gave up (and nothing was rolled back)
        self.stopped = threading.Event()    # inactive: stopped, exited 0 or failed
        self._stop = threading.Event()
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._starts: list[float] = []
        self._thread: threading.Thread | None = None
        self._path_unit: threading.Thread | None = None
        from agent import settings as settings_mod
        us = settings_mod.load(self.config, check_files=False).update
        self.request_file = us.layout().request_file if us else None
        env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "NOTIFY_SOCKET",
                            "WATCHDOG_USEC", "WATCHDOG_PID")}
        self.env = {**env, "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1",
                    "DONGLE_ROOT": str(self.root)}

    # --- control ------------------------------------------------------------------------------

    def start(self) -> AgentService:
        self._stop.clear()
        self.failed.clear()
        self.stopped.clear()
        self._thread = threading.Thread(target=self._run, name="agent-service", daemon=True)
        self._thread.start()
        if self.request_file is not None:
            self._path_unit = threading.Thread(target=self._watch_requests, name="install-path",
                                               daemon=True)
            self._path_unit.start()
        return self

    def stop(self, timeout: float = 60) -> None:
        """``systemctl stop``: SIGTERM, SIGKILL after ``stop_timeout_s``."""
        self._stop.set()
        with self._lock:
            proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        if self._thread is not None:
            self._thread.join(timeout)
        if self._path_unit is not None:
            self._path_unit.join(timeout)

    def _watch_requests(self) -> None:
        """dongle-update-install.path (PathChanged=): the installer once per change."""
        def stamp() -> tuple[int, int] | None:
            try:
                st = self.request_file.stat()
            except OSError:
                return None
            return st.st_ino, st.st_mtime_ns
        seen = stamp()
        while not self._stop.wait(0.1):
            now = stamp()
            if now is not None and now != seen:
                seen = now
                rc = self._helper("--config", str(self.config), "apply")
                self.installs.append(rc)

    @property
    def running_version(self) -> str | None:
        with self._lock:
            alive = self._proc is not None and self._proc.poll() is None
        return self.layout.current_version() if alive else None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    # --- the unit -----------------------------------------------------------------------------

    def _helper(self, *args: str, env: Mapping[str, str] | None = None) -> int:
        exe = self.layout.current / "bin" / "dongle-update"
        return self._exec(exe, args, env)

    def _exec(self, exe: Path, args: tuple[str, ...], env: Mapping[str, str] | None) -> int:
        with open(self.log_path, "a") as out:
            try:
                return subprocess.run([str(exe), *args], stdout=out, stderr=subprocess.STDOUT,
                                      env={**self.env, **(env or {})}, timeout=120).returncode
            except (OSError, subprocess.TimeoutExpired) as e:
                out.write(f"agent-service: {exe} {' '.join(args)} failed: {e}\n")
                return -1

    def _note(self, text: str) -> None:
        with open(self.log_path, "a") as out:
            out.write(f"agent-service: {text}\n")
        log.info("agent-service: %s", text)

    def _start_limit_hit(self) -> bool:
        now = time.monotonic()
        self._starts = [t for t in self._starts if now - t < self.interval_s]
        self._starts.append(now)
        return len(self._starts) > self.burst

    def _run_once(self) -> Run:
        self._helper("prestart")                                  # ExecStartPre=-
        exe = self.layout.current / "bin" / "dongle-agent"        # ExecStart= resolves now
        version = self.layout.current_version()
        self._note(f"starting {exe} ({version})")
        with open(self.log_path, "a") as out:
            try:
                proc = subprocess.Popen([str(exe), "--config", str(self.config), *self.args],
                                        stdout=out, stderr=subprocess.STDOUT, env=self.env)
            except OSError as e:
                self._note(f"cannot execute {exe}: {e}")
                run = Run(version, "exit-code", "exited", "203")   # systemd's EXIT_EXEC
                self._poststop(run)
                return run
            with self._lock:
                self._proc = proc
            if self._stop.is_set():
                proc.send_signal(signal.SIGTERM)
            rc = self._wait(proc)
        with self._lock:
            self._proc = None
        if rc >= 0:
            run = Run(version, "success" if rc == 0 else "exit-code", "exited", str(rc))
        else:
            name = signal.Signals(-rc).name.removeprefix("SIG")
            clean = self._stop.is_set() and -rc in (signal.SIGTERM, signal.SIGINT)
            run = Run(version, "success" if clean else "signal", "killed", name)
        self._note(f"{version} ended: {run.result} ({run.code} {run.status})")
        self._poststop(run)
        return run

    def _wait(self, proc: subprocess.Popen) -> int:
        while True:
            try:
                return proc.wait(0.2)
            except subprocess.TimeoutExpired:
                pass
            if self._stop.is_set():
                try:
                    return proc.wait(self.stop_timeout_s)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    return proc.wait()

    def _poststop(self, run: Run) -> None:
        self.runs.append(run)
        self._helper("poststop", env={"SERVICE_RESULT": run.result, "EXIT_CODE": run.code,
                                      "EXIT_STATUS": run.status})   # ExecStopPost=-

    def _on_failure(self) -> bool:
        """OnFailure=dongle-agent-rollback.service. True if it rolled back (start again)."""
        exe = self.layout.previous / "bin" / "dongle-update"
        if not exe.exists():                                      # ConditionPathExists=
            return False
        rc = self._exec(exe, ("rollback", "--reason",
                              "start_limit: dongle-agent.service failed repeatedly"), None)
        return rc == 0

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if self._start_limit_hit():
                    self._note("start limit hit: failed")
                    if self._on_failure():
                        self._starts.clear()                      # reset-failed, start
                        continue
                    self.failed.set()
                    return
                run = self._run_once()
                if self._stop.is_set():
                    return
                status = run.status
                if run.result == "success":
                    self._note("exited cleanly: inactive")
                    return
                if run.code == "exited" and status == "2":        # RestartPreventExitStatus=2
                    self._note("configuration error (status 2): failed")
                    if self._on_failure():
                        continue
                    self.failed.set()
                    return
                if status == str(RESTART_EXIT_CODE):
                    self._note("restart requested (status 75)")  # RestartForceExitStatus=75
                self._stop.wait(self.restart_s)                   # RestartSec=
        finally:
            self.stopped.set()
