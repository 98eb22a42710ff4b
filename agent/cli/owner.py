"""``dongle export``, ``dongle privacy``, ``dongle wipe``: the owner's data at the car.

The work is in agent/owner/ (export.py, erase.py; the running agent's side of ``privacy`` and
``wipe`` in owner_data.py); these are the commands and their terminal dialogue.
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

from agent.cli.common import (ProgressBar, add_command, ask_agent, emit, fail, interim_printer, note,
                              prompt, respond, settings_of, table, when)
from agent.technician import control
from agent.technician.control import AgentNotRunning, ClientError


def cmd_export(args: argparse.Namespace) -> int:
    from agent.owner.export import EXPORT_FORMAT, export
    bar = ProgressBar(not args.json, "export")

    def progress(done: int, total: int) -> None:
        frac = done / total if total else 1.0
        bar.show(frac, f"{done}/{total} records ({frac:.0%})")

    try:
        s = settings_of(args)
        n = export(s.db_path, Path(args.out), data_dir=s.data_dir, device_id=s.device_id,
                   progress=progress)
    except ClientError as e:
        return fail(args, e)
    except OSError as e:
        return fail(args, ClientError("failed", f"export: {e}"))
    finally:
        bar.done()
    return emit(args, {"out": str(args.out), "records": n, "format": EXPORT_FORMAT},
                f"exported {n} records to {args.out} (JSON Lines, format {EXPORT_FORMAT}; see docs/privacy.md)")


def format_privacy(res: dict) -> str:
    rows = [(cat, st["mode"], st["state"], "yes" if st["paused"] else "no", st.get("consent_id"),
             when(st.get("until"))) for cat, st in res["privacy"].items()]
    return table(rows, ["category", "mode", "state", "paused", "consent", "until"])


def cmd_privacy(args: argparse.Namespace) -> int:
    return respond(args, lambda: ask_agent(args, "privacy", action=args.action), format_privacy)


def wipe_cli(args: argparse.Namespace, *, ask: Callable[[str], str] = prompt, wait_stopped_s: float = 60.0) -> int:
    """``dongle wipe``: terminal confirmation, then the agent (button, device_wiped, keys), then
    the data directory once the agent has stopped. Prompts and progress go to stderr."""
    from agent.owner.erase import wipe_data_dir
    try:
        s = settings_of(args)
        note(f"This erases everything on dongle {s.device_id}: collected data, consents, bookings, the "
             "service records and the device's keys. It cannot be undone; the dongle must be provisioned "
             "again before it can be used.")
        answer = ask(f"Type the device id ({s.device_id}) to confirm: ")
        if answer.strip() != s.device_id:
            raise ClientError("refused", "not confirmed at the terminal; nothing was wiped")
        agent_result: dict = {}
        try:
            agent_result = ask_agent(args, "wipe", timeout=None, on_interim=interim_printer, confirmed=True,
                                     by=getattr(args, "by", None) or "owner at the car (dongle wipe)")
        except AgentNotRunning:
            raise ClientError("no_agent", "the agent is not running: start it (sudo systemctl start "
                                          "dongle-agent) so that the button can confirm and the cloud is told; "
                                          "nothing was wiped") from None
        deadline = time.monotonic() + wait_stopped_s
        while time.monotonic() < deadline:
            try:
                control.call(s.control.socket, "status", timeout=5, group=s.control.group)
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
        return fail(args, e)
    summary = {"device_wiped_sent": agent_result.get("device_wiped_sent", False),
               "keys_destroyed": agent_result.get("destroyed", []), **result}
    if not args.json:
        told = "the cloud was told (device_wiped acknowledged)" if summary["device_wiped_sent"] \
            else "the cloud could not be told (offline)"
        note(f"Wiped: data key and {len(summary['keys_destroyed'])} key file(s) destroyed, "
             f"{result['tables']} tables and {len(result['files_removed'])} files erased; {told}. "
             "Provision the dongle again before use (dongle provision).")
    return emit(args, summary)


def cmd_wipe(args: argparse.Namespace) -> int:
    return wipe_cli(args)


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "export", help="everything the dongle holds about the vehicle and its use, as JSON Lines",
                    description="Write every record the dongle holds (vehicle, positions, events, consents, "
                                "bookings, service records, pending data) to FILE as JSON Lines; the "
                                "format is documented in docs/privacy.md.")
    p.add_argument("--out", required=True, metavar="FILE", help="the file to write (created mode 0600)")
    p.set_defaults(func=cmd_export)

    p = add_command(sub, "privacy", help="pause or resume location and driving behaviour collection at the car",
                    description="pause: stop collecting location and driving behaviour at once (unsent data "
                                "is deleted). resume: start again, within the owner's consent. Resuming is "
                                "only possible here, at the car (or with the button gesture).")
    p.add_argument("action", choices=("pause", "resume", "status"), nargs="?", default="status")
    p.set_defaults(func=cmd_privacy)

    p = add_command(sub, "wipe", help="erase the dongle for a new owner or a returned dongle (terminal + button)",
                    description="Erase all data, consents, bookings, the service record copy and the device's "
                                "keys. Confirm by typing the device id, then by pressing the dongle's button. "
                                "The cloud is told (device_wiped) when the dongle is online.")
    p.add_argument("--by", help="who confirms (recorded in device_wiped), e.g. a name")
    p.set_defaults(func=cmd_wipe)
