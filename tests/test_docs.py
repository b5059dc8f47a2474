"""The documentation (docs/, `make docs`) names everything an integrator or operator
meets: every error code, every metric, every option and YAML key. (`make docs` checks
that it builds, its references included; tests/test_quickstart.py runs its quick start.)"""

from __future__ import annotations

import re
from collections import Counter

from incoming import config
from incoming.errors import ErrorCode
from incoming.metrics import Metrics

from .harness import ROOT

DOCS = ROOT / "docs"


def test_every_error_code_is_in_the_reference() -> None:
    table = (DOCS / "reference" / "errors.rst").read_text()
    rows = re.findall(r"^(\d+)\s+([A-Z_]+)\s", table, re.M)
    assert rows == [(str(code.value), code.name) for code in ErrorCode]


def test_the_metrics_table_names_every_series_and_only_those() -> None:
    metrics = Metrics()
    metrics.count_uploads(Counter)
    exported = set(re.findall(r"^# TYPE (incoming_\w+) ", metrics.render().decode(), re.M))
    assert len(exported) > 10
    page = (DOCS / "operations" / "monitoring.rst").read_text()
    documented = set(re.findall(r"``(incoming_\w+)", page))
    assert documented == exported


def test_the_configuration_reference_names_every_option_and_yaml_key() -> None:
    page = (DOCS / "reference" / "configuration.rst").read_text()
    options = [name for name, *_ in config.Options.optParameters + config.Options.optFlags]
    assert len(options) > 15
    for option in options:
        assert f"``--{option}" in page, option
    keys = {key for _, key, _ in config._SETTINGS.values() if key} | {"IncomingIP", "IncomingPort"}
    for key in keys:
        assert f"``{key}" in page, key
    # and no option that does not exist
    assert set(re.findall(r"``--([a-z0-9-]+)", page)) <= set(options)
