"""Parse `ember.yaml` into function specs.

Pure: the text comes in, `FunctionSpec`s go out. Every error is `UserError(code="bad_manifest")`
whose message names the file, the key path, the value and what to write instead:
``ember.yaml: functions.hello.memory: 'abc' is not a whole number of MB; write e.g. memory: 256``.
"""

from __future__ import annotations

import keyword
import math
import re
import reprlib
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any

import msgspec
import yaml

from ember.errors import UserError
from ember.spec import (
    MAX_TIMEOUT_S,
    RETRYABLE,
    AsyncSpec,
    BackoffSpec,
    Destination,
    FunctionSpec,
    ScaleSpec,
    SecretRef,
    TriggerSpec,
)

NAME_RE = re.compile(r"^[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")
SECRET_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z")
SECRET_NAME_RULE = "use 1-63 letters, digits, '_', '.' and '-', starting with a letter or digit"
NAME_RULE = (
    "use 1-63 lowercase letters, digits and '-', starting with a letter, not ending with '-'"
)

_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"  # ASCII only, on purpose
_HANDLER_RE = re.compile(rf"{_IDENTIFIER}(?:\.{_IDENTIFIER})+")
_ENV_KEY_RE = re.compile(_IDENTIFIER)
_DURATION_RE = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(ms|s|m|h)?")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_DURATION_RULE = "a number of seconds, or with a unit: 500ms, 30s, 15m, 1h"
_FUNCTIONS_EXAMPLE = "functions: {hello: {handler: handler.handle}}"
_EXAMPLES = {
    "handler": "handler.handle",
    "triggers": "[{type: cron, schedule: '*/5 * * * *'}]",
    "source": "src",
    "memory": "256",
    "timeout": "30s",
    "concurrency": "4",
    "scale": "{min: 0, max: 10, idle: 60s}",
    "env": "{LOG_LEVEL: debug}",
    "network": "none",
    "access": "private",
    "cpu": "0.5",
    "pids": "256",
    "tmp": "64",
    "secrets": "[db-password]",
    "preload": "[numpy, pandas]",
    "min": "0",
    "max": "10",
    "idle": "60s",
    "target": "1",
    "window": "60s",
    "panic_window": "6s",
    "down_rate": "2",
    "async": "{retries: 5, on_failure: {function: failed}}",
    "retries": "5",
    "backoff": "{initial: 1s, max: 5m, factor: 2, jitter: 0.5}",
    "initial": "1s",
    "backoff.max": "5m",  # a parent.key entry wins over the key's own (scale.max is a count)
    "factor": "2",
    "jitter": "0.5",
    "retry_on": "[5xx, 429, timeout, crash]",
    "max_age": "6h",
    "on_success": "{function: audit}",
    "on_failure": "{url: 'https://hooks.example.com/failed'}",
    "function": "audit",
    "url": "https://hooks.example.com/done",
    "subject": "ember.results.resize",
}

_Parser = Callable[[object, str], object]


_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxlist, _repr.maxdict, _repr.maxstring, _repr.maxother = 2, 5, 5, 100, 100


MAX_ENV_BYTES = 32 * 1024


def _show(value: object) -> str:
    """A short repr for messages: YAML aliases can make a tiny file expand to gigabytes."""
    return _repr.repr(value)


def validate_name(name: str) -> str:
    """Return `name` if it is a valid function name (a DNS label), else raise `bad_name`."""
    if not NAME_RE.match(name):
        raise UserError(f"function name {_show(name)} is invalid: {NAME_RULE}", code="bad_name")
    return name


def parse_duration(value: object, key: str) -> float:
    """Seconds from a number (seconds) or a string such as "500ms", "30s", "15m", "1h", "90"."""
    seconds = _seconds(value)
    if seconds is None:
        example = _example(key, "30s")
        raise UserError(
            f"{key}: {_show(value)} is not a duration; write e.g. {example} ({_DURATION_RULE})",
            code="bad_manifest",
        )
    return seconds


def load_manifest(text: str | None, default_name: str) -> list[FunctionSpec]:
    """The functions `ember.yaml` declares; without a manifest, one function with defaults."""
    if text is None:
        return [FunctionSpec(name=validate_name(default_name))]
    document = _parse_yaml(text)
    if document is not None and not isinstance(document, dict):
        raise _error(
            f"expected a mapping with a functions: key at the top level, got {_kind(document)}"
        )
    top = _fields(document or {}, "", ("functions",))
    if "functions" not in top:
        raise _fail(
            "functions", f"is missing; declare at least one function, e.g. {_FUNCTIONS_EXAMPLE}"
        )
    functions = top["functions"]
    if functions is None or functions == {}:
        raise _fail(
            "functions", f"is empty; declare at least one function, e.g. {_FUNCTIONS_EXAMPLE}"
        )
    if not isinstance(functions, dict):
        raise _fail(
            "functions",
            f"expected a mapping of names to settings, got {_kind(functions)}; "
            f"write e.g. {_FUNCTIONS_EXAMPLE}",
        )
    return [_function(name, body) for name, body in functions.items()]


# libyaml's safe loader when PyYAML was built with it: the same documents, ~8x faster than the
# pure-Python one (0.21 -> 0.03 ms for a small ember.yaml, on each deploy's path).
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _parse_yaml(text: str) -> object:
    try:
        return yaml.load(text, Loader=_LOADER)  # a safe loader (no arbitrary objects)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = exc.problem or exc.context or "syntax error"
        raise UserError(
            f"ember.yaml is not valid YAML: {problem}{where}", code="bad_manifest"
        ) from None
    except yaml.YAMLError as exc:
        raise UserError(f"ember.yaml is not valid YAML: {exc}", code="bad_manifest") from None


def _function(key: object, body: object) -> FunctionSpec:
    if not isinstance(key, str) or not NAME_RE.match(key):
        raise _fail("functions", f"function name {_show(key)} is invalid: {NAME_RULE}")
    path = f"functions.{key}"
    changes = _parse_fields({} if body is None else body, path, _FUNCTION_PARSERS)
    spec = msgspec.structs.replace(
        FunctionSpec(name=key), **{_ATTRIBUTES[field]: item for field, item in changes.items()}
    )
    _refuse_self_destinations(spec, _join(path, "async"))
    return spec


def _parse_fields(value: object, path: str, parsers: Mapping[str, _Parser]) -> dict[str, object]:
    fields = _fields(value, path, tuple(parsers))
    return {key: _field(parsers[key], item, _join(path, key)) for key, item in fields.items()}


def _fields(value: object, path: str, allowed: tuple[str, ...]) -> dict[str, object]:
    """`value` as a mapping whose keys are all in `allowed`."""
    if not isinstance(value, dict):
        raise _fail(path, f"expected a mapping of {', '.join(allowed)}, got {_kind(value)}")
    for key in value:
        if key not in allowed:
            raise _fail(_join(path, key), f"unknown key; valid keys are {', '.join(allowed)}")
    return {str(key): item for key, item in value.items()}


def _field(parser: _Parser, value: object, path: str) -> object:
    if value is None:
        example = _example(path)
        raise _fail(path, f"has no value; write e.g. {example}, or remove the key for the default")
    return parser(value, path)


def _handler(value: object, path: str) -> str:
    if (
        not isinstance(value, str)
        or not _HANDLER_RE.fullmatch(value)
        or any(keyword.iskeyword(part) for part in value.split("."))
    ):
        raise _fail(
            path,
            f"{_show(value)} is not module.function; write e.g. handler: handler.handle "
            "(the function handle in handler.py)",
        )
    return value


def _source(value: object, path: str) -> str:
    if not isinstance(value, str) or "\\" in value or "\0" in value:
        raise _fail(
            path, f"{_show(value)} is not a directory path; write e.g. source: src (use '/')"
        )
    parts = [part for part in value.split("/") if part not in ("", ".")]
    if value.startswith("/") or ".." in parts:
        raise _fail(
            path,
            f"{_show(value)} must be a directory inside the one holding ember.yaml, "
            "relative to it, without '..'; write e.g. source: src",
        )
    return "/".join(parts) or "."


def _whole(value: object, path: str, low: int, high: int, unit: str = "") -> int:
    example = _example(path)
    if isinstance(value, bool) or not isinstance(value, int):
        of_unit = f" of {unit}" if unit else ""
        raise _fail(path, f"{_show(value)} is not a whole number{of_unit}; write e.g. {example}")
    if not low <= value <= high:
        in_unit = f" {unit}" if unit else ""
        raise _fail(path, f"{value} is out of range; use {low} to {high}{in_unit}, e.g. {example}")
    return value


def _memory(value: object, path: str) -> int:
    return _whole(value, path, 16, 16384, "MB")


def _concurrency(value: object, path: str) -> int:
    return _whole(value, path, 1, 1000)


def _duration(value: object, path: str) -> float:
    try:
        return parse_duration(value, path)
    except UserError as exc:
        raise _error(exc.message) from None


def _timeout(value: object, path: str) -> float:
    seconds = _duration(value, path)
    if not 0 < seconds <= MAX_TIMEOUT_S:
        raise _fail(
            path,
            f"{_show(value)} is out of range; use more than 0 and at most "
            f"{MAX_TIMEOUT_S / 60:g}m, e.g. timeout: 30s",
        )
    return seconds


def _scale(value: object, path: str) -> ScaleSpec:
    changes = _parse_fields(value, path, _SCALE_PARSERS)
    scale = msgspec.structs.replace(ScaleSpec(), **changes)
    if scale.min > scale.max:
        raise _fail(
            path, f"min ({scale.min}) is greater than max ({scale.max}); lower min or raise max"
        )
    if scale.panic_window > scale.window:
        raise _fail(
            path,
            f"panic_window ({scale.panic_window:g} s) is longer than window ({scale.window:g} s); "
            "the panic window is the short one, e.g. window: 60s, panic_window: 6s",
        )
    return scale


def _number(value: object, path: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise _fail(
            path,
            f"{_show(value)} is not a number from {low:g} to {high:g}; write e.g. {_example(path)}",
        )
    return float(value)


def _window(value: object, path: str, low: float, high: float) -> float:
    seconds = _duration(value, path)
    if not low <= seconds <= high:
        raise _fail(
            path,
            f"{_show(value)} is out of range; use {low:g}s to {high / 60:g}m, e.g. "
            f"{_example(path)}",
        )
    return seconds


def _env(value: object, path: str) -> dict[str, str]:
    if not isinstance(value, dict):
        raise _fail(
            path,
            f"expected a mapping of variable names to values, got {_kind(value)}; "
            f"write e.g. env: {_EXAMPLES['env']}",
        )
    env = {_env_key(key, path): _env_value(item, _join(path, key)) for key, item in value.items()}
    size = sum(len(k.encode()) + len(v.encode()) for k, v in env.items())
    if size > MAX_ENV_BYTES:
        raise _fail(
            path,
            f"holds {size} bytes; the environment may hold at most "
            f"{MAX_ENV_BYTES // 1024} KB: put large values in a file of the bundle",
        )
    return env


def _network(value: object, path: str) -> str:
    if value not in ("host", "none"):
        raise _fail(
            path,
            f"{_show(value)} is not a network policy; write network: host (the "
            "default) or network: none (loopback only)",
        )
    return str(value)


def _access(value: object, path: str) -> str:
    if value not in ("public", "private"):
        raise _fail(
            path,
            f"{_show(value)} is not an access policy; write access: public (anyone may "
            "invoke it, the default) or access: private (callers need an invoke key)",
        )
    return str(value)


def _cpu(value: object, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.01 <= value <= 256:
        raise _fail(
            path,
            f"{_show(value)} is not a number of cores from 0.01 to 256; write e.g. cpu: 0.5 "
            "(half a core for all instances together), or leave it out for a fair share",
        )
    return float(value)


def validate_secret_name(name: object, path: str = "secret name") -> str:
    if not isinstance(name, str) or not SECRET_NAME_RE.match(name):
        raise UserError(f"{path}: {_show(name)} is invalid: {SECRET_NAME_RULE}", code="bad_name")
    return name


def _secrets(value: object, path: str) -> list[SecretRef]:
    if not isinstance(value, list):
        raise _fail(
            path,
            f"expected a list of secret names, got {_kind(value)}; write e.g. "
            "secrets: [db-password] or secrets: [{name: db-password, env: DB_PASSWORD}]",
        )
    refs: list[SecretRef] = []
    for i, item in enumerate(value):
        where = f"{path}[{i}]"
        if isinstance(item, dict):
            fields = _fields(item, where, ("name", "env"))
            name, env = fields.get("name"), fields.get("env", "")
            if env != "":
                env = _env_key(env, where + ".env")
        else:
            name, env = item, ""
        try:
            validate_secret_name(name, where)
        except UserError as exc:
            raise _error(exc.message) from None
        refs.append(SecretRef(name=str(name), env=str(env)))
    if len({ref.name for ref in refs}) != len(refs):
        raise _fail(path, "lists a secret twice; list each once")
    return refs


_MODULE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
MAX_PRELOAD = 64


def _preload(value: object, path: str) -> list[str]:
    if not isinstance(value, list) or len(value) > MAX_PRELOAD:
        raise _fail(
            path,
            f"expected a list of at most {MAX_PRELOAD} module names, got {_kind(value)}; "
            "write e.g. preload: [numpy, pandas]",
        )
    for i, item in enumerate(value):
        if not isinstance(item, str) or not _MODULE_RE.fullmatch(item):
            raise _fail(
                f"{path}[{i}]",
                f"{_show(item)} is not a module name; write it as in an import statement, "
                "e.g. pandas or scipy.signal",
            )
    if len(set(value)) != len(value):
        raise _fail(path, "lists a module twice; list each once")
    return list(value)


MAX_RETRIES = 1_000_000
MAX_URL = 2048
MAX_SUBJECT = 255
_STATUS_RE = re.compile(r"[1-9][0-9]{2}")
_SUBJECT_RE = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")
_URL_CHARS_RE = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no spaces
_RETRY_ON_RULE = (
    f"write {', '.join(RETRYABLE)} or a status code from 400 to 599, e.g. "
    f"retry_on: {_EXAMPLES['retry_on']}"
)


_RUNNER_KEYS = ("type", "name", "filter", "delivery")


def _triggers(value: object, path: str) -> list[TriggerSpec]:
    """The list's shape only: each entry's type, settings, filter and delivery are checked at
    deploy (ember.triggers.plan), where `--allow-trigger-errors` may keep a wrong one."""
    if not isinstance(value, list):
        raise _fail(path, f"expected a list of triggers, got {_kind(value)}; {_TRIGGER_EXAMPLE}")
    triggers: list[TriggerSpec] = []
    for index, entry in enumerate(value):
        where = f"{path}[{index}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("type"), str):
            raise _fail(where, f"expected a mapping with a type:, got {_kind(entry)}")
        name = entry.get("name", trigger_name(entry["type"], index, value))
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise _fail(f"{where}.name", f"{_show(name)} is invalid: {NAME_RULE}")
        if any(t.name == name for t in triggers):
            raise _fail(f"{where}.name", f"{name!r} is taken by another trigger; name each one")
        try:
            config = msgspec.json.decode(msgspec.json.encode(entry))
        except (TypeError, msgspec.EncodeError):
            raise _fail(
                where, "holds a value that is not text, a number, a list or a mapping"
            ) from None
        triggers.append(
            TriggerSpec(
                name=name,
                type=entry["type"],
                config={k: v for k, v in config.items() if k not in _RUNNER_KEYS},
                filter=config.get("filter") or [],
                delivery=config.get("delivery") or {},
            )
        )
    return triggers


def trigger_spec(entry: object) -> TriggerSpec:
    """One trigger as `ember triggers add` sends it (the shape of a `triggers:` entry)."""
    try:
        return _triggers([entry], "trigger")[0]
    except UserError as exc:
        message = exc.message.replace("ember.yaml: trigger[0]", "trigger", 1)
        raise UserError(message, code="bad_trigger") from None


def trigger_name(type_: str, index: int, entries: list[Any]) -> str:
    """A trigger without `name:`: its type, or `type-N` (N from 1 in the list) when the list
    has several of that type."""
    same = [i for i, e in enumerate(entries) if isinstance(e, dict) and e.get("type") == type_]
    base = re.sub(r"[^a-z0-9-]", "-", type_.lower())[:40] or "trigger"
    return base if len(same) == 1 else f"{base}-{same.index(index) + 1}"


_TRIGGER_EXAMPLE = "write e.g. triggers: [{type: cron, schedule: '*/5 * * * *'}]"


def _async(value: object, path: str) -> AsyncSpec:
    changes = _parse_fields(value, path, _ASYNC_PARSERS)
    return msgspec.structs.replace(AsyncSpec(), **changes)


def _backoff(value: object, path: str) -> BackoffSpec:
    written = _fields(value, path, tuple(_BACKOFF_PARSERS))
    changes = _parse_fields(written, path, _BACKOFF_PARSERS)
    backoff = msgspec.structs.replace(BackoffSpec(), **changes)
    if backoff.max < backoff.initial:
        cap = _show(written["max"]) if "max" in written else f"the default {backoff.max:g} s"
        raise _fail(
            _join(path, "max"),
            f"{cap} is shorter than initial ({_show(written['initial'])}); every wait is "
            f"capped at max, so write a max of at least initial, e.g. max: {written['initial']}, "
            "or lower initial",
        )
    return backoff


def _span(value: object, path: str, low: float, high: float) -> float:
    """A duration from `low` to `high` seconds."""
    seconds = _duration(value, path)
    if not low <= seconds <= high:
        raise _fail(
            path,
            f"{_show(value)} is out of range; use {_unit(low)} to {_unit(high)}, e.g. "
            f"{_example(path)}",
        )
    return seconds


def _unit(seconds: float) -> str:
    """`seconds` as one would write it in ember.yaml: 0.001 -> 1ms, 3600 -> 1h."""
    for unit, size in (("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= size and seconds % size == 0:
            days = f" ({seconds / 86400:g} days)" if seconds > 86400 and unit == "h" else ""
            return f"{seconds / size:g}{unit}{days}"
    return f"{seconds * 1000:g}ms"


def _retry_on(value: object, path: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise _fail(
            path,
            f"expected a list of outcomes to retry, got {_kind(value)}; {_RETRY_ON_RULE}, "
            "or retry_on: [] to never retry",
        )
    outcomes: dict[str, None] = {}  # insertion-ordered: duplicates removed, order kept
    for i, item in enumerate(value):
        outcomes[_outcome(item, f"{path}[{i}]")] = None
    return tuple(outcomes)


def _outcome(value: object, path: str) -> str:
    if isinstance(value, str) and value in RETRYABLE:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        code = value
    elif isinstance(value, str) and _STATUS_RE.fullmatch(value):
        code = int(value)
    else:
        raise _fail(path, f"{_show(value)} is not an outcome to retry; {_RETRY_ON_RULE}")
    if not 400 <= code <= 599:
        raise _fail(path, f"{_show(value)} is not an error status code; {_RETRY_ON_RULE}")
    return str(code)


def _destination(value: object, path: str) -> Destination:
    if not isinstance(value, dict):
        raise _fail(
            path,
            f"expected a mapping with one of {', '.join(_DESTINATION_PARSERS)}, got "
            f"{_kind(value)}; write e.g. {_example(path)}",
        )
    changes = _parse_fields(value, path, _DESTINATION_PARSERS)
    if len(changes) != 1:
        given = f"sets {', '.join(changes)}" if changes else "sets no target"
        raise _fail(
            path,
            f"{given}; set exactly one of {', '.join(_DESTINATION_PARSERS)}, e.g. {_example(path)}",
        )
    return msgspec.structs.replace(Destination(), **changes)


def _target_function(value: object, path: str) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise _fail(
            path,
            f"{_show(value)} is not a function name: {NAME_RULE}; name a function of the "
            f"same namespace, e.g. {_example(path)}",
        )
    return value


def _url(value: object, path: str) -> str:
    if not isinstance(value, str) or not _URL_CHARS_RE.fullmatch(value):
        raise _fail(
            path,
            f"{_show(value)} is not a URL; write e.g. {_example(path)} "
            "(percent-encode spaces and non-ASCII characters)",
        )
    if len(value) > MAX_URL:
        raise _fail(path, f"is {len(value)} characters long; use at most {MAX_URL}")
    try:
        parts = urllib.parse.urlsplit(value)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
        parts.port  # noqa: B018 -- raises ValueError when out of range or not a number
    except ValueError:
        ok = False
    if not ok:
        raise _fail(
            path,
            f"{_show(value)} is not an absolute http:// or https:// URL with a host; "
            f"write e.g. {_example(path)}",
        )
    return value


def _subject(value: object, path: str) -> str:
    if not isinstance(value, str) or not _SUBJECT_RE.fullmatch(value) or len(value) > MAX_SUBJECT:
        raise _fail(
            path,
            f"{_show(value)} is not a NATS subject: use at most {MAX_SUBJECT} letters, digits, "
            "'_' and '-' in tokens separated by '.', without wildcards (* or >); write e.g. "
            f"{_example(path)}",
        )
    return value


def _refuse_self_destinations(spec: FunctionSpec, path: str) -> None:
    """A function may not be its own destination: each run would start another, forever."""
    why = {
        "on_success": "each success would invoke it again, forever",
        "on_failure": "each failure would invoke it again, past its retries and max_age "
        "(to retry more, raise retries)",
    }
    for key, because in why.items():
        destination: Destination | None = getattr(spec.async_, key)
        if destination is not None and destination.function == spec.name:
            raise _fail(
                f"{path}.{key}.function",
                f"{_show(spec.name)} is the function itself: {because}; name another "
                "function, or send the result to a url or subject",
            )


def _env_key(key: object, path: str) -> str:
    if not isinstance(key, str) or not _ENV_KEY_RE.fullmatch(key):
        raise _fail(
            _join(path, key),
            f"{_show(key)} is not a valid variable name; "
            "use letters, digits and '_', not starting with a digit",
        )
    return key


def _env_value(value: object, path: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str) and "\0" not in value:
        return value
    if value is None:
        raise _fail(path, f"has no value; write e.g. {_leaf(path)}: '' for an empty one")
    raise _fail(
        path,
        f"{_show(value)} is not a valid value; use a string, a number or true/false "
        "(quote anything else)",
    )


def _seconds(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        if isinstance(value, int | float):
            seconds = float(value)
        elif isinstance(value, str) and (match := _DURATION_RE.fullmatch(value.strip())):
            seconds = float(match[1]) * _UNIT_SECONDS[match[2]]
        else:
            return None
    except OverflowError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _kind(value: object) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "true/false"
    kinds = {dict: "a mapping", list: "a list", str: "a string", int: "a number", float: "a number"}
    return kinds.get(type(value), f"a {type(value).__name__}")


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _leaf(path: str) -> str:
    return path.rpartition(".")[2]


def _example(path: str, default: str | None = None) -> str:
    """`key: value` to show for the key at `path`: `max: 5m` for `functions.f.async.backoff.max`."""
    parent, _, leaf = path.rpartition(".")
    value = _EXAMPLES.get(f"{_leaf(parent)}.{leaf}") or _EXAMPLES.get(leaf, default)
    if value is None:
        raise KeyError(leaf)
    return f"{leaf}: {value}"


def _error(message: str) -> UserError:
    return UserError(f"ember.yaml: {message}", code="bad_manifest")


def _fail(path: str, problem: str) -> UserError:
    return _error(f"{path}: {problem}")


_SCALE_PARSERS: dict[str, _Parser] = {
    "min": lambda value, path: _whole(value, path, 0, 1000),
    "max": lambda value, path: _whole(value, path, 1, 1000),
    "idle": _duration,
    "target": lambda value, path: _number(value, path, 0.01, 1000),
    "window": lambda value, path: _window(value, path, 6, 3600),
    "panic_window": lambda value, path: _window(value, path, 1, 600),
    "down_rate": lambda value, path: _number(value, path, 1.01, 1000),
}
_BACKOFF_PARSERS: dict[str, _Parser] = {
    "initial": lambda value, path: _span(value, path, 0.001, 3600),
    "max": lambda value, path: _span(value, path, 0.001, 24 * 3600),
    "factor": lambda value, path: _number(value, path, 1, 10),
    "jitter": lambda value, path: _number(value, path, 0, 1),
}
_DESTINATION_PARSERS: dict[str, _Parser] = {
    "function": _target_function,
    "url": _url,
    "subject": _subject,
}
_ASYNC_PARSERS: dict[str, _Parser] = {
    "retries": lambda value, path: _whole(value, path, 0, MAX_RETRIES),
    "backoff": _backoff,
    "retry_on": _retry_on,
    "max_age": lambda value, path: _span(value, path, 1, 7 * 24 * 3600),
    "concurrency": lambda value, path: _whole(value, path, 0, 10000),
    "on_success": _destination,
    "on_failure": _destination,
}
_FUNCTION_PARSERS: dict[str, _Parser] = {
    "handler": _handler,
    "source": _source,
    "memory": _memory,
    "timeout": _timeout,
    "concurrency": _concurrency,
    "scale": _scale,
    "env": _env,
    "network": lambda value, path: _network(value, path),
    "access": _access,
    "cpu": _cpu,
    "pids": lambda value, path: _whole(value, path, 8, 65536),
    "tmp": lambda value, path: _whole(value, path, 1, 16384, "MB"),
    "secrets": _secrets,
    "preload": _preload,
    "async": _async,
    "triggers": lambda value, path: _triggers(value, path),
}
# The FunctionSpec attribute of each key of ember.yaml: `async` is a keyword, so `async_`.
_ATTRIBUTES = {field.encode_name: field.name for field in msgspec.structs.fields(FunctionSpec)}
