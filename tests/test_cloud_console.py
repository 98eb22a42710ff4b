"""The reference backend's ledger: dedup on (dev, seq), gaps, and gaps explained by evictions."""
from __future__ import annotations

from scripts.refcloud.console import Ledger, _safe, format_record


def test_dedup_gaps_and_explained_evictions(tmp_path):
    led = Ledger(tmp_path / "c.db")
    for s in (1, 2, 5, 9):
        assert led.first_time("d-1", s, "telemetry")
    assert not led.first_time("d-1", 5, "telemetry")
    assert led.missing("d-1") == [3, 4, 6, 7, 8]
    led.record_eviction("d-1", 6, 8)
    assert led.missing("d-1") == [3, 4]
    assert led.missing("other") == []
    assert led.next_down_seq("d-1") == 1 and led.next_down_seq("d-1") == 2
    # Persisted across console restarts.
    led2 = Ledger(tmp_path / "c.db")
    assert not led2.first_time("d-1", 9, "telemetry") and led2.next_down_seq("d-1") == 3


def test_untrusted_text_is_escaped_for_the_terminal():
    assert _safe("ok\x1b[31mred\x07") == "ok\\x1b[31mred\\x07"
    rec = {"dev": "d-1", "kind": "event", "seq": 4, "duplicate": False,
           "body": {"type": "booking\x1b[2J", "ts": 1, "booking_id": "x\ny"}}
    line = format_record(rec)
    assert "\x1b" not in line and "\n" not in line
