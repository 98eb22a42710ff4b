"""Helpers shared by tests/test_update_*.py: a real TUF repository built with
scripts/refcloud/release.py, served over HTTPS by scripts/testbed/tuf_server.py with the dev CA,
and :class:`Harness`: the agent's Updater with the installer (agent.update.installer) run
between its steps as dongle-update-install.path would, and a restart building it afresh."""
from __future__ import annotations

import random
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from agent.cloud import schemas
from agent.cloud.protocol import Opened
from agent.settings import UpdateSettings
from agent.update import installer, state
from agent.update.slots import Layout
from agent.update.tuf_client import TufClient
from agent.update.updater import Updater
from scripts.testbed.devca import DevCA
from scripts.refcloud.release import PYVER, ReleaseRepo, release_body, write_launchers
from scripts.testbed.tuf_server import TufServer

HW = "dongle-pi-v1"


def make_tree(root: Path, version: str, *, filler: int = 20_000, seed: int = 1,
              modules: int = 0, extra: dict[str, str] | None = None) -> Path:
    """A small agent environment: a package whose module says its version, plus ``filler``
    bytes of incompressible data (the 'dependencies') that stay the same across versions."""
    tree = root / f"tree-{version}"
    if tree.exists():
        shutil.rmtree(tree)
    site = tree / "lib" / PYVER / "site-packages"
    (site / "stubagent").mkdir(parents=True)
    (site / "stubagent" / "__init__.py").write_text(f"VERSION = {version!r}\n")
    (site / "stubdep").mkdir()
    (site / "stubdep" / "blob.bin").write_bytes(random.Random(seed).randbytes(filler))
    (site / "stubdep" / "__pycache__").mkdir()
    (site / "stubdep" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"junk")
    for i in range(modules):   # many small files: extraction, bytecode and fsync take a while
        (site / "stubdep" / f"m{i:03d}.py").write_text(
            "".join(f"def f{j}(x):\n    return x * {j} + {i}\n\n" for j in range(40)))
    for rel, text in (extra or {}).items():
        p = site / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    write_launchers(tree)
    return tree


@dataclass
class Env:
    """One test's world: repository + keys, HTTPS server, device layout and TUF client."""
    tmp: Path
    repo: ReleaseRepo
    server: TufServer
    ca: DevCA
    layout: Layout
    events: list[dict] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.server.url

    def tuf(self, **kw) -> TufClient:
        return TufClient(self.tmp / "device-meta", self.repo.root_path,
                         ca_file=self.ca.ca_cert_path, **kw)

    def release(self, version: str, counter: int, *, delta_from: str | None = None,
                parked: bool = False, min_supply_v: float = 0, component: str = "agent",
                target: str | None = None) -> dict:
        if target is None:
            target = (f"agent/{version}/bundle.tar.zst" if component == "agent"
                      else f"mcu/{version}/firmware.bin")
        return release_body(component, version, counter, self.url, target,
                            delta_from=delta_from,
                            delta_target=delta_from and f"agent/{version}/delta-from-{delta_from}.zst",
                            parked=parked, min_supply_v=min_supply_v)


def opened(body: dict, seq: int = 1) -> Opened:
    header = {"v": 1, "dev": "dongle-test", "kind": "release", "seq": seq, "ts": 0,
              "enc": "identity", "kid_s": "0" * 16, "kid_r": "0" * 16}
    return Opened(header=header, body=body, protected=b"")


def build_repo(tmp: Path, versions: list[tuple[str, int]], *, filler: int = 20_000,
               modules: int = 0, keys: Path | None = None,
               consistent_snapshot: bool = True) -> ReleaseRepo:
    """A repository with each (version, counter) as a bundle, and a delta from the one before.
    ``consistent_snapshot``: the root's flag (both are standard repositories)."""
    repo = ReleaseRepo.init(tmp / "repo", keys or tmp / "keys",
                            consistent_snapshot=consistent_snapshot)
    prev = None
    for version, counter in versions:
        tree = make_tree(tmp / "trees", version, filler=filler, modules=modules)
        repo.add_agent_release(version, counter, tree, hardware_ids=[HW],
                               delta_from=[prev] if prev else [])
        repo.publish()
        prev = version
    return repo


def layout_for(tmp: Path) -> Layout:
    return Layout(tmp / "opt-dongle", sys.executable)


class Harness:
    """The agent's updater against ``env``'s repository, with the installer in between.

    ``step()`` is one pass of the updater's worker; when it asked for a restart (``current``
    moved), the next ``step()`` runs a new Updater, as the restarted agent would. ``apply()``
    runs the installer once, as dongle-update-install.service does when the request changes;
    ``cycle()`` is a step, then the installer and a step again if a request is waiting."""

    def __init__(self, env: Env, tuf=None, health=None, monotonic=None, **settings):
        self.env = env
        self.events: list[dict] = []
        self.restarts = 0
        self.parked: bool | None = True
        self.volts: float | None = 12.6
        self.health = health or (lambda: {"store": True, "broker": True})
        self.settings = UpdateSettings(root=env.layout.root, work_dir=env.layout.work,
                                       tuf_root=env.repo.root_path,
                                       metadata_dir=env.tmp / "device-meta",
                                       ca_file=env.ca.ca_cert_path, python=env.layout.python,
                                       max_rate_kib_s=0, compile_bytecode=False, **settings)
        self._tuf, self._monotonic = tuf, monotonic
        self._restarted = False
        self.updater = self._new()

    def _new(self) -> Updater:
        kw = {"monotonic": self._monotonic} if self._monotonic else {}
        return Updater(self.settings, emit_event=self._emit, parked=lambda: self.parked,
                       supply_v=lambda: self.volts, restart=self._restart, health=self.health,
                       clock_synced=lambda: True, tuf=self._tuf, **kw)

    def _emit(self, body: dict) -> None:
        schemas.validate("event", body)   # every event body is a valid PROTOCOL §4 event
        self.events.append(body)

    def _restart(self) -> None:
        self.restarts += 1
        self._restarted = True

    def _restarted_now(self) -> Updater:
        if self._restarted:
            self._restarted = False
            self.updater = self._new()
        return self.updater

    def step(self) -> list[str]:
        return self._restarted_now().step()

    def apply(self) -> dict | None:
        return installer.apply(self.settings)

    def request_waiting(self) -> bool:
        req = state.load_work(self.env.layout).get("request")
        return bool(req) and (state.load(self.env.layout).get("last_request") or {}).get("id") != req["id"]

    def cycle(self) -> list[str]:
        done = self.step()
        if self.request_waiting():
            self.apply()
            done += self.step()
        return done

    def send(self, body: dict, seq: int = 1):
        out = self._restarted_now().handle_release(opened(body, seq))
        if out.after_commit:
            out.after_commit()
        return out

    def states(self) -> list[str]:
        """States without the progress events (``downloading`` with ``bytes_done``)."""
        return [e["state"] for e in self.events if "bytes_done" not in e]

    def rejection(self) -> str:
        rejected = [e for e in self.events if e["state"] == "rejected"]
        assert len(rejected) == 1, self.events
        return rejected[0]["reason"]


#: What a cycle that installs says: the agent asked the installer, then restarts into the slot.
INSTALLED = ["agent:requested", "agent:restart"]


def install(h: Harness, version: str, counter: int, **kw) -> list[str]:
    """Sends the release and runs one cycle (agent, installer, agent)."""
    assert h.send(h.env.release(version, counter, **kw)).status == "accepted"
    return h.cycle()
