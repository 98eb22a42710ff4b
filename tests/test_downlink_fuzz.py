"""Property: random bytes and random CBOR on any downlink topic never crash the agent and never
change its state (no config, booking, seq or ack) — hypothesis drives the real Downlink with a
real store; a shorter run goes through the real broker to the running agent."""
from __future__ import annotations

import os
import time

import cbor2
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from agent.cloud import keys
from agent import settings
from agent.compose import build
from agent.cloud.bookings import Bookings
from agent.cloud.downlink import Downlink, Outcome
from agent.outbox.store import Store

TOPICS = ["down/config", "down/booking", "down/command", "down/release", "down/unknown", "up/ack"]

cbor_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20)


def _envelope_like():
    header = st.dictionaries(st.sampled_from(["v", "dev", "kind", "seq", "ts", "exp", "enc", "kid_s", "kid_r", "x"]),
                             cbor_values, max_size=9)
    return st.tuples(header, st.binary(max_size=80), st.binary(max_size=70)).map(
        lambda t: cbor2.dumps([cbor2.dumps(t[0]), t[1], t[2]]))


payloads = st.binary(max_size=300) | cbor_values.map(cbor2.dumps) | _envelope_like()


def _state(store: Store):
    return (store.query("SELECT * FROM configs"), store.query("SELECT * FROM downlink_seq"),
            store.query("SELECT * FROM bookings"), store.query("SELECT seq FROM outbox"),
            store.last_uplink_seq)


def test_random_input_never_crashes_or_changes_state(tmp_path):
    store = Store(tmp_path / "a.db")
    bookings = Bookings(store)
    cloud_sign = Ed25519PrivateKey.generate()
    applied = []
    dl = Downlink(store, lambda kind, body, seq: b"sealed", device_id="fuzz-0001",
                  recipient_key=X25519PrivateKey.generate(),
                  trusted_signers=lambda: keys.trusted_signers([cloud_sign.public_key()]),
                  handlers={"config": lambda o: applied.append(o) or Outcome("applied"),
                            "booking": bookings.handle,
                            "command": lambda o: applied.append(o) or Outcome("done")})
    before = _state(store)

    @hsettings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(topic=st.sampled_from(TOPICS), payload=payloads)
    def run(topic, payload):
        dl.handle(topic, payload)  # must not raise

    run()
    assert _state(store) == before and applied == []
    assert "internal_error" not in dl.unauthenticated
    assert sum(dl.unauthenticated.values()) > 0


def test_garbage_through_the_broker_leaves_the_agent_running_and_unchanged(fleet):
    toml = fleet.device("fz-0001")
    agent = build(settings.load(toml))
    agent.start()
    try:
        assert agent.link.wait_connected(30)
        before = _state(agent.store)
        rnd = __import__("random").Random(7)
        for i in range(60):
            kind = rnd.choice(["config", "booking", "command", "release"])
            payload = rnd.choice([os.urandom(rnd.randrange(0, 400)),
                                  cbor2.dumps([os.urandom(20), os.urandom(50), os.urandom(64)]),
                                  cbor2.dumps({"op": "ping"}), b""])
            fleet.console.publish_raw("fz-0001", f"down/{kind}", payload)
        deadline = time.monotonic() + 20
        while sum(agent.downlink.unauthenticated.values()) < 60 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sum(agent.downlink.unauthenticated.values()) == 60
        assert _state(agent.store) == before
        # Still fully working: a genuine ping is answered.
        fleet.console.publish("fz-0001", "command", {"op": "ping"})
        assert fleet.console.wait_for(lambda r: r.get("kind") == "ack" and r["body"]["status"] == "done", 20)
    finally:
        agent.stop()
