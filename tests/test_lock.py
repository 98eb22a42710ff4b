"""requirements.lock (scripts/lock.sh) is what the device, the development venv and the OTA
bundles install: it must satisfy requirements.txt on both architectures, pin every package
exactly with hashes, give a Pi its GPIO backend, and be what this venv runs.

The last test stages the locked dependencies for aarch64 the way the release tool does
(scripts/refcloud/release.py stage_deps: pip download + install --target --platform, hash-checked
against the lock); it needs the package index (pip's cache makes a repeat quick).
"""
from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from scripts.refcloud import wheelhouse
from scripts.refcloud.release import PYVER, stage_deps

ROOT = Path(__file__).resolve().parents[1]
INSTALL_SH = ROOT / "scripts" / "install.sh"


def requirements_txt() -> list[Requirement]:
    out = []
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            out.append(Requirement(line))
    return out


@pytest.mark.parametrize("arch", wheelhouse.ARCHES)
def test_the_lock_satisfies_requirements_txt(arch):
    env = wheelhouse.marker_environment(arch)
    pins = {p.name: p for p in wheelhouse.pins_for(arch)}
    for req in requirements_txt():
        if req.marker is not None and not req.marker.evaluate(env):
            assert canonicalize_name(req.name) not in pins, f"{req.name} is not for {arch}"
            continue
        pin = pins.get(canonicalize_name(req.name))
        assert pin is not None, f"{req} is not in requirements.lock for {arch}: run scripts/lock.sh"
        assert req.specifier.contains(pin.version, prereleases=True), (
            f"requirements.lock pins {pin.name}=={pin.version}, outside {req} (requirements.txt): "
            "run scripts/lock.sh")


def test_every_pin_is_exact_with_hashes_and_wheels_only():
    pins = wheelhouse.read_lock()   # raises for a pin without == or without hashes
    assert len(pins) == len({p.name for p in pins}), "a package is pinned twice"
    assert all(len(h) == 64 for p in pins for h in p.hashes)
    options = [ln for ln in (ROOT / "requirements.lock").read_text().splitlines()
               if ln.startswith("--")]
    assert options == ["--only-binary :all:"], options  # pip never builds a locked sdist


def test_a_pi_gets_the_real_lgpio_and_a_pc_none():
    arm = {p.name: p for p in wheelhouse.pins_for("aarch64")}
    x86 = {p.name: p for p in wheelhouse.pins_for("x86_64")}
    assert "lgpio" in arm and "lgpio" not in x86
    # 0.0.0.2 is the empty placeholder pip picks for manylinux2014 tags
    assert Requirement("lgpio>=0.2").specifier.contains(arm["lgpio"].version)
    # pip must be allowed the tag the real wheel has (it does not widen manylinux_2_X itself)
    assert "manylinux_2_34_aarch64" in wheelhouse.platform_tags("aarch64")
    assert set(x86) == set(arm) - {"lgpio"}


def test_this_venv_runs_the_locked_versions():
    for pin in wheelhouse.pins_for(wheelhouse.host_arch()):
        assert metadata.version(pin.name) == pin.version, (
            f"{pin.name} {metadata.version(pin.name)} installed, the lock says {pin.version}: "
            "scripts/setup.sh installs the lock (a dev tool must not move it)")


def test_wheelhouse_requirements_are_marker_free_and_name_their_arch(tmp_path):
    reqs = tmp_path / "requirements.txt"
    chosen = wheelhouse.write_requirements("aarch64", reqs)
    assert wheelhouse.read_lock(reqs) == [wheelhouse.Pin(p.name, p.version, None, p.hashes)
                                          for p in chosen]
    assert ";" not in reqs.read_text()
    # the architecture as scripts/install.sh reads it (same sed expression)
    script = INSTALL_SH.read_text()
    expr = script[script.index("sed -n '1s/") + len("sed -n '"):]
    expr = expr[:expr.index("'")]
    got = subprocess.run(["sed", "-n", expr, str(reqs)], capture_output=True, text=True, check=True)
    assert got.stdout.strip() == "aarch64"


def _elf_machine(path: Path) -> int:
    head = path.read_bytes()[:20]
    assert head[:4] == b"\x7fELF"
    return int.from_bytes(head[18:20], "little")


def test_stage_deps_puts_the_locked_aarch64_wheels_in_a_bundle(tmp_path):
    tree = tmp_path / "tree"
    names = stage_deps(tree, arch="aarch64")
    pins = wheelhouse.pins_for("aarch64")
    assert names == sorted(p.name for p in pins)
    site = tree / "lib" / PYVER / "site-packages"
    installed = {}
    for dist in metadata.distributions(path=[str(site)]):
        installed[canonicalize_name(dist.metadata["Name"])] = dist.version
    assert installed == {p.name: p.version for p in pins}
    # compiled parts are for the Pi (EM_AARCH64 = 183), never this machine's
    sos = list(site.rglob("*.so"))
    assert any(p.name.startswith("_lgpio") for p in sos)
    assert sos and {_elf_machine(p) for p in sos} == {183}
    assert not (site / "bin").exists(), "console scripts of dependencies belong to no slot"
    assert not list(site.rglob("*.pyc")), "bytecode is compiled on the device"
