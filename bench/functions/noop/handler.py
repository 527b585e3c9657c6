def handle(req, ctx):
    return {"ok": True}
