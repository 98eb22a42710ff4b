"""The cloud link: MQTT with mutual TLS, the envelope protocol (PROTOCOL.md), topics, keys, provisioning, and the downlink with what it applies (config, bookings, commands)."""
