"""The systemd units in contrib/systemd: their command lines parse as twistd parses them,
and the template for several instances keeps the single service's limits and hardening."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from twisted.scripts.twistd import ServerOptions

from incoming.config import Config, Options, load_yaml

from .harness import ROOT

UNITS = ROOT / "contrib" / "systemd"
EXAMPLE_YAML = ROOT / "contrib" / "incoming.yaml"
# what the instances must share with the single service, word for word
SAME = ("Type", "User", "Group", "WorkingDirectory", "StateDirectory", "Restart", "LimitNOFILE",
        "UMask", "KillSignal", "TimeoutStopSec", "NoNewPrivileges", "ProtectSystem",
        "ReadWritePaths", "PrivateTmp", "WantedBy")  # fmt: skip


def settings(path: Path) -> dict[str, list[str]]:
    """Every `Key=value` of a unit file, values in order (Environment= may repeat)."""
    found: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def exec_start(unit: dict[str, list[str]], instance: str) -> list[str]:
    """ExecStart's words as systemd passes them: %i is the instance, ${NAME} the unit's
    Environment= value (one word each)."""
    environment = dict(e.split("=", 1) for e in unit.get("Environment", []))
    [line] = unit["ExecStart"]
    words = shlex.split(line.replace("%i", instance))
    return [re.sub(r"\$\{(\w+)\}", lambda m: environment[m.group(1)], w) for w in words]


def test_the_template_unit_runs_an_instance_per_port_on_one_redis() -> None:
    unit = settings(UNITS / "incoming@.service")
    words = exec_start(unit, "4002")
    assert words[0] == "/opt/incoming/bin/twistd"
    assert words[words.index("--config") + 1] == "/etc/incoming/incoming.yaml"
    # the YAML file is the example shipped beside the units
    words[words.index("--config") + 1] = str(EXAMPLE_YAML)
    twistd = ServerOptions()
    twistd.parseOptions(words[1:])  # as `twistd` does, the `incoming` plugin's options too
    assert twistd["nodaemon"] and twistd["pidfile"] == "" and twistd["logfile"] == "-"
    assert twistd.subCommand == "incoming"
    config: Config = twistd.subOptions.config
    assert config.listen == "tcp:4002:interface=127.0.0.1"
    assert config.redis == "redis://127.0.0.1:6379/0"
    example = load_yaml(EXAMPLE_YAML)
    assert config.storage_dir == example["storage_dir"]  # every instance: the same
    assert config.ws_timeout == example["ws_timeout"]  # the lease time
    assert any(
        config.storage_dir.is_relative_to(path) for path in unit["ReadWritePaths"][0].split()
    )
    # the same instance through the plugin's own options, as `twistd incoming --help` reads them
    options = Options()
    options.parseOptions(words[words.index("incoming") + 1 :])
    assert options.config == config


def test_the_template_unit_keeps_the_single_service_limits_and_hardening() -> None:
    single = settings(UNITS / "incoming.service")
    template = settings(UNITS / "incoming@.service")
    assert template["LimitNOFILE"] == ["65536"] and template["UMask"] == ["0027"]
    assert {k: template.get(k) for k in SAME} == {k: single.get(k) for k in SAME}
    assert "%i" in template["Description"][0]
    # the single service's command still parses too (the .tac file reads $INCOMING_CONFIG)
    twistd = ServerOptions()
    twistd.parseOptions(shlex.split(single["ExecStart"][0])[1:])
    assert twistd["python"] == "/opt/incoming/incoming.tac"
