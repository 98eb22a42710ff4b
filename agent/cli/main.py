"""``dongle``: the technician / operator command line.

One module per command group, each with ``register(subparsers)`` adding its commands (a
``cmd_<name>(args) -> int`` handler each): status.py (``status``, ``live``, ``buffer``), dtc.py,
service.py (``bookings``, ``booking``, ``service-log``), config.py, capture.py (``capture``),
logs.py, battery.py, provision.py, owner.py (``export``, ``privacy``, ``wipe``). What they share
— the options, asking the agent, the output shape — is common.py.

Exit codes: 0 success, 1 the operation was refused or failed, 2 bad arguments, 3 it needs the
running agent and none runs, 141 the reader of its output went away (``dongle live | head``:
128 + SIGPIPE, what ``yes | head`` reports too; no traceback).

Most commands talk to the running agent over its control socket (agent/technician/control.py);
where it makes sense (``status``, ``dtc``, ``bookings``, ``service-log``, ``config``, ``buffer``)
they fall back to reading the agent's SQLite store read-only when the agent is stopped, and say
so. ``capture`` records through the agent's CAN buses, or opens the interfaces itself when no
agent runs. Every command takes ``--json``: one JSON object on stdout, ``{"ok": true, ...}`` or
``{"ok": false, "code", "error"}`` (common.py; docs/technician.md). The settings file is
``--config FILE`` (default $DONGLE_CONFIG, else /etc/dongle/agent.toml), before or after the
command's name.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from agent.cli import battery, capture, common, config, dtc, logs, owner, provision, service, status
from agent.version import add_version_option

#: The command groups, in the order ``dongle --help`` lists them.
GROUPS = (provision, status, dtc, service, config, capture, logs, battery, owner)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dongle", description="In-car telematics dongle tools.",
                                     parents=[common.OPTIONS])
    add_version_option(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in GROUPS:
        group.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on bad arguments, 0 for --help
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    for name, value in common.defaults().items():   # not parser defaults: the actions are shared
        if not hasattr(args, name):
            setattr(args, name, value)
    if not logging.getLogger().handlers:
        level = logging.WARNING - 10 * min(args.verbose, 2)
        logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except BrokenPipeError:
        return _output_closed()


def _output_closed() -> int:
    """stdout's reader is gone: say nothing more (Python would complain again when it flushes
    stdout at exit, so stdout is pointed at /dev/null first)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # not a real file (tests capture stdout in memory)
        pass
    return common.EXIT_OUTPUT_CLOSED


if __name__ == "__main__":
    sys.exit(main())
