"""The clock's word on synchronisation (drivers/core/clock.py): the kernel's NTP state, the floor
of the newest trusted time, the stamps of CAN frames under a stale clock, and downlink expiry
checked against the floor while the clock is stale. The same in a real guest with a real
systemd and a clock months behind: tests/device/test_dongle_clock.py."""
from __future__ import annotations

import time

import can
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.cloud import protocol
from agent.cloud.downlink import Downlink, Outcome
from agent.cloud.keys import key_id
from agent.outbox.store import Store
from agent.outbox.uplink import Sealer
from drivers.can import trusted_timestamp
from drivers.core.clock import (FLOOR_SLACK_MS, PLAUSIBLE_AFTER_MS, Clock, kernel_ntp_synced,
                                kernel_timex)

DAY_MS = 86_400_000
TRUE_NS = 1_796_000_000_000 * 10**6         # 2026-11: the true time in these tests
STALE_NS = TRUE_NS - 180 * DAY_MS * 10**6   # what fake-hwclock restored: months behind, after 2025


class Machine:
    """A wall clock, a monotonic clock and the kernel's NTP state, all set by the test."""

    def __init__(self, wall_ns: int):
        self.wall, self.mono, self.ntp = wall_ns, 5 * 10**9, False
        self.kernel_asked = 0

    def wall_ns(self) -> int:
        return self.wall

    def mono_ns(self) -> int:
        return self.mono

    def kernel(self) -> bool:
        self.kernel_asked += 1
        return self.ntp

    def tick(self, seconds: float) -> None:
        self.wall += int(seconds * 1e9)
        self.mono += int(seconds * 1e9)

    def timesync(self, true_ns: int) -> None:
        """What systemd-timesyncd does: step the clock, then tell the kernel it is synchronised."""
        self.wall, self.ntp = true_ns, True

    def clock(self, **kw) -> Clock:
        return Clock(wall_ns=self.wall_ns, mono_ns=self.mono_ns, boot_id="b", kernel_synced=self.kernel, **kw)


def test_a_stale_clock_after_2025_is_not_synchronised_until_the_kernel_says_so():
    m = Machine(STALE_NS)
    clock = m.clock()
    assert STALE_NS // 10**6 > PLAUSIBLE_AFTER_MS   # "plausible": the old rule called this synced
    assert not clock.is_synced() and clock.synced_now_ms() is None
    assert clock.now_ms() == m.mono // 10**6          # provisional: monotonic since boot
    m.tick(2)
    m.timesync(TRUE_NS)
    m.tick(1)
    assert clock.is_synced() and clock.now_ms() == m.wall // 10**6
    assert clock.offset_ms() == (m.wall - m.mono) // 10**6   # what re-times the provisional rows


def test_the_kernel_is_asked_at_most_once_a_second():
    m = Machine(TRUE_NS)
    m.ntp = True
    clock = m.clock()
    for _ in range(1000):
        clock.now_ms()
        m.tick(0.0005)
    assert m.kernel_asked == 1
    m.tick(1.0)
    clock.now_ms()
    assert m.kernel_asked == 2


def test_without_a_kernel_probe_the_wall_clock_is_trusted_after_the_floor_only():
    m = Machine(TRUE_NS)
    clock = Clock(wall_ns=m.wall_ns, mono_ns=m.mono_ns, boot_id="b")   # [clock] synced_by = "wall"
    assert clock.is_synced()
    clock.raise_floor(TRUE_NS // 10**6 + FLOOR_SLACK_MS + 1)   # a signed cloud ts from later
    assert not clock.is_synced()
    m.tick(2)
    assert clock.is_synced()   # within the slack again


def test_a_kernel_synchronised_clock_before_the_floor_is_not_trusted():
    m = Machine(STALE_NS)
    m.ntp = True                                   # e.g. an NTP server on the wrong time
    clock = m.clock(floor_ms=TRUE_NS // 10**6)
    assert not clock.is_synced()
    assert clock.status()["kernel_synced"] is True and clock.status()["synced"] is False


def test_not_before_is_the_floor_plus_the_time_since_it_was_learnt():
    m = Machine(STALE_NS)
    clock = m.clock()
    assert clock.not_before_ms() == PLAUSIBLE_AFTER_MS
    assert clock.raise_floor(TRUE_NS // 10**6)
    assert not clock.raise_floor(TRUE_NS // 10**6 - 1)   # never moves back
    m.tick(30)
    assert clock.not_before_ms() == TRUE_NS // 10**6 + 30_000
    assert not clock.is_synced()


def test_the_kernel_probe_reads_adjtimex():
    """On this machine, for real: adjtimex(2) answers (read-only, no privilege) and the rule is
    systemd's (``maxerror`` below 16 s; the kernel caps it at 16 s when unsynchronised)."""
    rc, status, maxerror = kernel_timex()
    assert 0 <= rc <= 5 and 0 <= maxerror <= 16_000_000
    assert kernel_ntp_synced() == (maxerror < 16_000_000)


def test_a_can_frame_keeps_the_kernel_timestamp_only_when_the_clock_agrees():
    m = Machine(STALE_NS)
    clock = m.clock()
    msg = can.Message(timestamp=STALE_NS / 1e9, arbitration_id=0x123, data=b"\x01")
    # the kernel stamped it with the stale wall clock; the agent's clock is provisional
    assert round(trusted_timestamp(msg.timestamp, clock.now_us(), m.wall // 1000) * 1e6) == m.mono // 1000
    m.timesync(TRUE_NS)
    m.tick(1)   # the kernel's word is re-read once a second
    msg = can.Message(timestamp=m.wall / 1e9 - 0.002, arbitration_id=0x123, data=b"\x01")
    assert abs(round(trusted_timestamp(msg.timestamp, clock.now_us(), m.wall // 1000) * 1e6) - (m.wall // 1000 - 2000)) <= 1


@pytest.fixture
def stale_store(tmp_path):
    m = Machine(STALE_NS)
    store = Store(tmp_path / "agent.db", clock=m.clock())
    yield m, store
    store.close()


def _downlink(store, cloud_sign, device_enc):
    applied = []

    def handle(opened):
        applied.append(opened.seq)
        return Outcome("applied")
    sealer = Sealer("clk-0001", Ed25519PrivateKey.generate(), X25519PrivateKey.generate().public_key(),
                    clock=store.clock.now_ms)
    dl = Downlink(store, sealer.seal, device_id="clk-0001", recipient_key=device_enc,
                  trusted_signers=lambda: {key_id(cloud_sign.public_key()): cloud_sign.public_key()},
                  handlers={"command": handle})
    return dl, applied


def test_an_expired_downlink_is_refused_while_the_clock_is_stale_and_ts_raises_the_floor(stale_store):
    m, store = stale_store
    cloud_sign, device_enc = Ed25519PrivateKey.generate(), X25519PrivateKey.generate()
    dl, applied = _downlink(store, cloud_sign, device_enc)
    true_ms = TRUE_NS // 10**6

    def envelope(seq, ts_ms, exp_ms):
        return protocol.seal("command", {"op": "report", "id": f"c{seq}"}, dev="clk-0001", seq=seq,
                             signer=cloud_sign, recipient=device_enc.public_key(), ts_ms=ts_ms, exp_ms=exp_ms)

    # sealed yesterday, valid for an hour: by the stale clock (months behind) not yet expired
    dl.handle("down/command", envelope(5, true_ms - DAY_MS, true_ms - DAY_MS + 3_600_000))
    # the floor is only 2025-01-01 (nothing trusted yet), so that is not known to be expired
    assert applied == [5]
    # a fresh envelope: its signed ts is a time that has certainly passed
    dl.handle("down/command", envelope(6, true_ms, true_ms + 3_600_000))
    assert applied == [5, 6] and store.true_time_floor() == true_ms
    assert not store.clock.is_synced()
    # now a captured one from yesterday, never delivered (seq 7): its exp has passed, by the floor
    dl.handle("down/command", envelope(7, true_ms - DAY_MS, true_ms - DAY_MS + 3_600_000))
    assert applied == [5, 6]
    assert dl.acks["rejected"] == 1
    # the next boot starts from the persisted floor
    assert Clock(wall_ns=m.wall_ns, kernel_synced=m.kernel,
                 floor_ms=store.true_time_floor()).not_before_ms() == true_ms
