"""The vehicle twin: one car, driven by the real RAV4 recording, seen through OBD and CAN."""
