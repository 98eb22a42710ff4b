"""Over-the-air updates end to end, with real peers only: the cloud console builds a release from
this checkout into a TUF repository (scripts/refcloud/release.py) served over HTTPS with the dev CA
(scripts/testbed/tuf_server.py) and sends the signed ``down/release`` through Mosquitto; a real
``dongle-agent`` runs from its ``current`` slot under scripts/demo_update.AgentService (what
systemd does with the update drop-in: prestart/poststop helpers, restart on exit 75, OnFailure=
rollback), downloads the delta, installs, restarts on trial and reports ``good`` — or, for a
release that crashes on start, rolls back by itself.

Bundles are code-only (the dependencies stay in the checkout's venv, see scripts/testbed/updates.py),
so a release is a delta of a few KB.
"""
from __future__ import annotations

import pytest

from agent.cloud import protocol, schemas
from agent.update import state
from scripts.testbed import updates as demo_update
from scripts.refcloud.console import release

pytestmark = pytest.mark.timeout(150)

DEV = "ota-0001"
FACTORY = "1.0.0"


@pytest.fixture
def dongle(fleet):
    """The fleet plus a repository server, a factory-installed dongle and its agent service."""
    run = fleet.run_dir
    srv = demo_update.serve(run, fleet.ca)
    layout = demo_update.factory_install(run, version=FACTORY, compile_bytecode=False)
    toml = fleet.device(DEV, tuf_root=demo_update.repository(run).root_path,
                        update=demo_update.update_settings(
                            layout.root, stable_s=3.0, trial_s=60.0, poll_s=0.5, retry_s=2.0,
                            compile_bytecode=False))
    svc = demo_update.AgentService(layout.root, toml, toml.parent / "agent.log",
                                   restart_s=0.3, args=("--log-level", "DEBUG")).start()
    try:
        assert _online(fleet.console, FACTORY), svc.log_text()[-5000:]
        yield fleet.console, svc, layout, srv
    finally:
        svc.stop()
        srv.stop()


def _online(console, version: str, timeout: float = 60):
    return console.wait_for(lambda r: r.get("dev") == DEV and r.get("topic") == "status"
                            and r["status"].get("state") == "online"
                            and r["status"].get("agent") == version, timeout)


def _update_events(console, version: str) -> list[dict]:
    with console._records_lock:
        recs = list(console.records)
    return [r["body"] for r in recs if r.get("dev") == DEV and r.get("kind") == "event"
            and r["body"].get("type") == "update" and r["body"].get("to") == version]


def _wait_update(console, version: str, st: str, timeout: float = 60) -> dict | None:
    rec = console.wait_for(lambda r: r.get("dev") == DEV and r.get("kind") == "event"
                           and r["body"].get("type") == "update" and r["body"].get("to") == version
                           and r["body"].get("state") == st, timeout)
    return rec and rec["body"]


def _ack(console, seq: int) -> dict | None:
    rec = console.wait_for(lambda r: r.get("dev") == DEV and r.get("kind") == "ack"
                           and r["body"].get("ref_kind") == "release"
                           and r["body"].get("ref_seq") == seq, 30)
    return rec and rec["body"]


def test_release_updates_the_running_agent_which_reports_good(dongle) -> None:
    console, svc, layout, _ = dongle
    seq, body = release(console, DEV, "1.0.1")
    assert body["delta_from"] == FACTORY            # from the version the device reported
    assert _ack(console, seq)["status"] == "accepted", svc.log_text()[-5000:]

    good = _wait_update(console, "1.0.1", "good", 90)
    assert good, svc.log_text()[-8000:]
    assert _online(console, "1.0.1"), svc.log_text()[-5000:]   # status `agent` of the new slot
    events = _update_events(console, "1.0.1")
    for ev in events:
        schemas.validate("event", ev)
    states = [e["state"] for e in events]
    for st in ("downloading", "installed", "trial", "good"):
        assert st in states, states
    assert states.index("downloading") < states.index("installed") < states.index("trial")
    [installed] = [e for e in events if e["state"] == "installed"]
    assert installed["via"] == "delta" and installed["from"] == FACTORY
    assert good["from"] == FACTORY

    assert layout.current_version() == "1.0.1" and layout.previous_version() == FACTORY
    st = state.load(layout)
    assert st["agent"]["release_counter"] == body["release_counter"] and st["trial"] is None
    assert svc.running_version == "1.0.1"
    # The restart into the new slot was asked for (exit 75), not a crash.
    assert [(r.version, r.status) for r in svc.runs] == [(FACTORY, "75")]


def test_broken_release_rolls_back_by_itself(dongle) -> None:
    console, svc, layout, _ = dongle
    seq, body = release(console, DEV, "1.0.2", broken=True)
    assert _ack(console, seq)["status"] == "accepted", svc.log_text()[-5000:]

    back = _wait_update(console, "1.0.2", "rolled_back", 90)
    assert back, svc.log_text()[-8000:]
    schemas.validate("event", back)
    assert back["reason"] == "crash_loop: exited 1" and back["from"] == FACTORY
    # The report was sent by the old version, running again; the broken one never came online.
    assert console.wait_for(lambda r: r.get("dev") == DEV and r.get("topic") == "status"
                            and r["status"].get("agent") == "1.0.2", 0.1) is None
    states = [e["state"] for e in _update_events(console, "1.0.2")]
    assert "trial" in states and "good" not in states, states

    # The new version ran and crashed (max_starts = 3), then the old one runs again.
    crashed = [r for r in svc.runs if r.version == "1.0.2"]
    assert len(crashed) == 3 and all(r.status == "1" for r in crashed), svc.runs
    assert "deliberately broken release" in svc.log_text()
    assert layout.current_version() == FACTORY and svc.running_version == FACTORY
    st = state.load(layout)
    assert st["agent"]["blocked_counter"] == body["release_counter"]
    assert st["agent"]["version"] == FACTORY and st["trial"] is None

    # Not retried: the same counter again is refused at once.
    seq2, _ = console.publish(DEV, "release", body)
    ack = _ack(console, seq2)
    assert ack["status"] == "rejected" and "blocked_counter" in ack["reason"]


def _publish_unchecked(console, body: dict) -> int:
    """What a buggy or hostile backend can send: signed and sealed, but never held against the
    release schema on the cloud side (the console's own publish checks it)."""
    _, enc_pub = console.registry.get(DEV)
    seq = console.ledger.next_down_seq(DEV)
    env = protocol.seal("release", body, dev=DEV, seq=seq, signer=console.sign_key,
                        recipient=enc_pub, check_schema=False)
    console.publish_raw(DEV, "down/release", env, retain=True)
    return seq


NOT_VERSIONS = ["../../etc", "/", "1..2", "1.2.", ".1", "1.0/../../x", "9" * 65, ""]


def test_a_release_whose_version_is_not_a_plain_version_is_rejected_before_any_download(dongle) -> None:
    """Issue 20 item 6: such a release was acked ``accepted``, retried for ever, and kept every
    lower counter out ("counter N is pending"). Now: ``rejected`` naming the version, nothing
    fetched, nothing pending, and the next good release goes through."""
    console, svc, layout, srv = dongle
    built = demo_update.build_release(console.run_dir, "1.0.1")
    srv.reset_counters()
    for i, version in enumerate(NOT_VERSIONS):
        body = built.body(srv.url)
        body.update(version=version, release_counter=100 + i)
        ack = _ack(console, _publish_unchecked(console, body))
        assert ack["status"] == "rejected", (version, ack, svc.log_text()[-3000:])
        assert "version" in ack["reason"], ack
    assert not [r for r in srv.requests if r[0].startswith("/targets/")]
    assert state.load_work(layout)["pending"] == {}
    seq = _publish_unchecked(console, built.body(srv.url))      # counter 2: lower than all above
    assert _ack(console, seq)["status"] == "accepted", svc.log_text()[-3000:]


def test_release_without_updates_configured_is_rejected(fleet) -> None:
    srv = demo_update.serve(fleet.run_dir, fleet.ca)
    try:
        toml = fleet.device("noupd-0001")
        agent = fleet.agent(toml)
        c = fleet.console
        assert c.wait_for(lambda r: r.get("dev") == "noupd-0001" and r.get("topic") == "status"
                          and r["status"].get("state") == "online", 60), agent.log_text()
        seq, _ = release(c, "noupd-0001", "1.0.1")
        rec = c.wait_for(lambda r: r.get("dev") == "noupd-0001" and r.get("kind") == "ack"
                         and r["body"].get("ref_seq") == seq, 30)
        assert rec, agent.log_text()
        assert rec["body"]["status"] == "rejected"
        assert rec["body"]["reason"] == "updates not configured"
        assert agent.terminate() == 0
    finally:
        srv.stop()

