"""pyserial's URL handler for ``obdport://`` (found through ``serial.protocol_handler_packages``;
pyserial requires the module name ``protocol_<scheme>``). See drivers/obd/port.py."""
from drivers.obd.port import serial_class_for_url

__all__ = ["serial_class_for_url"]
