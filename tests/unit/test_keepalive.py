"""`decide()` as a table of named scenarios on a fake clock."""

from __future__ import annotations

import pytest

from ember.autoscaler.keepalive import Decision, PoolView, decide
from ember.spec import ScaleSpec

KEEPALIVE = 600.0


def view(
    idle: list[tuple[str, float]] | None = None,
    busy: int = 0,
    starting: int = 0,
    waiting: int = 0,
    zygote: bool = True,
    used: float = 0.0,
    retired: bool = False,
) -> PoolView:
    return PoolView(
        idle=idle or [],
        busy=busy,
        starting=starting,
        waiting=waiting,
        zygote=zygote,
        zygote_last_used=used,
        retired=retired,
    )


CASES = [
    ("fresh idle instance is kept", ScaleSpec(idle=60), view([("a", 100.0)]), 130.0, Decision()),
    (
        "idle past scale.idle is reaped",
        ScaleSpec(idle=60),
        view([("a", 100.0)]),
        160.0,
        Decision(reap=["a"]),
    ),
    (
        "oldest idle go first",
        ScaleSpec(idle=10),
        view([("new", 95.0), ("old", 50.0), ("mid", 80.0)]),
        100.0,
        Decision(reap=["old", "mid"]),
    ),
    (
        "min holds even when idle expired",
        ScaleSpec(min=2, idle=10),
        view([("a", 0.0), ("b", 0.0), ("c", 0.0)]),
        100.0,
        Decision(reap=["a"]),
    ),
    (
        "busy instances count toward min",
        ScaleSpec(min=2, idle=10),
        view([("a", 0.0)], busy=1),
        100.0,
        Decision(),
    ),
    ("below min starts the difference", ScaleSpec(min=3), view(busy=1), 0.0, Decision(start=2)),
    ("starting instances count toward min", ScaleSpec(min=3), view(starting=3), 0.0, Decision()),
    ("no warm start while requests wait", ScaleSpec(min=3), view(waiting=2), 0.0, Decision()),
    ("zygote stays within its keep-alive", ScaleSpec(), view(used=0.0), 599.0, Decision()),
    (
        "zygote released after its keep-alive",
        ScaleSpec(),
        view(used=0.0),
        600.0,
        Decision(reap_zygote=True),
    ),
    (
        "zygote kept while instances live",
        ScaleSpec(idle=1000),
        view([("a", 0.0)]),
        700.0,
        Decision(),
    ),
    ("zygote kept for min", ScaleSpec(min=1, idle=1), view([("a", 0.0)]), 700.0, Decision()),
    (
        "retired pool drains idle at once",
        ScaleSpec(min=2),
        view([("a", 99.0), ("b", 99.0)], used=99.0, retired=True),
        100.0,
        Decision(reap=["a", "b"], reap_zygote=True),
    ),
    (
        "retired pool keeps zygote while busy",
        ScaleSpec(),
        view(busy=1, retired=True),
        100.0,
        Decision(),
    ),
]


@pytest.mark.parametrize(
    ("spec", "pool", "now", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_decide(spec: ScaleSpec, pool: PoolView, now: float, expected: Decision) -> None:
    got = decide(spec, pool, now, KEEPALIVE)
    assert sorted(got.reap) == sorted(expected.reap)
    assert (got.start, got.reap_zygote) == (expected.start, expected.reap_zygote)


def test_clock_steps_release_in_order() -> None:
    spec = ScaleSpec(idle=60)
    pool = view([("a", 0.0)], used=0.0)
    assert decide(spec, pool, 59.0, KEEPALIVE) == Decision()
    assert decide(spec, pool, 60.0, KEEPALIVE).reap == ["a"]
    empty = view(used=60.0)
    assert not decide(spec, empty, 600.0, KEEPALIVE).reap_zygote
    assert decide(spec, empty, 660.0, KEEPALIVE).reap_zygote
