"""ember.yaml's per-function `async:` block: retries, backoff, retry_on, max_age, destinations."""

from __future__ import annotations

import textwrap

import pytest

from ember.errors import UserError
from ember.manifest import load_manifest
from ember.spec import RETRYABLE, AsyncSpec, BackoffSpec, Destination, FunctionSpec, canonical


def _async(block: str, name: str = "f") -> AsyncSpec:
    [spec] = load_manifest(f"functions:\n  {name}:\n    async: {block}\n", "ignored")
    return spec.async_


def test_defaults_when_absent() -> None:
    [spec] = load_manifest("functions:\n  f: {memory: 256}\n", "ignored")
    assert spec.async_ == AsyncSpec()
    assert spec.async_ == AsyncSpec(
        retries=2,
        backoff=BackoffSpec(initial=1.0, max=300.0, factor=2.0, jitter=0.5),
        retry_on=RETRYABLE,
        max_age=6 * 3600.0,
        concurrency=0,
        on_success=None,
        on_failure=None,
    )


def test_an_empty_block_is_the_defaults_and_keeps_the_revision_hash() -> None:
    assert _async("{}") == AsyncSpec()
    assert _async("{backoff: {}}") == AsyncSpec()
    [spec] = load_manifest("functions:\n  a:\n    async: {retries: 2}\n", "ignored")
    assert canonical(spec) == canonical(FunctionSpec(name="a")) == b'{"name":"a"}'


def test_a_full_block() -> None:
    text = textwrap.dedent("""
        functions:
          resize:
            async:
              retries: 5
              backoff: {initial: 500ms, max: 5m, factor: 3, jitter: 0}
              retry_on: [5xx, 429, timeout, crash, 503, "503", "429", 404]
              max_age: 2h
              concurrency: 4
              on_success: {function: audit}
              on_failure: {url: "https://hooks.example.com/failed"}
          audit:
            async:
              retries: 0
              retry_on: []
              max_age: 1s
              concurrency: 10000
              on_failure: {subject: ember.dead-letters.audit_v2}
    """)
    resize, audit = load_manifest(text, "ignored")
    assert resize.async_ == AsyncSpec(
        retries=5,
        backoff=BackoffSpec(initial=0.5, max=300.0, factor=3.0, jitter=0.0),
        retry_on=("5xx", "429", "timeout", "crash", "503", "404"),
        max_age=7200.0,
        concurrency=4,
        on_success=Destination(function="audit"),
        on_failure=Destination(url="https://hooks.example.com/failed"),
    )
    assert audit.async_ == AsyncSpec(
        retries=0,
        retry_on=(),
        max_age=1.0,
        concurrency=10000,
        on_failure=Destination(subject="ember.dead-letters.audit_v2"),
    )
    assert canonical(resize) != canonical(FunctionSpec(name="resize"))


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        ("{retries: 1000000}", AsyncSpec(retries=1_000_000)),
        ("{backoff: {initial: 1h, max: 24h}}", AsyncSpec(backoff=BackoffSpec(3600.0, 86400.0))),
        ("{backoff: {initial: 2s, max: 2s}}", AsyncSpec(backoff=BackoffSpec(2.0, 2.0))),
        ("{backoff: {factor: 1, jitter: 1}}", AsyncSpec(backoff=BackoffSpec(factor=1, jitter=1))),
        ("{backoff: {factor: 10}}", AsyncSpec(backoff=BackoffSpec(factor=10.0))),
        ("{max_age: 168h}", AsyncSpec(max_age=7 * 24 * 3600.0)),
        ("{max_age: 90}", AsyncSpec(max_age=90.0)),
        ("{retry_on: [400, '599']}", AsyncSpec(retry_on=("400", "599"))),
        (
            "{on_success: {url: 'http://10.0.0.2:8080/done?x=1'}}",
            AsyncSpec(on_success=Destination(url="http://10.0.0.2:8080/done?x=1")),
        ),
        ("{on_success: {subject: results}}", AsyncSpec(on_success=Destination(subject="results"))),
    ],
)
def test_bounds_accepted(block: str, expected: AsyncSpec) -> None:
    assert _async(block) == expected


BAD_ASYNC = {
    "not a mapping": (
        "[retries]",
        "functions.f.async: expected a mapping of retries, backoff, retry_on, max_age, "
        "concurrency, on_success, on_failure, got a list",
    ),
    "null": (
        "",
        "functions.f.async: has no value; write e.g. async: {retries: 5, on_failure: "
        "{function: failed}}, or remove the key for the default",
    ),
    "unknown key": (
        "{retires: 3}",
        "functions.f.async.retires: unknown key; valid keys are retries, backoff, retry_on, "
        "max_age, concurrency, on_success, on_failure",
    ),
    "negative retries": (
        "{retries: -1}",
        "functions.f.async.retries: -1 is out of range; use 0 to 1000000, e.g. retries: 5",
    ),
    "too many retries": ("{retries: 1000001}", "functions.f.async.retries: 1000001 is out of"),
    "retries text": (
        "{retries: many}",
        "functions.f.async.retries: 'many' is not a whole number; write e.g. retries: 5",
    ),
    "unknown backoff key": (
        "{backoff: {base: 1s}}",
        "functions.f.async.backoff.base: unknown key; valid keys are initial, max, factor, jitter",
    ),
    "backoff max below initial": (
        "{backoff: {initial: 5s, max: 1s}}",
        "functions.f.async.backoff.max: '1s' is shorter than initial ('5s'); every wait is "
        "capped at max, so write a max of at least initial, e.g. max: 5s, or lower initial",
    ),
    "backoff initial above the default max": (
        "{backoff: {initial: 10m}}",
        "functions.f.async.backoff.max: the default 300 s is shorter than initial ('10m')",
    ),
    "backoff max not a duration": (
        "{backoff: {max: soon}}",
        "functions.f.async.backoff.max: 'soon' is not a duration; write e.g. max: 5m",
    ),
    "backoff max too long": (
        "{backoff: {max: 25h}}",
        "functions.f.async.backoff.max: '25h' is out of range; use 1ms to 24h, e.g. max: 5m",
    ),
    "backoff initial zero": (
        "{backoff: {initial: 0}}",
        "functions.f.async.backoff.initial: 0 is out of range; use 1ms to 1h, e.g. initial: 1s",
    ),
    "backoff initial too long": (
        "{backoff: {initial: 2h, max: 3h}}",
        "functions.f.async.backoff.initial: '2h' is out of range; use 1ms to 1h",
    ),
    "backoff factor below one": (
        "{backoff: {factor: 0.5}}",
        "functions.f.async.backoff.factor: 0.5 is not a number from 1 to 10; write e.g. factor: 2",
    ),
    "backoff factor too big": ("{backoff: {factor: 11}}", "backoff.factor: 11 is not a number"),
    "jitter 2": (
        "{backoff: {jitter: 2}}",
        "functions.f.async.backoff.jitter: 2 is not a number from 0 to 1; write e.g. jitter: 0.5",
    ),
    "backoff not a mapping": (
        "{backoff: 2s}",
        "functions.f.async.backoff: expected a mapping of initial, max, factor, jitter, "
        "got a string",
    ),
    "retry_on 4xx": (
        "{retry_on: [5xx, 4xx]}",
        "functions.f.async.retry_on[1]: '4xx' is not an outcome to retry; write 5xx, 429, "
        "timeout, crash or a status code from 400 to 599, e.g. retry_on: [5xx, 429, timeout, "
        "crash]",
    ),
    "retry_on abc": (
        "{retry_on: [abc]}",
        "functions.f.async.retry_on[0]: 'abc' is not an outcome to retry",
    ),
    "retry_on 600": (
        "{retry_on: [600]}",
        "functions.f.async.retry_on[0]: 600 is not an error status code; write 5xx, 429",
    ),
    "retry_on 200 as text": (
        "{retry_on: ['200']}",
        "functions.f.async.retry_on[0]: '200' is not an error status code",
    ),
    "retry_on true": ("{retry_on: [true]}", "retry_on[0]: True is not an outcome to retry"),
    "retry_on upper case": ("{retry_on: [5XX]}", "retry_on[0]: '5XX' is not an outcome"),
    "retry_on not a list": (
        "{retry_on: 5xx}",
        "functions.f.async.retry_on: expected a list of outcomes to retry, got a string",
    ),
    "max_age 0": (
        "{max_age: 0}",
        "functions.f.async.max_age: 0 is out of range; use 1s to 168h (7 days), e.g. max_age: 6h",
    ),
    "max_age over a week": ("{max_age: 169h}", "functions.f.async.max_age: '169h' is out of"),
    "max_age in days": (
        "{max_age: 2d}",
        "functions.f.async.max_age: '2d' is not a duration; write e.g. max_age: 6h",
    ),
    "concurrency too big": (
        "{concurrency: 10001}",
        "functions.f.async.concurrency: 10001 is out of range; use 0 to 10000",
    ),
    "concurrency negative": ("{concurrency: -1}", "functions.f.async.concurrency: -1 is out of"),
    "destination without a target": (
        "{on_success: {}}",
        "functions.f.async.on_success: sets no target; set exactly one of function, url, "
        "subject, e.g. on_success: {function: audit}",
    ),
    "destination with two targets": (
        "{on_failure: {function: audit, url: 'https://a.example'}}",
        "functions.f.async.on_failure: sets function, url; set exactly one of function, url, "
        "subject",
    ),
    "destination not a mapping": (
        "{on_success: audit}",
        "functions.f.async.on_success: expected a mapping with one of function, url, subject, "
        "got a string; write e.g. on_success: {function: audit}",
    ),
    "destination unknown key": (
        "{on_success: {queue: x}}",
        "functions.f.async.on_success.queue: unknown key; valid keys are function, url, subject",
    ),
    "destination null target": (
        "{on_success: {url: }}",
        "functions.f.async.on_success.url: has no value; write e.g. "
        "url: https://hooks.example.com/done",
    ),
    "destination bad function name": (
        "{on_success: {function: Audit_Log}}",
        "functions.f.async.on_success.function: 'Audit_Log' is not a function name: use 1-63",
    ),
    "url ftp": (
        "{on_failure: {url: 'ftp://x'}}",
        "functions.f.async.on_failure.url: 'ftp://x' is not an absolute http:// or https:// "
        "URL with a host; write e.g. url: https://hooks.example.com/done",
    ),
    "url relative": ("{on_failure: {url: /hooks/failed}}", "'/hooks/failed' is not an absolute"),
    "url without host": ("{on_failure: {url: 'https://'}}", "'https://' is not an absolute"),
    "url bad port": ("{on_failure: {url: 'http://a:99999'}}", "'http://a:99999' is not an"),
    "url with a space": (
        "{on_failure: {url: 'https://a.example/x y'}}",
        "functions.f.async.on_failure.url: 'https://a.example/x y' is not a URL; write e.g. "
        "url: https://hooks.example.com/done (percent-encode spaces and non-ASCII characters)",
    ),
    "url too long": (
        "{on_failure: {url: 'https://a.example/" + "x" * 2048 + "'}}",
        "functions.f.async.on_failure.url: is 2066 characters long; use at most 2048",
    ),
    "subject wildcard": (
        "{on_failure: {subject: a.*}}",
        "functions.f.async.on_failure.subject: 'a.*' is not a NATS subject: use at most 255 "
        "letters, digits, '_' and '-' in tokens separated by '.', without wildcards (* or >); "
        "write e.g. subject: ember.results.resize",
    ),
    "subject tail wildcard": ("{on_failure: {subject: 'a.>'}}", "'a.>' is not a NATS subject"),
    "subject empty token": ("{on_failure: {subject: a..b}}", "'a..b' is not a NATS subject"),
    "subject too long": (
        "{on_failure: {subject: " + "a" * 256 + "}}",
        "' is not a NATS subject: use at most 255 letters",
    ),
    "on_success to itself": (
        "{on_success: {function: f}}",
        "functions.f.async.on_success.function: 'f' is the function itself: each success would "
        "invoke it again, forever; name another function, or send the result to a url or subject",
    ),
    "on_failure to itself": (
        "{on_failure: {function: f}}",
        "functions.f.async.on_failure.function: 'f' is the function itself: each failure would "
        "invoke it again, past its retries and max_age (to retry more, raise retries)",
    ),
}


@pytest.mark.parametrize(("block", "expected"), BAD_ASYNC.values(), ids=BAD_ASYNC.keys())
def test_bad_async_block(block: str, expected: str) -> None:
    with pytest.raises(UserError) as caught:
        _async(block)
    assert caught.value.code == "bad_manifest"
    assert caught.value.status == 400
    assert caught.value.message.startswith("ember.yaml: functions.f.async")
    assert expected in caught.value.message


def test_a_destination_may_name_another_function_of_the_manifest_or_not() -> None:
    text = "functions:\n  a: {async: {on_success: {function: b}}}\n  b: {}\n"
    assert load_manifest(text, "ignored")[0].async_.on_success == Destination(function="b")
    assert _async("{on_failure: {function: elsewhere}}").on_failure == Destination(
        function="elsewhere"
    )


def test_the_unknown_function_key_error_lists_async() -> None:
    with pytest.raises(UserError) as caught:
        load_manifest("functions:\n  f: {asynch: {}}\n", "ignored")
    assert caught.value.message.startswith("ember.yaml: functions.f.asynch: unknown key; ")
    assert caught.value.message.endswith(", secrets, preload, async, triggers")
