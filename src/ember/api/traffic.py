"""Revisions and traffic: aliases and weights, rollback, and gradual rollouts stepped once a
second by `rollout.step`. It moves the store's pointers, reloads the function and publishes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Protocol

import msgspec

from ember import manifest
from ember.api import rollout as rollouts
from ember.api.bundles import Bundles
from ember.api.functions import Functions
from ember.api.names import qualified
from ember.api.publisher import Publisher
from ember.api.schemas import CanaryPlan
from ember.errors import NotFound, UserError
from ember.gateway.router import BUCKETS
from ember.pool.target import Target
from ember.spec import FunctionSpec
from ember.store.base import (
    Alias,
    FunctionRecord,
    Rollout,
    Store,
    effective_revision,
)
from ember.telemetry.outcomes import Outcomes
from ember.wire.messages import ZygoteReady

log = logging.getLogger("ember.api")

ROLLOUT_TICK = 1.0  # seconds between rollout checks


class WarmingPool(Protocol):
    async def prepare(self, target: Target) -> ZygoteReady: ...


class Traffic:
    def __init__(
        self,
        store: Store,
        functions: Functions,
        bundles: Bundles,
        publisher: Publisher,
        pool: WarmingPool,
        outcomes: Outcomes,
        writes: asyncio.Lock,
    ) -> None:
        self.store = store
        self.functions = functions
        self.bundles = bundles
        self.publisher = publisher
        self.pool = pool
        self.outcomes = outcomes  # of the revisions a rollout watches
        self.writes = writes
        self._rollout_task: asyncio.Task[None] | None = None

    # ---- revisions and traffic ----
    def check_canary(self, namespace: str, specs: list[FunctionSpec], plan: CanaryPlan) -> None:
        if not 0 < plan.percent < 100 or not 0 < plan.step <= 100:
            raise UserError(
                f"--canary {plan.percent} and --step {plan.step} must be percentages: canary "
                "1-99, step 1-100, e.g. --canary 10 --step 10",
                code="bad_rollout",
            )
        if plan.every < 1 or not 0 <= plan.max_error_rate <= 1 or plan.max_p99_ms < 0:
            raise UserError(
                f"--every {plan.every:g} s must be at least 1 s, --max-error-rate "
                f"{plan.max_error_rate:g} a fraction 0-1 (e.g. 1%), --max-p99 >= 0",
                code="bad_rollout",
            )
        for spec in specs:
            key = qualified(namespace, spec.name)
            if self.functions.serving(key) is None:
                raise UserError(
                    f"function '{spec.name}' has no revision yet, so there is nothing to compare "
                    "a canary with; deploy it without --canary first",
                    code="no_stable_revision",
                    status=409,
                )

    async def route_new_revision(
        self,
        key: str,
        serving: FunctionRecord | None,
        number: int,
        canary: CanaryPlan | None,
        now: float,
    ) -> None:
        """A deploy stored revision `number`: start its rollout, or end the one it replaces."""
        if serving is None:
            return  # the function's first revision serves everything
        if canary is not None:
            if serving.rollout is not None:  # a new rollout replaces a running one
                self.outcomes.unwatch(key, serving.rollout.to_revision)
            await self._start_rollout(key, serving, number, canary, now)
        elif serving.rollout is not None:
            await self._supersede(key, "a plain deploy replaced it", now)

    async def _start_rollout(
        self, key: str, serving: FunctionRecord, number: int, plan: CanaryPlan, now: float
    ) -> None:
        """The new revision gets `percent` of the traffic as alias `canary`, the serving one
        the rest as `stable`; the rollout loop moves the weights from here."""
        stable = serving.revision
        rollout = Rollout(
            from_revision=stable,
            to_revision=number,
            weight=plan.percent,
            step=plan.step,
            every=plan.every,
            max_error_rate=plan.max_error_rate,
            max_p99_ms=plan.max_p99_ms,
            reason=f"{plan.percent}% on {number}",
            started_at=now,
            updated_at=now,
            next_at=now + plan.every,
        )
        aliases = _with_weights(
            serving.aliases,
            {"stable": (stable, 100 - plan.percent), "canary": (number, plan.percent)},
        )
        await self.store.set_traffic(key, stable, serving.previous, aliases, rollout, now)
        self.outcomes.take(key, number)
        self.outcomes.watch(key, number)
        log.info("rollout of %s: %d%% on revision %d", key, plan.percent, number)

    async def _supersede(self, key: str, why: str, now: float) -> None:
        fn = await self.store.function(key)
        if fn is None or fn.rollout is None or fn.rollout.state != "running":
            return
        ended = msgspec.structs.replace(fn.rollout, state="superseded", reason=why, updated_at=now)
        await self.store.set_traffic(key, fn.revision, fn.previous, fn.aliases, ended, now)
        self.outcomes.unwatch(key, fn.rollout.to_revision)

    async def set_traffic(self, namespace: str, name: str, aliases: list[Alias]) -> FunctionRecord:
        """`ember traffic NAME stable=3:90 canary=4:10`: the whole alias table at once."""
        key = qualified(namespace, name)
        async with self.writes:
            fn = self._record(namespace, name)
            numbers = {r.number for r in await self.store.revisions(key)}
            _check_aliases(name, aliases, numbers)
            await self._warm([a.revision for a in aliases if a.weight], key)
            now = time.time()
            rollout = fn.rollout
            if rollout is not None and rollout.state == "running":
                rollout = msgspec.structs.replace(
                    rollout, state="superseded", reason="traffic set by hand", updated_at=now
                )
                self.outcomes.unwatch(key, rollout.to_revision)
            await self.store.set_traffic(key, fn.revision, fn.previous, aliases, rollout, now)
            return await self._reload(key)

    async def rollback(self, namespace: str, name: str, to: int = 0) -> FunctionRecord:
        """All traffic to one revision in one step: `to`, else the running rollout's stable
        revision, else the one that served before. Aliases stay, their weights go."""
        key = qualified(namespace, name)
        async with self.writes:
            fn = self._record(namespace, name)
            running = fn.rollout is not None and fn.rollout.state == "running"
            if not to:
                if running:
                    assert fn.rollout is not None
                    to = fn.rollout.from_revision
                elif fn.previous:
                    to = fn.previous
                else:
                    raise UserError(
                        f"function '{name}' has no earlier revision to roll back to; list "
                        f"them with `ember revisions {name}` and pass --to N",
                        code="no_previous_revision",
                        status=409,
                    )
            await self._move_all(key, fn, to, "rolled back by hand")
            return self._recorded(key)

    async def _move_all(self, key: str, fn: FunctionRecord, to: int, why: str) -> None:
        if await self.store.revision(key, to) is None:
            numbers = [r.number for r in await self.store.revisions(key)]
            raise NotFound(
                f"function '{key.partition('/')[2]}' has no revision {to}; it has "
                f"{', '.join(map(str, numbers))}"
            )
        await self._warm([to], key)  # the revision imports before any request reaches it
        now = time.time()
        rollout = fn.rollout
        if rollout is not None and rollout.state == "running":
            rollout = msgspec.structs.replace(
                rollout,
                state="rolled_back",
                reason=f"rolled back to {to}: {why}",
                updated_at=now,
            )
            self.outcomes.unwatch(key, rollout.to_revision)
        serving = effective_revision(fn.revision, fn.aliases)
        previous = serving if to != serving else fn.previous
        aliases = [msgspec.structs.replace(a, weight=0) for a in fn.aliases]
        await self.store.set_traffic(key, to, previous, aliases, rollout, now)
        await self._reload(key)
        log.info("%s: all traffic to revision %d (%s)", key, to, why)

    async def _warm(self, numbers: list[int], key: str) -> None:
        """Start the zygotes of revisions about to get traffic: a failed import refuses the
        change (422) while the current routes keep serving."""
        for number in set(numbers):
            rec = await self.store.revision(key, number)
            if rec is None:
                continue
            await self.bundles.ensure_code(rec.bundle)
            await self.bundles.layers.ensure_installed(rec.layer)
            current = self.functions.revisions(key).get(number)
            await self.pool.prepare(
                current if current is not None else self.functions.target_of(rec)
            )

    def _record(self, namespace: str, name: str) -> FunctionRecord:
        self.functions.require(namespace, name)
        return self._recorded(qualified(namespace, name))

    def _recorded(self, key: str) -> FunctionRecord:
        fn = self.functions.record(key)
        assert fn is not None
        return fn

    async def _reload(self, key: str) -> FunctionRecord:
        await self.functions.load(key)
        self.publisher.publish()
        return self._recorded(key)

    def forget(self, key: str) -> None:
        """`ember rm`: a running rollout's canary is not watched any more."""
        fn = self.functions.record(key)
        if fn is not None and fn.rollout is not None:
            self.outcomes.unwatch(key, fn.rollout.to_revision)

    # ---- rollouts ----
    def start(self) -> None:
        for key in self.functions.qualified_names():
            fn = self._recorded(key)
            if fn.rollout is not None and fn.rollout.state == "running":
                self.outcomes.watch(key, fn.rollout.to_revision)
        self._rollout_task = asyncio.get_running_loop().create_task(self._rollout_loop())

    async def stop(self) -> None:
        if self._rollout_task is not None:
            self._rollout_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._rollout_task

    async def _rollout_loop(self) -> None:
        while True:
            await asyncio.sleep(ROLLOUT_TICK)
            for key in self.functions.qualified_names():
                try:
                    await self.advance_rollout(key, time.time())
                except Exception:  # one function's rollout must not stop the others
                    log.exception("rollout of %s failed to advance", key)

    async def advance_rollout(self, key: str, now: float) -> None:
        fn = self.functions.record(key)
        if fn is None or fn.rollout is None or fn.rollout.state != "running":
            return
        rollout = fn.rollout
        summary = self.outcomes.peek(key, rollout.to_revision)
        updated, verdict = rollouts.step(rollout, summary, now)
        if verdict is rollouts.Verdict.WAIT:
            return
        async with self.writes:
            fn = self.functions.record(key)
            if fn is None or fn.rollout != rollout:  # changed meanwhile
                return
            self.outcomes.take(key, rollout.to_revision)
            await self._apply_step(key, fn, rollout, updated, verdict, now)
            await self._reload(key)

    async def _apply_step(
        self,
        key: str,
        fn: FunctionRecord,
        rollout: Rollout,
        updated: Rollout,
        verdict: rollouts.Verdict,
        now: float,
    ) -> None:
        """Store the step's weights: all back to stable, all to the canary, or one step on."""
        if verdict is rollouts.Verdict.ROLL_BACK:
            log.warning("%s: %s", key, updated.reason)
            aliases = [msgspec.structs.replace(a, weight=0) for a in fn.aliases]
            await self.store.set_traffic(
                key, rollout.from_revision, fn.previous, aliases, updated, now
            )
            self.outcomes.unwatch(key, rollout.to_revision)
        elif verdict is rollouts.Verdict.DONE:
            aliases = _with_weights(fn.aliases, {"stable": (rollout.to_revision, 0)})
            aliases = [a for a in aliases if a.name != "canary"]
            await self.store.set_traffic(
                key, rollout.to_revision, rollout.from_revision, aliases, updated, now
            )
            self.outcomes.unwatch(key, rollout.to_revision)
            log.info("%s: rollout done, revision %d serves all", key, rollout.to_revision)
        else:
            aliases = _with_weights(
                fn.aliases,
                {
                    "stable": (rollout.from_revision, 100 - updated.weight),
                    "canary": (rollout.to_revision, updated.weight),
                },
            )
            await self.store.set_traffic(key, fn.revision, fn.previous, aliases, updated, now)
            log.info("%s: rollout at %d%%", key, updated.weight)


def _with_weights(aliases: list[Alias], changes: dict[str, tuple[int, int]]) -> list[Alias]:
    """Every other alias keeps its revision at weight 0; `changes` (name → revision, weight)
    are set or added."""
    out = [msgspec.structs.replace(a, weight=0) for a in aliases if a.name not in changes]
    out += [Alias(name, revision, weight) for name, (revision, weight) in changes.items()]
    return out


def _check_aliases(name: str, aliases: list[Alias], numbers: set[int]) -> None:
    seen: set[str] = set()
    for alias in aliases:
        if not manifest.NAME_RE.match(alias.name) or alias.name == "latest":
            raise UserError(
                f"alias {alias.name[:64]!r} is invalid: {manifest.NAME_RULE}; 'latest' is "
                "reserved (it always names the newest revision)",
                code="bad_alias",
            )
        if alias.name in seen:
            raise UserError(f"alias '{alias.name}' is given twice", code="bad_alias")
        seen.add(alias.name)
        if alias.revision not in numbers:
            raise UserError(
                f"alias '{alias.name}': function '{name}' has no revision {alias.revision} "
                f"(it has {', '.join(map(str, sorted(numbers)))})",
                code="bad_alias",
                status=422,
            )
        if not 0 <= alias.weight <= 100:
            raise UserError(
                f"alias '{alias.name}': weight {alias.weight} must be 0-100 (%)", code="bad_alias"
            )
    total = sum(a.weight for a in aliases)
    if total not in (0, BUCKETS):
        raise UserError(
            f"the weights add up to {total}%; they must add up to 100 (or all be 0 to only "
            "name revisions), e.g. stable=3:90 canary=4:10",
            code="bad_weights",
        )
