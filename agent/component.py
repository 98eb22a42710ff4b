"""What the daemon is made of: components with one life cycle.

Every part of the running agent that has a thread, a socket or state worth reporting is a
:class:`Component`. The composition root (agent/compose.py) builds each one with what it needs
in its constructor, and :class:`agent.compose.Agent` starts them in order, stops them in reverse
order, applies every new cloud config to each and shows each one's ``status()`` under its name.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Component(Protocol):
    def start(self) -> None:
        """Starts the component's threads; returns at once."""

    def stop(self) -> None:
        """Stops them; returns within a bounded time, whatever state the peer is in."""

    def status(self) -> dict[str, Any]:
        """A JSON-ready summary for ``dongle status`` and the control socket."""

    def apply_config(self, doc: dict[str, Any]) -> list[str]:
        """Takes a new cloud config (PROTOCOL §4) as a whole; returns what did not apply."""
