"""The cloud-managed configuration document (PROTOCOL §4 ``config``).

The shipped default lives in ``config/default_config.json`` (version 0, so any document from the
cloud, which starts at 1, is newer). The active document is persisted in the store; the agent
starts with the newest stored one, else the default.
"""
from __future__ import annotations

import copy
import json
from importlib import resources


def default_config() -> dict:
    return json.loads(resources.files("agent.config").joinpath("default_config.json").read_text())


def obd_pids(doc: dict) -> list[dict]:
    return copy.deepcopy(doc.get("obd", {}).get("pids", []))
