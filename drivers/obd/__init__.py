"""OBD-II through an ELM327 adapter (python-OBD): the port, multi-PID requests, diagnostics modes, units."""
