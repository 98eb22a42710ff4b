"""Fixtures for tests against the kernel's SocketCAN stack on a virtual CAN interface.

These tests need a Linux kernel with CAN (can, can_raw, can_bcm) and an up ``vcan`` interface,
which this project's development machines do not have: run them with ``make test-socketcan``
(User-Mode Linux, see scripts/canvm/). Elsewhere every test here is skipped with the reason.
The interface is ``$CAN_TEST_CHANNEL`` (default ``vcan0``).
"""
from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import can
import pytest

CHANNEL = os.environ.get("CAN_TEST_CHANNEL", "vcan0")


def vcan_unavailable_reason(channel: str = CHANNEL) -> str | None:
    """Why SocketCAN on ``channel`` cannot be used here, or None when it can."""
    if not hasattr(socket, "AF_CAN"):
        return "this Python/OS has no AF_CAN"
    if not Path("/sys/class/net", channel).exists():
        return f"no {channel} interface (run these with `make test-socketcan`)"
    try:
        s = socket.socket(socket.AF_CAN, socket.SOCK_RAW, socket.CAN_RAW)
    except OSError as e:
        return f"kernel has no CAN_RAW ({e}); run these with `make test-socketcan`"
    try:
        s.bind((channel,))
    except OSError as e:
        return f"cannot bind a CAN_RAW socket to {channel} ({e})"
    finally:
        s.close()
    return None


_REASON = vcan_unavailable_reason()


@pytest.fixture(scope="session")
def channel() -> str:
    if _REASON is not None:
        pytest.skip(_REASON)
    return CHANNEL


def open_bus(channel: str, **kw) -> can.BusABC:
    return can.Bus(interface="socketcan", channel=channel, **kw)


@pytest.fixture
def tx(channel: str) -> Iterator[can.BusABC]:
    bus = open_bus(channel)
    yield bus
    bus.shutdown()


@pytest.fixture
def rx(channel: str) -> Iterator[can.BusABC]:
    bus = open_bus(channel)
    yield bus
    bus.shutdown()
