import time


def handle(req, ctx):
    time.sleep(0.05)
    return {"ok": True}
