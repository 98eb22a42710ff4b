"""The agent's locked dependencies as wheels for one device architecture.

``requirements.lock`` (made by scripts/lock.sh) is one universal resolution: exact pins, the
sha256 of every wheel, and environment markers for platform-only dependencies (``lgpio`` on
aarch64). pip evaluates markers against the interpreter it runs on, never against
``--platform``, so a cross-architecture download or install from the lock itself would take the
build host's markers (no lgpio for a Pi built on a PC). This module resolves the markers for the
target first and hands pip a marker-free, hash-pinned file:

    python -m scripts.refcloud.wheelhouse aarch64 DIR   # DIR/requirements.txt + the wheels
    python -m scripts.refcloud.wheelhouse x86_64 DIR

The target is the device's: Debian 12 / Raspberry Pi OS bookworm, CPython 3.11, glibc 2.36
(manylinux_2_17 .. manylinux_2_36 wheels, manylinux2014 and older aliases, pure Python).
Wheels only: a package without a wheel for the target is named, with the reason, and the
command fails (it would have to build on the device).

``DIR/requirements.txt`` is what scripts/install.sh installs offline
(``pip install --no-index --find-links DIR --require-hashes -r DIR/requirements.txt``) and what
:func:`scripts.refcloud.release.stage_deps` installs into an OTA bundle: the same pins and hashes.
"""
from __future__ import annotations

import argparse
import platform
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

REPO_ROOT = Path(__file__).resolve().parents[2]
LOCK = REPO_ROOT / "requirements.lock"

#: The device's interpreter: Debian bookworm's python3 (3.11.2).
PYTHON = "3.11"
PYTHON_FULL = "3.11.2"
#: The device's C library (bookworm: glibc 2.36); the oldest manylinux tag in use is 2_17.
GLIBC_MINOR = 36
ARCHES = ("x86_64", "aarch64")
#: The first line of DIR/requirements.txt names the architecture (install.sh checks it).
HEADER = "# wheelhouse for {arch}, CPython {python}, from requirements.lock"


def host_arch() -> str:
    machine = platform.machine()
    return {"arm64": "aarch64", "amd64": "x86_64"}.get(machine.lower(), machine)


def platform_tags(arch: str) -> list[str]:
    """pip ``--platform`` values a bookworm device of ``arch`` accepts, best first. pip does not
    widen a ``manylinux_2_X`` tag to older ones itself, so every one is listed."""
    _check_arch(arch)
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(GLIBC_MINOR, 16, -1)]
    tags.append(f"manylinux2014_{arch}")
    if arch == "x86_64":
        tags += [f"manylinux2010_{arch}", f"manylinux1_{arch}"]
    return tags


def marker_environment(arch: str) -> dict[str, str]:
    """PEP 508 marker variables of the device (CPython 3.11 on Linux, ``arch``)."""
    _check_arch(arch)
    return {"implementation_name": "cpython", "implementation_version": PYTHON_FULL,
            "os_name": "posix", "platform_machine": arch,
            "platform_python_implementation": "CPython", "platform_release": "",
            "platform_system": "Linux", "platform_version": "",
            "python_full_version": PYTHON_FULL, "python_version": PYTHON, "sys_platform": "linux"}


def pip_target_args(arch: str) -> list[str]:
    """pip options that select wheels for the device instead of this machine."""
    args = ["--only-binary=:all:", "--python-version", PYTHON, "--implementation", "cp"]
    for abi in (f"cp{PYTHON.replace('.', '')}", "abi3", "none"):
        args += ["--abi", abi]
    for tag in platform_tags(arch):
        args += ["--platform", tag]
    return args


@dataclass(frozen=True)
class Pin:
    name: str
    version: str
    marker: str | None
    hashes: tuple[str, ...]

    def line(self) -> str:
        return " \\\n    ".join([f"{self.name}=={self.version}"]
                                + [f"--hash=sha256:{h}" for h in self.hashes])


def read_lock(path: Path = LOCK) -> list[Pin]:
    """The pins of a hash-pinned requirements file (``name==version ; marker`` + ``--hash``)."""
    text = re.sub(r"\\\n", " ", Path(path).read_text())
    pins = []
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith(("#", "-")):
            continue
        hashes = tuple(re.findall(r"--hash=sha256:([0-9a-f]{64})", line))
        req = Requirement(re.sub(r"\s*--hash=\S+", "", line).strip())
        spec = list(req.specifier)
        if len(spec) != 1 or spec[0].operator != "==" or not hashes:
            raise ValueError(f"{path}: {req.name} is not pinned with == and hashes: "
                             f"{raw.strip()!r}")
        pins.append(Pin(canonicalize_name(req.name), spec[0].version,
                        str(req.marker) if req.marker else None, hashes))
    return pins


def pins_for(arch: str, pins: list[Pin] | None = None) -> list[Pin]:
    """The pins a device of ``arch`` installs (markers evaluated for it, then dropped)."""
    env = marker_environment(arch)
    return [p for p in (read_lock() if pins is None else pins)
            if p.marker is None or Marker(p.marker).evaluate(env)]


def write_requirements(arch: str, path: Path, pins: list[Pin] | None = None) -> list[Pin]:
    chosen = pins_for(arch, pins)
    Path(path).write_text(HEADER.format(arch=arch, python=PYTHON) + "\n"
                          + "--only-binary :all:\n" + "\n".join(p.line() for p in chosen) + "\n")
    return chosen


def _pip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
                          capture_output=True, text=True)


def _pip_error(out: str) -> str:
    lines = [ln for ln in out.splitlines() if ln.startswith("ERROR")]
    if lines:
        return "; ".join(lines)
    return out.strip().splitlines()[-1] if out.strip() else "pip failed"


class MissingWheels(RuntimeError):
    """Some pins have no wheel for the target: ``missing`` maps each to pip's reason."""

    def __init__(self, arch: str, missing: dict[str, str]):
        self.arch, self.missing = arch, missing
        super().__init__(f"no hash-matching {arch} cp{PYTHON.replace('.', '')} wheel for: "
                         + "; ".join(f"{name} ({why})" for name, why in missing.items()))


def download(arch: str, dest: Path, lock: Path = LOCK) -> list[Path]:
    """Downloads the locked wheels for ``arch`` into ``dest`` (hash-checked) and writes
    ``dest/requirements.txt``; returns the wheels. Wheels already in ``dest`` are reused.
    :class:`MissingWheels` names every pin without a wheel for the target."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    pins = write_requirements(arch, dest / "requirements.txt", read_lock(lock))
    common = ["download", "--no-deps", "--require-hashes", "--dest", str(dest),
              *pip_target_args(arch)]
    r = _pip(*common, "-r", str(dest / "requirements.txt"))
    if r.returncode != 0:  # find every pin that fails, not just the first
        missing = {}
        with tempfile.TemporaryDirectory() as tmp:
            for pin in pins:
                one = Path(tmp) / f"{pin.name}.txt"
                one.write_text(pin.line() + "\n")
                r1 = _pip(*common, "-r", str(one))
                if r1.returncode != 0:
                    missing[f"{pin.name}=={pin.version}"] = _pip_error(r1.stdout + r1.stderr)
        raise MissingWheels(arch, missing or {"?": _pip_error(r.stdout + r.stderr)})
    return wheels_for(dest, pins)


def wheels_for(dest: Path, pins: list[Pin]) -> list[Path]:
    """The wheel in ``dest`` for each pin (the one pip chose), in pin order."""
    by_name: dict[tuple[str, str], Path] = {}
    for whl in Path(dest).glob("*.whl"):
        name, version, _build, _tags = parse_wheel_filename(whl.name)
        by_name[(name, str(version))] = whl
    out = []
    for p in pins:
        whl = next((w for (n, v), w in by_name.items() if n == p.name and v == p.version), None)
        if whl is None:
            raise FileNotFoundError(f"{dest}: no wheel for {p.name}=={p.version}")
        out.append(whl)
    return out


def install_target(site: Path, arch: str, wheelhouse: Path) -> None:
    """Installs ``wheelhouse``'s pins into the directory ``site`` (an OTA bundle's
    site-packages) for ``arch``: offline, hash-checked, no bytecode (the device compiles it)."""
    reqs = Path(wheelhouse) / "requirements.txt"
    first = reqs.read_text().splitlines()[:1]
    if first != [HEADER.format(arch=arch, python=PYTHON)]:
        raise ValueError(f"{wheelhouse} is not a wheelhouse for {arch}: {first}")
    r = _pip("install", "--no-index", "--find-links", str(wheelhouse), "--no-deps",
             "--require-hashes", "--no-compile", "--target", str(site), "--upgrade",
             *pip_target_args(arch), "-r", str(reqs))
    if r.returncode != 0:
        raise RuntimeError(f"pip install --target {site} failed: {_pip_error(r.stdout + r.stderr)}")


def wheel_kind(whl: Path) -> str:
    """``pure`` (py3-none-any), ``abi3`` or ``binary`` (a CPython-version-specific build)."""
    _n, _v, _b, tags = parse_wheel_filename(whl.name)
    if all(t.platform == "any" for t in tags):
        return "pure"
    return "abi3" if any(t.abi == "abi3" for t in tags) else "binary"


def _check_arch(arch: str) -> None:
    if arch not in ARCHES:
        raise ValueError(f"architecture {arch!r}: one of {', '.join(ARCHES)}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scripts.refcloud.wheelhouse",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("arch", choices=ARCHES + ("host",), help="the device's architecture")
    ap.add_argument("dest", type=Path, help="directory for the wheels and requirements.txt")
    ap.add_argument("--lock", type=Path, default=LOCK)
    args = ap.parse_args(argv)
    arch = host_arch() if args.arch == "host" else args.arch
    try:
        wheels = download(arch, args.dest, args.lock)
    except MissingWheels as e:
        print(f"wheelhouse: {e}", file=sys.stderr)
        if any("No matching distribution" in why for why in e.missing.values()):
            print("wheelhouse: a package without a wheel would have to build on the device (Pi "
                  "OS: build-essential python3-dev, plus the library's own -dev packages)",
                  file=sys.stderr)
        return 1
    kinds: dict[str, list[str]] = {}
    for whl in wheels:
        kinds.setdefault(wheel_kind(whl), []).append(whl.name)
    for kind in ("binary", "abi3", "pure"):
        for name in kinds.get(kind, []):
            print(f"{kind:6}  {name}")
    print(f"wheelhouse: {len(wheels)} wheels for {arch} (cp{PYTHON.replace('.', '')}) in "
          f"{args.dest}: " + ", ".join(f"{len(v)} {k}" for k, v in kinds.items())
          + "; none to build")
    return 0


if __name__ == "__main__":
    sys.exit(main())
