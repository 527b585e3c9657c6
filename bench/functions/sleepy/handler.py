import os
import time


def handle(req, ctx):
    entered = time.time()
    time.sleep(0.5)
    return {"entered": entered, "pid": os.getpid()}
