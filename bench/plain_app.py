"""The headline baseline: what a user would write instead of deploying to Ember, a plain
Starlette app on uvicorn returning the same JSON as bench/functions/noop.

Run it as `uvicorn bench.plain_app:app --http httptools --loop uvloop --no-access-log`.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route


async def noop(request: Request) -> Response:
    return JSONResponse({"ok": True})


async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok")


app = Starlette(routes=[Route("/fn/noop", noop), Route("/healthz", healthz)])
