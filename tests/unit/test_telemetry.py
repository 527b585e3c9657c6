"""The log budget (per invocation, per function, for the server), billing, and forgetting a
removed function in the metrics and the outcomes."""

from __future__ import annotations

import asyncio
import re

import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ember.errors import UserError
from ember.telemetry.buffer import (
    LINE_OVERHEAD,
    MAX_ERROR_CHARS,
    LogBudget,
    TelemetryBuffer,
    billed_ms,
)
from ember.telemetry.metrics import Metrics
from ember.telemetry.outcomes import Outcomes
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
    buf.activation(_activation("r1"))
    acts, logs = buf.drain()
    kept = "".join(r.message for r in logs if r.request_id == "r1" and r.stream == "stdout")
    assert kept == "abcdabcdab"
    note = [r for r in logs if r.stream == "system"]
    assert len(note) == 1 and "6 bytes of output dropped" in note[0].message
    assert [a.id for a in acts] == ["r1"]
    assert buf.drain() == ([], [])


def test_billing_rounds_up_to_whole_milliseconds() -> None:
    assert [billed_ms(x) for x in (0.0, 0.2, 1.0, 1.01)] == [1, 1, 1, 2]


# ---- the log budget ----

BUDGET = LogBudget(function_bytes=20_000, total_bytes=50_000, tracked_ids=100)


def _line(function: str, text: str, rid: str = "", revision: int = 1) -> LogRecord:
    return LogRecord(
        ts=1.0,
        function=function,
        revision=revision,
        request_id=rid,
        instance="i",
        stream="stdout",
        message=text,
    )


def _activation(rid: str, function: str = "f") -> ActivationRecord:
    return ActivationRecord(
        id=rid,
        function=function,
        revision=1,
        start=1.0,
        duration_ms=2.0,
        status=200,
        tier="warm",
        instance="i",
        peak_memory_kb=0,
        billed_ms=2,
    )


def _kept(logs: list[LogRecord], function: str) -> int:
    return sum(len(r.message) for r in logs if r.function == function and r.stream == "stdout")


def _dropped(logs: list[LogRecord], function: str) -> int:
    notes = [r.message for r in logs if r.function == function and r.stream == "system"]
    return sum(int(m.group(1)) for n in notes if (m := re.match(r"\[ember\] (\d+) bytes", n)))


def test_output_without_a_request_id_is_held_to_the_function_budget_per_window() -> None:
    buf = TelemetryBuffer(log_bytes_per_invocation=1_000_000, budget=BUDGET)
    for _ in range(100):  # a thread or an on_fork hook: no request id, 100 kB
        buf.log(_line("ns/f", "x" * 1000))
    _, logs = buf.drain()
    kept = _kept(logs, "ns/f")
    cost = LINE_OVERHEAD + len("stdout")
    assert kept + cost * (len(logs) - 1) <= BUDGET.function_bytes < kept + cost * len(logs) + 1000
    assert kept + _dropped(logs, "ns/f") == 100_000  # every byte kept or counted
    (note,) = [r for r in logs if r.stream == "system"]
    assert note.request_id == "" and note.revision == 1 and note is logs[-1]
    assert f"a function may buffer {BUDGET.function_bytes} bytes" in note.message
    buf.log(_line("ns/f", "y" * 1000))  # the next window has a budget again
    assert buf.drain()[1] == [_line("ns/f", "y" * 1000)]
    assert buf.drain() == ([], [])


def test_one_function_cannot_spend_another_functions_budget() -> None:
    buf = TelemetryBuffer(log_bytes_per_invocation=1_000_000, budget=BUDGET)
    for _ in range(100):
        buf.log(_line("ns/loud", "x" * 1000))
    buf.log(_line("ns/quiet", "hello\n"))
    _, logs = buf.drain()
    assert [r.message for r in logs if r.function == "ns/quiet"] == ["hello\n"]


def test_the_server_wide_budget_bounds_all_functions_together() -> None:
    buf = TelemetryBuffer(log_bytes_per_invocation=1_000_000, budget=BUDGET)
    for n in range(10):
        for _ in range(30):
            buf.log(_line(f"ns/f{n}", "x" * 1000))
    assert buf.statistics().log_bytes <= BUDGET.total_bytes
    _, logs = buf.drain()
    assert sum(len(r.message) for r in logs if r.stream == "stdout") <= BUDGET.total_bytes
    for n in range(10):
        assert _kept(logs, f"ns/f{n}") + _dropped(logs, f"ns/f{n}") == 30_000
    assert "the server's log buffer (50000 bytes for all functions" in logs[-1].message


def test_a_flood_of_tiny_lines_is_bounded_by_their_count() -> None:
    buf = TelemetryBuffer(log_bytes_per_invocation=1_000_000, budget=BUDGET)
    for _ in range(10_000):
        buf.log(_line("ns/f", "."))
    assert buf.statistics().log_lines <= BUDGET.function_bytes // LINE_OVERHEAD


def test_a_huge_line_is_cut_to_the_room_left() -> None:
    buf = TelemetryBuffer(log_bytes_per_invocation=1_000_000, budget=BUDGET)
    buf.log(_line("ns/f", "x" * 10_000_000))
    _, logs = buf.drain()
    assert len(logs[0].message) == BUDGET.function_bytes - LINE_OVERHEAD - len("stdout")
    assert _kept(logs, "ns/f") + _dropped(logs, "ns/f") == 10_000_000


def test_non_ascii_output_counts_its_utf8_bytes_and_is_cut_between_characters() -> None:
    buf = TelemetryBuffer(log_bytes_per_invocation=1_000_000, budget=BUDGET)
    text = "é€😀" * 10_000  # 2 + 3 + 4 bytes a group
    buf.log(_line("ns/f", text))
    _, logs = buf.drain()
    kept = logs[0].message
    room = BUDGET.function_bytes - LINE_OVERHEAD - len("stdout")
    assert text.startswith(kept) and room - 4 < len(kept.encode()) <= room
    assert len(kept.encode()) + _dropped(logs, "ns/f") == 90_000


def test_an_invocations_output_counts_against_its_function_too() -> None:
    buf = TelemetryBuffer(log_bytes_per_invocation=5000, budget=BUDGET)
    for n in range(50):  # each under its own cap, together over the function's budget
        buf.log(_line("ns/f", "x" * 1000, rid=f"r{n}"))
    _, logs = buf.drain()
    assert _kept(logs, "ns/f") < BUDGET.function_bytes
    assert _kept(logs, "ns/f") + _dropped(logs, "ns/f") == 50_000


def test_the_per_invocation_cap_holds_across_windows() -> None:
    buf = TelemetryBuffer(log_bytes_per_invocation=10, budget=BUDGET)
    buf.log(_line("f", "abcdef", rid="r1"))
    assert _kept(buf.drain()[1], "f") == 6
    buf.log(_line("f", "ghijkl", rid="r1"))
    buf.activation(_activation("r1"))
    _, logs = buf.drain()
    assert [r.message for r in logs if r.stream == "stdout"] == ["ghij"]
    (note,) = [r for r in logs if r.stream == "system"]
    assert note.request_id == "r1" and note.message.startswith("[ember] 2 bytes of output dropped")


def test_ids_that_never_get_an_activation_record_do_not_accumulate() -> None:
    buf = TelemetryBuffer(log_bytes_per_invocation=10, budget=BUDGET)
    buf.log(_line("f", "x" * 15, rid="first"))  # 5 bytes over its cap, never finishes
    for n in range(1000):  # forged ids, output after the result, ...
        buf.log(_line("f", "x", rid=f"forged-{n}"))
        if n % 10 == 0:
            buf.drain()
    assert buf.statistics().tracked_ids == BUDGET.tracked_ids


def test_the_notice_of_an_evicted_invocation_is_not_lost() -> None:
    buf = TelemetryBuffer(log_bytes_per_invocation=10, budget=BUDGET)
    buf.log(_line("f", "x" * 15, rid="first"))
    notes: list[LogRecord] = []
    for n in range(BUDGET.tracked_ids):
        buf.log(_line("f", "x", rid=f"other-{n}"))
        notes += [r for r in buf.drain()[1] if r.stream == "system"]
    assert [(r.request_id, r.message.split(":")[0]) for r in notes] == [
        ("first", "[ember] 5 bytes of output dropped")
    ]


def test_an_id_too_long_to_be_embers_is_not_tracked() -> None:
    buf = TelemetryBuffer(log_bytes_per_invocation=10, budget=BUDGET)
    buf.log(_line("f", "x" * 100, rid="z" * 1000))
    assert buf.statistics().tracked_ids == 0
    _, logs = buf.drain()
    assert _kept(logs, "f") + _dropped(logs, "f") == 100


def test_forget_drops_what_is_kept_about_a_function() -> None:
    buf = TelemetryBuffer(log_bytes_per_invocation=10, budget=BUDGET)
    for fn in ("ns/gone", "ns/kept"):
        buf.log(_line(fn, "x" * 15, rid=f"{fn}-request"))
        buf.log(_line(fn, "x" * 30_000))
    buf.forget("ns/gone")
    assert buf.statistics().tracked_ids == 1
    buf.activation(_activation("ns/gone-request", "ns/gone"))
    _, logs = buf.drain()
    assert not [r for r in logs if r.function == "ns/gone" and r.stream == "system"]
    assert len([r for r in logs if r.function == "ns/kept" and r.stream == "system"]) == 1


def test_a_long_activation_error_is_cut() -> None:
    buf = TelemetryBuffer(log_bytes_per_invocation=10)
    buf.activation(msgspec.structs.replace(_activation("r"), error="E" * 1_000_000))
    (act,), _ = buf.drain()
    assert act.error is not None and len(act.error) == MAX_ERROR_CHARS


@pytest.mark.parametrize(
    "budget",
    [
        LogBudget(function_bytes=0),
        LogBudget(tracked_ids=-1),
        LogBudget(function_bytes=10, total_bytes=5),
    ],
)
def test_an_invalid_budget_names_its_key(budget: LogBudget) -> None:
    with pytest.raises(UserError, match=r"log budget: \w+=-?\d+ must be"):
        budget.validate()


# ---- forgetting a removed function ----


class Counts(msgspec.Struct, frozen=True):
    function: str
    idle: int = 0
    busy: int = 0
    starting: int = 0
    waiting: int = 0


def test_metrics_read_any_revision_statistics_with_the_fields_they_need() -> None:
    metrics = Metrics(lambda: [Counts("ns/f", idle=2, waiting=3)])
    text = metrics.render().decode()
    assert 'ember_instances{function="f",namespace="ns",state="idle"} 2.0' in text
    assert 'ember_waiting_requests{function="f",namespace="ns"} 3.0' in text


def test_metrics_forget_removes_every_series_of_a_function() -> None:
    metrics = Metrics(list)
    for fn in ("ns/gone", "ns/kept"):
        metrics.observe(fn, 200, 0.01, "warm")
        metrics.observe(fn, 404, 0.01, "none")
        metrics.observe(fn, 502, 0.01, "fork")
    metrics.forget("ns/gone")
    text = metrics.render().decode()
    assert 'function="gone"' not in text
    assert text.count('function="kept"') > 10
    metrics.observe("ns/gone", 200, 0.01, "warm")  # deployed again: counts from zero
    assert (
        'ember_invocations_total{code="200",function="gone",namespace="ns"} 1.0'
        in metrics.render().decode()
    )


def test_outcomes_forget_stops_watching_every_revision_of_a_function() -> None:
    outcomes = Outcomes()
    for fn, rev in (("ns/gone", 1), ("ns/gone", 2), ("ns/kept", 1)):
        outcomes.watch(fn, rev)
        outcomes.add(fn, rev, 500, 0.01)
    outcomes.forget("ns/gone")
    assert outcomes.peek("ns/gone", 1).requests == outcomes.peek("ns/gone", 2).requests == 0
    outcomes.add("ns/gone", 2, 500, 0.01)  # no longer kept
    assert outcomes.peek("ns/gone", 2).requests == 0
    assert outcomes.peek("ns/kept", 1).requests == 1


# ---- /metrics: valid text, rendered only for what changed ----


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text exposition, parsed by the Prometheus client."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_text_parses_with_every_series_of_each_function() -> None:
    metrics = Metrics(lambda: [Counts("ns/a", idle=1), Counts("ns/b", busy=2, waiting=1)])
    for seconds in (0.0004, 0.002, 0.002, 7.0, 1000.0):
        metrics.observe("ns/a", 200, seconds, "warm")
    metrics.observe("ns/a", 502, 0.01, "fork")
    metrics.observe('ns/we"ird', 404, 0.01, "none")
    samples = _samples(metrics.render().decode())
    a = (("function", "a"), ("namespace", "ns"))
    assert samples[("ember_invocations_total", (("code", "200"), *a))] == 5
    assert samples[("ember_invocations_total", (("code", "502"), *a))] == 1
    assert samples[("ember_starts_total", (*a, ("tier", "warm")))] == 5
    assert samples[("ember_starts_total", (*a, ("tier", "fork")))] == 1
    bucket = "ember_invocation_duration_seconds_bucket"
    le = lambda bound: (("function", "a"), ("le", bound), ("namespace", "ns"))  # noqa: E731
    assert [samples[(bucket, le(b))] for b in ("0.0005", "0.0025", "10.0", "900.0", "+Inf")] == [
        1,
        3,
        5,
        5,
        6,
    ]
    assert samples[("ember_invocation_duration_seconds_count", a)] == 6
    assert samples[("ember_invocation_duration_seconds_sum", a)] == pytest.approx(1007.0144)
    assert ("ember_invocations_created", (("code", "200"), *a)) in samples
    weird = (("code", "404"), ("function", 'we"ird'), ("namespace", "ns"))
    assert samples[("ember_invocations_total", weird)] == 1
    b = (("function", "b"), ("namespace", "ns"))
    assert samples[("ember_instances", (*b, ("state", "busy")))] == 2
    assert samples[("ember_waiting_requests", b)] == 1
    per_function = [key for key in samples if ("function", "a") in key[1]]
    assert len(per_function) == 2 * 2 + 22 + 2 * 2 + 4  # 2 codes, histogram, 2 tiers, gauges


def test_a_scrape_renders_only_the_functions_called_since_the_last() -> None:
    metrics = Metrics(list)
    for i in range(100):
        metrics.observe(f"ns/f{i}", 200, 0.01, "fork")
    first = metrics.scrape()
    assert first.changed == 100
    text = first.render()
    assert metrics.scrape().changed == 0
    assert metrics.render() == text
    metrics.observe("ns/f7", 200, 0.01, "warm")
    again = metrics.scrape()
    assert again.changed == 1
    samples = _samples(again.render().decode())
    f7 = (("code", "200"), ("function", "f7"), ("namespace", "ns"))
    assert samples[("ember_invocations_total", f7)] == 2
    assert len(samples) == len(_samples(text.decode())) + 2  # f7's new tier, its created


def test_a_request_during_a_render_is_not_lost_to_the_cache() -> None:
    """The numbers are copied on the loop and rendered on a thread: an observation that comes
    in between is not in that render, and the render is not kept as current."""
    metrics = Metrics(list)
    metrics.observe("ns/f", 200, 0.01, "warm")
    scrape = metrics.scrape()
    metrics.observe("ns/f", 200, 0.01, "warm")  # while the thread renders
    f = (("code", "200"), ("function", "f"), ("namespace", "ns"))
    assert _samples(scrape.render().decode())[("ember_invocations_total", f)] == 1
    assert _samples(metrics.render().decode())[("ember_invocations_total", f)] == 2


def test_a_render_on_the_event_loop_lets_other_work_in_and_says_the_same() -> None:
    """/metrics is formatted on the event loop in slices: requests are served between them
    (on a worker thread the render held the GIL 5 ms at a time while the loop waited)."""

    async def main() -> None:
        metrics = Metrics(list)
        twin = Metrics(list)
        for i in range(300):
            metrics.observe(f"ns/f{i}", 200, 0.01, "fork")
            twin.observe(f"ns/f{i}", 200, 0.01, "fork")
        turns = 0
        rendering = True

        async def other() -> None:
            nonlocal turns
            while rendering:
                turns += 1
                await asyncio.sleep(0)

        task = asyncio.get_running_loop().create_task(other())
        await asyncio.sleep(0)
        seen = turns
        body = await (await metrics.scrape_async()).render_async()
        rendering = False
        await task
        assert turns > seen  # the loop ran other work before the render was done
        expected = _samples(twin.render().decode())
        got = _samples(body.decode())
        assert got.keys() == expected.keys()
        assert metrics.scrape().changed == 0  # what it rendered is cached as before

    asyncio.run(main())
