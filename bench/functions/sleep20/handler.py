import os
import time


def handle(req, ctx):
    time.sleep(0.02)
    return {"pid": os.getpid()}
