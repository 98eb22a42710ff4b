"""Vehicle health insights computed on the device (trips, 12 V battery, maintenance, traction battery)."""
