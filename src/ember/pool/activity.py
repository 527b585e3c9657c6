"""When each function was last busy, and its idle times: what the zygote keep-alive decides on.

A function's activity starts when its first request (on any revision) begins and ends when its
last one finishes; the gap to the next start is one idle time in its histogram
(`autoscaler/histogram.py`). State is per function ("namespace/name") and goes with
`forget()` when the function is removed.
"""

from __future__ import annotations

from ember.autoscaler.histogram import IdleHistogram, Windows, windows


class Activity:
    def __init__(self, fixed_keepalive: float) -> None:
        self.fixed_keepalive = fixed_keepalive  # until a histogram is representative
        self.histograms: dict[str, IdleHistogram] = {}
        self._busy: dict[str, int] = {}  # revisions of the function with requests now
        self._idle_since: dict[str, float] = {}  # end of the function's last activity

    def record(self, function: str, busy: bool, now: float) -> bool:
        """A revision of `function` got its first request in flight, or its last one done;
        True when that turned the function as a whole busy, or idle."""
        count = self._busy.get(function, 0)
        if busy:
            if count == 0 and function in self._idle_since:
                hist = self.histograms.get(function)
                if hist is None:  # not setdefault: that built a 240-bin histogram per request
                    hist = self.histograms[function] = IdleHistogram()
                hist.record(now - self._idle_since[function])
            self._busy[function] = count + 1
            return count == 0
        if count <= 1:
            self._busy.pop(function, None)
            self._idle_since[function] = now
            return count == 1
        self._busy[function] = count - 1
        return False

    def busy(self, function: str) -> bool:
        return function in self._busy

    def idle_since(self, function: str) -> float | None:
        return self._idle_since.get(function)

    def windows(self, function: str) -> Windows:
        hist = self.histograms.get(function)
        if hist is None:
            return Windows(0.0, self.fixed_keepalive, False, "fixed: no idle times yet")
        return windows(hist, self.fixed_keepalive)

    def forget(self, function: str) -> None:
        """The function was removed: nothing of it stays."""
        self.histograms.pop(function, None)
        self._busy.pop(function, None)
        self._idle_since.pop(function, None)

    def __len__(self) -> int:
        """Functions with any state here (for tests of pruning)."""
        return len(self.histograms.keys() | self._busy.keys() | self._idle_since.keys())
