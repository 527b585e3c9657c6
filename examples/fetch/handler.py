"""Call out over HTTP with httpx, installed from requirements.txt: GET ?url=…, get its status,
size and time back.

    ember deploy examples/fetch
    curl 'http://127.0.0.1:8080/fn/fetch?url=http://127.0.0.1:8080/healthz'

The client is made once, in the zygote, so every instance starts with it ready: connections
are per instance (each is its own process).
"""

import time

import httpx

client = httpx.Client(timeout=5.0, follow_redirects=True)


def handle(req, ctx):
    url = req.query.get("url")
    if not url:
        return {"error": "give the address to fetch as ?url=http://…"}, 400
    started = time.perf_counter()
    try:
        response = client.get(url)
    except httpx.HTTPError as exc:
        return {"url": url, "error": f"{type(exc).__name__}: {exc}"}, 502
    return {
        "url": url,
        "status": response.status_code,
        "bytes": len(response.content),
        "ms": round((time.perf_counter() - started) * 1000, 1),
        "httpx": httpx.__version__,
        "from": httpx.__file__,
    }
