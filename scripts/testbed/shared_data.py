"""Where the shared real-world data lives (the recordings, DBC references, NMEA track, EV vectors):
``../shared/data`` beside the checkout, or ``$DONGLE_SHARED_DATA``. Its README says where each
file came from. Used by tests, benchmarks and the demo."""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = Path(os.environ.get("DONGLE_SHARED_DATA") or ROOT.parent / "shared" / "data")
RAV4 = SHARED_DATA / "comma2k19_rav4"
RAV4_LOG = RAV4 / "comma2k19_rav4_seg40_candump.log.gz"
