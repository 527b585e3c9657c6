"""Async invocations (`POST /fn-async/NAME` → 202, run later from the queue), on each queue
backend: SQLite (the default) and NATS JetStream (`ember up --queue nats://...`, a throwaway
`nats-server -js` started by the bench). `bench/functions/noop` is the function throughout.

Per backend, in this order, each phase on a fresh function name (so its counters start at 0),
deployed with the defaults (`scale.max` 10) and called once synchronously (its first instance
forked), and only once the queue is empty (every accepted invocation ended, no queue depth
left). The queue runs what it accepts at once, so the accept phase measures accepting while
executing, as a real burst would; the 50 ms /metrics polling (a few ms per scrape) is part of
the load too.

1. **accepted/s**: `wrk -t2 -c32` POSTs a small JSON body to /fn-async/noop-burst back to back
   until N answers came (full 30,000, quick 3,000): a Lua script (`wrk_script`) stops each wrk
   thread at its share and notes, on CLOCK_MONOTONIC, when it started and ended. accepted/s =
   answers / (last thread's end - first thread's start); every answer must be a 202.
   wrk, not bench/producer.py, is the client. Measured once both ways on this 2-core machine
   (SQLite, 30,000, two rounds each): wrk 5,490 and 5,190 accepted/s using 0.59 and 0.56 s of
   CPU; the producer 5,290 and 4,460/s using 0.85 and 0.97 s. Neither client is the limit
   (about a tenth of a core), but wrk takes less of the CPU the server shares and gives the
   higher, steadier figure, so it is the honest measure of the server.
2. **completed/s**: from the same start until /metrics (polled every 50 ms) shows
   `ember_async_invocations_total{status="succeeded"}` at the number the server accepted
   (`status="accepted"`; a few more than N, the requests in flight when wrk stopped).
   completed/s = succeeded / that time (±50 ms of polling).
3. **202 → completion at half the peak**: bench/producer.py, open loop (32 connections) at
   completed/s ÷ 2 for 5 s (quick 1 s); then each invocation's record (the list endpoint,
   newest 10,000 at most) gives `ended - accepted` (server unix times). The client's own 202
   latency (answer - send) is the second row.
4. **the same calls synchronously**: `POST /fn/noop` with `wrk -t2 -c32` for 5 s (quick 1 s,
   after a 1 s warm-up): req/s, p50, p99; and at the same half rate, open loop (producer):
   p50, p99 of request → response. These are the comparison rows.
5. **fairness with a backlog** (SQLite only): `backlogged` (bench/functions/sleep50, sleeps
   50 ms; `scale.max: 2`, so it drains at ~40/s) gets 100,000 async invocations (quick 5,000;
   producer, 32 connections). Before it exists and while it waits: the sync latency of noop
   (1 connection, 200 requests), and 202 → completion (server) and send → 202 (client) of 100
   async invocations of `other` (noop, open loop at 100/s). Then `DELETE
   /api/v1/functions/backlogged` (timed) removes it.

Targets (the issue): >= 5,000 accepted/s on SQLite, >= 2,000 completed/s, p50 202 →
completion <= 5 ms at half the peak. OpenFaaS CE's reported ~85 accepted/s is a reference
figure (shown as a row), not run here.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.client import KeepAlive, Load
from bench.common import Row, log, percentile, report, verdict
from bench.producer import Produced, produce, request
from bench.servers import Ember, Nats
from bench.wrk import parse as parse_wrk

ACCEPTED_PER_S = 5000.0  # on SQLite (issue)
COMPLETED_PER_S = 2000.0  # (issue)
P50_MS = 5.0  # 202 → completion at half the peak (issue)
OPENFAAS_CE_ACCEPTED_PER_S = 85  # reported, not run: a reference figure
CONNECTIONS = 32
WRK_THREADS = 2
BODY = b'{"n": 1}'
HEADERS = [("Content-Type", "application/json")]
POLL_S = 0.05
LIST_LIMIT = 10_000  # the most the list endpoint answers
NOTE = (
    f"OpenFaaS CE's reported ~{OPENFAAS_CE_ACCEPTED_PER_S} async accepted/s is a reference "
    "figure, not run here. accepted/s: wrk -t2 -c32 POST until N answers; completed/s: until "
    "/metrics counts them succeeded; 202->completion: server's ended - accepted."
)


# ---- pure helpers (tests/unit/test_bench.py) ----
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def metric_samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample of metric NAME in a Prometheus text exposition: (labels, value)."""
    out = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or match.group(1) != name:
            continue
        labels = {
            k: v.replace('\\"', '"').replace("\\\\", "\\")
            for k, v in _LABEL.findall(match.group(2) or "")
        }
        out.append((labels, float(match.group(3))))
    return out


def async_counts(text: str) -> dict[str, dict[str, int]]:
    """`ember_async_invocations_total` by function ("namespace/name"), then status (accepted,
    succeeded, failed, ...)."""
    out: dict[str, dict[str, int]] = {}
    for labels, value in metric_samples(text, "ember_async_invocations_total"):
        function = f"{labels.get('namespace', '')}/{labels.get('function', '')}"
        out.setdefault(function, {})[labels.get("status", "")] = int(value)
    return out


def ended(counts: dict[str, int]) -> int:
    """How many of a function's accepted invocations ended, whatever the status."""
    return sum(n for status, n in counts.items() if status != "accepted")


def queue_depths(text: str) -> dict[str, int]:
    return {
        f"{labels.get('namespace', '')}/{labels.get('function', '')}": int(value)
        for labels, value in metric_samples(text, "ember_async_queue_depth")
    }


def shares(total: int, parts: int) -> list[int]:
    """TOTAL split into PARTS near-equal whole shares."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _lua_string(data: bytes) -> str:
    """A Lua string literal of DATA (printable ASCII as is, any other byte as \\ddd)."""
    return (
        '"'
        + "".join(chr(b) if 32 <= b < 127 and b not in b'"\\' else f"\\{b:03d}" for b in data)
        + '"'
    )


def wrk_script(
    method: str, body: bytes, headers: Sequence[tuple[str, str]], expected: int, quotas: list[int]
) -> str:
    """A wrk Lua script: METHOD with BODY and HEADERS; counts answers whose status is not
    EXPECTED; with QUOTAS (one per wrk thread), thread i stops after quotas[i] answers and
    prints `bench-thread-done I`. At the end one `bench-thread ID ANSWERED UNEXPECTED STARTED
    FINISHED` line per thread (CLOCK_MONOTONIC seconds, what time.perf_counter reads on
    Linux; FINISHED 0 for a thread that did not reach its quota)."""
    lines = [
        "-- generated by bench/async_invoke.py",
        'local ffi = require("ffi")',
        "ffi.cdef[[",
        "typedef struct { long tv_sec; long tv_nsec; } ember_bench_timespec;",
        "int clock_gettime(int clk, ember_bench_timespec *tp);",
        "]]",
        'local ts = ffi.new("ember_bench_timespec")',
        "local function now()",
        "  ffi.C.clock_gettime(1, ts)  -- CLOCK_MONOTONIC",
        "  return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9",
        "end",
        f"wrk.method = {_lua_string(method.encode())}",
        f"wrk.body = {_lua_string(body)}",
        *(
            f"wrk.headers[{_lua_string(k.encode())}] = {_lua_string(v.encode())}"
            for k, v in headers
        ),
        f"local quotas = {{{', '.join(str(q) for q in quotas)}}}",
        "local threads = {}",
        "function setup(thread)",
        "  local i = #threads + 1",
        '  thread:set("id", i)',
        '  thread:set("quota", quotas[i] or 0)',
        "  table.insert(threads, thread)",
        "end",
        "function init(args)",
        "  answered, unexpected, finished = 0, 0, 0",
        "  started = now()",
        "end",
        "function response(status, headers, body)",
        "  answered = answered + 1",
        f"  if status ~= {int(expected)} then unexpected = unexpected + 1 end",
        "  if quota > 0 and answered == quota then",
        "    finished = now()",
        '    io.write(string.format("bench-thread-done %d\\n", id))',
        "    io.flush()",
        "    wrk.thread:stop()",
        "  end",
        "end",
        "function done(summary, latency, requests)",
        "  for _, t in ipairs(threads) do",
        '    io.write(string.format("bench-thread %d %d %d %.6f %.6f\\n", t:get("id"),',
        '      t:get("answered"), t:get("unexpected"), t:get("started"), t:get("finished")))',
        "  end",
        "end",
    ]
    return "\n".join(lines) + "\n"


@dataclass
class WrkThread:
    id: int
    answered: int
    unexpected: int
    started: float
    finished: float  # 0: stopped before its quota


def wrk_threads(output: str) -> list[WrkThread]:
    """The `bench-thread` lines `wrk_script`'s done() prints."""
    return [
        WrkThread(int(i), int(a), int(u), float(s), float(f))
        for i, a, u, s, f in re.findall(
            r"^bench-thread (\d+) (\d+) (\d+) ([0-9.]+) ([0-9.]+)$", output, re.M
        )
    ]


# ---- load ----
@dataclass
class WrkRun:
    threads: list[WrkThread]
    load: Load | None  # wrk's own report (its req/s is wrong when the threads stop early)
    output: str

    @property
    def answered(self) -> int:
        return sum(t.answered for t in self.threads)

    @property
    def unexpected(self) -> int:
        return sum(t.unexpected for t in self.threads)

    @property
    def span(self) -> tuple[float, float]:
        """First thread's start, last thread's end (perf_counter seconds; nan if one stopped
        before its quota)."""
        start = min(t.started for t in self.threads)
        if any(t.finished == 0 for t in self.threads):
            return start, math.nan
        return start, max(t.finished for t in self.threads)


def wrk_post(
    url: str, path: str, expected: int, seconds: float, total: int = 0, conns: int = CONNECTIONS
) -> WrkRun:
    """`wrk -t2 -cCONNS` POSTing BODY to PATH: until TOTAL answers (then wrk is stopped; SECONDS
    is only the limit), or for SECONDS when TOTAL is 0."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise RuntimeError("wrk is not installed (apt-get install wrk)")
    threads = min(WRK_THREADS, conns)
    quotas = shares(total, threads) if total else []
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(wrk_script("POST", BODY, HEADERS, expected, quotas))
    cmd = [wrk, f"-t{threads}", f"-c{conns}", f"-d{seconds:g}s", "--timeout", "10s"]
    cmd += ["--latency", "-s", f.name, url + path]
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        lines, done = [], 0
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("bench-thread-done"):
                done += 1
                if done == len(quotas):
                    proc.send_signal(signal.SIGINT)  # wrk sleeps -d otherwise
        proc.wait()
    finally:
        Path(f.name).unlink(missing_ok=True)
    output = "".join(lines)
    try:
        load: Load | None = parse_wrk(output)
    except (AttributeError, KeyError):
        load = None
    return WrkRun(wrk_threads(output), load, output)


class Poller:
    """A thread reading /metrics every 50 ms: the async counters of every function, with the
    perf_counter time each scrape was answered."""

    def __init__(self, ember: Ember) -> None:
        self.client = httpx.Client(base_url=ember.url, headers=ember.http.headers, timeout=30)
        self.samples: list[tuple[float, dict[str, dict[str, int]]]] = []
        self.scrape_ms: list[float] = []
        self.errors = 0
        self._stop = threading.Event()
        self._new = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Poller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.client.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.perf_counter()
            try:
                text = self.client.get("/metrics").text
            except httpx.HTTPError:
                self.errors += 1
            else:
                now = time.perf_counter()
                self.scrape_ms.append((now - t0) * 1000.0)
                with self._new:
                    self.samples.append((now, async_counts(text)))
                    self._new.notify_all()
            self._stop.wait(max(0.0, POLL_S - (time.perf_counter() - t0)))

    def until(
        self, done: Callable[[dict[str, dict[str, int]]], bool], timeout: float, since: float = 0
    ) -> tuple[float, dict[str, dict[str, int]]] | None:
        """The first scrape answered after SINCE whose counters satisfy DONE (None after
        TIMEOUT s), with its time."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._new:
            while True:
                for at, counts in self.samples[seen:]:
                    if at >= since and done(counts):
                        return at, counts
                seen = len(self.samples)
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._new.wait(min(left, 1.0))

    def latest(self) -> dict[str, dict[str, int]]:
        with self._new:
            return self.samples[-1][1] if self.samples else {}


def settle(ember: Ember, timeout: float = 60.0) -> None:
    """Wait until the queue is empty: every accepted invocation ended and no depth left."""
    deadline = time.monotonic() + timeout
    while True:
        text = ember.http.get("/metrics").text
        counts, depths = async_counts(text), queue_depths(text)
        if all(ended(c) >= c.get("accepted", 0) for c in counts.values()) and not any(
            depths.values()
        ):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the queue did not empty in {timeout:g} s: {counts} {depths}")
        time.sleep(0.1)


def fresh(ember: Ember, name: str, function: str = "noop", **config: Any) -> str:
    """Deploy bench/functions/FUNCTION as NAME and call it once (its first instance forked)."""
    ember.deploy(function, name, **config)
    resp = ember.http.post(f"/fn/{name}", content=BODY, headers=dict(HEADERS))
    if resp.status_code != 200:
        raise RuntimeError(f"warm-up call of {name}: {resp.status_code} {resp.text[:200]}")
    settle(ember)
    return name


def qualified(name: str) -> str:
    return f"default/{name}"


def records(ember: Ember, name: str, status: str = "succeeded") -> list[dict[str, Any]]:
    resp = ember.http.get(
        f"/api/v1/functions/{name}/invocations", params={"status": status, "limit": LIST_LIMIT}
    )
    resp.raise_for_status()
    found: list[dict[str, Any]] = resp.json()["invocations"]
    return found


def statuses(got: Produced) -> dict[int, int]:
    out: dict[int, int] = {}
    for status in got.statuses:
        out[status] = out.get(status, 0) + 1
    return out


def _ms(values: Sequence[float]) -> tuple[float, float]:
    return round(percentile(values, 50), 3), round(percentile(values, 99), 3)


def _whole(value: float) -> float:
    """VALUE rounded to a whole number (NaN stays NaN)."""
    return value if math.isnan(value) else round(value)


def row(backend: str, what: str, **cells: Any) -> Row:
    out: Row = {"backend": backend, "measurement": what}
    out.update(cells)
    return out


# ---- the phases ----
def accept_and_complete(ember: Ember, backend: str, n: int) -> tuple[list[Row], float]:
    """Phases 1 and 2; returns their rows and completed/s."""
    name = fresh(ember, "noop-burst")
    key = qualified(name)
    with Poller(ember) as poller:
        run = wrk_post(ember.url, f"/fn-async/{name}", 202, max(60.0, n / 200), total=n)
        if not run.threads:
            raise RuntimeError(f"wrk printed no thread lines:\n{run.output}")
        start, end = run.span
        # what the server accepted: N, and those in flight when wrk stopped (once the counter
        # stops moving)
        accepted = -1
        for _ in range(100):
            time.sleep(0.2)
            now = poller.latest().get(key, {}).get("accepted", 0)
            if now == accepted:
                break
            accepted = now
        timeout = 30 + accepted / 500
        got = poller.until(lambda c: ended(c.get(key, {})) >= accepted, timeout, since=start)
        last = poller.latest().get(key, {})
        scrape = _ms(poller.scrape_ms)
    accept_s = end - start
    bad = run.unexpected + (run.load.errors if run.load else 0)
    accepted_per_s = run.answered / accept_s if accept_s > 0 else math.nan
    p50, p99 = (run.load.p50_ms, run.load.p99_ms) if run.load else (math.nan, math.nan)
    accept_row = row(
        backend,
        f"async accepted: wrk -c{CONNECTIONS} POST until {n:,} answers",
        n=run.answered,
        per_s=_whole(accepted_per_s),
        p50_ms=round(p50, 3),
        p99_ms=round(p99, 3),
        errors=bad,
        seconds=round(accept_s, 3),
    )
    if backend == "sqlite":
        accept_row["target"] = f">= {ACCEPTED_PER_S:g}/s"
        accept_row["verdict"] = verdict(accepted_per_s, ACCEPTED_PER_S, True, "/s")
    if got is None:
        counts = last
        done_s = math.nan
        log(f"{backend}: {ended(last)} of {accepted} ended after {timeout:g} s: {last}")
    else:
        done_s = got[0] - start
        counts = got[1].get(key, {})
    succeeded = counts.get("succeeded", 0)
    completed_per_s = succeeded / done_s if done_s > 0 else math.nan
    complete_row = row(
        backend,
        "async completed: first POST -> last succeeded (/metrics)",
        n=succeeded,
        per_s=_whole(completed_per_s),
        errors=accepted - succeeded,
        seconds=round(done_s, 3),
        target=f">= {COMPLETED_PER_S:g}/s",
        verdict=verdict(completed_per_s, COMPLETED_PER_S, True, "/s")
        if got is not None
        else f"{ended(last)} of {accepted} ended after {timeout:g} s",
    )
    log(
        f"{backend}: {run.answered} answers ({run.unexpected} not 202) in {accept_s:.3f} s, "
        f"server accepted {accepted}; ended {counts} at {done_s:.3f} s; "
        f"/metrics scrape p50 {scrape[0]} ms, p99 {scrape[1]} ms"
    )
    return [accept_row, complete_row], completed_per_s


def half_rate_async(ember: Ember, backend: str, rate: float, seconds: float) -> list[Row]:
    """Phase 3: open loop at RATE for SECONDS; 202 → completion from the records."""
    name = fresh(ember, "noop-half")
    count = max(1, round(rate * seconds))
    req = request("POST", f"/fn-async/{name}", BODY, HEADERS)
    got = produce(ember.port, [req] * count, CONNECTIONS, rate)
    ids = {
        json.loads(body)["id"] for s, body in zip(got.statuses, got.bodies, strict=True) if s == 202
    }
    client = [
        (a - s) * 1000.0
        for st, s, a in zip(got.statuses, got.sent, got.answered, strict=True)
        if st == 202
    ]
    settled = True
    try:
        settle(ember, 30 + len(ids) / 500)
    except TimeoutError as exc:
        settled = False
        log(f"{backend}: half rate: {exc}")
    found = [r for r in records(ember, name) if r["id"] in ids]
    lat = [(r["ended"] - r["accepted"]) * 1000.0 for r in found]
    missing = len(ids) - len(found) if len(ids) <= LIST_LIMIT else 0
    p50, p99 = _ms(lat)
    c50, c99 = _ms(client)
    offered = f"{rate:.0f}/s offered, {got.rate:.0f}/s sent"
    not_202 = len(got.statuses) - len(ids)
    if not_202 or missing or not settled:
        log(
            f"{backend}: half rate: statuses {statuses(got)}; {missing} of {len(ids)} not succeeded"
        )
    return [
        row(
            backend,
            f"async 202 -> completion (server ended - accepted), {offered}",
            n=len(lat),
            per_s=round(got.rate),
            p50_ms=p50,
            p99_ms=p99,
            errors=not_202 + missing,
            target=f"p50 <= {P50_MS:g} ms",
            verdict=verdict(p50, P50_MS, unit=" ms"),
        ),
        row(
            backend,
            f"async 202 answer (client send -> 202), {offered}",
            n=len(client),
            per_s=round(got.rate),
            p50_ms=c50,
            p99_ms=c99,
            errors=not_202,
        ),
    ]


def sync_rows(ember: Ember, backend: str, rate: float, seconds: float) -> list[Row]:
    """Phase 4: POST /fn/noop, wrk -c32, and open loop at RATE."""
    wrk_post(ember.url, "/fn/noop", 200, 1)  # warm-up: instances, connections
    run = wrk_post(ember.url, "/fn/noop", 200, seconds)
    load = run.load
    rows = [
        row(
            backend,
            f"sync POST /fn/noop: wrk -c{CONNECTIONS}, {seconds:g} s",
            n=run.answered,
            per_s=round(load.requests_per_s) if load else math.nan,
            p50_ms=round(load.p50_ms, 3) if load else math.nan,
            p99_ms=round(load.p99_ms, 3) if load else math.nan,
            errors=run.unexpected + (load.errors if load else 0),
        )
    ]
    count = max(1, round(rate * seconds))
    got = produce(
        ember.port, [request("POST", "/fn/noop", BODY, HEADERS)] * count, CONNECTIONS, rate
    )
    lat = [
        (a - s) * 1000.0
        for st, s, a in zip(got.statuses, got.sent, got.answered, strict=True)
        if st == 200
    ]
    p50, p99 = _ms(lat)
    rows.append(
        row(
            backend,
            f"sync POST /fn/noop (client send -> 200), {rate:.0f}/s offered, {got.rate:.0f}/s sent",
            n=len(lat),
            per_s=round(got.rate),
            p50_ms=p50,
            p99_ms=p99,
            errors=len(got.statuses) - len(lat),
        )
    )
    return rows


# ---- fairness ----
@dataclass
class Latencies:
    sync_ms: list[float] = field(default_factory=list)
    async_ms: list[float] = field(default_factory=list)  # 202 -> completion (server)
    accept_ms: list[float] = field(default_factory=list)  # send -> 202 (client)
    errors: int = 0


def probe(ember: Ember, other: str, sync_n: int = 200, async_n: int = 100) -> Latencies:
    """noop's sync latency (1 connection, SYNC_N requests) and OTHER's 202 → completion
    (ASYNC_N invocations at 100/s, open loop)."""
    out = Latencies()
    conn = KeepAlive(ember.port)
    try:
        for _ in range(sync_n):
            got = conn.get("/fn/noop")
            if got.status == 200:
                out.sync_ms.append(got.ms)
            else:
                out.errors += 1
    finally:
        conn.close()
    req = request("POST", f"/fn-async/{other}", BODY, HEADERS)
    sent = produce(ember.port, [req] * async_n, 4, 100.0)
    ids = {json.loads(b)["id"] for s, b in zip(sent.statuses, sent.bodies, strict=True) if s == 202}
    out.errors += async_n - len(ids)
    out.accept_ms = [
        (a - t) * 1000.0
        for st, t, a in zip(sent.statuses, sent.sent, sent.answered, strict=True)
        if st == 202
    ]
    key = qualified(other)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        counts = async_counts(ember.http.get("/metrics").text).get(key, {})
        if ended(counts) >= counts.get("accepted", 0):
            break
        time.sleep(POLL_S)
    found = [r for r in records(ember, other, "succeeded") if r["id"] in ids]
    out.async_ms = [(r["ended"] - r["accepted"]) * 1000.0 for r in found]
    out.errors += len(ids) - len(found)
    return out


def _depth(ember: Ember, name: str) -> int:
    return queue_depths(ember.http.get("/metrics").text).get(qualified(name), 0)


def fairness(ember: Ember, backlog: int) -> tuple[list[Row], list[Row]]:
    """Phase 5; rows of the before/during comparison, and of the backlog itself."""
    fresh(ember, "other")
    before = probe(ember, "other")
    name = fresh(ember, "backlogged", "sleep50", scale={"max": 2})
    log(f"fairness: queueing {backlog:,} invocations of {name}")
    req = request("POST", f"/fn-async/{name}", BODY, HEADERS)
    got = produce(ember.port, [req] * backlog, CONNECTIONS)
    queued = statuses(got)
    time.sleep(1.5)  # the depth in /metrics is read once a second
    depth_before = _depth(ember, name)
    during = probe(ember, "other")
    depth_after = _depth(ember, name)
    counts = async_counts(ember.http.get("/metrics").text).get(qualified(name), {})
    t0 = time.perf_counter()
    resp = ember.http.delete(f"/api/v1/functions/{name}")
    delete_s = time.perf_counter() - t0
    if resp.status_code >= 400:
        log(f"fairness: DELETE {name}: {resp.status_code} {resp.text[:300]}")
    time.sleep(1.5)
    depth_gone = _depth(ember, name)
    a50, a99 = _ms([(a - s) * 1000.0 for s, a in zip(got.sent, got.answered, strict=True)])
    backlog_rows: list[Row] = [
        {
            "step": f"queue {backlog:,} to {name} (producer, {CONNECTIONS} connections)",
            "n": len(got.statuses),
            "per_s": round(got.rate),
            "p50_ms": a50,
            "p99_ms": a99,
            "errors": len(got.statuses) - queued.get(202, 0),
            "note": f"statuses {queued}",
        },
        {
            "step": "queue depth while probing (start, end)",
            "n": f"{depth_before:,}, {depth_after:,}",
            "note": f"{name} ended so far: {ended(counts)}",
        },
        {
            "step": f"DELETE /api/v1/functions/{name}",
            "seconds": round(delete_s, 3),
            "errors": int(resp.status_code >= 400),
            "note": f"HTTP {resp.status_code}; depth 1.5 s later: {depth_gone}",
        },
    ]
    rows = []
    for what, b, d in (
        ("sync GET /fn/noop, 1 connection", before.sync_ms, during.sync_ms),
        ("async other: 202 -> completion, 100/s", before.async_ms, during.async_ms),
        ("async other: client send -> 202, 100/s", before.accept_ms, during.accept_ms),
    ):
        b50, b99 = _ms(b)
        d50, d99 = _ms(d)
        rows.append(
            {
                "measurement": what,
                "n": f"{len(b)}/{len(d)}",
                "before_p50_ms": b50,
                "before_p99_ms": b99,
                "backlog_p50_ms": d50,
                "backlog_p99_ms": d99,
                "x_p50": f"{d50 / b50:.2f}x" if b50 else "",
                "x_p99": f"{d99 / b99:.2f}x" if b99 else "",
            }
        )
    rows[1]["errors"] = f"{before.errors}/{during.errors}"
    return rows, backlog_rows


# ---- the run ----
def backend_rows(ember: Ember, backend: str, n: int, seconds: float) -> list[Row]:
    ember.deploy("noop")
    settle(ember)
    rows, completed = accept_and_complete(ember, backend, n)
    rate = completed / 2 if completed > 0 and not math.isnan(completed) else COMPLETED_PER_S / 2
    settle(ember, 120)
    log(f"{backend}: half the peak: {rate:.0f}/s for {seconds:g} s")
    rows += half_rate_async(ember, backend, rate, seconds)
    settle(ember, 120)
    rows += sync_rows(ember, backend, rate, seconds)
    return rows


def _log_problems(ember: Ember, backend: str) -> int:
    """Log the server's error lines; how many."""
    bad = [
        line
        for line in ember.output().splitlines()
        if any(w in line for w in ("ERROR", "Traceback", "CRITICAL", "Exception"))
    ]
    for line in bad[:20]:
        log(f"{backend} server: {line}")
    return len(bad)


def run(scale: float = 1.0) -> dict[str, Any]:
    quick = scale < 1
    n = 3_000 if quick else 30_000
    seconds = 1.0 if quick else 5.0
    backlog = 5_000 if quick else 100_000
    rows: list[Row] = []
    sections: dict[str, list[Row]] = {}
    problems: dict[str, int] = {}
    for backend in ("sqlite", "nats"):
        log(f"async_invoke: {backend} queue, N={n:,}")
        try:
            with contextlib.ExitStack() as stack:
                extra: list[str] = []
                if backend == "nats":
                    nats = stack.enter_context(Nats())
                    extra = ["--queue", nats.url]
                ember = stack.enter_context(Ember(extra, label=f"ember, {backend} queue"))
                try:
                    rows += backend_rows(ember, backend, n, seconds)
                    if backend == "sqlite":
                        fair, backlog_rows = fairness(ember, backlog)
                        sections[f"fairness with {backlog:,} queued for another function"] = fair
                        sections["the backlog"] = backlog_rows
                finally:
                    problems[backend] = _log_problems(ember, backend)
        except Exception as exc:  # one backend failing still reports the other
            log(f"async_invoke: {backend} failed: {type(exc).__name__}: {exc}")
            last = str(exc).strip().splitlines()
            rows.append(row(backend, "(failed)", errors=1, note=(last[-1] if last else "")[:160]))
    rows.append(
        row(
            "OpenFaaS CE",
            "async accepted (reported figure, not run)",
            per_s=OPENFAAS_CE_ACCEPTED_PER_S,
        )
    )
    return report(
        "async_invoke",
        rows,
        sections,
        note=NOTE,
        n=n,
        seconds=seconds,
        backlog=backlog,
        server_log_errors=problems,
    )


if __name__ == "__main__":
    run()
