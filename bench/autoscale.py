"""Autoscaler: the reaction to a step of load, and instances over time for a burst.

Both run against a real `ember up` (as root: with the sandbox) serving `sleep20`, a handler that
sleeps 20 ms and returns its pid, at concurrency 1. Load comes from closed-loop clients (asyncio
on uvloop, one kept-alive connection each, opened before the load starts): each sends its next
request as soon as the previous response is in. While the load runs, a thread reads the
revision's counts from `GET /api/v1/functions/NAME` every 100 ms.

1. **Step from 1 to 50 clients**, `scale.max: 100`, the default windows (stable 60 s, panic
   6 s): 1 client for 10 s, then 50 for 10 s. Reported: the steady p99 of 1 client (over the
   last half of its phase) and of 50 clients (likewise); `recovered_s`, the time from the step
   to the first 0.25 s bucket of completed requests whose p99 is under 2x the 1-client p99
   (NaN: none is), and `later_spikes`, how many later buckets are over it again; the p99 of
   the first bucket after the step and of the worst; the most instances (idle + busy +
   starting) the API showed after the step and when, when 50 had started (idle or busy:
   `ready_at_s`) and when the API first showed the scaler in panic, all to the 100 ms of the
   sampling; how many instances served the steady half (distinct pids); failed requests
   (non-200, errors, timeouts).

   Baseline in the same run: the same step against the same server with `scale: {min: 50}`,
   so 50 instances wait before the step. That is the ideal reaction, so the difference between
   the two rows is what scaling up on demand costs; what both share (50 clients on 2 cores,
   the client included) is not the autoscaler's. Bare uvicorn is no baseline here:
   bench/baseline_app.py calls the handler inline on its event loop, so a handler that sleeps
   serialises the 50 clients (each request would wait ~1 s).

2. **Instances over time for a burst**: an idle function (no instance), then 60 clients for
   5 s, then none; counts sampled for 20 s from the start of the burst. It is deployed with
   `scale: {window: 10s, panic_window: 2s, idle: 5s, max: 100}`, shorter than the defaults
   (60 s, 6 s, 60 s) so that scale-down and scale to zero happen within the run. A second table
   has one row a second: the maximum of each count over that second's samples, whether any
   sample was in panic, and the requests completed in that second with their p99. The summary
   row: peak instances and when, when 60 had started, the first and last sample in panic, when
   the count reached 0 for good, and how often it rose again after the burst (flapping).
   `desired` and `panic` come from the function's `autoscaler` in the API (n/a where the
   server does not report it).

3. **0 → 100 concurrent instances** (a burst of single requests from zero): bench/burst.py.

python -m bench.autoscale            # about 65 s
python -m bench.autoscale --quick    # 3 s + 3 s steps, a 2 s burst seen until back to 0: ~25 s
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import threading
import time
from dataclasses import dataclass
from typing import Any

import httpx
import msgspec
import psutil
import uvloop

from bench.common import Row, log, percentile, report, table, wait_for
from bench.servers import Ember

FUNCTION = "sleep20"
STEP_CLIENTS = 50
BURST_CLIENTS = 60
BUCKET = 0.25  # seconds of completed requests in one rolling-p99 bucket
RECOVERED = 2.0  # "recovered" = bucket p99 under this times the 1-client p99
SAMPLE = 0.1  # seconds between two reads of the instance counts
TIMEOUT = 30.0  # seconds before a request counts as failed
BURST_SCALE = {"window": "10s", "panic_window": "2s", "idle": "5s", "max": 100}


@dataclass(frozen=True)
class Done:
    at: float  # perf_counter() when the response was read (or the request failed)
    ms: float
    ok: bool
    body: bytes


@dataclass(frozen=True)
class Sample:
    at: float  # perf_counter()
    idle: int
    busy: int
    starting: int
    waiting: int
    desired: int | None  # None: the API does not report it
    panic: bool | None

    @property
    def instances(self) -> int:
        return self.idle + self.busy + self.starting


# ---- closed-loop clients ----
Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def _connect(port: int) -> Conn:
    return await asyncio.open_connection("127.0.0.1", port)


def _length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            return int(line[15:])
    return 0


async def _client(port: int, path: str, begin: float, end: float, out: list[Done]) -> None:
    """From `begin` to `end` (perf_counter), one request after the other on one connection;
    a failed request is recorded, and the next one gets a new connection."""
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    conn: Conn | None = await _connect(port)
    await asyncio.sleep(max(0.0, begin - time.perf_counter()))
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(TIMEOUT):
                reader, writer = conn = conn or await _connect(port)
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                body = await reader.readexactly(_length(head))
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
            t1 = time.perf_counter()
            out.append(Done(t1, (t1 - t0) * 1000.0, False, repr(e).encode()))
            if conn is not None:
                conn[1].close()
            conn = None
            await asyncio.sleep(0.01)  # a refused connection must not spin
            continue
        t1 = time.perf_counter()
        out.append(Done(t1, (t1 - t0) * 1000.0, head.startswith(b"HTTP/1.1 200"), body))
        if b"connection: close" in head.lower():
            writer.close()
            conn = None
    if conn is not None:
        conn[1].close()


def load(port: int, path: str, spans: list[tuple[float, float]]) -> tuple[float, list[Done]]:
    """One client per (begin, end) offset pair, in seconds from t0 (returned with the results)."""

    async def main() -> tuple[float, list[Done]]:
        out: list[Done] = []
        t0 = time.perf_counter() + 0.2  # time to open every connection first
        await asyncio.gather(
            *(_client(port, path, t0 + begin, t0 + end, out) for begin, end in spans)
        )
        return t0, out

    return uvloop.run(main())


# ---- the instance counts, read from the API in a thread ----
def _reported(info: dict[str, Any], key: str) -> Any:
    """The autoscaler's KEY from a function's info (`autoscaler`), None if not reported."""
    place = info.get("autoscaler")
    return place.get(key) if isinstance(place, dict) else None


class Sampler(threading.Thread):
    """Reads NAME's counts every SAMPLE seconds until `until` (perf_counter), or until the
    count has been 0 for a second after `zero_after`, when that is set."""

    def __init__(self, ember: Ember, name: str, until: float) -> None:
        super().__init__(daemon=True)
        self.ember, self.name, self.until = ember, name, until
        self.zero_after = math.inf
        self.samples: list[Sample] = []

    def run(self) -> None:
        while time.perf_counter() < self.until and not self._settled():
            try:
                info = self.ember.info(self.name)
            except httpx.HTTPError as e:
                log(f"autoscale: could not read the counts of {self.name}: {e!r}")
                time.sleep(SAMPLE)
                continue
            counts = info["instances"]
            desired, panic = _reported(info, "desired"), _reported(info, "panic")
            self.samples.append(
                Sample(
                    time.perf_counter(),
                    counts["idle"],
                    counts["busy"],
                    counts["starting"],
                    counts["waiting"],
                    None if desired is None else int(desired),
                    None if panic is None else bool(panic),
                )
            )
            time.sleep(SAMPLE)

    def _settled(self) -> bool:
        last = [s for s in self.samples if s.at >= max(self.zero_after, time.perf_counter() - 1)]
        return len(last) >= 5 and all(s.instances == 0 for s in last)


# ---- analysis ----
def _p99(done: list[Done]) -> float:
    return round(percentile([d.ms for d in done], 99), 3)


def _between(done: list[Done], start: float, end: float) -> list[Done]:
    return [d for d in done if start <= d.at < end]


def buckets(done: list[Done], start: float, end: float) -> list[tuple[float, int, float]]:
    """(offset from start, requests, p99 ms) of each BUCKET seconds of completed requests."""
    out = []
    for i in range(math.ceil((end - start) / BUCKET - 1e-9)):
        got = _between(done, start + i * BUCKET, start + (i + 1) * BUCKET)
        out.append((round(i * BUCKET, 3), len(got), _p99(got)))
    return out


def recovered(series: list[tuple[float, int, float]], limit: float) -> tuple[float, int]:
    """Seconds until the first bucket whose p99 is under `limit` (NaN: none is), and how many
    later buckets are over it again."""
    first = next((i for i, (_, _, p99) in enumerate(series) if p99 < limit), None)
    if first is None:
        return math.nan, 0
    return series[first][0], sum(not p99 < limit for _, _, p99 in series[first:])


def _pids(done: list[Done]) -> set[int]:
    pids = set()
    for d in done:
        if d.ok:
            pids.add(int(msgspec.json.decode(d.body)["pid"]))
    return pids


def _first_error(done: list[Done]) -> str:
    failed = next((d for d in done if not d.ok), None)
    return "" if failed is None else failed.body[:300].decode(errors="replace")


# ---- 1. the step ----
def _wait_instances(ember: Ember, name: str, n: int) -> None:
    def ready() -> bool:
        return int(ember.info(name)["instances"]["idle"]) >= n

    wait_for(ready, 30, f"{n} idle instances of {name}")


def _delete(ember: Ember, name: str) -> None:
    """Delete NAME and wait for its instances to exit (memory for the next deploy)."""
    zygote = ember.function_zygote(name)
    ember.http.delete(f"/api/v1/functions/{name}").raise_for_status()
    if zygote is not None:

        def gone() -> bool:
            try:
                return not zygote.children()
            except psutil.NoSuchProcess:
                return True

        wait_for(gone, 30, f"the instances of {name} to exit")


def step(ember: Ember, label: str, name: str, quiet: float, loud: float) -> tuple[Row, Any]:
    path = f"/fn/{name}"
    end = quiet + loud
    sampler = Sampler(ember, name, time.perf_counter() + end + 1.0)
    sampler.start()
    spans = [(0.0, end)] + [(quiet, end)] * (STEP_CLIENTS - 1)
    t0, done = load(ember.port, path, spans)
    sampler.join()
    at = t0 + quiet  # the step
    one = _between(done, at - quiet / 2, at)
    many = _between(done, at + loud / 2, t0 + end)
    series = buckets(done, at, t0 + end)
    p99_one = _p99(one)
    back, spikes = recovered(series, RECOVERED * p99_one)
    after = [s for s in sampler.samples if s.at >= at]
    peak = max(after, key=lambda s: s.instances, default=None)
    panic_from, _ = _panic(after, at)
    failed = sum(not d.ok for d in done)
    if failed:
        log(f"autoscale: {label}: {failed} failed requests; first: {_first_error(done)}")
    row: Row = {
        "scenario": f"step 1 → {STEP_CLIENTS} clients: {label}",
        "p99_1c_ms": p99_one,
        "p99_50c_ms": _p99(many),
        "req_per_s_50c": round(len(many) / (loud / 2)),
        "recovered_s": back,
        "later_spikes": spikes,
        "first_bucket_ms": series[0][2],
        "worst_bucket_ms": max(p99 for _, _, p99 in series),
        "peak_instances": peak.instances if peak else 0,
        "peak_at_s": round(peak.at - at, 2) if peak else math.nan,
        "ready_at_s": _ready_at(after, STEP_CLIENTS, at),
        "panic_at_s": panic_from,
        "pids_used": len(_pids(many)),
        "failed": failed,
    }
    return row, {"buckets": series, "requests": len(done)}


# ---- 2. the burst ----
def _second_rows(samples: list[Sample], done: list[Done], t0: float, seconds: int) -> list[Row]:
    rows = []
    for i in range(seconds):
        got = [s for s in samples if t0 + i <= s.at < t0 + i + 1]
        if not got:
            continue
        desired = [s.desired for s in got if s.desired is not None]
        panic = [s.panic for s in got if s.panic is not None]
        finished = _between(done, t0 + i, t0 + i + 1)
        rows.append(
            {
                "t_s": i,
                "instances": max(s.instances for s in got),
                "busy": max(s.busy for s in got),
                "starting": max(s.starting for s in got),
                "waiting": max(s.waiting for s in got),
                "desired": max(desired) if desired else "n/a",
                "panic": any(panic) if panic else "n/a",
                "done": len(finished),
                "p99_ms": _p99(finished) if finished else "",
            }
        )
    return rows


def _rises(samples: list[Sample]) -> int:
    return sum(b.instances > a.instances for a, b in itertools.pairwise(samples))


def _ready_at(samples: list[Sample], n: int, origin: float) -> float:
    """Seconds from `origin` to the first sample with n instances started (idle or busy)."""
    return next((round(s.at - origin, 2) for s in samples if s.idle + s.busy >= n), math.nan)


def _panic(samples: list[Sample], origin: float) -> tuple[float, float]:
    """Seconds from `origin` to the first and the last sample in panic (NaN: none was)."""
    panicked = [s.at - origin for s in samples if s.panic]
    if not panicked:
        return math.nan, math.nan
    return round(panicked[0], 2), round(panicked[-1], 2)


def burst(ember: Ember, name: str, seconds: float, observe: float, quick: bool) -> tuple[Row, Any]:
    """The counts for `observe` seconds from the start of a burst of `seconds`; with `quick`,
    only until they have been 0 for a second after the burst."""
    ember.drain(name, 30)
    sampler = Sampler(ember, name, time.perf_counter() + 0.2 + observe)
    if quick:
        sampler.zero_after = time.perf_counter() + 0.2 + seconds
    sampler.start()
    t0, done = load(ember.port, f"/fn/{name}", [(0.0, seconds)] * BURST_CLIENTS)
    sampler.join()
    samples = sampler.samples
    peak = max(samples, key=lambda s: s.instances)
    ended = [s for s in samples if s.at >= t0 + seconds]
    last = max((i for i, s in enumerate(ended) if s.instances), default=-1)
    zero_at = ended[last + 1].at - t0 if last + 1 < len(ended) else math.nan
    panic_from, panic_to = _panic(samples, t0)
    failed = sum(not d.ok for d in done)
    if failed:
        log(f"autoscale: burst: {failed} failed requests; first: {_first_error(done)}")
    row: Row = {
        "scenario": f"burst: {BURST_CLIENTS} clients for {seconds:g} s",
        "p99_ms": _p99(done),
        "peak_instances": peak.instances,
        "peak_at_s": round(peak.at - t0, 2),
        "ready_at_s": _ready_at(samples, BURST_CLIENTS, t0),
        "panic_at_s": panic_from,
        "panic_to_s": panic_to,
        "zero_at_s": round(zero_at, 2),
        "rises_after_burst": _rises(ended),
        "pids_used": len(_pids(done)),
        "failed": failed,
    }
    return row, _second_rows(samples, done, t0, math.ceil(observe))


def run(scale: float = 1.0) -> dict[str, Any]:
    quiet, loud = max(3.0, 10 * scale), max(3.0, 10 * scale)
    burst_s, observe = max(2.0, 5 * scale), 20.0
    rows: list[Row] = []
    extra: dict[str, Any] = {}
    with Ember() as ember:
        log(f"autoscale: step 1 → {STEP_CLIENTS} clients ({quiet:g} s + {loud:g} s), twice")
        ember.deploy(FUNCTION, "step", scale={"max": 100})
        row, extra["step_autoscaled"] = step(ember, "autoscaled", "step", quiet, loud)
        rows.append(row)
        _delete(ember, "step")
        ember.deploy(FUNCTION, "step-min50", scale={"min": STEP_CLIENTS, "max": 100})
        _wait_instances(ember, "step-min50", STEP_CLIENTS)
        row, extra["step_prescaled"] = step(ember, "pre-scaled, min 50", "step-min50", quiet, loud)
        rows.append(row)
        _delete(ember, "step-min50")
        seen = "until back to 0" if scale < 1 else f"{observe:g} s seen"
        log(f"autoscale: burst of {BURST_CLIENTS} clients for {burst_s:g} s, {seen}")
        ember.deploy(FUNCTION, "burst", scale=BURST_SCALE)
        row, series = burst(ember, "burst", burst_s, observe, quick=scale < 1)
        rows.append(row)
    doc = report("autoscale", rows, burst_series=series, burst_scale=BURST_SCALE, **extra)
    print(f"== autoscale: the burst, one row a second ==\n{table(series)}\n", flush=True)
    return doc


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.autoscale", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="shorter phases (about 25 s)")
    run(0.25 if parser.parse_args().quick else 1.0)
