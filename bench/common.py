"""Shared helpers: paths, waiting, percentiles, and `report()` (one JSON line plus a table)."""

from __future__ import annotations

import json
import math
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FUNCTIONS = Path(__file__).resolve().parent / "functions"
RESULTS = Path(__file__).resolve().parent / "results"
PYTHON = sys.executable

Row = dict[str, Any]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "it") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.002)
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summary(values_ms: Sequence[float]) -> dict[str, float]:
    """n, p50, p90, p99, min, max of a list of milliseconds, rounded for printing."""
    return {
        "n": len(values_ms),
        "p50": round(percentile(values_ms, 50), 3),
        "p90": round(percentile(values_ms, 90), 3),
        "p99": round(percentile(values_ms, 99), 3),
        "min": round(min(values_ms), 3) if values_ms else math.nan,
        "max": round(max(values_ms), 3) if values_ms else math.nan,
    }


def verdict(value: float, limit: float, higher_is_better: bool = False, unit: str = "") -> str:
    """`ok`, or how far off the target is (absolute, in `unit`, and relative)."""
    if math.isnan(value):
        return "n/a"
    good = value >= limit if higher_is_better else value <= limit
    if good:
        return "ok"
    miss = limit - value if higher_is_better else value - limit
    return f"MISS by {miss:.4g}{unit} ({miss / limit:.0%})"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def table(rows: Sequence[Row]) -> str:
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    cells = [[_cell(row.get(col, "")) for col in columns] for row in rows]
    widths = [max(len(col), *(len(r[i]) for r in cells)) for i, col in enumerate(columns)]
    lines = ["  ".join(col.ljust(w) for col, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def report(
    name: str, rows: Sequence[Row], sections: dict[str, list[Row]] | None = None, **extra: Any
) -> dict[str, Any]:
    """Print one JSON line and a plain text table (and one per section, when rows of different
    columns are better apart); return the JSON document."""
    doc: dict[str, Any] = {"benchmark": name, "rows": list(rows), **extra}
    if sections:
        doc["sections"] = sections
    print(json.dumps(doc, default=str), flush=True)
    print(f"\n== {name} ==\n{table(rows)}\n", flush=True)
    for title, section in (sections or {}).items():
        print(f"== {name}: {title} ==\n{table(section)}\n", flush=True)
    return doc


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def latency_row(fn: str, what: str, values: list[float], target: str = "", ok: str = "") -> Row:
    """One table row of latency percentiles for a measurement of a function."""
    s = summary(values)
    return {
        "function": fn,
        "measurement": what,
        "n": s["n"],
        "p50_ms": s["p50"],
        "p99_ms": s["p99"],
        "max_ms": s["max"],
        "target": target,
        "verdict": ok,
    }


def judged_row(fn: str, what: str, values: list[float], p50: float, p99: float | None) -> Row:
    """`latency_row` with a verdict on its p50 (and p99, when given) against targets in ms."""
    s = summary(values)
    target, ok = f"p50 <= {p50:g}", verdict(s["p50"], p50, unit=" ms")
    if p99 is not None:
        target += f", p99 <= {p99:g}"
        p99_ok = verdict(s["p99"], p99, unit=" ms")
        if p99_ok != "ok":
            ok = f"p99 {p99_ok}" if ok == "ok" else f"p50 {ok}; p99 {p99_ok}"
    return latency_row(fn, what, values, target, ok)
