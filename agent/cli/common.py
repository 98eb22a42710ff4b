"""What every ``dongle`` command shares: its options, talking to the agent, and its output.

Output: with ``--json`` a command prints exactly one JSON document on stdout, an object:
``{"ok": true, ...the command's fields}`` when it did its job, ``{"ok": false, "code": ...,
"error": ...}`` when it did not (:func:`emit` and :func:`fail`). Commands that keep running
(``live`` without ``--once``, ``logs -f``) print a stream of such objects, one per line (JSON
Lines). Prompts, progress and notes go to stderr, so stdout stays machine-readable. Without
``--json`` a command prints text for people on stdout, errors on stderr.

Options every command accepts, before or after its name: ``--config FILE``, ``--json``,
``-v``/``--verbose`` (:data:`OPTIONS`; ``dongle --config F status`` is ``dongle status
--config F``; the last one given wins).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence

from agent import settings as settings_mod
from agent.settings import Settings
from agent.technician import control
from agent.technician.control import AgentNotRunning, ClientError
from drivers.core.text import safe_text as safe  # text from the car or the cloud on a terminal

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_AGENT = 0, 1, 2, 3
EXIT_OUTPUT_CLOSED = 128 + 13   # SIGPIPE: stdout's reader went away (main.py)


def _options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("options of every command (before or after its name)")
    g.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                   help=f"the agent's settings file (default $DONGLE_CONFIG or {settings_mod.DEFAULT_PATH})")
    g.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                   help="machine-readable output: one JSON object on stdout (docs/technician.md)")
    g.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                   help="more log output (repeatable)")
    return p


#: The parent parser of the top level and of every subcommand (see the module docstring).
OPTIONS = _options()


def defaults() -> dict:
    """The values of :data:`OPTIONS` when none is given (set on the top-level parser)."""
    return {"config": os.environ.get("DONGLE_CONFIG", settings_mod.DEFAULT_PATH), "json": False, "verbose": 0}


def add_command(sub: argparse._SubParsersAction, name: str, **kw) -> argparse.ArgumentParser:
    """A subcommand parser that takes :data:`OPTIONS` too."""
    return sub.add_parser(name, parents=[OPTIONS], **kw)


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------

def emit_json(fields: dict, *, ok: bool = True, stream: bool = False) -> None:
    """One JSON object on stdout: ``{"ok": ok, **fields}`` (one line when ``stream``)."""
    doc = {**fields, "ok": ok}
    if stream:
        print(json.dumps(doc, sort_keys=True, default=str), flush=True)
    else:
        print(json.dumps(doc, indent=2, sort_keys=True, default=str))


def emit(args: argparse.Namespace, fields: dict, text: Callable[[dict], str] | str | None = None) -> int:
    """A command's result: ``fields`` as JSON with ``--json``, else ``text`` (a string or a
    function of ``fields``) on stdout. Returns :data:`EXIT_OK`."""
    if args.json:
        emit_json(fields)
    elif text is not None:
        print(text(fields) if callable(text) else text)
    return EXIT_OK


def respond(args: argparse.Namespace, get: Callable[[], dict], text: Callable[[dict], str] | str | None) -> int:
    """The whole of a command that asks for one result: ``get()``, then :func:`emit` it, or
    :func:`fail` with the refusal."""
    try:
        res = get()
    except ClientError as e:
        return fail(args, e)
    return emit(args, res, text)


def fail(args: argparse.Namespace, e: ClientError) -> int:
    """A refusal or failure: the JSON error object with ``--json``, the message on stderr
    always. Returns the exit status (:data:`EXIT_NO_AGENT` when no agent runs, else
    :data:`EXIT_FAILED`)."""
    if getattr(args, "json", False):
        emit_json({"code": e.code, "error": e.message}, ok=False)
    print(f"dongle: {e.message}", file=sys.stderr)
    if e.code == "no_agent":
        return EXIT_NO_AGENT
    return EXIT_FAILED


def note(text: str) -> None:
    """A remark for the person (stderr, so it never mixes with the output)."""
    print(text, file=sys.stderr, flush=True)


class ProgressBar:
    """A one-line bar on stderr, redrawn in place; only when stderr is a terminal (a log or a
    pipe gets nothing, not one line per redraw) and ``enabled`` (not with ``--json``)."""

    WIDTH = 30

    def __init__(self, enabled: bool = True, label: str = ""):
        self.enabled = enabled and sys.stderr.isatty()
        self.label = f"{label} " if label else ""
        self._drawn = False

    def show(self, fraction: float, text: str) -> None:
        if not self.enabled:
            return
        fill = int(min(1.0, max(0.0, fraction)) * self.WIDTH)
        print(f"\r{self.label}[{'#' * fill}{'.' * (self.WIDTH - fill)}] {text}", end="",
              file=sys.stderr, flush=True)
        self._drawn = True

    def done(self) -> None:
        """Ends the bar's line (once, and only if a bar was drawn)."""
        if self._drawn:
            print(file=sys.stderr, flush=True)
            self._drawn = False


def prompt(text: str) -> str:
    """Asks the person: ``text`` on stderr, the answer from stdin ("" at end of input).

    Not :func:`input`, which writes its prompt on stdout."""
    sys.stderr.write(text)
    sys.stderr.flush()
    return sys.stdin.readline()


def interim_printer(m: dict) -> None:
    """Shows the agent's interim ``prompt`` / ``progress`` lines (stderr)."""
    if "prompt" in m or "progress" in m:
        note(m.get("prompt") or m.get("progress"))


# --------------------------------------------------------------------------------------------
# Text for people
# --------------------------------------------------------------------------------------------



def table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> str:
    cells = [[safe("" if v is None else v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join(lines)


def pairs(items: Sequence[tuple[str, object]]) -> str:
    width = max((len(k) for k, _ in items), default=0)
    return "\n".join(f"{k.ljust(width)}  {safe('-' if v is None else v, 400)}" for k, v in items)


def ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def when(ms: int | None) -> str:
    if not ms:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ms / 1000))


# --------------------------------------------------------------------------------------------
# Talking to the agent, or reading its store
# --------------------------------------------------------------------------------------------

def settings_of(args: argparse.Namespace) -> Settings:
    """The agent's settings, read as the daemon reads them but without opening its key files."""
    try:
        return settings_mod.load(getattr(args, "config", None) or settings_mod.DEFAULT_PATH, check_files=False)
    except settings_mod.SettingsError as e:
        code = "no_settings" if "not found" in str(e) else "bad_settings"
        raise ClientError(code, str(e)) from None


def ask_agent(args: argparse.Namespace, op: str, *, timeout: float | None = 30.0,
              on_interim: Callable[[dict], None] | None = None, **kw) -> dict:
    """One request to the running agent (agent/technician/control.py); raises
    :class:`AgentNotRunning` when none runs, :class:`ClientError` when it refuses."""
    s = settings_of(args)
    return control.call(s.control.socket, op, timeout=timeout, on_interim=on_interim, group=s.control.group, **kw)


def offline(args: argparse.Namespace):
    """``(settings, read-only connection)`` to the stopped agent's store."""
    s = settings_of(args)
    return s, control.open_store_readonly(s.db_path)


def ask_or_read(args: argparse.Namespace, op: str, read_stopped: Callable[[], dict], **kw) -> dict:
    """Asks the running agent; when none runs, says so and reads its store read-only instead."""
    try:
        return ask_agent(args, op, **kw)
    except AgentNotRunning:
        if not args.json:
            note("(the agent is not running: read from its store, read-only)\n")
        return read_stopped()


def meta(conn, key: str, default=None):
    """A value of the stopped agent's ``meta`` table."""
    row = conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
    return json.loads(row[0]) if row else default


def secret_meta(s: Settings, conn, key: str, default=None):
    """A ``meta`` value the agent keeps under its data key (e.g. ``vehicle``: the VIN), opened
    with that key; ``default`` when this user cannot read the key or the value does not open."""
    from agent.owner.datakey import DataKey, DataKeyError, open_secret_meta
    try:
        return open_secret_meta(DataKey.in_dir(s.data_dir, create=False), key, meta(conn, key, default))
    except (DataKeyError, OSError, ValueError):
        return default


def has_table(conn, name: str) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,)).fetchone() is not None
