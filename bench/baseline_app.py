"""The baseline: bare Starlette serving the same handler modules in-process at /fn/{name}
(the directory name with '_' → '-', as Ember names it).

Run it as `uvicorn bench.baseline_app:app --http httptools --loop uvloop --no-access-log`
with BENCH_FUNCTIONS=noop,numpy_pandas (directories under bench/functions). The handler gets
the same `Request`/`Context` objects an Ember instance builds, so the difference to Ember is the
platform (routing, pool, a process hop and the frames), not the handler.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ember.runtime.api import Context, Request

FUNCTIONS = Path(__file__).resolve().parent / "functions"
Handler = Callable[[Request, Context], Any]


def load(name: str) -> Handler:
    spec = importlib.util.spec_from_file_location(
        f"bench_fn_{name}", FUNCTIONS / name / "handler.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    handler: Handler = module.handle
    return handler


HANDLERS = {
    n.replace("_", "-"): load(n) for n in os.environ.get("BENCH_FUNCTIONS", "noop").split(",") if n
}
LOG = logging.getLogger("bench.function")


async def invoke(request: HttpRequest) -> Response:
    name = request.path_params["name"]
    handler = HANDLERS.get(name)
    if handler is None:
        return PlainTextResponse("not found", status_code=404)
    req = Request(
        request.method,
        "/",
        request.scope.get("query_string", b""),
        request.scope["headers"],
        await request.body(),
    )
    ctx = Context(uuid.uuid4().hex, name, 1, 128, time.time() + 30, LOG)
    return JSONResponse(handler(req, ctx))


async def healthz(request: HttpRequest) -> Response:
    return PlainTextResponse("ok")


app = Starlette(routes=[Route("/fn/{name}", invoke), Route("/healthz", healthz)])
