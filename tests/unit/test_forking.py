"""`ember.runtime.forking`: a plain fork skips CPython's after-fork work but reseeds `random`;
`ForkHooks` notes the at-fork hooks that need `os.fork()`."""

from __future__ import annotations

import json
import os
import random

import pytest

from ember.runtime import forking


def _in_child(plain: bool) -> dict[str, object]:
    """Fork; the child reports what it sees through a pipe and exits."""
    read, write = os.pipe()
    pid = forking.fork(plain)
    if pid == 0:
        try:
            os.close(read)
            seen = {"draw": random.getrandbits(64), "hook_ran": _HOOK_RAN}
            os.write(write, json.dumps(seen).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        got: dict[str, object] = json.loads(f.read())
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return got


_HOOK_RAN = False


def _hook() -> None:
    global _HOOK_RAN
    _HOOK_RAN = True


os.register_at_fork(after_in_child=_hook)


@pytest.mark.parametrize("plain", [True, False])
def test_a_child_draws_other_random_numbers_than_its_parent(plain: bool) -> None:
    state = random.getstate()
    parent_draw = random.getrandbits(64)
    random.setstate(state)  # the child starts from the state the parent drew from
    seen = _in_child(plain)
    assert seen["draw"] != parent_draw


def test_a_plain_fork_runs_no_at_fork_hooks_and_os_fork_does() -> None:
    assert _in_child(plain=True)["hook_ran"] is False
    assert _in_child(plain=False)["hook_ran"] is True


def test_fork_hooks_counts_foreign_hooks_but_not_randoms() -> None:
    with forking.ForkHooks() as hooks:
        os.register_at_fork(after_in_child=random._inst.seed)  # type: ignore[attr-defined]
        assert hooks.foreign == 0
        os.register_at_fork(after_in_parent=lambda: None)
        assert hooks.foreign == 1
    assert os.register_at_fork is not hooks._register  # put back on exit
