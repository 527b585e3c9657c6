from __future__ import annotations

from pathlib import Path

import pytest

from ember.config import ServerConfig
from ember.errors import UserError


@pytest.mark.parametrize(
    ("field", "value"),
    [("port", 70000), ("queue_depth", -1), ("log_level", "loud"), ("flush_interval", 0)],
)
def test_validate_names_key_value_and_rule(field: str, value: object) -> None:
    with pytest.raises(UserError) as err:
        ServerConfig(home=Path("/tmp/x"), **{field: value}).validate()  # type: ignore[arg-type]
    assert field in err.value.message and repr(value) in err.value.message


def test_defaults_are_valid() -> None:
    cfg = ServerConfig(home=Path("/tmp/x")).validate()
    assert (cfg.port, cfg.max_body_bytes, cfg.db_path.name) == (8080, 6 * 1024 * 1024, "ember.db")
