"""Fixtures for the tests in the device VM (scripts/testbed/devicevm.py): Debian 12 with systemd
as PID 1 under QEMU, built by scripts/devicevm/build.sh.

The architecture is ``$DEVICEVM_ARCH`` (amd64, the default, or arm64). The tests are marked
``device`` and left out of the default run (pytest.ini); ``make test-device`` /
``make test-device-arm64`` run them. They need root and the host tools that
``scripts/devicevm/build.sh`` installs; without them every test is skipped with the reason,
unless ``DEVICEVM_REQUIRE=1`` (CI), which makes that a failure. The first run builds the image
(about 2 minutes for amd64, 8 for arm64); later runs find it in /var/tmp/dongle-devicevm.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from scripts.testbed.devicevm import ARCHES, build_image, normalize_arch

ARCH = normalize_arch(os.environ.get("DEVICEVM_ARCH", "amd64"))


def devicevm_unavailable_reason(arch: str = ARCH) -> str | None:
    """Why the device VM cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "the device VM needs root (debootstrap, chroot)"
    tools = [ARCHES[arch].qemu, "qemu-img", "debootstrap", "mke2fs", "socat"]
    if arch == "arm64":
        tools.append("qemu-aarch64-static")
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        return (f"missing {', '.join(missing)}: run scripts/devicevm/build.sh --arch {arch} "
                f"(or make devicevm-image{'-arm64' if arch == 'arm64' else ''}) once to install the host tools")
    return None


@pytest.fixture(scope="session")
def devicevm_image() -> Path:
    """The built image directory for ``ARCH`` (built on first use)."""
    reason = devicevm_unavailable_reason()
    if reason is not None:
        if os.environ.get("DEVICEVM_REQUIRE") == "1":
            pytest.fail(f"DEVICEVM_REQUIRE=1 but {reason}")
        pytest.skip(reason)
    return build_image(ARCH)


# The installed dongle (scripts/install.sh in the VM, once per session): tests/device/dongle.py.
from tests.device.dongle import installed  # noqa: E402,F401


@pytest.fixture(scope="module")
def elm():
    """The ELM327-emulator's stock car on a pty: a module's dongle reads it over a serial port."""
    from scripts.vehicle_sim.elm_emulator import ElmEmulator
    with ElmEmulator("car") as e:
        yield e
