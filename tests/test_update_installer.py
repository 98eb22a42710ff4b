"""The installer (agent/update/installer.py, `dongle-update apply`) trusts nothing the agent says.

The agent downloads and verifies a release into its staging area and asks; each test here then
plays a compromised agent that changes something after its own checks — the bytes, the metadata,
links in its directory, the request — and the installer, verifying again from the pinned root
with its own TUF memory, refuses. Real repository over HTTPS, real python-tuf on both sides."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from agent.update import request, state, trial
from agent.update.tuf_client import StagedSource
from agent.update.tuf_errors import TufError
from scripts.refcloud.release import ReleaseRepo
from scripts.testbed.devca import DevCA
from scripts.testbed.tuf_server import TufServer
from tests.support.updates import INSTALLED, Env, Harness, build_repo, install, layout_for

pytestmark = pytest.mark.timeout(120)

BUNDLE = "agent/1.0.0/bundle.tar.zst"


@pytest.fixture
def env(tmp_path: Path):
    repo = build_repo(tmp_path, [("1.0.0", 1), ("1.1.0", 2)])
    ca = DevCA(tmp_path / "pki")
    with TufServer(repo.repo, ca) as srv:
        yield Env(tmp_path, repo, srv, ca, layout_for(tmp_path))


def staged(env: Env, h: Harness, version: str = "1.0.0", counter: int = 1) -> Path:
    """The agent's part: accepted, downloaded, verified, asked. Returns the staged bundle."""
    assert h.send(env.release(version, counter)).status == "accepted"
    assert h.step() == ["agent:requested"]
    info = env.repo.targets.signed.targets[f"agent/{version}/bundle.tar.zst"]
    path = env.layout.staged_file(info.hashes)
    assert path.is_file() and env.layout.request_file.is_file()
    return path


def refused(env: Env, h: Harness, why: str) -> None:
    out = h.apply()
    assert out["result"] == "rejected" and why in out["reason"], out
    assert env.layout.current_version() is None and env.layout.installed() == []
    assert h.step() == []                      # the agent hears it, drops the release
    [ev] = [e for e in h.events if e["state"] == "rejected"]
    assert ev["reason"].startswith("installer: ") and why in ev["reason"]
    assert state.load_work(env.layout)["pending"] == {}


def test_bytes_changed_after_the_agent_checked_them_are_refused(env: Env) -> None:
    h = Harness(env)
    path = staged(env, h)
    data = bytearray(path.read_bytes())
    data[100] ^= 1
    path.write_bytes(bytes(data))
    refused(env, h, "hash_mismatch")


def test_a_symbolic_link_in_the_staging_area_is_never_followed(env: Env, tmp_path: Path) -> None:
    """Even to the right bytes: a root process following the agent's links reads what the
    agent points it at."""
    h = Harness(env)
    path = staged(env, h)
    elsewhere = tmp_path / "elsewhere"
    shutil.move(path, elsewhere)
    path.symlink_to(elsewhere)
    refused(env, h, "symbolic link")


def test_a_linked_staging_directory_is_not_followed_either(env: Env, tmp_path: Path) -> None:
    h = Harness(env)
    staged(env, h)
    moved = tmp_path / "moved-staging"
    shutil.move(env.layout.staging, moved)
    env.layout.staging.symlink_to(moved)
    out = h.apply()
    assert out["result"] in ("rejected", "error") and "staging" in out["reason"], out
    assert env.layout.current_version() is None


def test_metadata_signed_by_other_keys_is_refused(env: Env, tmp_path: Path) -> None:
    """The agent stages a repository of its own making (its keys, its bundle)."""
    h = Harness(env)
    staged(env, h)
    evil = ReleaseRepo.init(tmp_path / "evil", tmp_path / "evil-keys")
    from tests.support.updates import HW, make_tree
    evil.add_agent_release("1.0.0", 1, make_tree(tmp_path / "t", "1.0.0", extra={"x.py": "EVIL"}),
                           hardware_ids=[HW])
    evil.publish()
    for name in ("timestamp.json", "snapshot.json", "targets.json"):
        shutil.copy(evil.metadata_dir / name, env.layout.staged_metadata / name)
    info = evil.targets.signed.targets[BUNDLE]
    shutil.copy(evil.target_file(BUNDLE), env.layout.staged_file(info.hashes))
    refused(env, h, "untrusted_signature")


def test_the_installer_keeps_its_own_memory_of_the_newest_metadata(env: Env) -> None:
    """Staged metadata older than what the installer has seen is a rollback attack, whatever
    the agent's own cache says."""
    h = Harness(env)
    staged(env, h)
    old_meta = env.tmp / "old-meta"
    shutil.copytree(env.layout.staged_metadata, old_meta)
    h.apply()
    assert h.step() == ["agent:restart"]
    trial.mark_good(env.layout)
    env.repo.publish()                                    # newer metadata, same targets
    assert install(h, "1.1.0", 2, delta_from="1.0.0") == INSTALLED
    shutil.rmtree(env.layout.staged_metadata, ignore_errors=True)
    shutil.copytree(old_meta, env.layout.staged_metadata)
    with pytest.raises(TufError) as e:
        StagedSource(env.layout, env.repo.root_path).target_info("agent/1.1.0/bundle.tar.zst")
    assert e.value.reason == "metadata_mismatch", e.value


def test_requests_are_done_once_and_never_below_the_installed_counter(env: Env) -> None:
    h = Harness(env)
    staged(env, h)
    req = json.loads(env.layout.request_file.read_text())
    assert h.apply()["result"] == "done"
    assert h.apply() is None                           # the same request again: nothing
    assert h.step() == ["agent:restart"]
    trial.mark_good(env.layout)
    # a compromised agent replays the install under a new id: counter 1 is installed now
    request.write(env.layout, "install", release=req["release"])
    out = h.apply()
    assert out["result"] == "rejected" and out["reason"].startswith("stale_counter"), out
    assert env.layout.current_version() == "1.0.0"


def test_no_install_while_a_trial_runs_and_unusable_requests_are_refused(env: Env) -> None:
    h = Harness(env)
    staged(env, h)
    h.apply()
    assert state.load(env.layout)["trial"]["version"] == "1.0.0"
    request.write(env.layout, "install", release={"component": "agent", "version": "1.1.0",
                                                  "release_counter": 2,
                                                  "target": "agent/1.1.0/bundle.tar.zst"})
    out = h.apply()
    assert out["result"] == "rejected" and "on trial" in out["reason"], out
    for bad in ({"version": "../../etc"}, {"release_counter": -1}, {"release_counter": True},
                {"target": "x" * 300}, {"component": "mcu"}):
        release = {"component": "agent", "version": "1.1.0", "release_counter": 2,
                   "target": "agent/1.1.0/bundle.tar.zst", **bad}
        request.write(env.layout, "install", release=release)
        out = h.apply()
        assert out["result"] == "error" and out["reason"].startswith("unusable request"), (bad, out)
    assert env.layout.current_version() == "1.0.0"
    # good and rollback only end the trial that runs
    request.write(env.layout, "rollback", version="9.9.9", reason="no_broker: spoofed")
    assert h.apply()["result"] == "ignored" and env.layout.current_version() == "1.0.0"
