"""``dongle-update``: the update helper systemd runs as root around the agent, the installer,
and a manual installer.

    dongle-update prestart            ExecStartPre=+: count a trial start, roll back a crash loop
    dongle-update poststop            ExecStopPost=+: record how a trial run ended
    dongle-update rollback --reason R the OnFailure= unit (runs the *previous* slot's copy)
    dongle-update --config F apply    dongle-update-install.service: carry out the agent's request
                                      (agent.update.installer; settings from F's [update])
    dongle-update status              counters, slots, trial, the last request
    dongle-update install --repository URL --target T --version V --counter N ...
                                      fetch, verify, install and activate on trial by hand
                                      (no conditions; as root)

``--root`` (default ``$DONGLE_ROOT`` or /opt/dongle) names the install layout, ``--work`` the
agent's update directory (default ``$DONGLE_WORK``, else ``<root>/work``; ``apply`` takes it
from the settings). prestart, poststop and apply never fail their unit over their own trouble:
they log and exit 0 (apply: 2 when the settings are unusable). ``rollback`` exits 1 when there
was nothing to roll back.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from agent.update import slots, state, trial
from agent.update.slots import Layout
from agent.version import add_version_option

log = logging.getLogger(__name__)


def _layout(args: argparse.Namespace) -> Layout:
    return Layout(Path(args.root), args.python, Path(args.work) if args.work else None)


def cmd_prestart(args: argparse.Namespace) -> int:
    try:
        print(trial.on_prestart(_layout(args)))
    except Exception:  # noqa: BLE001 - never keep the agent from starting
        log.exception("dongle-update prestart failed")
    return 0


def cmd_poststop(args: argparse.Namespace) -> int:
    try:
        trial.on_poststop(_layout(args), os.environ)
    except Exception:  # noqa: BLE001
        log.exception("dongle-update poststop failed")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    """Exit 0 if it rolled back (the unit then restarts the agent), 1 if there was nothing to
    roll back (no trial: a failing good version is not a reason to change versions)."""
    try:
        done = trial.roll_back(_layout(args), args.reason)
    except Exception:  # noqa: BLE001
        log.exception("dongle-update rollback failed")
        return 1
    print("rolled_back" if done else "nothing to roll back")
    return 0 if done else 1


def cmd_apply(args: argparse.Namespace) -> int:
    """The installer (dongle-update-install.service): settings from ``--config``'s [update]."""
    from agent import settings as settings_mod
    from agent.update import installer
    try:
        s = settings_mod.load(args.config, check_files=False)
    except settings_mod.SettingsError as e:
        log.error("dongle-update apply: %s", e)
        return 2
    if s.update is None:
        log.info("dongle-update apply: updates are not enabled in %s", args.config)
        return 0
    try:
        out = installer.apply(s.update)
    except Exception:  # noqa: BLE001 - recorded where possible; the agent asks again
        log.exception("dongle-update apply failed")
        return 0
    print(json.dumps(out) if out else "nothing to do")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    layout = _layout(args)
    st = state.load(layout)
    st["current"], st["previous"] = layout.current_version(), layout.previous_version()
    st["slots"] = layout.installed()
    st["work"] = state.load_work(layout)
    print(json.dumps(st, indent=1, sort_keys=True))
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    from agent.update.tuf_client import NetworkSource, TufClient, TufError
    from agent.update.updater import Rejected, activate_on_trial, fetch_agent, install_slot

    layout = _layout(args)
    slots.prepare(layout)
    release = {"component": "agent", "version": args.version,
               "release_counter": args.counter, "repository": args.repository,
               "target": args.target}
    if args.delta_from:
        release["delta_from"], release["delta_target"] = args.delta_from, args.delta_target
    tuf = TufClient(Path(args.metadata_dir), Path(args.tuf_root),
                    ca_file=Path(args.ca_file) if args.ca_file else None, rate_bps=args.rate)
    try:
        if not layout.slot(args.version).is_dir():
            tar, compressed, how = fetch_agent(NetworkSource(tuf, args.repository, layout),
                                               layout, release, args.hardware_id,
                                               max_bytes=args.max_bytes)
            install_slot(layout, release, tar, compressed, compile_bytecode=not args.no_compile)
            log.info("installed %s (%s)", args.version, how)
        activate_on_trial(layout, release)
    except (TufError, Rejected) as e:
        print(f"dongle-update: rejected: {e}", file=sys.stderr)
        return 1
    print(layout.current_version())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dongle-update", description=__doc__.split("\n")[0])
    add_version_option(p)
    p.add_argument("--root", default=os.environ.get("DONGLE_ROOT", "/opt/dongle"))
    p.add_argument("--work", default=os.environ.get("DONGLE_WORK"),
                   help="the agent's update directory (staging, requests)")
    p.add_argument("--python", default="/usr/bin/python3", help="interpreter the slots use")
    p.add_argument("--config", default="/etc/dongle/agent.toml", help="agent.toml (for apply)")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("prestart").set_defaults(func=cmd_prestart)
    sub.add_parser("poststop").set_defaults(func=cmd_poststop)
    rb = sub.add_parser("rollback")
    rb.add_argument("--reason", default="start_limit: the agent unit failed")
    rb.set_defaults(func=cmd_rollback)
    sub.add_parser("status").set_defaults(func=cmd_status)
    sub.add_parser("apply").set_defaults(func=cmd_apply)
    ins = sub.add_parser("install")
    ins.add_argument("--repository", required=True)
    ins.add_argument("--target", required=True)
    ins.add_argument("--version", required=True)
    ins.add_argument("--counter", type=int, required=True)
    ins.add_argument("--delta-from")
    ins.add_argument("--delta-target")
    ins.add_argument("--metadata-dir", required=True)
    ins.add_argument("--tuf-root", required=True)
    ins.add_argument("--ca-file")
    ins.add_argument("--hardware-id", default="dongle-pi-v1")
    ins.add_argument("--rate", type=float, help="bytes/s cap")
    ins.add_argument("--max-bytes", type=int, default=256 * 1024 * 1024)
    ins.add_argument("--no-compile", action="store_true")
    ins.set_defaults(func=cmd_install)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
