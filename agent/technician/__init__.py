"""The technician's side at the car: the control socket, its requests, and the service record chain."""
