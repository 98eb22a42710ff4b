"""The vehicle twin: one car, driven by the real RAV4 recording, seen through OBD and CAN.

Test and demo tooling only (the ELM327-emulator it plugs into is CC BY-NC-SA); nothing under
agent/ or drivers/ imports it.

- :mod:`.recording`: the RAV4 minute (comma2k19) read once with python-can and cantools into
  time series (and, for the CAN side, its frames).
- :mod:`.drive`: the drive model. :class:`~.drive.Drive` makes a loop of the recording (key on,
  crank, warm idle, pull away, the recorded minute, stop, idle, parked) and gives the car's
  whole :class:`~.drive.State` at any drive time, with what the recording lacks modelled
  (coolant, intake air, load, throttle, MAF, fuel rate and level, odometer, voltage, run
  time); :class:`~.drive.DriveClock` maps wall time to drive time; :class:`~.drive.Car` names
  the car (its VIN follows from the name) and its few settings; :meth:`~.drive.Drive.truth` and
  :meth:`~.drive.Drive.loop_truth` give the known answers per loop (trips, engine starts,
  distance, duration, fuel).
- :mod:`.ecu`: the engine ECU's memory: trouble codes, freeze frame, readiness monitors (kept
  across restarts of the twin, as an ECU keeps it while the car is off).
- :mod:`.elm_scenario`: runs inside the ELM327-emulator: the ``twin`` scenario (answers
  computed from the drive) and the ECU task plug-in (silent while parked).
- :mod:`.elm_twin`: :class:`~.elm_twin.TwinEmulator`, the emulator on a pty with that
  scenario (:class:`scripts.vehicle_sim.elm_emulator.ElmEmulator` underneath).
- :mod:`.can_twin`: the CAN side on the same clock (recorded frames, held and re-encoded frames
  for the made-up phases, silence while parked).
- :mod:`.twin`: :class:`~.twin.VehicleTwin` starts both sides from one place (the demo's entry:
  scripts/demo.py), goes on from the next key-on at a restart, optionally after a lead-in parked.

Run by hand::

    python -m scripts.vehicle_sim.drive --loops 2            # phases and known answers, JSON
    python -m scripts.vehicle_sim.twin --run-dir run/twin --speed 5 \\
        --can-interface udp_multicast --can-channel 239.74.1.2 --can-port 40000
"""
