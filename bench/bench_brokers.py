"""Start-up cost of the test brokers (issue 19): what CI pays for RabbitMQ, beside Mosquitto.

Each round, in this order, on loopback with mutual TLS and the project's ACL:

- Mosquitto (scripts/testbed/mosquitto.py): start, restart — the same-run baseline;
- one RabbitMQ node (scripts/testbed/rabbitmq.py) booted cold (blank data directory);
- one RabbitMQ node from the template (a copy of a booted, stopped blank node), then restart;
- the three-node RabbitMQ cluster (seed from the template, two joiners booting blank), then
  one node SIGKILLed and started again (it rejoins).

A "start" ends when the broker accepts MQTT connections and has loaded its users. The template
is made once before the first round (its cold boot is reported too). CPU seconds are those of
the broker processes (children of this process), summed over the step.

    .venv/bin/python bench/bench_brokers.py [--rounds 3] [--markdown]
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.testbed.devca import DevCA  # noqa: E402
from scripts.testbed.mosquitto import LocalBroker  # noqa: E402
from scripts.testbed import rabbitmq  # noqa: E402


_TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) a live process has used so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def timed(fn: Callable[[], None], pids: Callable[[], list[int]]) -> tuple[float, float]:
    """(wall s, CPU s) of ``fn``. CPU: that of the broker processes ``fn`` started (``pids()``
    read before and after); if it started none, that of the child processes reaped meanwhile
    (rabbitmqctl; the template's node). A stopped broker's lifetime CPU is not counted."""
    before_pids = set(pids())
    before = os.times()
    t0 = time.monotonic()
    fn()
    wall = time.monotonic() - t0
    after = os.times()
    new = set(pids()) - before_pids
    if new:
        return wall, sum(proc_cpu(p) for p in new)
    return wall, (after.children_user - before.children_user
                  + after.children_system - before.children_system)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--markdown", action="store_true", help="also print the table")
    args = parser.parse_args(argv)
    reason = rabbitmq.missing_reason()
    if reason:
        print(f"bench_brokers: {reason}", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="bench-brokers-"))
    rows: dict[str, list[tuple[float, float]]] = {}

    live: list[object] = []  # brokers whose processes count

    def pids() -> list[int]:
        out = []
        for b in live:
            nodes = getattr(b, "nodes", None) or [getattr(b, "node", b)]
            out += [n.pid for n in nodes if n.pid]
        return out

    def record(label: str, fn: Callable[[], None]) -> None:
        rows.setdefault(label, []).append(timed(fn, pids))

    try:
        ca = DevCA(work / "pki")
        shutil.rmtree(rabbitmq._Template.root(), ignore_errors=True)
        record("RabbitMQ: make the template (cold boot + stop, once)",
               lambda: rabbitmq._Template._ensure("dongle"))
        for r in range(args.rounds):
            m = LocalBroker(work / f"mosq-{r}", ca)
            live[:] = [m]
            record("Mosquitto: start", m.start)
            record("Mosquitto: restart", m.restart)
            m.stop()

            cold = rabbitmq.RabbitBroker(work / f"cold-{r}", ca, devices=["dev-bench"],
                                         use_template=False)
            live[:] = [cold]
            record("RabbitMQ node: start, cold", cold.start)
            cold.stop()

            node = rabbitmq.RabbitBroker(work / f"node-{r}", ca, devices=["dev-bench"])
            live[:] = [node]
            record("RabbitMQ node: start from the template", node.start)
            record("RabbitMQ node: restart (stop + start)", node.restart)
            record("RabbitMQ node: add a device (rabbitmqctl eval)",
                   lambda: node.add_device(f"dev-added-{r}"))
            node.stop()

            cluster = rabbitmq.RabbitCluster(work / f"cluster-{r}", ca, devices=["dev-bench"])
            live[:] = [cluster]
            record("RabbitMQ cluster of 3: start", cluster.start)
            victim = cluster.nodes[1]
            victim.kill()
            record("RabbitMQ cluster: SIGKILLed node back in", lambda: cluster.start_node(victim))
            cluster.stop()
            for d in work.iterdir():
                if d.name != "pki":
                    shutil.rmtree(d, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"machine: {platform.machine()} {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}, RabbitMQ {rabbitmq.version()}; {args.rounds} rounds")
    lines = ["| step | wall s (median, min–max) | broker CPU s (median) |", "|---|---:|---:|"]
    for label, vals in rows.items():
        walls = [w for w, _ in vals]
        cpus = [c for _, c in vals]
        lines.append(f"| {label} | {statistics.median(walls):.1f} ({min(walls):.1f}–"
                     f"{max(walls):.1f}) | {statistics.median(cpus):.1f} |")
    for line in lines:
        if args.markdown or not line.startswith("|---"):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
