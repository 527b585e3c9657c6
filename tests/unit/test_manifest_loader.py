"""ember.yaml is read with libyaml's safe loader where PyYAML has it (each deploy parses one)."""

from __future__ import annotations

import pytest
import yaml

from ember import manifest
from ember.errors import UserError


@pytest.mark.skipif(not yaml.__with_libyaml__, reason="PyYAML built without libyaml")
def test_the_manifest_is_parsed_by_libyaml() -> None:
    assert manifest._LOADER is yaml.CSafeLoader


def test_the_safe_loader_still_refuses_python_objects() -> None:
    with pytest.raises(UserError, match="not valid YAML"):
        manifest.load_manifest("functions: !!python/object/apply:os.system ['true']\n", "f")


def test_a_syntax_error_still_names_its_line() -> None:
    with pytest.raises(UserError, match="at line 4"):
        manifest.load_manifest("functions:\n  f:\n    scale: {idle: [\n", "f")
