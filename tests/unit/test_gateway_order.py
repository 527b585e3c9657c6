"""The gateway answers first and records after: the activation record, the metrics and the
rollout's outcome counts are not on the caller's path."""

from __future__ import annotations

import asyncio

from ember.auth import KeyTable
from ember.gateway.app import Exchange, Gateway, Response
from ember.gateway.router import RouteTable
from ember.pool.instance import Instance
from ember.pool.target import Target
from ember.spec import FunctionSpec
from ember.telemetry.buffer import TelemetryBuffer
from ember.telemetry.metrics import Metrics
from ember.telemetry.outcomes import Outcomes
from ember.wire.messages import Result

TARGET = Target("fn", 1, "0" * 64, "/nonexistent", FunctionSpec(name="fn"))


def test_the_response_goes_out_before_the_invocation_is_recorded() -> None:
    async def main() -> None:
        telemetry = TelemetryBuffer(64 * 1024)
        gateway = Gateway(
            RouteTable(),
            None,  # type: ignore[arg-type]  # the pool: not asked once a result is in
            telemetry,
            Metrics(list),
            KeyTable(),
            1024 * 1024,
            Outcomes(),
            1024 * 1024,
        )
        exchange = Exchange(gateway, "GET", "/fn/fn", b"/fn/fn", b"", [])
        exchange.target = TARGET
        recorded_at_reply: list[int] = []

        def reply(response: Response) -> None:
            recorded_at_reply.append(len(telemetry.activations))

        exchange.reply = reply
        inst = Instance("fn-1-abc", 1, lambda _i, _m: None, lambda _i: None)
        exchange.resolved(Result("r0", 200, [], b"ok"), "warm", inst)
        assert recorded_at_reply == [0]  # nothing recorded when the answer went out
        assert [a.status for a in telemetry.activations] == [200]  # recorded right after

    asyncio.run(main())
