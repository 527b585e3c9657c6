"""The handler's view of an invocation: `Request`, `Context`, `Response` and `on_fork`."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

if TYPE_CHECKING:
    from ember.runtime.events import Carried, CloudEvent

_fork_hooks: list[Callable[[], object]] = []


def on_fork(fn: Callable[[], object]) -> Callable[[], object]:
    """Register `fn` to run in every new instance right after it is forked from the zygote.

    Use it to reopen connections, restart threads, or reseed generators the runtime does not know.
    """
    _fork_hooks.append(fn)
    return fn


def fork_hooks() -> list[Callable[[], object]]:
    return list(_fork_hooks)


class MultiDict(Mapping[str, str]):
    """A read-only multi-valued mapping; `[key]`/`get` give the first value, `getall` every one."""

    __slots__ = ("_fold", "_items")

    def __init__(self, items: list[tuple[str, str]], *, fold: bool = False) -> None:
        self._fold = fold
        self._items = [(k.lower() if fold else k, v) for k, v in items]

    def _key(self, key: str) -> str:
        return key.lower() if self._fold else key

    def __getitem__(self, key: str) -> str:
        key = self._key(key)
        for k, v in self._items:
            if k == key:
                return v
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys(k for k, _ in self._items))

    def __len__(self) -> int:
        return len(dict.fromkeys(k for k, _ in self._items))

    def getall(self, key: str) -> list[str]:
        key = self._key(key)
        return [v for k, v in self._items if k == key]

    def items_all(self) -> list[tuple[str, str]]:
        return list(self._items)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._items!r})"


class Request:
    """One HTTP request as the function sees it. `path` is what follows /fn/NAME, percent-decoded;
    `raw_path` the same part exactly as sent, percent-encoding kept (`a%2Fb` stays one segment)."""

    __slots__ = (
        "_carried",
        "_headers",
        "_query",
        "_sent",
        "body",
        "method",
        "path",
        "query_string",
        "raw_path",
    )

    def __init__(
        self,
        method: str,
        path: str,
        query_string: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        raw_path: str | None = None,
    ) -> None:
        self.method = method
        self.path = path
        self.raw_path = path if raw_path is None else raw_path
        self.query_string = query_string
        self._sent = headers
        self._headers: MultiDict | None = None
        self.body = body
        self._query: MultiDict | None = None
        self._carried: Carried | None = None

    @property
    def headers(self) -> MultiDict:
        """Names case-insensitive; decoded when first read (a handler that never reads them
        costs nothing for them)."""
        if self._headers is None:
            pairs = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in self._sent]
            self._headers = MultiDict(pairs, fold=True)
        return self._headers

    @property
    def query(self) -> MultiDict:
        if self._query is None:
            pairs = parse_qsl(self.query_string.decode("latin-1"), keep_blank_values=True)
            self._query = MultiDict(pairs)
        return self._query

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def event(self) -> CloudEvent | None:
        """The CloudEvent the request carries in binary or structured mode (parsed when first
        read); None if it carries none. ValueError if it is malformed, or a batch (`events`)."""
        return self._cloudevents().one()

    @property
    def events(self) -> list[CloudEvent]:
        """The events of a batch, or [event], or [] (ValueError if malformed)."""
        return list(self._cloudevents().events)

    def _cloudevents(self) -> Carried:
        if self._carried is None:
            from ember.runtime import events  # on first use: most requests carry none

            self._carried = events.parse(self._sent, self.body)
        return self._carried


class Context:
    """Facts about the invocation: ids, limits, the deadline, and a logger."""

    __slots__ = ("deadline", "function", "log", "memory_mb", "request_id", "revision")

    def __init__(
        self,
        request_id: str,
        function: str,
        revision: int,
        memory_mb: int,
        deadline: float,
        log: logging.Logger,
    ) -> None:
        self.request_id = request_id
        self.function = function
        self.revision = revision
        self.memory_mb = memory_mb
        self.deadline = deadline
        self.log = log

    def remaining_ms(self) -> float:
        return max(0.0, (self.deadline - time.time()) * 1000.0)


class Response:
    """An explicit response: body (bytes, str, or JSON-able), status, headers."""

    __slots__ = ("body", "content_type", "headers", "status")

    def __init__(
        self,
        body: object = b"",
        status: int = 200,
        headers: Mapping[str, str] | None = None,
        content_type: str | None = None,
    ) -> None:
        self.body = body
        self.status = status
        self.headers = dict(headers or {})
        self.content_type = content_type
