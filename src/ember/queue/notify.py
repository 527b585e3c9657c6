"""What is sent when an async invocation ends: its `X-Callback-Url` (OpenFaaS's shape: the
function's answer POSTed with `X-Call-Id`, `X-Function-Status`, `X-Duration-Seconds`) and its
function's `async.on_success` / `async.on_failure` destination (the whole record, as the API
shows it: to another function through the queue, to a URL, or to a NATS subject).

An invocation that ends with something to send is saved with `notify` set, in the same write
as its end; once everything is sent (or given up on after bounded retries) `notify` is cleared.
A server that stopped in between sends it again when it starts: at least once, like the
invocation itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from ember.gateway.rules import request_id
from ember.queue.base import SUCCEEDED, Invocation, Queue
from ember.queue.views import info
from ember.spec import AsyncSpec, Destination

log = logging.getLogger("ember.queue")

RETRY_WAITS = (1.0, 2.0, 4.0)  # seconds before the 2nd, 3rd and 4th try of a POST
POST_TIMEOUT = 10.0
FAILURES = frozenset({"failed", "dead", "expired"})
_json = msgspec.json.Encoder()


def destination_for(inv: Invocation, spec: AsyncSpec) -> Destination | None:
    if inv.status == SUCCEEDED:
        return spec.on_success
    if inv.status in FAILURES:
        return spec.on_failure
    return None  # cancelled: the caller chose it


class Notifier:
    def __init__(
        self, queue: Queue, enqueue: Callable[[Invocation], Awaitable[Invocation]]
    ) -> None:
        self.queue = queue
        self.enqueue = enqueue
        self._client: Any = None  # httpx.AsyncClient, made at the first POST

    def wanted(self, inv: Invocation, spec: AsyncSpec) -> bool:
        return bool(inv.callback) or destination_for(inv, spec) is not None

    async def send(self, inv: Invocation, spec: AsyncSpec) -> None:
        """Send what the ended invocation owes, then clear its `notify`."""
        try:
            if inv.callback:
                await self._post(inv.callback, *self._callback(inv), what=f"callback of {inv.id}")
            dest = destination_for(inv, spec)
            if dest is not None:
                await self._destination(inv, dest)
        except Exception:
            log.exception("sending the end of async invocation %s failed", inv.id)
        inv.notify = False
        try:
            await self.queue.save(inv)
        except Exception:
            log.exception("saving async invocation %s failed", inv.id)

    def _callback(self, inv: Invocation) -> tuple[bytes, list[tuple[str, str]]]:
        result = inv.result
        last = inv.attempts[-1] if inv.attempts else None
        headers = [
            ("X-Call-Id", inv.id),
            ("X-Function-Name", inv.function.partition("/")[2]),
            ("X-Function-Status", str(result.status if result is not None else 0)),
            ("X-Duration-Seconds", f"{(last.duration_ms if last else 0.0) / 1000.0:.6f}"),
            ("X-Ember-Invocation-Status", inv.status),
        ]
        if result is None:
            return b"", headers
        for name, value in result.headers:
            if name == b"content-type":
                headers.append(("Content-Type", value.decode("latin-1")))
        return result.body, headers

    async def _destination(self, inv: Invocation, dest: Destination) -> None:
        record = _json.encode(info(inv))
        if dest.url:
            headers = [("Content-Type", "application/json"), ("X-Call-Id", inv.id)]
            await self._post(dest.url, record, headers, what=f"destination of {inv.id}")
        elif dest.subject:
            publish = getattr(self.queue, "publish", None)
            if publish is None:
                log.warning(
                    "async invocation %s: destination subject %r needs the NATS queue "
                    "(ember up --queue nats://...); not sent",
                    inv.id,
                    dest.subject,
                )
                return
            await publish(dest.subject, record)
        elif dest.function:
            namespace = inv.function.partition("/")[0]
            path = (
                f"/fn/{dest.function}"
                if namespace == "default"
                else (f"/fn/{namespace}/{dest.function}")
            )
            await self.enqueue(
                Invocation(
                    id=request_id(),
                    function=f"{namespace}/{dest.function}",
                    method="POST",
                    path=path,
                    raw_path=path,
                    query=b"",
                    headers=[
                        (b"content-type", b"application/json"),
                        (b"x-ember-source-invocation", inv.id.encode()),
                    ],
                    body=record,
                    accepted=time.time(),
                    authorized=True,  # the function's own namespace sends it
                    not_before=time.time(),
                )
            )

    async def _post(self, url: str, body: bytes, headers: list[tuple[str, str]], what: str) -> None:
        """POST with bounded retries: connection errors, 5xx and 429 are tried again."""
        import httpx

        if self._client is None:
            self._client = httpx.AsyncClient(timeout=POST_TIMEOUT, follow_redirects=False)
        for attempt, wait in enumerate((0.0, *RETRY_WAITS), start=1):
            if wait:
                await asyncio.sleep(wait)
            try:
                resp = await self._client.post(url, content=body, headers=headers)
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if resp.status_code < 400:
                    return
                problem = f"answered {resp.status_code}"
                if resp.status_code < 500 and resp.status_code != 429:
                    break
            log.info("%s to %s: try %d %s", what, url, attempt, problem)
        log.warning("%s to %s given up: %s", what, url, problem)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
