"""A recording `Events` for tests of one source against its real broker (no Ember server)."""

from __future__ import annotations

import asyncio

from ember.triggers.base import Message


class Sink:
    """Takes up to `limit` messages unacknowledged, like a trigger with that concurrency."""

    def __init__(self, limit: int = 16, id: str = "t1") -> None:
        self.id, self.function, self.name = id, "default/fn", "t"
        self.limit = limit
        self.held = 0
        self.messages: asyncio.Queue[Message] = asyncio.Queue()
        self.states: list[str] = []
        self.errors: list[str] = []
        self.pending = -1
        self.state = b""
        self._room = asyncio.Condition()

    @property
    def room(self) -> int:
        return self.limit - self.held

    async def put(self, message: Message) -> None:
        async with self._room:
            await self._room.wait_for(lambda: self.held < self.limit)
            self.held += 1
        self.messages.put_nowait(message)

    async def free(self) -> int:
        async with self._room:
            await self._room.wait_for(lambda: self.held <= self.limit // 2)
            return self.limit - self.held

    async def done(self) -> None:
        """A message the test has acked or nacked: room for one more."""
        async with self._room:
            self.held -= 1
            self._room.notify_all()

    async def get(self, timeout: float = 10.0) -> Message:
        return await asyncio.wait_for(self.messages.get(), timeout)

    def connected(self) -> None:
        self.states.append("running")

    def failing(self, error: str) -> None:
        self.states.append("failing")
        self.errors.append(error)

    def backlog(self, pending: int, oldest: float = 0.0) -> None:
        self.pending = pending

    async def load_state(self) -> bytes:
        return self.state

    async def save_state(self, state: bytes) -> None:
        self.state = state
