"""How many instances a revision should have: a concurrency autoscaler with a panic mode.

`decide(scale, concurrency, window, now)` is pure. The pool feeds the window one sample per
tick (the time-weighted mean of requests in flight or waiting over that tick), calls `decide`,
starts or stops instances to reach `Decision.desired`, and stores the decision's state back.

* desired = ceil(mean concurrency / target) over the **stable window** (`scale.window`,
  default 60 s), clamped to [scale.min, scale.max]; target = `scale.target`, or the
  function's `concurrency` when unset.
* **Panic**: when the mean over the short **panic window** (`scale.panic_window`, 6 s) asks
  for at least twice the instances the scaler itself provided (its previous decision, before
  the scale-down rate limit held instances that requests had started on their own), it
  follows the short window, and keeps doing so until a whole stable window has passed without
  that condition. It never scales down while panicking. (Requests start instances of their
  own when none is free, so the running count already follows a burst within milliseconds;
  compared with it, a burst would never look like one.)
* **Scale-down** is rate limited: at most one step every `DOWN_STEP` seconds, each to no fewer
  than ceil(current / scale.down_rate) instances, and never below what the panic window asks
  for (a panic that ends during a burst does not drop instances the burst still uses).
  Averaging over the stable window is what keeps an oscillating load from flapping.
* **Scale to zero** (to scale.min) after no request for `scale.idle` seconds (the idle grace,
  default 60 s), even if the stable window still remembers load; the rate limit does not
  apply then (every instance was idle that long). Within the grace one instance stays.
* **A manual scale** (`ember scale N`) is a hold, not a floor: the scaler targets exactly N
  (within [scale.min, scale.max]) until `held_until`, then decides again. Requests still start
  instances of their own when none is free; the hold brings the count back to N once they are
  idle.

Starting an instance costs milliseconds here, so requests also start instances themselves
when none is free; the scaler's job is keeping enough warm for bursts and releasing the rest.
"""

from __future__ import annotations

import math
from collections import deque

import msgspec

from ember.spec import ScaleSpec

PANIC_FACTOR = 2.0  # the short window must ask for this many times the current instances
DOWN_STEP = 2.0  # seconds between two scale-down steps
_EPSILON = 1e-9  # 2.0000001 requests over a target of 1 still wants 2 instances, not 3


class Window:
    """Concurrency samples of one revision, oldest first, and the scaler's carried state."""

    def __init__(self, span: float) -> None:
        self.span = span  # how much history to keep (the stable window)
        self.samples: deque[tuple[float, float]] = deque()  # (end of tick, mean concurrency)
        self.instances = 0  # running and starting, when the sample was taken
        self.last_active = -math.inf  # last time any request was in flight or waiting
        self.last = Decision(desired=0)  # the previous decision: its panic and scale-down times
        self.held, self.held_until = 0, -math.inf  # `ember scale N`: exactly N until then

    def add(self, now: float, concurrency: float, instances: int, active: bool) -> None:
        self.samples.append((now, concurrency))
        while self.samples and self.samples[0][0] <= now - self.span:
            self.samples.popleft()
        self.instances = instances
        if active:
            self.last_active = now

    def idle_until(self, now: float, every: float) -> None:
        """No request came since the last sample and no sample was taken (the pool stops
        stepping a revision with nothing to decide): add the zero samples taken every `every`
        seconds up to `now` would have left, those still within the window."""
        last = self.samples[-1][0] if self.samples else now - self.span
        t = max(last, now - self.span) + every
        while t <= now - every:
            self.samples.append((t, 0.0))
            t += every

    def mean(self, now: float, span: float) -> float:
        """Mean over the samples of the last `span` seconds (all there are, if younger)."""
        total, n = 0.0, 0
        for t, value in reversed(self.samples):
            if t <= now - span:
                break
            total += value
            n += 1
        return total / n if n else 0.0

    def keep(self, decision: Decision) -> None:
        self.last = decision


class Decision(msgspec.Struct, frozen=True):
    desired: int
    wanted: int = 0  # what the windows asked for, before the scale-down rate limit held more
    panic: bool = False
    stable: float = 0.0  # mean concurrency over the stable window
    short: float = 0.0  # over the panic window
    panic_until: float = -math.inf
    last_down: float = -math.inf


def decide(scale: ScaleSpec, concurrency: int, window: Window, now: float) -> Decision:
    target = scale.target or float(concurrency)
    current = window.instances
    stable = window.mean(now, scale.window)
    short = window.mean(now, scale.panic_window)
    want_stable = _instances(stable, target)
    want_short = _instances(short, target)
    panic_until = window.last.panic_until
    # Compared with what the scaler itself last asked for: a rate-limited scale-down holds
    # the instances requests started on their own, which the scaler did not provide.
    if want_short >= PANIC_FACTOR * max(window.last.wanted, 1):
        panic_until = now + scale.window
    last_down = window.last.last_down
    if now - window.last_active >= scale.idle:
        panic_until = -math.inf  # no request for the whole grace: straight to scale.min
    panic = now < panic_until
    if now - window.last_active >= scale.idle:
        desired = wanted = 0
    elif panic:
        desired = wanted = max(want_short, want_stable, current)
    else:
        desired = want_stable
        if desired < current:  # never below what the last seconds needed
            desired = max(desired, min(want_short, current))
        if desired == 0:
            desired = min(current, 1)  # within the idle grace: keep one
        wanted = desired
        if desired < current:
            if now - last_down < DOWN_STEP:
                desired = current
            else:
                desired = max(desired, math.ceil(current / scale.down_rate))
    if now < window.held_until:  # `ember scale N` holds exactly N until then
        desired = wanted = window.held
    desired = max(scale.min, min(scale.max, desired))
    wanted = max(scale.min, min(scale.max, wanted))
    if desired < current:
        last_down = now
    return Decision(
        desired=desired,
        wanted=wanted,
        panic=panic,
        stable=stable,
        short=short,
        panic_until=panic_until,
        last_down=last_down,
    )


def _instances(concurrency: float, target: float) -> int:
    return max(0, math.ceil(concurrency / target - _EPSILON))
