"""The dongle agent: the daemon (daemon.py, built by compose.py) and the technician CLI (cli/)."""
