"""ember.yaml parsing: durations, names, defaults and every validation rule."""

from __future__ import annotations

import textwrap

import pytest

from ember.errors import UserError
from ember.manifest import load_manifest, parse_duration, validate_name
from ember.spec import FunctionSpec, ScaleSpec


def _yaml(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (30, 30.0),
        (0, 0.0),
        (1.5, 1.5),
        ("90", 90.0),
        ("500ms", 0.5),
        ("30s", 30.0),
        ("1.5s", 1.5),
        ("15m", 900.0),
        ("1h", 3600.0),
        (" 2 s ", 2.0),
        (".5s", 0.5),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value, "timeout") == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value",
    [True, None, "", "abc", "5x", "-5s", -1, "1d", "1.2.3s", float("inf"), float("nan"), "٣s", [1]],
)
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(UserError) as caught:
        parse_duration(value, "functions.hello.timeout")
    assert caught.value.code == "bad_manifest"
    assert caught.value.message.startswith(f"functions.hello.timeout: {value!r} is not a duration")
    assert "write e.g. timeout: 30s" in caught.value.message


@pytest.mark.parametrize("name", ["a", "hello", "resize-image", "a1", "x" * 63])
def test_validate_name_accepts(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "Foo",
        "Foo/bar",
        "1abc",
        "-a",
        "a-",
        "a_b",
        "a.b",
        "x" * 64,
        "héllo",
        "\u0430bc",
        "a\n",
        " a",
    ],
)
def test_validate_name_rejects(name: str) -> None:
    with pytest.raises(UserError) as caught:
        validate_name(name)
    assert caught.value.code == "bad_name"
    assert caught.value.message == (
        f"function name {name!r} is invalid: use 1-63 lowercase letters, digits and '-', "
        "starting with a letter, not ending with '-'"
    )


def test_no_manifest_gives_one_default_function() -> None:
    assert load_manifest(None, "hello") == [FunctionSpec(name="hello")]


def test_no_manifest_with_a_bad_directory_name() -> None:
    with pytest.raises(UserError, match="function name 'My_Func' is invalid") as caught:
        load_manifest(None, "My_Func")
    assert caught.value.code == "bad_name"


def test_a_function_without_settings_gets_defaults() -> None:
    specs = load_manifest("functions:\n  hello:\n", "ignored")
    assert specs == [FunctionSpec(name="hello")]
    assert specs[0].handler == "handler.handle"
    assert specs[0].scale == ScaleSpec(min=0, max=10, idle=60.0)


def test_every_setting() -> None:
    text = _yaml("""
        functions:
          resize:
            handler: app.main.run
            source: ./src/resize/
            memory: 256
            timeout: 1.5m
            concurrency: 8
            scale: {min: 1, max: 4, idle: 500ms, target: 2.5, window: 2m, panic_window: 10s,
                    down_rate: 4}
            env: {LOG_LEVEL: debug, RETRIES: 3, RATIO: 0.5, DEBUG: true, QUIET: false, EMPTY: ""}
            preload: [numpy, scipy.signal]
    """)
    assert load_manifest(text, "ignored") == [
        FunctionSpec(
            name="resize",
            handler="app.main.run",
            source="src/resize",
            memory=256,
            timeout=90.0,
            concurrency=8,
            scale=ScaleSpec(
                min=1, max=4, idle=0.5, target=2.5, window=120.0, panic_window=10.0, down_rate=4.0
            ),
            env={
                "LOG_LEVEL": "debug",
                "RETRIES": "3",
                "RATIO": "0.5",
                "DEBUG": "true",
                "QUIET": "false",
                "EMPTY": "",
            },
            preload=["numpy", "scipy.signal"],
        )
    ]


def test_several_functions_keep_file_order() -> None:
    text = _yaml("""
        functions:
          zeta: {memory: 64}
          alpha:
            timeout: 5
            scale: {max: 1}
          mid: {}
    """)
    specs = load_manifest(text, "ignored")
    assert [spec.name for spec in specs] == ["zeta", "alpha", "mid"]
    assert specs[0].memory == 64
    assert specs[1].timeout == 5.0
    assert specs[1].scale == ScaleSpec(max=1)
    assert specs[2] == FunctionSpec(name="mid")


@pytest.mark.parametrize(
    ("source", "normalized"),
    [
        (".", "."),
        ("./", "."),
        ("", "."),
        ("src", "src"),
        ("./src/", "src"),
        ("a//b/./c", "a/b/c"),
        ("..foo", "..foo"),
    ],
)
def test_source_is_normalized(source: str, normalized: str) -> None:
    [spec] = load_manifest(f"functions:\n  f:\n    source: {source!r}\n", "ignored")
    assert spec.source == normalized


@pytest.mark.parametrize(
    ("duration", "seconds"), [("1", 1.0), ("900", 900.0), ("15m", 900.0), ("0.25", 0.25)]
)
def test_timeout_bounds_accepted(duration: str, seconds: float) -> None:
    [spec] = load_manifest(f"functions:\n  f:\n    timeout: {duration}\n", "ignored")
    assert spec.timeout == seconds


BAD_MANIFESTS = {
    "empty file": ("", "functions: is missing; declare at least one function"),
    "comment only": ("# nothing\n", "functions: is missing"),
    "no functions key": ("other: 1\n", "other: unknown key; valid keys are functions"),
    "top level list": (
        "- a\n",
        "expected a mapping with a functions: key at the top level, got a list",
    ),
    "top level string": ("hello\n", "got a string"),
    "functions empty": ("functions:\n", "functions: is empty; declare at least one function"),
    "functions empty mapping": ("functions: {}\n", "functions: is empty"),
    "functions list": (
        "functions:\n  - hello\n",
        "functions: expected a mapping of names to settings, got a list",
    ),
    "bad name": (
        "functions:\n  Foo/bar: {}\n",
        "functions: function name 'Foo/bar' is invalid: use 1-63",
    ),
    "numeric name": ("functions:\n  123: {}\n", "functions: function name 123 is invalid"),
    "unicode lookalike name": (
        "functions:\n  h\u0435llo: {}\n",
        "function name 'h\u0435llo' is invalid",
    ),
    "trailing dash name": ("functions:\n  hello-: {}\n", "function name 'hello-' is invalid"),
    "preload not a list": (
        "functions:\n  f: {preload: numpy}\n",
        "functions.f.preload: expected a list of at most 64 module names, got a string",
    ),
    "preload not a module": (
        "functions:\n  f: {preload: [numpy, ../x]}\n",
        "functions.f.preload[1]: '../x' is not a module name",
    ),
    "preload twice": (
        "functions:\n  f: {preload: [numpy, numpy]}\n",
        "functions.f.preload: lists a module twice",
    ),
    "settings not a mapping": (
        "functions:\n  f: handler.handle\n",
        "functions.f: expected a mapping of handler, source, memory, timeout, concurrency, "
        "scale, env, network, access, cpu, pids, tmp, secrets, preload, async, triggers, got a "
        "string",
    ),
    "unknown function key": (
        "functions:\n  f:\n    memroy: 1\n",
        "functions.f.memroy: unknown key; valid keys are handler, source, memory, timeout, "
        "concurrency, scale, env",
    ),
    "unknown scale key": (
        "functions:\n  f:\n    scale: {maximum: 3}\n",
        "functions.f.scale.maximum: unknown key; valid keys are min, max, idle",
    ),
    "panic window longer than window": (
        "functions:\n  f:\n    scale: {window: 10s, panic_window: 20s}\n",
        "functions.f.scale: panic_window (20 s) is longer than window (10 s)",
    ),
    "window too short": (
        "functions:\n  f:\n    scale: {window: 1s}\n",
        "functions.f.scale.window: '1s' is out of range; use 6s to 60m",
    ),
    "target zero": (
        "functions:\n  f:\n    scale: {target: 0}\n",
        "functions.f.scale.target: 0 is not a number from 0.01 to 1000",
    ),
    "down rate one": (
        "functions:\n  f:\n    scale: {down_rate: 1}\n",
        "functions.f.scale.down_rate: 1 is not a number from 1.01 to 1000",
    ),
    "null setting": (
        "functions:\n  f:\n    memory:\n",
        "functions.f.memory: has no value; write e.g. memory: 256",
    ),
    "handler without module": (
        "functions:\n  f:\n    handler: handle\n",
        "functions.f.handler: 'handle' is not module.function; write e.g. handler: handler.handle",
    ),
    "handler with a dash": (
        "functions:\n  f:\n    handler: my-mod.handle\n",
        "'my-mod.handle' is not module.function",
    ),
    "handler keyword": (
        "functions:\n  f:\n    handler: import.handle\n",
        "'import.handle' is not module.function",
    ),
    "handler trailing dot": (
        "functions:\n  f:\n    handler: 'handler.'\n",
        "'handler.' is not module.function",
    ),
    "handler number": ("functions:\n  f:\n    handler: 3\n", "3 is not module.function"),
    "source absolute": (
        "functions:\n  f:\n    source: /srv/app\n",
        "functions.f.source: '/srv/app' must be a directory inside the one holding ember.yaml",
    ),
    "source dotdot": (
        "functions:\n  f:\n    source: src/../../x\n",
        "'src/../../x' must be a directory inside",
    ),
    "source backslash": (
        "functions:\n  f:\n    source: 'src\\app'\n",
        "functions.f.source: 'src\\\\app' is not a directory path; "
        "write e.g. source: src (use '/')",
    ),
    "source list": ("functions:\n  f:\n    source: [a]\n", "['a'] is not a directory path"),
    "memory word": (
        "functions:\n  f:\n    memory: abc\n",
        "functions.f.memory: 'abc' is not a whole number of MB; write e.g. memory: 256",
    ),
    "memory float": ("functions:\n  f:\n    memory: 1.5\n", "1.5 is not a whole number of MB"),
    "memory bool": ("functions:\n  f:\n    memory: true\n", "True is not a whole number of MB"),
    "memory with unit": (
        "functions:\n  f:\n    memory: 256MB\n",
        "'256MB' is not a whole number of MB",
    ),
    "memory too small": (
        "functions:\n  f:\n    memory: 8\n",
        "functions.f.memory: 8 is out of range; use 16 to 16384 MB, e.g. memory: 256",
    ),
    "memory too big": (
        "functions:\n  f:\n    memory: 16385\n",
        "16385 is out of range; use 16 to 16384 MB",
    ),
    "timeout word": (
        "functions:\n  f:\n    timeout: soon\n",
        "functions.f.timeout: 'soon' is not a duration; write e.g. timeout: 30s",
    ),
    "timeout zero": (
        "functions:\n  f:\n    timeout: 0\n",
        "functions.f.timeout: 0 is out of range; use more than 0 and at most 15m",
    ),
    "timeout too long": (
        "functions:\n  f:\n    timeout: 16m\n",
        "'16m' is out of range; use more than 0 and at most 15m",
    ),
    "timeout negative": ("functions:\n  f:\n    timeout: -1\n", "-1 is not a duration"),
    "concurrency zero": (
        "functions:\n  f:\n    concurrency: 0\n",
        "functions.f.concurrency: 0 is out of range; use 1 to 1000, e.g. concurrency: 4",
    ),
    "concurrency too big": (
        "functions:\n  f:\n    concurrency: 1001\n",
        "1001 is out of range; use 1 to 1000",
    ),
    "concurrency string": (
        "functions:\n  f:\n    concurrency: '4'\n",
        "'4' is not a whole number; write e.g. concurrency: 4",
    ),
    "scale not mapping": (
        "functions:\n  f:\n    scale: 3\n",
        "functions.f.scale: expected a mapping of min, max, idle, target, window, panic_window, "
        "down_rate, got a number",
    ),
    "scale min negative": (
        "functions:\n  f:\n    scale: {min: -1}\n",
        "functions.f.scale.min: -1 is out of range; use 0 to 1000",
    ),
    "scale max zero": (
        "functions:\n  f:\n    scale: {max: 0}\n",
        "functions.f.scale.max: 0 is out of range; use 1 to 1000",
    ),
    "scale max too big": (
        "functions:\n  f:\n    scale: {max: 1001}\n",
        "functions.f.scale.max: 1001 is out of range",
    ),
    "scale min above max": (
        "functions:\n  f:\n    scale: {min: 5, max: 2}\n",
        "functions.f.scale: min (5) is greater than max (2); lower min or raise max",
    ),
    "scale min above default max": (
        "functions:\n  f:\n    scale: {min: 11}\n",
        "min (11) is greater than max (10)",
    ),
    "scale idle word": (
        "functions:\n  f:\n    scale: {idle: later}\n",
        "functions.f.scale.idle: 'later' is not a duration; write e.g. idle: 60s",
    ),
    "env list": (
        "functions:\n  f:\n    env: [A]\n",
        "functions.f.env: expected a mapping of variable names to values, got a list",
    ),
    "env bad key": (
        "functions:\n  f:\n    env: {1ABC: x}\n",
        "functions.f.env.1ABC: '1ABC' is not a valid variable name",
    ),
    "env dashed key": (
        "functions:\n  f:\n    env: {MY-VAR: x}\n",
        "'MY-VAR' is not a valid variable name",
    ),
    "env numeric key": (
        "functions:\n  f:\n    env: {1: x}\n",
        "functions.f.env.1: 1 is not a valid variable name",
    ),
    "env null value": (
        "functions:\n  f:\n    env: {A: null}\n",
        "functions.f.env.A: has no value; write e.g. A: '' for an empty one",
    ),
    "env list value": (
        "functions:\n  f:\n    env: {A: [1]}\n",
        "functions.f.env.A: [1] is not a valid value; use a string, a number or true/false",
    ),
    "env date value": (
        "functions:\n  f:\n    env: {A: 2024-01-01}\n",
        "functions.f.env.A: datetime.date(2024, 1, 1) is not a valid value",
    ),
    "access unknown": (
        "functions:\n  f:\n    access: world\n",
        "functions.f.access: 'world' is not an access policy; write access: public",
    ),
    "cpu zero": ("functions:\n  f:\n    cpu: 0\n", "functions.f.cpu: 0 is not a number of cores"),
    "cpu text": ("functions:\n  f:\n    cpu: half\n", "'half' is not a number of cores"),
    "pids too few": ("functions:\n  f:\n    pids: 2\n", "functions.f.pids: 2 is out of range"),
    "tmp text": ("functions:\n  f:\n    tmp: big\n", "'big' is not a whole number of MB"),
    "secrets not a list": (
        "functions:\n  f:\n    secrets: db\n",
        "functions.f.secrets: expected a list of secret names",
    ),
    "secret traversal": (
        "functions:\n  f:\n    secrets: ['../etc']\n",
        "functions.f.secrets[0]: '../etc' is invalid",
    ),
    "secret twice": ("functions:\n  f:\n    secrets: [a, a]\n", "lists a secret twice"),
    "secret bad env": (
        "functions:\n  f:\n    secrets: [{name: a, env: 1BAD}]\n",
        "'1BAD' is not a valid variable name",
    ),
    "secret unknown key": (
        "functions:\n  f:\n    secrets: [{name: a, file: x}]\n",
        "functions.f.secrets[0].file: unknown key",
    ),
}


@pytest.mark.parametrize(("text", "expected"), BAD_MANIFESTS.values(), ids=BAD_MANIFESTS.keys())
def test_bad_manifest(text: str, expected: str) -> None:
    with pytest.raises(UserError) as caught:
        load_manifest(text, "ignored")
    assert caught.value.code == "bad_manifest"
    assert caught.value.status == 400
    assert caught.value.message.startswith("ember.yaml: ")
    assert expected in caught.value.message


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("functions:\n  hello:\n    memory: 128\n   timeout: 3\n", 4),
        ("functions: {hello: {memory: 1}\n", 2),
        ('functions:\n  hello:\n    handler: "unterminated\n', 4),
        ("functions: !!python/object:os.system {}\n", 1),
    ],
)
def test_invalid_yaml_names_the_line(text: str, line: int) -> None:
    with pytest.raises(UserError) as caught:
        load_manifest(text, "ignored")
    assert caught.value.code == "bad_manifest"
    assert caught.value.message.startswith("ember.yaml is not valid YAML: ")
    assert caught.value.message.endswith(f" at line {line}")


def test_environment_size_is_capped() -> None:
    from ember.manifest import MAX_ENV_BYTES

    big = "x" * (MAX_ENV_BYTES + 1)
    with pytest.raises(UserError) as err:
        load_manifest(f"functions:\n  f:\n    env: {{BIG: '{big}'}}\n", "f")
    assert "env" in err.value.message and "KB" in err.value.message


def test_network_policy() -> None:
    specs = load_manifest("functions:\n  a: {network: none}\n  b: {}\n", "x")
    assert [s.network for s in specs] == ["none", "host"]
    with pytest.raises(UserError) as err:
        load_manifest("functions:\n  a: {network: bridge}\n", "x")
    assert "network: none" in err.value.message


def test_revision_hash_ignores_settings_left_at_their_default() -> None:
    from ember.spec import canonical

    assert canonical(FunctionSpec(name="f")) == b'{"name":"f"}'
    assert canonical(FunctionSpec(name="f", network="host")) == canonical(FunctionSpec(name="f"))
    assert canonical(FunctionSpec(name="f", scale=ScaleSpec(max=3))) != canonical(
        FunctionSpec(name="f")
    )


def test_isolation_settings() -> None:
    text = """
    functions:
      f:
        access: private
        cpu: 0.5
        pids: 64
        tmp: 8
        secrets: [db, {name: token, env: API_TOKEN}]
    """
    [spec] = load_manifest(textwrap.dedent(text), "f")
    assert (spec.access, spec.cpu, spec.pids, spec.tmp) == ("private", 0.5, 64, 8)
    assert [(r.name, r.env) for r in spec.secrets] == [("db", ""), ("token", "API_TOKEN")]
