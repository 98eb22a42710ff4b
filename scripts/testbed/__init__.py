"""Test infrastructure: brokers, dev CA, devenv, TUF server, gps, waits, device VM harness."""
