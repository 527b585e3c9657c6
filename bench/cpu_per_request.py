"""Diagnostic: CPU time per warm request, by party, for Ember, the plain app and the relay floor.

Throughput on a 2-core machine is bounded by the CPU each request costs all parties together
(the HTTP server, the processes that run the code, and wrk itself), so this prints, for the
same no-op JSON answer under `wrk -t2 -c32` and `wrk -t1 -c1`:

* `plain`: the plain Starlette app on uvicorn (bench/plain_app.py), one process;
* `relay floor`: bench/relay_floor.py, httptools relaying a frame to one of 10 forked workers,
  the least any front + worker-process design does per request;
* `ember`: `ember up` with `noop` deployed with default settings but `scale.min: 2`.

CPU time comes from the processes' own accounting (user + system, psutil; wrk's from
`os.times()` of this process's children), divided by the requests wrk completed; unlike
requests per second it barely depends on what else runs on the machine.

    python -m bench.cpu_per_request [--quick]
"""

from __future__ import annotations

import argparse
import os
import socket
from typing import Any

import psutil

from bench.common import PYTHON, Row, log, report
from bench.servers import Ember, Plain, _Process
from bench.wrk import load

PATH = "/fn/noop"


class RelayFloor(_Process):
    name = "relay-floor"

    def command(self) -> list[str]:
        return [PYTHON, "-m", "bench.relay_floor", "--port", str(self.port), "--workers", "10"]

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited:\n{self.output()}")
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            return False
        return True


def _cpu(proc: psutil.Process) -> float:
    try:
        times = proc.cpu_times()
    except psutil.Error:  # gone meanwhile
        return 0.0
    return float(times.user + times.system)


def _measure(label: str, server: Any, connections: int, seconds: float) -> Row:
    top = psutil.Process(server.pid)
    others = top.children(recursive=True)
    before = [_cpu(p) for p in (top, *others)]
    children = os.times()
    got = load(server.url, server.port, PATH, connections, seconds)
    after = os.times()
    spent = [_cpu(p) - b for p, b in zip((top, *others), before, strict=True)]
    wrk = (after.children_user - children.children_user) + (
        after.children_system - children.children_system
    )
    requests = max(1.0, got.requests_per_s * seconds)
    return {
        "server": label,
        "connections": connections,
        "req_per_s": round(got.requests_per_s),
        "p50_ms": round(got.p50_ms, 3),
        "front_us": round(1e6 * spent[0] / requests, 1),
        "workers_us": round(1e6 * sum(spent[1:]) / requests, 1),
        "wrk_us": round(1e6 * wrk / requests, 1),
        "total_us": round(1e6 * (sum(spent) + wrk) / requests, 1),
        "errors": got.errors,
    }


def run(scale: float = 1.0) -> dict[str, Any]:
    seconds = max(1.0, round(5 * scale))
    rows: list[Row] = []
    with Plain() as plain, RelayFloor() as floor, Ember() as ember:
        ember.deploy("noop", scale={"min": 2})
        servers = [("plain", plain), ("relay floor", floor), ("ember", ember)]
        for _, server in servers:
            load(server.url, server.port, PATH, 32, 1)  # warm-up; Ember scales up
        for connections in (32, 1):
            log(f"cpu_per_request: {connections} connections, {seconds:g} s each")
            rows += [_measure(label, s, connections, seconds) for label, s in servers]
    return report("cpu_per_request", rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    run(0.4 if parser.parse_args().quick else 1.0)


if __name__ == "__main__":
    main()
