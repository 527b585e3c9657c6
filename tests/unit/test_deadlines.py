"""`Deadlines`: the keep-alive loop's schedule, so a tick touches only what is due."""

from __future__ import annotations

from ember.pool.deadlines import Deadlines


def test_due_pops_what_has_come_in_order_and_keeps_the_rest() -> None:
    d: Deadlines[str] = Deadlines()
    d.at("b", 2.0)
    d.at("a", 1.0)
    d.at("c", 3.0)
    assert d.due(0.5) == []
    assert d.due(2.0) == ["a", "b"]
    assert len(d) == 1 and d.when("c") == 3.0
    assert d.due(10.0) == ["c"] and len(d) == 0


def test_a_moved_deadline_counts_once_at_its_new_time() -> None:
    d: Deadlines[str] = Deadlines()
    d.at("a", 1.0)
    d.at("a", 5.0)
    assert d.due(2.0) == []  # its old entry is stale
    d.at("a", 1.5)
    assert d.due(2.0) == ["a"]
    assert d.due(10.0) == []


def test_a_wake_is_due_at_the_next_pass_whatever_its_clock() -> None:
    d: Deadlines[str] = Deadlines()
    d.at("a", 100.0)
    d.wake("a")
    assert d.due(-1e9) == ["a"]
    d.discard("a")
    assert d.due(1e9) == []


def test_the_limit_leaves_the_others_due() -> None:
    d: Deadlines[int] = Deadlines()
    for k in range(10):
        d.at(k, float(k))
    assert d.due(100.0, limit=4) == [0, 1, 2, 3]
    assert d.due(100.0) == [4, 5, 6, 7, 8, 9]


def test_stale_entries_stay_bounded_by_the_keys() -> None:
    d: Deadlines[int] = Deadlines()
    for round_ in range(1000):
        for k in range(10):
            d.at(k, float(round_ * 10 + k))
    assert len(d) == 10 and d.entries <= 2 * 10 + 64 + 1
