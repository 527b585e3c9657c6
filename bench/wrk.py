"""Run wrk (or the Python fallback) and parse its `--latency` report."""

from __future__ import annotations

import re
import shutil
import subprocess

from bench.client import Load, python_load

_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([0-9.]+)(us|ms|s)", text.strip()).groups()  # type: ignore[union-attr]
    return float(number) * _UNITS[unit]


def parse(output: str) -> Load:
    rps = float(re.search(r"Requests/sec:\s+([0-9.]+)", output).group(1))  # type: ignore[union-attr]
    pct = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", output, re.M))
    errors = 0
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    if non2xx:
        errors += int(non2xx.group(1))
    sock = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if sock:
        errors += sum(int(g) for g in sock.groups())
    return Load(rps, _ms(pct["50"]), _ms(pct["99"]), errors, "wrk")


def load(url: str, port: int, path: str, connections: int, seconds: float) -> Load:
    """`wrk -t2 -cN -dS --latency` (one thread for one connection); Python client if no wrk."""
    wrk = shutil.which("wrk")
    if wrk is None:
        return python_load(port, path, connections, seconds)
    threads = min(2, connections)
    cmd = [wrk, f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", "--latency", url + path]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return parse(out)
