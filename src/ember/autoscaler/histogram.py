"""When to keep a function's zygote loaded, learned from its idle times.

The hybrid histogram policy of Shahrad et al., "Serverless in the Wild: Characterizing and
Optimizing the Serverless Workload at a Large Cloud Provider" (USENIX ATC'20). Each function
keeps a histogram of its idle times (end of activity to next invocation). When the histogram is
representative, the zygote is unloaded at the end of activity, loaded again at the head of the
distribution (the pre-warm window) and kept until its tail (the keep-alive window); otherwise it
stays loaded for a fixed keep-alive from the end of activity.

From the paper: 1-minute bins over a 4-hour range, the 5th and 99th percentiles as head and tail,
a 10 % margin on each, and a coefficient of variation of the bin counts of 2 as the threshold
for a representative histogram. Ours: `MIN_SAMPLES`, the half-out-of-bounds rule, and the fixed
fallback, where the paper forecasts mostly out-of-bounds functions with ARIMA.

`windows()` and `loaded()` are pure; the caller records idle times and passes elapsed time in.
"""

from __future__ import annotations

import math

import msgspec

BINS = 240  # 4 hours
BIN_S = 60.0
HEAD_PERCENTILE = 5.0
TAIL_PERCENTILE = 99.0
MARGIN = 0.10
MIN_CV = 2.0
MIN_SAMPLES = 10
MAX_OUT_OF_BOUNDS = 0.5  # fraction of all idle times


class IdleHistogram:
    """Counts of one function's idle times in fixed bins; the rest in `out_of_bounds`."""

    def __init__(self, bins: int = BINS, bin_s: float = BIN_S) -> None:
        if bins < 1 or bin_s <= 0:
            raise ValueError(f"histogram needs bins >= 1 and bin_s > 0, got {bins}, {bin_s}")
        self.bin_s = bin_s
        self.counts = [0] * bins
        self.total = 0
        self.out_of_bounds = 0

    @property
    def range_s(self) -> float:
        return len(self.counts) * self.bin_s

    def record(self, idle_s: float) -> None:
        """Count one idle time, in seconds; the range's upper edge is out of bounds."""
        if not idle_s >= 0:
            raise ValueError(f"an idle time must be a number >= 0 seconds, got {idle_s}")
        index = int(idle_s // self.bin_s) if idle_s < self.range_s else len(self.counts)
        if index >= len(self.counts):
            self.out_of_bounds += 1
            return
        self.counts[index] += 1
        self.total += 1


class Windows(msgspec.Struct, frozen=True):
    prewarm: float  # seconds after the end of activity to (re)load the zygote; 0 = keep it
    keepalive: float  # seconds it stays loaded after the prewarm point
    representative: bool
    reason: str


def _cv(counts: list[int], total: int) -> float:
    """Coefficient of variation (population) of the bin counts."""
    mean = total / len(counts)
    variance = sum(c * c for c in counts) / len(counts) - mean * mean
    return math.sqrt(max(variance, 0.0)) / mean


def _percentile_bin(counts: list[int], total: int, q: float) -> int:
    """Index of the first bin at which the cumulative count reaches q % of the total."""
    need = total * q / 100.0
    seen = 0
    for index, count in enumerate(counts):
        seen += count
        if seen >= need:
            return index
    return len(counts) - 1


def windows(hist: IdleHistogram, fixed_keepalive: float) -> Windows:
    """Pre-warm and keep-alive windows from the histogram, or the fixed keep-alive."""
    total, oob = hist.total, hist.out_of_bounds

    def fixed(why: str) -> Windows:
        return Windows(0.0, fixed_keepalive, representative=False, reason=why)

    if total < MIN_SAMPLES:
        return fixed(f"fixed: {total} idle times in range < {MIN_SAMPLES}")
    if oob > MAX_OUT_OF_BOUNDS * (total + oob):
        return fixed(f"fixed: {oob} of {total + oob} idle times beyond {hist.range_s:g} s")
    cv = _cv(hist.counts, total)
    if cv < MIN_CV:
        return fixed(f"fixed: bin count CV {cv:.2f} < {MIN_CV:g}")
    head = _percentile_bin(hist.counts, total, HEAD_PERCENTILE)
    tail = _percentile_bin(hist.counts, total, TAIL_PERCENTILE)
    prewarm = math.floor(round(head * hist.bin_s * (1 - MARGIN), 6))  # whole seconds, down
    end = math.ceil(round((tail + 1) * hist.bin_s * (1 + MARGIN), 6))  # and up
    keepalive = max(end - prewarm, hist.bin_s)
    reason = f"p{HEAD_PERCENTILE:g} bin {head}, p{TAIL_PERCENTILE:g} bin {tail}, CV {cv:.2f}"
    return Windows(float(prewarm), float(keepalive), representative=True, reason=reason)


def loaded(w: Windows, idle_for: float) -> bool:
    """Whether the zygote should be loaded `idle_for` seconds after the end of activity."""
    return w.prewarm <= idle_for < w.prewarm + w.keepalive
