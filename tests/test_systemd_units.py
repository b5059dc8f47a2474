"""The systemd units in contrib/systemd: their command lines parse as twistd parses them,
the template for several instances keeps the single service's limits and sandbox,
`systemd-analyze security` rates them safe, and the daemon runs in that sandbox."""

from __future__ import annotations

import os
import re
import shlex
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.scripts.twistd import ServerOptions

from incoming.config import Config, Options, load_yaml

from .harness import (
    ROOT,
    Backend,
    Redis,
    Server,
    free_port,
    send_all,
    stop_daemon,
    upload_request,
)
from .system import (
    NEEDS_ROOT,
    open_directory,
    spawn_twistd,
    started,
    throwaway_accounts,
    unit_sandbox,
)

UNITS = ROOT / "contrib" / "systemd"
EXAMPLE_YAML = ROOT / "contrib" / "incoming.yaml"
TAC = "/opt/incoming/incoming.tac"
# what differs between the single service and the template
OWN = ("Description", "After", "Environment")
MAX_EXPOSURE = 3.0  # systemd-analyze security: "OK" up to 3.9; 8.7 before the sandbox


def settings(path: Path) -> dict[str, list[str]]:
    """Every `Key=value` of a unit file, values in order (Environment= may repeat)."""
    found: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def environment(unit: dict[str, list[str]], instance: str) -> dict[str, str]:
    """Environment= as systemd reads it: quoted words, %i the instance."""
    words = [w for line in unit["Environment"] for w in shlex.split(line)]
    return dict(w.replace("%i", instance).split("=", 1) for w in words)


def daemon_options(unit: dict[str, list[str]], instance: str) -> Config:
    """What the .tac file makes of the unit's environment (and the example YAML file)."""
    env = environment(unit, instance)
    assert env["INCOMING_CONFIG"] == "/etc/incoming/incoming.yaml"
    options = Options()
    options.parseOptions(
        ["--config", str(EXAMPLE_YAML), *shlex.split(env.get("INCOMING_OPTIONS", ""))]
    )
    return options.config


def test_both_units_run_the_tac_file_which_looks_for_no_plugins() -> None:
    for name in ("incoming.service", "incoming@.service"):
        [line] = settings(UNITS / name)["ExecStart"]
        twistd = ServerOptions()
        twistd.parseOptions(shlex.split(line)[1:])
        assert twistd["nodaemon"] and twistd["pidfile"] == "" and twistd["logfile"] == "-"
        assert twistd["python"] == TAC and twistd.subCommand is None, name


def test_the_template_unit_runs_an_instance_per_port_on_one_redis() -> None:
    unit = settings(UNITS / "incoming@.service")
    config = daemon_options(unit, "4002")
    assert config.listen == "tcp:4002:interface=127.0.0.1"
    assert config.redis == "redis://127.0.0.1:6379/0"
    example = load_yaml(EXAMPLE_YAML)
    assert config.storage_dir == example["storage_dir"]  # every instance: the same
    assert any(
        config.storage_dir.is_relative_to(path) for path in unit["ReadWritePaths"][0].split()
    )
    single = daemon_options(settings(UNITS / "incoming.service"), "")
    assert single.storage_dir == config.storage_dir and single.redis is None


def test_the_template_unit_keeps_the_single_service_limits_and_sandbox() -> None:
    single = settings(UNITS / "incoming.service")
    template = settings(UNITS / "incoming@.service")
    assert template["LimitNOFILE"] == ["65536"] and template["UMask"] == ["0027"]
    shared = (set(single) | set(template)) - set(OWN)
    assert {k: template.get(k) for k in shared} == {k: single.get(k) for k in shared}
    assert "%i" in template["Description"][0]


def test_systemd_analyze_rates_the_units_safe() -> None:
    for name in ("incoming.service", "incoming@.service"):
        report = subprocess.run(
            ["systemd-analyze", "security", "--offline=yes", str(UNITS / name)],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        [level] = re.findall(r"Overall exposure level for \S+: (\d+\.\d+)", report)
        assert float(level) <= MAX_EXPOSURE, (name, report)


@NEEDS_ROOT
@pytest_twisted.ensureDeferred
async def test_the_daemon_works_in_the_units_sandbox_with_redis_and_a_group(
    redis: Redis, backend: Backend, stopper: list[Any]
) -> None:
    """The template unit's command and environment, as its user (the group its `Group=`),
    under its seccomp filters and umask: Redis over TCP, an upload, its handover, and the
    backend (another user of the group) moving the file away."""
    unit = settings(UNITS / "incoming@.service")
    with throwaway_accounts("primary") as who, open_directory() as top:
        state = top / "lib"  # StateDirectory=: the service user's
        state.mkdir()
        os.chown(state, who.server.uid, who.gid)
        storage = state / "storage"
        config = top / "incoming.yaml"
        config.write_text(
            EXAMPLE_YAML.read_text().replace("/var/lib/incoming/storage", str(storage))
            + f"Group: {who.group}\n"
        )
        config.chmod(0o644)
        port = str(free_port())
        env = environment(unit, port)
        env["INCOMING_CONFIG"] = str(config)
        env["INCOMING_OPTIONS"] = env["INCOMING_OPTIONS"].replace(
            "redis://127.0.0.1:6379/0", redis.url
        )
        [line] = unit["ExecStart"]
        words = [w.replace(TAC, str(ROOT / "contrib" / "incoming.tac")) for w in shlex.split(line)]
        assert words[0] == "/opt/incoming/bin/twistd"
        sandbox = unit_sandbox(unit, top / "sandbox.json")
        daemon, process = spawn_twistd(words[1:], top, env, who.server, sandbox)
        stopper.append(process)
        await started(daemon)
        status = dict(
            line.split(":\t", 1)
            for line in Path(f"/proc/{process.pid}/status").read_text().splitlines()
        )
        assert status["Uid"].split()[0] == str(who.server.uid) and status["NoNewPrivs"] == "1"
        assert (status["Seccomp"], status["Seccomp_filters"]) == ("2", "2")  # filters on
        server = Server(manager=None, port=int(port), storage_dir=storage)  # type: ignore[arg-type]
        ticket = await server.new_upload(backend.url, removeFileWhenFinished="false")
        data = os.urandom(300_000)
        client, _ = await upload_request(server, ticket, len(data))
        client.send("MsgAck", Ack=True)
        await send_all(client, data, 512 * 1024, 4)
        handover = await backend.posts.get()
        await client.expect("MsgAllDone")
        assert handover["filename"] == str(storage / ticket)
        away = top / "backend-files"
        away.mkdir()
        os.chown(away, who.backend.uid, who.backend.gid)
        moved = who.backend.run("mv", handover["filename"], str(away))
        assert moved.returncode == 0, moved.stderr
        assert (away / ticket).read_bytes() == data
        assert stat.S_IMODE(storage.stat().st_mode) == 0o770 and storage.stat().st_gid == who.gid
        await stop_daemon(daemon, process)
    log = daemon.output.decode()
    assert f"cluster mode, Redis at 127.0.0.1:{redis.port}/0" in log
    assert "Unable to write to plugin cache" not in log
    assert "Traceback" not in log and "not permitted" not in log
