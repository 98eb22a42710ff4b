"""The one error for a local file the agent cannot use (a DBC, a key, a certificate, an EV profile).

It names the file and what is wrong with it; the daemon turns it into the one-line settings
error ``FILE: key 'a.b': <path>: <what>`` naming the key of agent.toml that points at the file
(agent/daemon.py), exits 2 and starts nothing.
"""
from __future__ import annotations

import os


class LocalFileError(Exception):
    """``path`` cannot be used: ``message`` says why (for a person, one line). ``key``: the
    settings key to name, where the one that names ``path`` is not the one to blame (a file
    shipped with the agent that a setting makes it read; one file named by two keys)."""

    def __init__(self, path: str | os.PathLike[str], message: str, *, key: str | None = None):
        self.path = os.fspath(path)
        self.message = message
        self.key = key
        super().__init__(f"{self.path}: {message}")
