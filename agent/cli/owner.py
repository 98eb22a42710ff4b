"""``dongle export``, ``dongle privacy``, ``dongle wipe``: the owner's data at the car.

The work is in agent/owner/ (export.py, erase.py; the running agent's side of ``privacy`` and
``wipe`` in owner_data.py); these are the commands and their terminal dialogue.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

from agent.cli import main as cli
from agent.owner.erase import wipe_data_dir
from agent.owner.export import EXPORT_FORMAT, export
from agent.technician import control
from agent.technician.control import AgentNotRunning, ClientError


def progress_bar(stream=sys.stderr, width: int = 30) -> Callable[[int, int], None]:
    def show(done: int, total: int) -> None:
        frac = done / total if total else 1.0
        fill = int(frac * width)
        stream.write(f"\rexport [{'#' * fill}{'.' * (width - fill)}] {done}/{total} records ({frac:.0%})")
        if done >= total:
            stream.write("\n")
        stream.flush()
    return show




def cmd_export(args: argparse.Namespace) -> int:
    try:
        s = cli.settings_of(args)
        n = export(s.db_path, Path(args.out), data_dir=s.data_dir, device_id=s.device_id,
                   progress=(lambda d, t: None) if args.json else progress_bar())
    except ClientError as e:
        return cli.fail(args, e)
    except OSError as e:
        return cli.fail(args, ClientError("failed", f"export: {e}"))
    if args.json:
        cli.emit_json({"ok": True, "out": str(args.out), "records": n})
    else:
        print(f"exported {n} records to {args.out} (JSON Lines, format {EXPORT_FORMAT}; see docs/privacy.md)")
    return cli.EXIT_OK


def cmd_privacy(args: argparse.Namespace) -> int:
    try:
        res = cli.ask_agent(args, "privacy", action=args.action)
    except ClientError as e:
        return cli.fail(args, e)
    if args.json:
        cli.emit_json({"ok": True, **res})
        return cli.EXIT_OK
    rows = [(cat, st["mode"], st["state"], "yes" if st["paused"] else "no", st.get("consent_id"),
             cli.when(st.get("until"))) for cat, st in res["privacy"].items()]
    print(cli.table(rows, ["category", "mode", "state", "paused", "consent", "until"]))
    return cli.EXIT_OK


def wipe_cli(args: argparse.Namespace, *, ask: Callable[[str], str] = input, out=sys.stderr,
             wait_stopped_s: float = 60.0) -> int:
    """``dongle wipe``: terminal confirmation, then the agent (button, device_wiped, keys), then
    the data directory once the agent has stopped."""
    try:
        s = cli.settings_of(args)
        print(f"This erases everything on dongle {s.device_id}: collected data, consents, bookings, the "
              "service records and the device's keys. It cannot be undone; the dongle must be provisioned "
              "again before it can be used.", file=out)
        try:
            answer = ask(f"Type the device id ({s.device_id}) to confirm: ")
        except EOFError:
            answer = ""
        if answer.strip() != s.device_id:
            raise ClientError("refused", "not confirmed at the terminal; nothing was wiped")

        def interim(m: dict) -> None:
            if "prompt" in m or "progress" in m:
                print(m.get("prompt") or m.get("progress"), file=out, flush=True)

        agent_result: dict = {}
        try:
            agent_result = cli.ask_agent(args, "wipe", timeout=None, on_interim=interim, confirmed=True,
                                         by=getattr(args, "by", None) or "owner at the car (dongle wipe)")
        except AgentNotRunning:
            raise ClientError("no_agent", "the agent is not running: start it (sudo systemctl start "
                                          "dongle-agent) so that the button can confirm and the cloud is told; "
                                          "nothing was wiped") from None
        deadline = time.monotonic() + wait_stopped_s
        while time.monotonic() < deadline:
            try:
                control_call_status(s)
            except AgentNotRunning:
                break
            except ClientError:
                pass
            time.sleep(0.2)
        else:
            raise ClientError("timeout", "the agent did not stop after destroying its keys; stop it "
                                         "(sudo systemctl stop dongle-agent) and run dongle wipe again")
        result = wipe_data_dir(s.data_dir)
    except ClientError as e:
        return cli.fail(args, e)
    summary = {"ok": True, "device_wiped_sent": agent_result.get("device_wiped_sent", False),
               "keys_destroyed": agent_result.get("destroyed", []), **result}
    if getattr(args, "json", False):
        cli.emit_json(summary)
    else:
        told = "the cloud was told (device_wiped acknowledged)" if summary["device_wiped_sent"] \
            else "the cloud could not be told (offline)"
        print(f"Wiped: data key and {len(summary['keys_destroyed'])} key file(s) destroyed, "
              f"{result['tables']} tables and {len(result['files_removed'])} files erased; {told}. "
              "Provision the dongle again before use (dongle provision).", file=out)
    return cli.EXIT_OK


def control_call_status(s) -> dict:
    return control.call(s.control.socket, "status", timeout=5, group=s.control.group)


def cmd_wipe(args: argparse.Namespace) -> int:
    return wipe_cli(args)
