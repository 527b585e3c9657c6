"""How every sub-command is registered: an `EmberError` becomes `error: …` and its exit code."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec

import typer

from ember.cli import render
from ember.errors import EmberError

P = ParamSpec("P")


def subcommand(group: typer.Typer, name: str) -> Callable[[Callable[P, None]], Callable[P, None]]:
    """Register `fn` as `NAME` of `group`."""

    def register(fn: Callable[P, None]) -> Callable[P, None]:
        @functools.wraps(fn)
        def run(*args: P.args, **kwargs: P.kwargs) -> None:
            try:
                fn(*args, **kwargs)
            except EmberError as exc:
                render.print_error(exc)
                raise typer.Exit(exc.exit_code) from None

        group.command(name)(run)
        return run

    return register
