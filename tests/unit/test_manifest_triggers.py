"""`triggers:` in ember.yaml: the manifest keeps each entry's shape (its settings are checked at
deploy, tests/unit/test_trigger_runner.py and tests/integration/test_triggers.py)."""

from __future__ import annotations

import pytest

from ember.errors import UserError
from ember.manifest import load_manifest, trigger_spec
from ember.spec import FunctionSpec, TriggerSpec, canonical


def triggers(body: str) -> list[TriggerSpec]:
    text = "functions:\n  f:\n    triggers:\n" + "".join(
        f"      {line}\n" for line in body.strip().splitlines()
    )
    return load_manifest(text, "f")[0].triggers


def test_entries_keep_their_keys_apart_from_filter_and_delivery() -> None:
    (t,) = triggers(
        "- {type: nats, url: 'nats://h:4222', subject: a.b, filter: [{attribute: type, "
        "exact: x}], delivery: {concurrency: 2}}"
    )
    assert t == TriggerSpec(
        name="nats",
        type="nats",
        config={"url": "nats://h:4222", "subject": "a.b"},
        filter=[{"attribute": "type", "exact": "x"}],
        delivery={"concurrency": 2},
    )


def test_names_default_to_the_type_numbered_when_it_repeats() -> None:
    names = [t.name for t in triggers("- {type: cron}\n- {type: nats}\n- {type: cron, name: x}")]
    assert names == ["cron-1", "nats", "x"]


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ("- schedule: '* * * * *'", "functions.f.triggers[0]: expected a mapping with a type:"),
        ("- {type: cron, name: Bad_Name}", "functions.f.triggers[0].name:"),
        ("- {type: cron, name: a}\n- {type: nats, name: a}", "functions.f.triggers[1].name:"),
    ],
)
def test_bad_shapes_name_the_entry(body: str, named: str) -> None:
    with pytest.raises(UserError) as caught:
        triggers(body)
    assert named in caught.value.message


def test_a_list_is_required_and_the_api_shape_is_the_same() -> None:
    with pytest.raises(UserError, match="expected a list of triggers"):
        load_manifest("functions:\n  f:\n    triggers: {type: cron}\n", "f")
    assert trigger_spec({"type": "cron", "schedule": "@daily"}).config == {"schedule": "@daily"}
    with pytest.raises(UserError, match=r"^trigger: expected a mapping"):
        trigger_spec(["cron"])


def test_a_function_without_triggers_hashes_as_before() -> None:
    assert b"triggers" not in canonical(FunctionSpec(name="f"))
