"""Events from NATS JetStream to a function through an Ember trigger, against the baseline a
user would write instead: a bare nats-py pull subscriber calling the same handler in-process.
Both run in this one process run, on the same throwaway `nats-server -js`.

1. **events/s acknowledged**: N messages (full 30,000, quick 3,000) are published to a stream
   first; then the consumer starts, and the clock runs until every one is acknowledged
   (the stream's consumer shows no message pending or unacknowledged; polled every 20 ms).
   - Ember: `POST /api/v1/functions/ev-noop/triggers` adds a `jetstream` trigger
     (`deliver: all`, default delivery: direct, concurrency 16) to bench/functions/noop
     (defaults: `scale.max` 10, one request per instance), deployed and called once before;
     the clock starts at that POST.
   - baseline: a durable pull consumer; `fetch(64)`, then for each message the noop's
     `handle(req, ctx)` called in this process and `msg.ack()`.
2. **publish → handler start at half that rate**: a publisher in this process sends core NATS
   publishes (stored by the stream) at half the rate Ember reached in 1 (the same rate for the
   baseline, whose publisher, pull loop and collector share this process), for 5 s (quick 1 s),
   each carrying its `time.time()`; bench/functions/stamp reports its start (`time.time()`
   first thing in the handler) over UDP to a collector here: latency = start - publish. The
   baseline calls the same handler module in-process from its pull loop.

Targets (the issue): >= 3,000 events/s acknowledged on 2 cores (about 2x Nuclio's published
~1,600 events/s per Python worker), p50 publish -> handler start <= 2 ms at half rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import time
from types import ModuleType
from typing import Any

import nats

from bench.common import FUNCTIONS, Row, free_port, log, percentile, report, verdict
from bench.servers import Ember, Nats

NUCLIO_PYTHON_PER_WORKER = 1_600  # events/s, Nuclio's published Python figure (not run here)
TARGET_RATE, TARGET_P50_MS = 3_000.0, 2.0
FETCH = 64
NOTE = (
    "events/s: N published first, then time until all acknowledged; latency: publish -> "
    "handler start at half each side's rate (UDP stamps from the handler)"
)


class _Req:
    """What the in-process baseline hands the handler: the parts it reads."""

    __slots__ = ("body", "headers")

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.headers: dict[str, str] = {}


def _handler(function: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        f"bench_{function}", FUNCTIONS / function / "handler.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def _stream(nc: Any, name: str) -> None:
    js = nc.jetstream()
    with contextlib.suppress(Exception):
        await js.delete_stream(name)
    await js.add_stream(name=name, subjects=[f"{name.lower()}.>"])


async def _preload(nc: Any, name: str, n: int) -> None:
    """N messages into the stream (core publishes, then a wait until the stream holds them)."""
    subject = f"{name.lower()}.x"
    for i in range(n):
        await nc.publish(subject, b'{"n": 1}')
        if i % 1000 == 999:
            await nc.flush()
    await nc.flush()
    js = nc.jetstream()
    while (await js.stream_info(name)).state.messages < n:
        await asyncio.sleep(0.01)


async def _drained(nc: Any, name: str) -> bool:
    js = nc.jetstream()
    consumers = await js.consumers_info(name)
    return bool(consumers) and all(c.num_pending == 0 and c.num_ack_pending == 0 for c in consumers)


async def _ember_rate(ember: Ember, url: str, n: int) -> float:
    nc = await nats.connect(url)
    try:
        await _stream(nc, "EVRATE")
        await _preload(nc, "EVRATE", n)
        trigger = {"type": "jetstream", "name": "bench", "url": url, "stream": "EVRATE"}
        trigger["deliver"] = "all"
        start = time.perf_counter()
        resp = ember.http.post("/api/v1/functions/ev-noop/triggers", json={"trigger": trigger})
        if resp.status_code != 201:
            raise RuntimeError(f"adding the trigger: {resp.status_code} {resp.text[:300]}")
        while not await _drained(nc, "EVRATE"):
            await asyncio.sleep(0.02)
        elapsed = time.perf_counter() - start
        ember.http.delete("/api/v1/functions/ev-noop/triggers/bench")
        return n / elapsed
    finally:
        await nc.close()


async def _baseline_rate(url: str, n: int) -> float:
    noop = _handler("noop")
    nc = await nats.connect(url)
    try:
        await _stream(nc, "BASERATE")
        await _preload(nc, "BASERATE", n)
        js = nc.jetstream()
        start = time.perf_counter()
        sub = await js.pull_subscribe("baserate.>", durable="base", stream="BASERATE")
        done = 0
        while done < n:
            for msg in await sub.fetch(FETCH, timeout=5):
                noop.handle(_Req(msg.data), None)
                await msg.ack()
                done += 1
        while not await _drained(nc, "BASERATE"):
            await asyncio.sleep(0.02)
        return n / (time.perf_counter() - start)
    finally:
        await nc.close()


class _Collector(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.latencies_ms: list[float] = []

    def datagram_received(self, data: bytes, addr: Any) -> None:
        published, _, started = data.partition(b" ")
        self.latencies_ms.append((float(started) - float(published)) * 1000.0)


async def _publish_at(nc: Any, subject: str, rate: float, seconds: float) -> int:
    """Open loop: message i is sent at start + i / rate (late ones go at once)."""
    interval, start, sent = 1.0 / rate, time.perf_counter(), 0
    while (elapsed := time.perf_counter() - start) < seconds:
        due = int(elapsed / interval) + 1
        while sent < due:
            await nc.publish(subject, repr(time.time()).encode())
            sent += 1
        await asyncio.sleep(max(0.0, sent * interval - (time.perf_counter() - start)))
    await nc.flush()
    return sent


async def _ember_latency(
    ember: Ember, url: str, port: int, rate: float, seconds: float
) -> list[float]:
    loop = asyncio.get_running_loop()
    collector = _Collector()
    transport, _ = await loop.create_datagram_endpoint(lambda: collector, ("127.0.0.1", port))
    nc = await nats.connect(url)
    try:
        await _stream(nc, "EVLAT")
        trigger = {"type": "jetstream", "name": "lat", "url": url, "stream": "EVLAT"}
        resp = ember.http.post("/api/v1/functions/ev-stamp/triggers", json={"trigger": trigger})
        if resp.status_code != 201:
            raise RuntimeError(f"adding the trigger: {resp.status_code} {resp.text[:300]}")
        await asyncio.sleep(0.5)  # the consumer is made and pulling
        sent = await _publish_at(nc, "evlat.x", rate, seconds)
        deadline = time.monotonic() + 30
        while len(collector.latencies_ms) < sent and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return collector.latencies_ms
    finally:
        await nc.close()
        transport.close()


async def _baseline_latency(url: str, port: int, rate: float, seconds: float) -> list[float]:
    os.environ["STAMP_ADDR"] = f"127.0.0.1:{port}"
    stamp = _handler("stamp")
    loop = asyncio.get_running_loop()
    collector = _Collector()
    transport, _ = await loop.create_datagram_endpoint(lambda: collector, ("127.0.0.1", port))
    nc = await nats.connect(url)
    try:
        await _stream(nc, "BASELAT")
        js = nc.jetstream()
        sub = await js.pull_subscribe("baselat.>", durable="lat", stream="BASELAT")
        stop = asyncio.Event()

        async def consume() -> None:
            while not stop.is_set():
                try:
                    msgs = await sub.fetch(FETCH, timeout=0.5)
                except TimeoutError:
                    continue
                for msg in msgs:
                    stamp.handle(_Req(msg.data), None)
                    await msg.ack()

        consumer = asyncio.create_task(consume())
        await asyncio.sleep(0.2)
        sent = await _publish_at(nc, "baselat.x", rate, seconds)
        deadline = time.monotonic() + 30
        while len(collector.latencies_ms) < sent and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        stop.set()
        await consumer
        return collector.latencies_ms
    finally:
        await nc.close()
        transport.close()


def _latency_row(side: str, rate: float, values: list[float]) -> Row:
    p50 = round(percentile(values, 50), 3)
    return {
        "side": side,
        "measurement": f"publish -> handler start at {rate:,.0f}/s",
        "n": len(values),
        "p50_ms": p50,
        "p99_ms": round(percentile(values, 99), 3),
        "target": f"p50 <= {TARGET_P50_MS:g} ms" if side == "ember" else "",
        "verdict": verdict(p50, TARGET_P50_MS, unit=" ms") if side == "ember" else "",
    }


def run(scale: float = 1.0) -> dict[str, Any]:
    quick = scale < 1
    n = 3_000 if quick else 30_000
    seconds = 1.0 if quick else 5.0
    port = free_port()
    rows: list[Row] = []
    with Nats() as broker, Ember(label="ember") as ember:
        log(f"triggers_nats: N={n:,}")
        ember.deploy("noop", "ev-noop")
        ember.deploy("stamp", "ev-stamp", env={"STAMP_ADDR": f"127.0.0.1:{port}"})
        for name in ("ev-noop", "ev-stamp"):  # their first instances forked
            ember.http.post(f"/fn/{name}", content=b"0").raise_for_status()
        ember_rate = asyncio.run(_ember_rate(ember, broker.url, n))
        base_rate = asyncio.run(_baseline_rate(broker.url, n))
        rows.append(
            {
                "side": "ember",
                "measurement": "events/s acknowledged (JetStream -> noop)",
                "per_s": round(ember_rate),
                "target": f">= {TARGET_RATE:,.0f}/s",
                "verdict": verdict(ember_rate, TARGET_RATE, higher_is_better=True, unit="/s"),
            }
        )
        rows.append(
            {
                "side": "bare nats-py subscriber",
                "measurement": "events/s acknowledged (handler in-process)",
                "per_s": round(base_rate),
            }
        )
        rows.append(
            {
                "side": "Nuclio (reported, not run)",
                "measurement": "events/s per Python worker",
                "per_s": NUCLIO_PYTHON_PER_WORKER,
            }
        )
        ember_lat = asyncio.run(_ember_latency(ember, broker.url, port, ember_rate / 2, seconds))
        base_lat = asyncio.run(_baseline_latency(broker.url, port, ember_rate / 2, seconds))
        rows.append(_latency_row("ember", ember_rate / 2, ember_lat))
        rows.append(_latency_row("bare nats-py subscriber", ember_rate / 2, base_lat))
    return report("triggers_nats", rows, note=NOTE, n=n, seconds=seconds)


if __name__ == "__main__":
    run()
