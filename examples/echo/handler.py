"""Echoes the request back: method, path, query, headers and the body's size."""


def handle(req, ctx):
    return {
        "method": req.method,
        "path": req.path,
        "query": {key: req.query.getall(key) for key in req.query},
        "headers": dict(req.headers),
        "bytes": len(req.body),
        "request_id": ctx.request_id,
        "remaining_ms": round(ctx.remaining_ms()),
    }
