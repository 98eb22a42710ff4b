"""Downlink from the cloud against the real broker: genuine messages applied exactly once,
everything forged, replayed, stale, misaddressed or malformed refused with a reason.

The agent runs in-process here (its state is inspected directly); the cloud side is the
reference console, sealing with its own keys through agent.protocol (whose byte-exactness is
proven independently in test_protocol.py).
"""
from __future__ import annotations


import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.cloud import protocol
from agent import settings
from agent.compose import build
from drivers.core.clock import Clock
from scripts.testbed.wait import wait_until

now_ms = Clock().now_ms

DEV = "dl-0001"
OTHER = "dl-0002"
DAY = 86_400_000


class Cloud:
    """The fleet's console plus helpers to craft downlink for DEV."""

    def __init__(self, fleet):
        self.fleet = fleet
        self.c = fleet.console
        self.enc_pub = self.c.registry.get(DEV)[1]

    def acks(self, kind=None):
        """The acks the cloud received, each envelope once: an envelope sent again because its
        PUBACK was lost (the same (dev, seq), PROTOCOL §2.4's at-least-once) is not another ack."""
        return [r for r in self.c.records if r.get("kind") == "ack" and r["dev"] == DEV
                and not r["duplicate"] and (kind is None or r["body"]["ref_kind"] == kind)]

    def wait_ack(self, kind, seq, timeout=30):
        rec = self.c.wait_for(lambda r: r.get("kind") == "ack" and r["body"]["ref_kind"] == kind
                              and r["body"]["ref_seq"] == seq, timeout)
        assert rec, f"no ack for {kind} seq={seq}"
        return rec["body"]

    def seal(self, kind, body, seq, *, signer=None, recipient=None, dev=DEV, exp_ms=None, check=True):
        return protocol.seal(kind, body, dev=dev, seq=seq, signer=signer or self.c.sign_key,
                             recipient=recipient or self.enc_pub, exp_ms=exp_ms, check_schema=check)

    def send(self, kind, envelope, *, retain=False):
        self.c.publish_raw(DEV, f"down/{kind}", envelope, retain=retain)


@pytest.fixture
def setup(fleet, tmp_path):
    fleet.device(OTHER)
    toml = fleet.device(DEV, extra_toml="[uplink]\nmax_inflight = 8\n")
    agent = build(settings.load(toml))
    agent.start()
    cloud = Cloud(fleet)
    assert agent.link.wait_connected(30)
    assert cloud.c.wait_for(lambda r: r.get("topic") == "status" and r["dev"] == DEV
                            and r["status"]["state"] == "online", 30)
    state = {"agent": agent, "toml": toml}
    yield cloud, state
    state["agent"].stop()


def _config(version, **extra):
    doc = {"version": version, "upload": {"interval_s": 1},
           "obd": {"pids": [{"name": "rpm", "pid": "RPM", "period_s": 1}], "dtc_period_s": 60},
           "can": {"signals": [], "raw": {"enabled": False, "ids": []}}}
    doc.update(extra)
    return doc


def _booking(bid="b-1", **kw):
    body = {"op": "upsert", "booking_id": bid, "service": "inspection",
            "scheduled_at": now_ms() + 3 * DAY,
            "provider": {"name": "Garage Müller", "address": "Hauptstr. 1", "phone": "+49 30 1234",
                         "lat": 52.52, "lon": 13.40}, "notes": "bring the spare key"}
    body.update(kw)
    return body


def test_config_applied_once_duplicate_and_replay(setup):
    cloud, st = setup
    agent = st["agent"]
    env5 = cloud.seal("config", _config(5, futurekey={"kept": True}), seq=10)
    cloud.send("config", env5, retain=True)
    ack = cloud.wait_ack("config", 10)
    assert ack["status"] == "applied" and ack["config_version"] == 5
    assert agent.config["version"] == 5 and agent.config["futurekey"] == {"kept": True}
    status = cloud.c.wait_for(lambda r: r.get("topic") == "status" and r["status"]["config_version"] == 5, 20)
    assert status, "status does not carry the active config_version"

    # QoS 1 redelivery of the same envelope: answered duplicate, no second effect.
    saved = agent.store.query("SELECT count(*) FROM configs")[0][0]
    cloud.send("config", env5)
    assert wait_until(lambda: [a["body"]["status"] for a in cloud.acks("config")].count("duplicate") == 1)
    assert agent.store.query("SELECT count(*) FROM configs")[0][0] == saved

    # A replay of an older envelope (lower seq) is rejected as such.
    cloud.send("config", cloud.seal("config", _config(4), seq=9))
    ack = cloud.wait_ack("config", 9)
    assert ack["status"] == "rejected" and ack["reason"].startswith("replay")
    # A newer seq with a version not above the active one: duplicate / rejected by version.
    cloud.send("config", cloud.seal("config", _config(5), seq=11))
    assert cloud.wait_ack("config", 11)["status"] == "duplicate"
    cloud.send("config", cloud.seal("config", _config(3), seq=12))
    ack = cloud.wait_ack("config", 12)
    assert ack["status"] == "rejected" and "not newer" in ack["reason"]
    assert agent.config["version"] == 5


def test_retained_config_redelivered_after_restart_has_no_second_effect(setup, fleet):
    cloud, st = setup
    cloud.send("config", cloud.seal("config", _config(7), seq=20), retain=True)
    assert cloud.wait_ack("config", 20)["status"] == "applied"
    st["agent"].stop()
    before = len(cloud.acks("config"))
    agent = st["agent"] = build(settings.load(st["toml"]))
    agent.start()
    assert agent.config["version"] == 7  # persisted
    # The broker delivers the retained config again on subscribe: a duplicate, nothing re-applied.
    assert wait_until(lambda: len(cloud.acks("config")) > before)
    assert cloud.acks("config")[-1]["body"]["status"] == "duplicate"
    assert agent.store.last_downlink_seq("config") == 20


def test_unauthenticated_envelopes_are_dropped_without_ack(setup, fleet):
    cloud, st = setup
    agent = st["agent"]
    body = _config(30)
    stranger = Ed25519PrivateKey.generate()
    other_enc = cloud.c.registry.get(OTHER)[1]
    good = cloud.seal("config", body, seq=30)
    outer = cbor2.loads(good)
    forged_sig = cbor2.dumps([outer[0], outer[1], bytes(64)])
    hdr = cbor2.loads(outer[0])
    hdr["seq"] = 31
    tampered_header = cbor2.dumps([cbor2.dumps(hdr, canonical=True), outer[1], outer[2]])
    ct = bytearray(outer[1])
    ct[-1] ^= 1
    tampered_ct = cbor2.dumps([outer[0], bytes(ct), outer[2]])
    cases = {
        "bad_signature": forged_sig,
        "unknown_signer": cloud.seal("config", body, seq=30, signer=stranger),
        "wrong_device": cloud.seal("config", body, seq=30, dev=OTHER),
        "wrong_recipient": cloud.seal("config", body, seq=30, recipient=other_enc),
        "malformed": b"\xa1\x61a\x01",
        "oversize": bytes(protocol.MAX_ENVELOPE + 1),
    }
    for reason, env in cases.items():
        cloud.send("config", env)
    cloud.send("config", tampered_header)
    cloud.send("config", tampered_ct)
    expected = dict.fromkeys(cases, 1)
    expected["bad_signature"] = 3  # forged, tampered header, tampered ciphertext (signature covers both)
    assert wait_until(lambda: dict(agent.downlink.unauthenticated) == expected, 30), dict(agent.downlink.unauthenticated)
    # Then a genuine one still works, and none of the above produced an ack or an effect.
    cloud.send("config", good)
    assert cloud.wait_ack("config", 30)["status"] == "applied"
    assert [a["body"]["ref_seq"] for a in cloud.acks()] == [30]


def test_expired_and_schema_invalid_are_acked_rejected(setup):
    cloud, st = setup
    cloud.send("command", cloud.seal("command", {"op": "ping"}, seq=1, exp_ms=now_ms() - 1000))
    ack = cloud.wait_ack("command", 1)
    assert ack["status"] == "rejected" and ack["reason"].startswith("expired")
    cloud.send("command", cloud.seal("command", {"op": "self_destruct"}, seq=2, check=False))
    ack = cloud.wait_ack("command", 2)
    assert ack["status"] == "rejected" and ack["reason"].startswith("schema")
    cloud.send("config", cloud.seal("config", {"version": "seven"}, seq=3, check=False))
    assert cloud.wait_ack("config", 3)["status"] == "rejected"
    assert st["agent"].config.get("version", 0) == 0  # the last good one stays


def test_bookings_upsert_cancel_and_validation(setup):
    cloud, st = setup
    bk = st["agent"].bookings
    cloud.send("booking", cloud.seal("booking", _booking(notes="line1\x1b[31mred\x07"), seq=1))
    assert cloud.wait_ack("booking", 1)["status"] == "accepted"
    b = bk.get("b-1")
    assert b["status"] == "scheduled" and b["notes"] == "line1\x1b[31mred\x07"  # stored as given
    cloud.send("booking", cloud.seal("booking", _booking(), seq=1))  # redelivery
    assert wait_until(lambda: [a["body"]["status"] for a in cloud.acks("booking")] == ["accepted", "duplicate"])
    bad = {
        2: _booking("b-2", scheduled_at=now_ms() - 10 * DAY),
        3: _booking("b-3", provider={"name": "X", "lat": 0.0, "lon": 0.0}),
        4: _booking("b-4", notes="n" * 5000),
        5: _booking("b-5", provider={"address": "nameless"}),
        6: _booking("b-6", provider={"name": "X", "lat": 123.0, "lon": 13.0}),
        7: {"op": "cancel", "booking_id": "unknown"},
    }
    for seq, body in bad.items():
        cloud.send("booking", cloud.seal("booking", body, seq=seq, check=False))
        ack = cloud.wait_ack("booking", seq)
        assert ack["status"] == "rejected" and ack["reason"], (seq, ack)
    cloud.send("booking", cloud.seal("booking", {"op": "cancel", "booking_id": "b-1"}, seq=8))
    assert cloud.wait_ack("booking", 8)["status"] == "accepted"
    assert [(x["booking_id"], x["status"]) for x in bk.list()] == [("b-1", "cancelled")]


def test_commands(setup):
    cloud, st = setup
    agent = st["agent"]
    cloud.send("command", cloud.seal("command", {"op": "ping", "request_id": "r1"}, seq=1))
    ack = cloud.wait_ack("command", 1)
    assert ack["status"] == "done" and ack["result"] == {"request_id": "r1"}
    cloud.send("command", cloud.seal("command", {"op": "report"}, seq=2))
    assert cloud.wait_ack("command", 2)["status"] == "done"
    snap = cloud.c.wait_for(lambda r: r.get("kind") == "event" and r["body"]["type"] == "health", 20)
    assert snap and snap["body"]["detail"]["config_version"] == 0
    cloud.send("command", cloud.seal("command", {"op": "clear_dtc"}, seq=3))
    assert cloud.wait_ack("command", 3)["status"] == "accepted"
    assert agent.store.get_meta("pending_clear_dtc")["ref_seq"] == 3
    cloud.send("command", cloud.seal("command", {"op": "delete_data", "categories": ["location"],
                                                 "request_id": "del-1"}, seq=4))
    ack = cloud.wait_ack("command", 4)
    assert ack["status"] == "done" and ack["result"]["deleted"] == {"location": 0}
    # read_dtc with no vehicle link: failed, with the reason, exactly one ack.
    cloud.send("command", cloud.seal("command", {"op": "read_dtc"}, seq=5))
    ack = cloud.wait_ack("command", 5)
    assert ack["status"] == "failed" and "vehicle" in ack["reason"]
    assert [a["body"]["ref_seq"] for a in cloud.acks("command")] == [1, 2, 3, 4, 5]


def test_config_that_breaks_connectivity_rolls_back(fleet):
    toml = fleet.device(DEV, extra_toml="")
    text = toml.read_text().replace("backoff_max_s = 10.0", "backoff_max_s = 1.0\nconfig_rollback_s = 4.0")
    toml.write_text(text)
    agent = build(settings.load(toml))
    agent.start()
    try:
        cloud = Cloud(fleet)
        assert agent.link.wait_connected(30)
        cloud.send("config", cloud.seal("config", _config(2), seq=1))
        assert cloud.wait_ack("config", 1)["status"] == "applied"
        # v3 moves the device to a broker that does not exist.
        dead = _config(3, link={"broker_url": "mqtts://127.0.0.1:1"})
        cloud.send("config", cloud.seal("config", dead, seq=2), retain=True)
        ack = cloud.wait_ack("config", 2, timeout=60)
        assert ack["status"] == "failed" and "rolled back to v2" in ack["reason"]
        assert ack["config_version"] == 2
        assert agent.config["version"] == 2 and agent.link.connected
        assert agent.store.active_config()["version"] == 2
        # A later good config applies normally.
        cloud.send("config", cloud.seal("config", _config(4), seq=3), retain=True)
        assert cloud.wait_ack("config", 3)["status"] == "applied"
    finally:
        agent.stop()


def test_restart_during_probation_still_rolls_back_and_acks_once(fleet):
    toml = fleet.device(DEV)
    toml.write_text(toml.read_text().replace("backoff_max_s = 10.0", "backoff_max_s = 1.0\nconfig_rollback_s = 4.0"))
    agent = build(settings.load(toml))
    agent.start()
    cloud = Cloud(fleet)
    try:
        assert agent.link.wait_connected(30)
        cloud.send("config", cloud.seal("config", _config(2), seq=1))
        assert cloud.wait_ack("config", 1)["status"] == "applied"
        cloud.send("config", cloud.seal("config", _config(3, link={"broker_url": "mqtts://127.0.0.1:1"}), seq=2))
        assert wait_until(lambda: agent.store.get_meta("config_probation"), 20)
    finally:
        agent.stop()  # "power cut" in the middle of the probation
    agent = build(settings.load(toml))
    agent.start()
    try:
        ack = cloud.wait_ack("config", 2, timeout=60)
        assert ack["status"] == "failed" and ack["config_version"] == 2
        assert agent.config["version"] == 2 and agent.store.get_meta("config_probation") is None
        assert wait_until(lambda: agent.link.connected, 30)
        # the outcome is acked once; a power cut before the PUBACK of seq 2 also brings the
        # broker's redelivery, acked "duplicate" (PROTOCOL §3: an equal seq, no second effect)
        second = [a["body"]["status"] for a in cloud.acks("config") if a["body"]["ref_seq"] == 2]
        assert second.count("failed") == 1 and set(second) <= {"failed", "duplicate"}, second
    finally:
        agent.stop()


def test_a_config_committed_when_the_agent_died_is_applied_and_acked_once_at_start(fleet):
    """The worker commits the config, its seq and the ack it owes; the agent dies before the
    after-commit application. The next start applies it and sends that ack, once."""
    toml = fleet.device(DEV)
    agent = build(settings.load(toml))   # not started: what the worker does, then the power cut
    cloud = Cloud(fleet)
    env = cloud.seal("config", _config(3), seq=7)
    dl = agent.downlink
    with agent.store.batch():
        opened = protocol.open_envelope(env, expected_dev=DEV, expected_kind="config",
                                        trusted_signers=dl._trusted_signers(), recipient_key=dl._recipient_key,
                                        now_ms=None, last_seq=agent.store.last_downlink_seq("config"))
        outcome = dl.handlers["config"](opened)
        agent.store.set_downlink_seq("config", opened.seq)
    assert outcome.status == "applied" and not outcome.send_ack and outcome.after_commit
    agent.store.close()
    agent = build(settings.load(toml))
    agent.start()
    try:
        assert agent.config["version"] == 3
        ack = cloud.wait_ack("config", 7)
        assert ack["status"] == "applied" and ack["config_version"] == 3
        cloud.send("config", env)   # the broker's redelivery (never PUBACKed)
        assert wait_until(lambda: [a["body"]["status"] for a in cloud.acks("config")] == ["applied", "duplicate"])
        assert agent.store.get_meta("config_ack_owed") is None
    finally:
        agent.stop()


def test_config_acks_always_name_the_config_the_device_keeps(setup):
    cloud, st = setup
    cloud.send("config", cloud.seal("config", _config(6), seq=5))
    assert cloud.wait_ack("config", 5)["config_version"] == 6
    cloud.send("config", cloud.seal("config", _config(6), seq=5))       # duplicate seq
    cloud.send("config", cloud.seal("config", _config(9), seq=4))       # replay
    cloud.send("config", cloud.seal("config", _config(9, link={"broker_url": "mqtts://h:99999"}), seq=6))
    assert wait_until(lambda: len(cloud.acks("config")) == 4)
    acks = [a["body"] for a in cloud.acks("config")]
    assert [a["status"] for a in acks] == ["applied", "duplicate", "rejected", "rejected"]
    assert all(a["config_version"] == 6 for a in acks)
    assert "port" in acks[3]["reason"].lower()


GENUINE = {
    "config": (lambda seq: _config(100 + seq), "applied"),
    "booking": (lambda seq: _booking(f"b-{seq}"), "accepted"),
    "command": (lambda seq: {"op": "ping"}, "done"),
}


@pytest.mark.parametrize("kind", sorted(GENUINE))
def test_every_downlink_kind_applies_once_and_refuses_the_rest(setup, kind):
    cloud, st = setup
    agent = st["agent"]
    body_for, status = GENUINE[kind]
    good = cloud.seal(kind, body_for(5), seq=5)
    cloud.send(kind, good)
    assert cloud.wait_ack(kind, 5)["status"] == status
    cloud.send(kind, good)                                          # QoS 1 redelivery
    cloud.send(kind, cloud.seal(kind, body_for(4), seq=4))          # replay of an older one
    cloud.send(kind, cloud.seal(kind, body_for(6), seq=6, exp_ms=now_ms() - 1))   # expired
    assert wait_until(lambda: len(cloud.acks(kind)) == 4, 30)
    assert [(a["body"]["ref_seq"], a["body"]["status"]) for a in cloud.acks(kind)] == [
        (5, status), (5, "duplicate"), (4, "rejected"), (6, "rejected")]

    before = dict(agent.downlink.unauthenticated)
    outer = cbor2.loads(cloud.seal(kind, body_for(7), seq=7))
    hdr = cbor2.loads(outer[0])
    hdr["seq"] = 8
    bad = [
        cbor2.dumps([outer[0], outer[1], bytes(a ^ 1 if i == 0 else a for i, a in enumerate(outer[2]))]),
        cloud.seal(kind, body_for(7), seq=7, signer=Ed25519PrivateKey.generate()),
        cloud.seal(kind, body_for(7), seq=7, dev=OTHER),
        cloud.seal(kind, body_for(7), seq=7, recipient=cloud.c.registry.get(OTHER)[1]),
        cbor2.dumps([cbor2.dumps(hdr, canonical=True), outer[1], outer[2]]),
        bytes(protocol.MAX_ENVELOPE + 10),
        b"\x83\x41\x00",
    ]
    for env in bad:
        cloud.send(kind, env)
    assert wait_until(lambda: sum(agent.downlink.unauthenticated.values()) - sum(before.values()) == len(bad), 30)
    got = {k: v - before.get(k, 0) for k, v in agent.downlink.unauthenticated.items() if v != before.get(k, 0)}
    assert got == {"bad_signature": 2, "unknown_signer": 1, "wrong_device": 1, "wrong_recipient": 1,
                   "oversize": 1, "malformed": 1}
    assert len(cloud.acks(kind)) == 4  # none of those was answered
    assert agent.store.last_downlink_seq(kind) == 5


# -- issue 20 items 7, 8, 9: refusals a backend can read ---------------------------------------

def _printable(text: str) -> bool:
    return all(c.isprintable() for c in text)


def test_delete_data_with_an_unknown_category_is_rejected_and_deletes_nothing(setup):
    cloud, st = setup
    agent = st["agent"]
    deleted = dict(agent.privacy.deleted)
    cloud.send("command", cloud.seal("command", {"op": "delete_data", "categories": ["location", "contacts"],
                                                 "request_id": "del-x"}, seq=1, check=False))
    ack = cloud.wait_ack("command", 1)
    assert ack["status"] == "rejected" and "result" not in ack
    assert ack["reason"] == "schema: categories[1]: 'contacts' is not one of ['location', 'driving_behaviour']"
    assert agent.privacy.deleted == deleted
    # The known categories still work, and the refusal used its seq (a corrected command needs a new one).
    cloud.send("command", cloud.seal("command", {"op": "delete_data", "categories": ["driving_behaviour"],
                                                 "request_id": "del-y"}, seq=2))
    ack = cloud.wait_ack("command", 2)
    assert ack["status"] == "done" and ack["result"] == {"request_id": "del-y", "deleted": {"driving_behaviour": 0}}


BOUNDS = [   # (kind, body at the bound, the field, its bound)
    ("command", lambda n: {"op": "ping", "request_id": "r" * n}, "request_id", 128),
    ("command", lambda n: {"op": "read_dtc", "request_id": "r" * n}, "request_id", 128),
    ("booking", lambda n: _booking("b" * n), "booking_id", 64),
    ("booking", lambda n: _booking(service="s" * n), "service", 200),
    ("booking", lambda n: _booking(notes="n" * n), "notes", 2000),
    ("booking", lambda n: _booking(provider={"name": "g" * n}), "provider.name", 200),
    ("booking", lambda n: _booking(provider={"name": "G", "address": "a" * n}), "provider.address", 500),
    ("booking", lambda n: _booking(provider={"name": "G", "phone": "1" * n}), "provider.phone", 40),
]


def test_every_echoed_field_is_bounded_and_an_oversized_one_rejected(setup):
    """Issue 20 item 8: a ping whose request_id made the ack exceed 128 KiB logged a traceback
    and acked ``failed``. Every bound, just over it and at it, through the real broker."""
    cloud, st = setup
    seq = 0
    for kind, body, field_name, bound in BOUNDS:
        seq += 1
        cloud.send(kind, cloud.seal(kind, body(bound + 1), seq=seq, check=False))
        ack = cloud.wait_ack(kind, seq)
        assert ack["status"] == "rejected", (field_name, ack)
        assert ack["reason"] == f"schema: {field_name}: {bound + 1} characters, at most {bound}", ack
        seq += 1
        cloud.send(kind, cloud.seal(kind, body(bound), seq=seq))
        ack = cloud.wait_ack(kind, seq)
        assert ack["status"] in ("done", "accepted", "failed"), (field_name, ack)   # read_dtc: no vehicle
        assert ack["status"] != "failed" or ack["reason"].startswith("the vehicle did not answer")
    # The one of the report: 200 000 characters.
    seq += 1
    cloud.send("command", cloud.seal("command", {"op": "ping", "request_id": "r" * 200_000}, seq=seq, check=False))
    ack = cloud.wait_ack("command", seq)
    assert (ack["status"], ack["reason"]) == ("rejected", "schema: request_id: 200000 characters, at most 128")


def test_config_bounds_and_a_bounded_problem_list(setup):
    cloud, st = setup
    ok = {"consent_id": "c" * 128, "granted_at": now_ms() - 1000, "until": now_ms() + DAY}
    over = [
        (_config(2, privacy={"location": {"mode": "coarse", **ok, "consent_id": "c" * 129}}),
         "schema: privacy.location.consent_id: 129 characters, at most 128"),
        (_config(3, ev={"profile": "p" * 65, "period_s": 60}), "schema: ev.profile: 65 characters, at most 64"),
        (_config(4, link={"broker_url": "mqtts://" + "h" * 293}), "schema: link.broker_url: 301 characters, at most 300"),
        (_config(5, health={"signals": {f"role{i}": "x" for i in range(33)}}), "schema: health.signals: 33 keys, at most 32"),
        (_config(6, health={"signals": {"r" * 65: "x"}}), "schema: health.signals: a key of 65 characters, at most 64"),
    ]
    for seq, (doc, reason) in enumerate(over, start=1):
        cloud.send("config", cloud.seal("config", doc, seq=seq, check=False))
        ack = cloud.wait_ack("config", seq)
        assert (ack["status"], ack["reason"]) == ("rejected", reason)
    # At the bounds: applied; 32 unknown roles (with control characters in their names) are 32
    # problems, of which the ack carries 20, escaped, and says how many more there were.
    roles = {f"\x1b[31mrole{i:02d}\r" + "x" * 50: "engine.rpm" for i in range(32)}
    doc = _config(7, privacy={"location": {"mode": "coarse", **ok}}, health={"signals": roles})
    cloud.send("config", cloud.seal("config", doc, seq=10))
    ack = cloud.wait_ack("config", 10)
    assert ack["status"] == "applied" and ack["config_version"] == 7
    problems = ack["result"]["problems"]
    assert len(problems) == 21 and problems[-1] == "... and 12 more"
    assert all(_printable(p) for p in problems) and "\\x1b[31mrole00\\r" in problems[0]


def test_schema_error_reasons_escape_control_characters_in_acks_and_logs(setup, caplog):
    """Issue 20 item 9: the reason quotes the body (a key, a booking id): escaped, never raw."""
    cloud, st = setup
    evil = "\x1b[2J\x1b[Hforged\rline\n2025 ok\x07\u202e"
    caplog.set_level("INFO", logger="agent.cloud.downlink")
    cloud.send("config", cloud.seal("config", _config(2, health={"signals": {evil: 5}}), seq=1, check=False))
    ack = cloud.wait_ack("config", 1)
    assert ack["status"] == "rejected"
    assert ack["reason"] == ("schema: health.signals.\\x1b[2J\\x1b[Hforged\\rline\\n2025 ok\\x07\\u202e: "
                             "5 is not of type 'string'")
    cloud.send("booking", cloud.seal("booking", {"op": "cancel", "booking_id": evil}, seq=2))
    ack = cloud.wait_ack("booking", 2)
    assert ack["status"] == "rejected" and _printable(ack["reason"]) and "\\x1b[2J" in ack["reason"]
    cloud.send("command", cloud.seal("command", {"op": evil}, seq=3, check=False))
    ack = cloud.wait_ack("command", 3)
    assert ack["status"] == "rejected" and _printable(ack["reason"])
    lines = [r.getMessage() for r in caplog.records if r.name == "agent.cloud.downlink"]
    assert any("forged" in line for line in lines)
    assert all(_printable(line) for line in lines), [line for line in lines if not _printable(line)]
