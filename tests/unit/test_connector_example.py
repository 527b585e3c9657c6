"""The example connector's tests, run with Ember's: they live next to the connector they test
(examples/connector-tcp/test_tcp_source.py, copied with it by connector authors), outside
pytest's testpaths, so they are collected here."""

import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "connector-tcp"
if str(EXAMPLE) not in sys.path:
    sys.path.insert(0, str(EXAMPLE))

from test_tcp_source import *  # noqa: E402, F403
