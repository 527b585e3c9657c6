"""When each key next needs attention: a heap of deadlines, so a periodic loop touches only
what is due, however many keys sleep.

`at(key, when)` sets (or moves) a key's one deadline; `wake(key)` makes it due at the next
`due()`, whatever clock that is given; `due(now)` pops every key whose deadline has come.
Moved deadlines leave stale heap entries behind, skipped when popped and compacted away when
they outnumber the live ones.
"""

from __future__ import annotations

import heapq
import itertools
import math
from typing import Generic, TypeVar

K = TypeVar("K")  # hashable


class Deadlines(Generic[K]):
    def __init__(self) -> None:
        self._when: dict[K, float] = {}
        self._heap: list[tuple[float, int, K]] = []
        self._seq = itertools.count()  # ties keep their order; keys are never compared

    def at(self, key: K, when: float) -> None:
        if self._when.get(key) == when:
            return
        self._when[key] = when
        heapq.heappush(self._heap, (when, next(self._seq), key))
        if len(self._heap) > 2 * len(self._when) + 64:
            self._compact()

    def wake(self, key: K) -> None:
        """Due at the next `due()`."""
        self.at(key, -math.inf)

    def discard(self, key: K) -> None:
        self._when.pop(key, None)

    def due(self, now: float, limit: int | None = None) -> list[K]:
        """Keys whose deadline is `now` or earlier (at most `limit`), earliest first; each
        loses its deadline."""
        out: list[K] = []
        heap = self._heap
        while heap and heap[0][0] <= now and (limit is None or len(out) < limit):
            when, _, key = heapq.heappop(heap)
            if self._when.get(key) == when:
                del self._when[key]
                out.append(key)
        return out

    def when(self, key: K) -> float | None:
        return self._when.get(key)

    def _compact(self) -> None:
        self._heap = [(w, s, k) for w, s, k in self._heap if self._when.get(k) == w]
        heapq.heapify(self._heap)

    def __len__(self) -> int:
        return len(self._when)

    @property
    def entries(self) -> int:
        """Heap entries, stale ones included (bounded by about twice the keys)."""
        return len(self._heap)
