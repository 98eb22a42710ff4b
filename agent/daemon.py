"""``dongle-agent --config FILE``: the daemon's entry point."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from agent import settings as settings_mod
from agent.version import add_version_option


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

    from agent.cloud.keys import KeyFileError
    from agent.compose import build
    from agent.device import malloc

    malloc.tune()  # before the agent's threads start

    try:
        agent = build(settings)
    except KeyFileError as e:
        print(f"dongle-agent: {e} (named in {settings.path})", file=sys.stderr)
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
