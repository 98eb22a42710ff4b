"""Vehicle and device I/O behind small interfaces with simulated twins; imports nothing from agent/."""
