"""Vehicle input: what the agent asks of the car and how readings become samples and frames (OBD poller, CAN decoding, EV battery over UDS, the vehicle's identity)."""
