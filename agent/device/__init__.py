"""The device: power management and the MCU, systemd (notify, watchdog), the LEDs and button, memory tuning."""
