"""The outbox: ingest (group commit), the SQLite store that survives power cuts within a disk budget, telemetry bodies, and the uplink that seals and sends them."""
