"""OBD-II through an ELM327 adapter (python-OBD): the port, multi-PID requests, diagnostics modes, units."""
import logging


def _not_python_obd_redefinitions(record: logging.LogRecord) -> bool:
    # python-OBD (obd/UnitsAndScaling.py) redefines pint's percent, % and ppm on purpose at
    # import; pint logs each as a WARNING, which the journal and the CLI would show every start.
    return not record.getMessage().startswith("Redefining ")


logging.getLogger("pint.util").addFilter(_not_python_obd_redefinitions)
