"""Agent updates through a real TUF repository (scripts/refcloud/release.py) served over HTTPS with the
dev CA (scripts/testbed/tuf_server.py): the Updater's down/release handler, delta and full bundles,
Range resume, and every rejection with its named reason."""
from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from agent.cloud import schemas
from agent.update import state, trial
from agent.update.tuf_client import TufError
from agent.update.updater import UpdateSettings, Updater
from scripts.refcloud.keys import generate_cloud_keys
from scripts.testbed.devca import DevCA
from scripts.refcloud.release import PYVER, signer_for
from scripts.testbed.tuf_server import TufServer
from tests.support.updates import (HW, INSTALLED, Env, Harness, build_repo, install, layout_for,
                                   make_tree)
from scripts.testbed.wait import wait_until

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def env(tmp_path: Path, request):
    """Parametrize with ``indirect=True`` and a bool: the repository's ``consistent_snapshot``."""
    repo = build_repo(tmp_path, [("1.0.0", 1), ("1.1.0", 2)],
                      consistent_snapshot=getattr(request, "param", True))
    ca = DevCA(tmp_path / "pki")
    with TufServer(repo.repo, ca) as srv:
        yield Env(tmp_path, repo, srv, ca, layout_for(tmp_path))


BOTH_LAYOUTS = pytest.mark.parametrize("env", [True, False], ids=["consistent", "plain"],
                                      indirect=True)


@BOTH_LAYOUTS
def test_full_install_then_delta_update(env: Env) -> None:
    h = Harness(env)
    assert install(h, "1.0.0", 1) == INSTALLED
    assert env.layout.current_version() == "1.0.0"
    assert h.states() == ["downloading", "installed", "trial"]
    progress = [e for e in h.events if "bytes_done" in e]
    assert progress and all(0 < e["bytes_done"] <= e["bytes_total"] for e in progress)
    assert h.restarts == 1
    # A newer release waits while 1.0.0 is still on trial (a rollback must land on a proven one).
    env.server.reset_counters()
    assert install(h, "1.1.0", 2, delta_from="1.0.0") == ["agent:waiting (trial of 1.0.0)"]
    assert env.layout.current_version() == "1.0.0" and h.restarts == 1
    trial.mark_good(env.layout)
    assert h.cycle() == INSTALLED
    fetched = [p for p, status, n, _ in env.server.requests if p.startswith("/targets/")]
    assert len(fetched) == 1 and "delta-from-1.0.0" in fetched[0]
    assert env.layout.current_version() == "1.1.0"
    assert env.layout.previous_version() == "1.0.0"
    slot = env.layout.slot("1.1.0")
    assert "1.1.0" in (slot / f"lib/{PYVER}/site-packages/stubagent/__init__.py").read_text()
    assert not list(slot.rglob("*.pyc"))  # compile_bytecode=False here; bundles carry none
    manifest = json.loads((slot / "MANIFEST.json").read_text())
    assert manifest["version"] == "1.1.0" and manifest["release_counter"] == 2
    installed = [e for e in h.events if e["state"] == "installed"]
    assert [e["via"] for e in installed] == ["full", "delta"]
    st = state.load(env.layout)
    assert st["trial"]["version"] == "1.1.0" and st["trial"]["from"] == "1.0.0"


def test_delta_falls_back_to_the_full_bundle(env: Env) -> None:
    h = Harness(env)
    install(h, "1.0.0", 1)
    trial.mark_good(env.layout)
    (env.layout.slot("1.0.0") / ".bundle.tar.zst").unlink()   # no base to patch
    env.server.reset_counters()
    assert install(h, "1.1.0", 2, delta_from="1.0.0") == INSTALLED
    fetched = [p for p, *_ in env.server.requests if p.startswith("/targets/")]
    assert len(fetched) == 1 and fetched[0].endswith("bundle.tar.zst")
    assert [e["via"] for e in h.events if e["state"] == "installed"] == ["full", "full"]


@BOTH_LAYOUTS
def test_download_resumes_with_range(env: Env) -> None:
    tuf = env.tuf(chunk=4096)
    info, url = tuf.target_info(env.url, "agent/1.0.0/bundle.tar.zst")
    part = env.tmp / "dl.part"
    seen = []

    def interrupt(done: int, total: int) -> None:
        seen.append(done)
        if len(seen) == 2:
            raise ConnectionResetError("link lost")

    with pytest.raises(TufError) as e:
        tuf.download(info, url, part, interrupt)
    assert e.value.retryable and part.stat().st_size == seen[-1] < info.length
    env.server.reset_counters()
    data = tuf.download(info, url, part)
    assert len(data) == info.length
    [(path, status, sent, ranged)] = [r for r in env.server.requests if r[0].startswith("/targets/")]
    assert status == 206 and ranged and sent == info.length - seen[-1]


def _target_requests(env: Env) -> list[tuple[str, int, int, bool]]:
    return [r for r in env.server.requests if r[0].startswith("/targets/")]


@BOTH_LAYOUTS
def test_a_target_republished_between_attempts_is_not_resumed_onto_old_bytes(env: Env) -> None:
    """Issue 20 item 10/11: the link drops mid-download, the repository re-publishes the
    target (same path, other bytes), and the next attempt must fetch the new bytes from the
    start instead of appending them to the old ones."""
    h = Harness(env, retry_s=0)
    env.server.cut_targets_after(17_000)       # of ~20.7 kB: the client has a chunk or two
    assert install(h, "1.0.0", 1) == ["agent:retry"]
    [(_, status, sent, _)] = _target_requests(env)
    assert (status, sent) == (200, 17_000)
    rebuilt = make_tree(env.tmp / "trees", "1.0.0", seed=2)   # same version, other bytes
    env.repo.add_agent_release("1.0.0", 1, rebuilt, hardware_ids=[HW])
    env.repo.publish()
    env.server.reset_counters()
    assert h.cycle() == INSTALLED
    [(_, status, sent, ranged)] = _target_requests(env)
    assert status == 200 and not ranged and sent == env.repo.target_file(
        "agent/1.0.0/bundle.tar.zst").stat().st_size
    assert "rejected" not in h.states()


def test_a_slow_drip_server_is_cut_at_the_deadline_and_the_bytes_kept(env: Env) -> None:
    """Issue 20 item 12: a server that sends a few bytes at a time (each read well inside the
    per-read timeout) must not hold a download forever. At 400 bytes/s the ~20 kB bundle would
    take about a minute; the deadline (1 s floor here, plus twice the time at the rate cap) cuts
    the attempt, which keeps what it got and is resumed."""
    h = Harness(env, tuf=env.tuf(deadline_floor_s=1.0), retry_s=0)
    env.server.slow_drip(400)
    assert install(h, "1.0.0", 1) == ["agent:retry"]
    act = h.updater.status()["activity"]
    assert act["state"] == "retrying" and "deadline" in act["error"], act
    [(_, _, dripped, _)] = wait_until(lambda: _target_requests(env), 20, what="the cut request")
    assert 0 < dripped < env.repo.target_file("agent/1.0.0/bundle.tar.zst").stat().st_size
    env.server.slow_drip(None)
    env.server.reset_counters()
    assert h.cycle() == INSTALLED
    [(_, status, _, ranged)] = _target_requests(env)
    assert status == 206 and ranged     # resumed: the dripped bytes were kept


def test_conditions_wait_for_parked_and_supply(env: Env) -> None:
    h = Harness(env)
    h.parked, h.volts = False, 11.0
    assert h.send(env.release("1.0.0", 1, parked=True, min_supply_v=12.0)).status == "accepted"
    assert h.cycle() == ["agent:waiting (parked)"]
    # downloaded and verified while driving; nothing installed, nothing asked of the installer
    assert env.layout.current_version() is None and env.layout.installed() == []
    assert [p.name for p in env.layout.staging.iterdir() if p.is_file()] == [
        env.layout.staged_name(env.repo.targets.signed.targets["agent/1.0.0/bundle.tar.zst"].hashes)]
    assert not env.layout.request_file.exists()
    assert h.updater.status()["activity"]["waiting_for"] == "parked"
    h.parked = True
    assert h.cycle()[0].startswith("agent:waiting (supply")
    env.server.reset_counters()
    h.volts = 12.4
    assert h.cycle() == INSTALLED
    assert not [r for r in env.server.requests if r[0].startswith("/targets/")]  # not fetched again
    assert env.layout.current_version() == "1.0.0"


# --- rejections, each with its named reason -------------------------------------------------------

def _assert_untouched(env: Env) -> None:
    assert env.layout.current_version() is None
    assert env.layout.installed() == []
    assert state.load_work(env.layout)["pending"] == {}
    assert not env.layout.request_file.exists()


def test_flipped_bits_are_rejected(env: Env) -> None:
    f = env.repo.target_file("agent/1.0.0/bundle.tar.zst")
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x10
    f.write_bytes(bytes(data))
    h = Harness(env)
    assert install(h, "1.0.0", 1) == ["agent:rejected (hash_mismatch)"]
    assert h.rejection().startswith("hash_mismatch")
    assert not list(env.layout.staging.glob("*"))  # bad bytes are never resumed from
    _assert_untouched(env)


def test_wrong_hardware_id_is_rejected(env: Env) -> None:
    tree = make_tree(env.tmp / "trees", "2.0.0")
    env.repo.add_agent_release("2.0.0", 3, tree, hardware_ids=["other-product-v2"])
    env.repo.publish()
    h = Harness(env)
    assert install(h, "2.0.0", 3) == ["agent:rejected (wrong_hardware)"]
    assert HW in h.rejection() and "other-product-v2" in h.rejection()
    _assert_untouched(env)


def test_older_or_equal_release_counter_is_rejected(env: Env) -> None:
    h = Harness(env)
    install(h, "1.1.0", 2)
    with state.locked(env.layout) as st:   # as if the trial had ended good
        state.raise_counter(st, "agent", 2, "1.1.0")
        st["trial"] = None
    for version, counter in (("1.1.0", 2), ("1.0.0", 1)):
        out = h.send(env.release(version, counter))
        assert out.status == "rejected" and out.reason.startswith("stale_counter"), out
    assert state.load(env.layout)["agent"]["release_counter"] == 2


def test_signed_counter_must_match_the_release(env: Env) -> None:
    h = Harness(env)   # the cloud claims counter 7 for a target signed with counter 1
    assert install(h, "1.0.0", 7) == ["agent:rejected (target_mismatch)"]
    assert "release_counter" in h.rejection()


def test_expired_timestamp_is_rejected(env: Env) -> None:
    env.repo.refresh_timestamp(dt.timedelta(seconds=-60))
    h = Harness(env)
    assert install(h, "1.0.0", 1) == ["agent:rejected (expired_metadata)"]
    assert "timestamp" in h.rejection()
    _assert_untouched(env)


def test_target_missing_from_metadata_is_rejected(env: Env) -> None:
    h = Harness(env)
    shutil.copy(env.repo.target_file("agent/1.1.0/bundle.tar.zst"),
                env.repo.targets_dir / "agent" / "evil.bundle.tar.zst")   # on the server, unsigned
    assert install(h, "1.0.0", 1, target="agent/evil.bundle.tar.zst") == \
        ["agent:rejected (target_missing)"]
    _assert_untouched(env)


def test_mixed_metadata_versions_are_rejected(env: Env) -> None:
    md = env.repo.metadata_dir
    v = env.repo.targets.signed.version
    # The server hands out an older targets file under the name of the newest one.
    shutil.copy(md / f"{v - 1}.targets.json", md / f"{v}.targets.json")
    h = Harness(env)
    assert install(h, "1.0.0", 1) == ["agent:rejected (metadata_mismatch)"]
    _assert_untouched(env)


def test_oversize_download_is_cut_at_the_signed_length(env: Env) -> None:
    f = env.repo.target_file("agent/1.0.0/bundle.tar.zst")
    with open(f, "ab") as out:
        out.write(b"\0" * 32_000_000)   # endless data, as far as the device should care
    h = Harness(env)
    assert install(h, "1.0.0", 1) == ["agent:rejected (oversize)"]
    # The server logs a request once its handler has ended (here: the client hung up mid-body).
    served = wait_until(lambda: [n for p, _, n, _ in env.server.requests if p.startswith("/targets/")], 20)
    # The client stopped reading at the signed length and hung up (socket buffers hold a few MB).
    assert served and served[0] < f.stat().st_size // 2
    _assert_untouched(env)


def test_release_signed_with_the_cloud_envelope_key_is_rejected(env: Env) -> None:
    """A compromised backend holds the envelope key, not the offline release key."""
    cloud = generate_cloud_keys(env.tmp / "cloud")
    envelope_key = serialization.load_pem_private_key(
        Path(cloud["paths"]["cloud_sign.key"]).read_bytes(), None)
    tree = make_tree(env.tmp / "trees", "6.6.6", extra={"stubagent/backdoor.py": "EVIL = 1\n"})
    env.repo.add_agent_release("6.6.6", 9, tree, hardware_ids=[HW])
    env.repo.publish(targets_signer=signer_for(envelope_key))
    h = Harness(env)
    assert install(h, "6.6.6", 9) == ["agent:rejected (untrusted_signature)"]
    assert "targets" in h.rejection()
    _assert_untouched(env)


def test_rejected_release_can_come_again_and_status_shows_it(env: Env) -> None:
    env.repo.refresh_timestamp(dt.timedelta(seconds=-60))
    h = Harness(env)
    install(h, "1.0.0", 1)
    assert h.updater.status()["activity"]["reason"] == "expired_metadata"
    env.repo.refresh_timestamp()   # the repository host re-signs
    assert install(h, "1.0.0", 1) == INSTALLED


@pytest.mark.parametrize("version,plain", [
    ("1.2.0", True), ("1.2.0-rc1", True), ("0.1.0+3", True), ("20261203_1", True),
    ("9" * 64, True), ("9" * 65, False), ("../../etc", False), ("/", False), ("1..2", False),
    ("1.2.", False), (".1", False), ("1.0/x", False), ("", False), ("1.0.partial", False),
    ("1 2", False), ("1.2\n", False)])
def test_the_schema_and_the_updater_agree_on_what_a_version_is(env: Env, version, plain) -> None:
    """The downlink holds a release against config/schemas/release.json; the updater checks
    the version again (it names a slot directory): one rule, two places, the same answers."""
    body = env.release("1.0.0", 1)
    body["version"] = version
    try:
        schemas.validate("release", body)
        schema_ok = True
    except schemas.SchemaError:
        schema_ok = False
    out = Harness(env).send(body)
    assert schema_ok is plain
    assert (out.status == "accepted") is plain, out
    if not plain:
        assert out.reason.startswith("invalid_version: version:"), out
