import os
import socket
import time

# Where handler starts are reported: "host:port" of the benchmark's UDP collector.
_host, _, _port = os.environ.get("STAMP_ADDR", "127.0.0.1:9").partition(":")
_addr = (_host, int(_port))
_sock = None  # made in the instance (a zygote's descriptors do not survive the fork)


def handle(req, ctx):
    """The body is the publisher's time.time(); the collector gets "published started"."""
    global _sock
    started = time.time()
    if _sock is None:
        _sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    _sock.sendto(req.body + b" " + repr(started).encode(), _addr)
    return b""
