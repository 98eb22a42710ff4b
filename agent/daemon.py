"""``dongle-agent --config FILE``: the daemon's entry point.

Exit status 2, with one line on stderr and nothing started, when the settings file or a file
it names is bad (``dongle-agent: FILE: key 'a.b': what is wrong``): systemd does not restart
it (RestartPreventExitStatus=2), since only a person can fix it."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from agent import settings as settings_mod
from agent.version import add_version_option


def local_file_message(settings: settings_mod.Settings, e) -> str:
    """``FILE: key 'can.buses[0].dbc': /etc/dongle/car.dbc: what is wrong``: the settings
    error format (agent/settings.py), naming the key that points at the file."""
    key = e.key or settings.key_naming(e.path)
    why = f"{e.path}: {e.message}"
    return str(settings.file_error(key, why)) if key else f"{settings.path}: {why}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dongle-agent", description="In-car telematics dongle agent")
    add_version_option(parser)
    parser.add_argument("--config", required=True, help="local settings file (TOML)")
    parser.add_argument("--log-level", help="override log.level from the settings")
    args = parser.parse_args(argv)

    try:
        settings = settings_mod.load(args.config)
    except settings_mod.SettingsError as e:
        print(f"dongle-agent: {e}", file=sys.stderr)
        return 2

    logging.basicConfig(
        level=getattr(logging, args.log_level or settings.log.level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    from agent.compose import build
    from agent.device import malloc
    from drivers.core.local_file import LocalFileError

    malloc.tune()  # before the agent's threads start

    try:
        agent = build(settings)
    except LocalFileError as e:   # a DBC, key, certificate or EV profile that cannot be used
        print(f"dongle-agent: {local_file_message(settings, e)}", file=sys.stderr)
        return 2

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    agent.start()
    try:
        while not stop.wait(1.0) and agent.exit_code is None:
            pass
    finally:
        agent.stop()
    return agent.exit_code or 0


if __name__ == "__main__":
    sys.exit(main())
