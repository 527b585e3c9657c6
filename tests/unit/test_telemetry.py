"""The per-invocation log cap and billing."""

from __future__ import annotations

from ember.telemetry.buffer import TelemetryBuffer, billed_ms
from ember.telemetry.records import ActivationRecord, LogRecord


def _log(rid: str, text: str) -> LogRecord:
    return LogRecord(
        ts=1.0,
        function="f",
        revision=1,
        request_id=rid,
        instance="i",
        stream="stdout",
        message=text,
    )


def test_output_past_the_cap_is_cut_and_noted() -> None:
    buf = TelemetryBuffer(log_bytes_per_invocation=10)
    for _ in range(4):
        buf.log(_log("r1", "abcd"))
    buf.log(_log("r2", "ok"))
    buf.activation(
        ActivationRecord(
            id="r1",
            function="f",
            revision=1,
            start=1.0,
            duration_ms=2.0,
            status=200,
            tier="warm",
            instance="i",
            peak_memory_kb=0,
            billed_ms=2,
        )
    )
    acts, logs = buf.drain()
    kept = "".join(r.message for r in logs if r.request_id == "r1" and r.stream == "stdout")
    assert kept == "abcdabcdab"
    note = [r for r in logs if r.stream == "system"]
    assert len(note) == 1 and "6 bytes of output dropped" in note[0].message
    assert [a.id for a in acts] == ["r1"]
    assert buf.drain() == ([], [])


def test_billing_rounds_up_to_whole_milliseconds() -> None:
    assert [billed_ms(x) for x in (0.0, 0.2, 1.0, 1.01)] == [1, 1, 1, 2]
