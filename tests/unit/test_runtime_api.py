"""The handler's view: Request, return-value conversion, error bodies, output capture."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from ember.runtime.api import Request, Response
from ember.runtime.capture import Capture, current_request
from ember.runtime.convert import BadReturn, error_result, to_result
from ember.wire.messages import Log


def test_request_query_and_headers_are_multi_valued_and_case_insensitive() -> None:
    req = Request(
        "GET", "/x", b"a=1&a=2&b=&c=%C3%BC", [(b"X-Thing", b"v1"), (b"x-thing", b"v2")], b'{"k": 1}'
    )
    assert req.query["a"] == "1" and req.query.getall("a") == ["1", "2"]
    assert req.query["b"] == "" and req.query.get("zz") is None
    assert req.headers["X-THING"] == "v1" and req.headers.getall("x-thing") == ["v1", "v2"]
    assert req.json() == {"k": 1} and req.text == '{"k": 1}'


def test_request_raw_path_is_the_path_as_sent_and_defaults_to_path() -> None:
    sent = Request("GET", "/a/b c", b"", [], b"", raw_path="/a%2Fb%20c")
    assert (sent.path, sent.raw_path) == ("/a/b c", "/a%2Fb%20c")
    assert Request("GET", "/x", b"", [], b"").raw_path == "/x"


@pytest.mark.parametrize(
    ("value", "status", "ctype", "body"),
    [
        ({"a": 1}, 200, b"application/json", b'{"a":1}'),
        ([1], 200, b"application/json", b"[1]"),
        ("hé", 200, b"text/plain; charset=utf-8", "hé".encode()),
        (b"\x00", 200, b"application/octet-stream", b"\x00"),
        (None, 204, b"text/plain; charset=utf-8", b""),
        (("x", 404), 404, b"text/plain; charset=utf-8", b"x"),
        (
            ({"e": 1}, 400, {"Content-Type": "application/problem+json"}),
            400,
            b"application/problem+json",
            b'{"e":1}',
        ),
        (Response(b"<p>", 201, {"X-A": "b"}, content_type="text/html"), 201, b"text/html", b"<p>"),
    ],
)
def test_return_values(value: object, status: int, ctype: bytes, body: bytes) -> None:
    result = to_result("rid", value)
    assert (result.status, result.body) == (status, body)
    assert dict(result.headers)[b"content-type"] == ctype


@pytest.mark.parametrize("value", [object(), ("x",), ("x", "200"), ("x", 999), ("x", 200, [1])])
def test_bad_return_values_name_the_problem(value: object) -> None:
    with pytest.raises(BadReturn):
        to_result("rid", value)


def test_error_result_has_the_lambda_shape() -> None:
    try:
        raise KeyError("missing")
    except KeyError as exc:
        result = error_result("rid", exc)
    body = json.loads(result.body)
    assert result.status == 500
    assert body["errorType"] == "KeyError" and body["requestId"] == "rid"
    assert body["errorMessage"] == "'missing'" and body["stackTrace"]


def test_capture_attributes_output_to_the_current_request() -> None:
    sent: list[Log] = []
    saved = sys.stdout, sys.stderr, list(logging.getLogger().handlers), logging.getLogger().level
    try:
        capture = Capture()
        capture.route_logging()  # in the zygote, before forking
        capture.install(sent.append)  # in the instance
        token = current_request.set("r1")
        print("hello")
        sys.stderr.write("oops\n")
        logging.getLogger("x").warning("careful")
        current_request.reset(token)
        capture.finish("r1")
    finally:
        sys.stdout, sys.stderr = saved[0], saved[1]
        root = logging.getLogger()
        root.handlers[:] = saved[2]
        root.setLevel(saved[3])
    by_stream = {log.stream: log for log in sent}
    assert by_stream["stdout"].data == "hello\n" and by_stream["stdout"].id == "r1"
    assert by_stream["stderr"].data == "oops\n"
    assert "WARNING x: careful" in by_stream["log"].data
