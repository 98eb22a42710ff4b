"""The device VM's costs (scripts/devicevm, scripts/testbed/devicevm.py): the image stage, boot to
``systemctl is-system-running`` = running, one ``run()``, file transfer, shutdown, and a power
cut followed by a boot. Baselines in the same run: the same command as a host subprocess, and
qemu-guest-agent's own round trip (guest-ping). Needs root; builds the image first if needed
(that build's time goes to stderr; a fresh tree build is measured with ``time
scripts/devicevm/build.sh`` and a new DEVICEVM_DIR, see scripts/devicevm/README.md).

    .venv/bin/python bench/bench_devicevm.py [--arch amd64|arm64] [--runs 20]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.testbed.devicevm import DeviceVM, build_image, normalize_arch  # noqa: E402


def median_s(fn, n: int) -> tuple[float, float, float]:
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), min(ts), max(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="amd64")
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    arch = normalize_arch(args.arch)
    image = build_image(arch)
    info = dict(line.split("=", 1) for line in (image / "info").read_text().split())
    print(f"device VM bench: {arch} guest ({info['kernel']}), host {platform.node()} "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, QEMU TCG")
    rows = []

    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="bench-devicevm-") as tmp:
        t0 = time.perf_counter()
        subprocess.run([str(ROOT / "scripts/devicevm/image.sh"), arch, info["tree"],
                        str(ROOT / "scripts/devicevm/rootfs"), f"{tmp}/image"],
                       check=True, stdout=subprocess.DEVNULL)
        rows.append(("image stage (copy tree, configure, mke2fs -d)", f"{time.perf_counter() - t0:.1f} s"))
        t0 = time.perf_counter()
        build_image(arch)
        rows.append(("build.sh with the image cached", f"{(time.perf_counter() - t0) * 1000:.0f} ms"))

        vm = DeviceVM(arch, f"{tmp}/vm", image=image)
        try:
            rows.append(("boot to running (fresh overlay)", f"{vm.boot():.1f} s"))
            agent = vm._agent
            m, lo, hi = median_s(lambda: agent.call("guest-ping"), args.runs)
            rows.append(("guest agent round trip (guest-ping), baseline", f"{m * 1000:.1f} ms"))
            m, lo, hi = median_s(lambda: subprocess.run(["true"]), args.runs)
            rows.append(("host subprocess.run(['true']), baseline", f"{m * 1000:.1f} ms"))
            m, lo, hi = median_s(lambda: vm.run("true"), args.runs)
            rows.append(("vm.run('true')", f"{m * 1000:.0f} ms (min {lo * 1000:.0f}, max {hi * 1000:.0f})"))
            m, lo, hi = median_s(lambda: vm.run("python3 -c pass"), max(3, args.runs // 4))
            rows.append(("vm.run('python3 -c pass')", f"{m * 1000:.0f} ms"))
            data = os.urandom(8 << 20)
            t0 = time.perf_counter()
            vm.put("/root/blob", data)
            rows.append(("put 8 MiB", f"{8 / (time.perf_counter() - t0):.1f} MiB/s"))
            t0 = time.perf_counter()
            assert vm.get("/root/blob") == data
            rows.append(("get 8 MiB", f"{8 / (time.perf_counter() - t0):.1f} MiB/s"))
            t0 = time.perf_counter()
            vm.power_cut()
            rows.append(("power cut (SIGKILL, reaped)", f"{(time.perf_counter() - t0) * 1000:.0f} ms"))
            rows.append(("boot after a power cut (same overlay)", f"{vm.boot():.1f} s"))
            t0 = time.perf_counter()
            vm.shutdown()
            rows.append(("clean shutdown", f"{time.perf_counter() - t0:.1f} s"))
        finally:
            if vm.running:
                vm.power_cut()
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


if __name__ == "__main__":
    main()
