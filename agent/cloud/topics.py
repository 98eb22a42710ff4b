"""PROTOCOL §2 topics: the one source of the topic prefix and the per-device topic names.

A pure module (no I/O, no third-party imports): the local settings, the MQTT link, the protocol
codec, the reference cloud and the test brokers' ACLs all take their topic names from here.
"""
from __future__ import annotations

#: The protocol's topic root; the prefix of a device's topics is ``ROOT/{device_id}/``.
ROOT = "dongle/v1"
#: The default ``mqtt.topic_prefix`` (configurable as a whole, PROTOCOL §2).
PREFIX_TEMPLATE = ROOT + "/{device_id}/"

#: Topic (after the prefix) → envelope kind, both directions (PROTOCOL §2).
UPLINK = {"up/telemetry": "telemetry", "up/event": "event", "up/ack": "ack"}
DOWNLINK = {"down/config": "config", "down/booking": "booking", "down/command": "command",
            "down/release": "release"}
KIND_OF = {**UPLINK, **DOWNLINK}
TOPIC_OF = {kind: topic for topic, kind in KIND_OF.items()}
#: Downlink kinds the cloud publishes retained (PROTOCOL §2).
RETAINED_DOWNLINK = frozenset({"config", "release"})
#: The plaintext status topic, also the MQTT will.
STATUS = "status"


def prefix(device_id: str, template: str = PREFIX_TEMPLATE) -> str:
    """The topic prefix of one device, e.g. ``dongle/v1/demo-0001/``."""
    return template.format(device_id=device_id)
