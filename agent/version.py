"""The installed agent's version (its distribution's metadata: setup.py in a checkout, the
slot's ``dongle_agent-<version>.dist-info`` in an OTA slot), and the ``--version`` option every
entry point (``dongle-agent``, ``dongle``, ``dongle-update``) has."""
from __future__ import annotations

import argparse
import sys
from importlib import metadata
from typing import Any

DISTRIBUTION = "dongle-agent"


def agent_version() -> str:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "0+unknown"


class _VersionAction(argparse.Action):
    """Prints ``<prog> <version>`` on stdout and exits 0; reads the metadata only when asked."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kw: Any):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print the program's name and version, then exit", **kw)

    def __call__(self, parser: argparse.ArgumentParser, *_args: Any, **_kw: Any) -> None:
        sys.stdout.write(f"{parser.prog} {agent_version()}\n")
        sys.stdout.flush()
        parser.exit()


def add_version_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action=_VersionAction)
