"""``dongle``: the technician and operator command line (talks to the agent over its control socket)."""
