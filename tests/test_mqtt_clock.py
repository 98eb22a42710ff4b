"""TLS with a clock that is not synchronised (agent/cloud/mqtt.py, "The clock and TLS"): a real
Mosquitto whose certificate a device with a stale clock would see as not yet valid, or that
expired before the newest time the device trusts. The device's clock is a drivers.core.clock
Clock whose kernel says synchronised or not, as adjtimex would on the Pi."""
from __future__ import annotations

import datetime as dt
import time

import pytest

from drivers.core.clock import Clock
from scripts.testbed.mosquitto import LocalBroker
from scripts.testbed.wait import wait_until
from tests.conftest import CLOUD_USER

DEV = "clock-0001"


def _broker(tmp_path, pki, **validity) -> LocalBroker:
    """A broker whose certificate (same CA) has the given validity."""
    b = LocalBroker(tmp_path / "broker", pki.ca, cloud_users=(CLOUD_USER,))
    pki.ca.issue_server("localhost", ("127.0.0.1", "::1"), out_dir=b.workdir, **validity)  # replaces it
    b.start()
    return b


def _clock(synced: bool, floor_ms: int | None = None) -> Clock:
    kw = {} if floor_ms is None else {"floor_ms": floor_ms}
    return Clock(kernel_synced=lambda: synced, **kw)


def _ends_with(h, what: str, timeout: float = 20.0) -> str:
    assert wait_until(lambda: h.link.stats["connect_attempts"] >= 2, timeout)
    err = h.link.stats["last_error"] or ""
    assert what in err, err
    assert not h.link.connected
    return err


@pytest.fixture
def future_broker(tmp_path, pki):
    """Valid from tomorrow: what a broker's fresh certificate is to a device a day or more behind."""
    b = _broker(tmp_path, pki, not_before=dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1))
    yield b
    b.stop()


def test_a_synchronised_clock_lets_openssl_refuse_a_certificate_not_yet_valid(future_broker, links):
    h = links(future_broker, DEV, clock=_clock(True))
    _ends_with(h, "not yet valid")


def test_an_unsynchronised_clock_connects_by_the_floor_and_says_so(future_broker, links, caplog):
    clock = _clock(False)
    h = links(future_broker, DEV, clock=clock)
    assert h.link.wait_connected(20), h.link.stats["last_error"]
    assert any("not synchronised" in r.getMessage() and "newest trusted time" in r.getMessage()
               for r in caplog.records)


def test_the_name_and_the_chain_are_still_checked_while_the_clock_is_not_synchronised(tmp_path, pki, links):
    from scripts.testbed.devca import DevCA
    other = DevCA(tmp_path / "other-ca")        # a broker certificate from a CA the device does not trust
    b = LocalBroker(tmp_path / "broker", other, cloud_users=(CLOUD_USER,))
    b.start()
    try:
        h = links(b, DEV, clock=_clock(False), ca_file=pki.ca.ca_cert_path)
        _ends_with(h, "certificate verify failed")
    finally:
        b.stop()


def test_a_certificate_that_expired_before_the_floor_is_refused_while_unsynchronised(tmp_path, pki, links):
    now = dt.datetime.now(dt.timezone.utc)
    b = _broker(tmp_path, pki, not_before=now - dt.timedelta(days=30), days=20)   # expired 10 days ago
    try:
        # the floor: a signed downlink seen yesterday says the time is at least then
        floor = int((now - dt.timedelta(days=1)).timestamp() * 1000)
        h = links(b, DEV, clock=_clock(False, floor_ms=floor))
        err = _ends_with(h, "expired")
        assert "before the newest trusted time" in err
        # with a floor older than the expiry (a device that has not seen the cloud since), the
        # same certificate is let through: the floor is all it can know
        h.link.stop(2.0)
        older = int((now - dt.timedelta(days=15)).timestamp() * 1000)
        h2 = links(b, "clock-0002", clock=_clock(False, floor_ms=older))
        assert h2.link.wait_connected(20), h2.link.stats["last_error"]
    finally:
        b.stop()


def test_the_check_follows_the_clock_as_it_becomes_synchronised(future_broker, links):
    synced = [False]
    clock = Clock(kernel_synced=lambda: synced[0])
    h = links(future_broker, DEV, clock=clock)
    assert h.link.wait_connected(20), h.link.stats["last_error"]
    synced[0] = True
    time.sleep(1.1)                 # the clock asks the kernel at most once a second
    assert clock.is_synced()
    h.link.reconnect_to(future_broker.host, future_broker.port)   # a new connection, checked by OpenSSL
    assert wait_until(lambda: "not yet valid" in (h.link.stats["last_error"] or ""), 20), h.link.stats
