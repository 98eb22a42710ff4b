"""``dongle logs``: the agent's log, from the systemd journal or its log file.

Where there is a systemd journal, ``journalctl -u dongle-agent``. Elsewhere (the demo, a
development checkout) the agent's log file: ``agent.log`` beside the settings file (where
scripts/demo.py and the test fleet write it), in the data directory, or
``/var/log/dongle/agent.log``; ``--file`` names another. With ``--json``: one object
``{"ok": true, "source", "lines": [...]}``; with ``--follow`` one object per line,
``{"ok": true, "line": ...}``.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

from agent.cli.common import EXIT_OK, add_command, emit, emit_json, fail, settings_of
from agent.settings import Settings
from agent.technician.control import ClientError

JOURNAL_UNIT = "dongle-agent"


def log_file_candidates(s: Settings | None) -> list[Path]:
    out = []
    if s is not None:
        out += [s.path.resolve().parent / "agent.log", s.data_dir / "agent.log"]
    out.append(Path("/var/log/dongle/agent.log"))
    return out


def _has_journal() -> bool:
    return Path("/run/systemd/system").is_dir() and shutil.which("journalctl") is not None


def _show(args: argparse.Namespace, lines: Iterable[str], follow_lines: Iterable[str], source: dict) -> int:
    """The last lines (one document), then, with ``--follow``, each new line as it comes."""
    lines = [line.rstrip("\n") for line in lines]
    if args.follow:
        for line in lines:
            emit_json({"line": line}, stream=True) if args.json else print(line, flush=True)
        for line in follow_lines:
            line = line.rstrip("\n")
            emit_json({"line": line}, stream=True) if args.json else print(line, flush=True)
        return EXIT_OK
    return emit(args, {**source, "lines": lines}, "\n".join(lines) if lines else None)


def _follow(f) -> Iterable[str]:
    while True:
        line = f.readline()
        if line:
            yield line
        else:
            time.sleep(0.3)


def _journal(args: argparse.Namespace) -> int:
    cmd = ["journalctl", "-u", JOURNAL_UNIT, "-n", str(args.lines), "--no-pager"]
    if args.follow:
        cmd.append("-f")
    if not args.json:
        return subprocess.call(cmd)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, errors="replace") as proc:
        if args.follow:
            return _show(args, (), proc.stdout, {})
        return _show(args, proc.stdout.readlines(), (), {"source": "journal", "unit": JOURNAL_UNIT})


def cmd_logs(args: argparse.Namespace) -> int:
    try:
        if args.file is None and _has_journal():
            return _journal(args)
        try:
            s = settings_of(args)
        except ClientError:
            s = None
        path = Path(args.file) if args.file else next((p for p in log_file_candidates(s) if p.is_file()), None)
        if path is None:
            return fail(args, ClientError("no_logs", "no systemd journal here and no agent log file found (looked at "
                                                     + ", ".join(map(str, log_file_candidates(s)))
                                                     + "); give one with --file"))
        try:
            with open(path, errors="replace") as f:
                return _show(args, f.readlines()[-args.lines:], _follow(f), {"source": "file", "path": str(path)})
        except OSError as e:
            return fail(args, ClientError("not_permitted" if isinstance(e, PermissionError) else "no_logs",
                                          f"cannot read {path}: {e.strerror or e}"))
    except KeyboardInterrupt:
        return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "logs", help="the agent's log (journalctl -u dongle-agent, or its log file)")
    p.add_argument("-n", "--lines", type=int, default=100, help="how many of the last lines (default 100)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    p.add_argument("--file", help="read this log file instead of the journal")
    p.set_defaults(func=cmd_logs)
