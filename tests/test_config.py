"""`twistd incoming` options and the 2014 YAML file."""

from __future__ import annotations

import grp
import os
from ipaddress import ip_network
from pathlib import Path

import pytest
from twisted.python import usage

from incoming.config import Config, Options
from incoming.objectstore import Location


def parse(*argv: str) -> Config:
    options = Options()
    options.parseOptions(list(argv))
    return options.config


def test_defaults_are_the_2014_servers() -> None:
    assert parse() == Config(
        listen="tcp:4000:interface=0.0.0.0",
        storage_dir=Path("incoming-storage"),
        chunk_size_kb=512,
        send_ahead=4,
        max_idle=43200,
        ws_timeout=58,
        handover_timeout=55,
        handover_confirm_timeout=600,
    )


def test_every_option() -> None:
    config = parse(
        "--listen",
        "tcp:8080:interface=127.0.0.1",
        "--storage-dir",
        "/srv/up",
        "--chunk-size-kb",
        "1024",
        "--send-ahead",
        "8",
        "--max-idle",
        "60",
        "--ws-timeout",
        "30",
        "--handover-timeout",
        "20",
        "--handover-confirm-timeout",
        "90",
    )
    assert config == Config(
        listen="tcp:8080:interface=127.0.0.1",
        storage_dir=Path("/srv/up"),
        chunk_size_kb=1024,
        send_ahead=8,
        max_idle=60,
        ws_timeout=30,
        handover_timeout=20,
        handover_confirm_timeout=90,
    )


def test_yaml_file_and_options_win(tmp_path: Path) -> None:
    path = tmp_path / "incoming.yaml"
    path.write_text(
        "IncomingIP: 127.0.0.1\nIncomingPort: 4711\nStorageDir: /data/in\n"
        "UploadChunkSizeKB: 256\nUploadSendAhead: 6\nUploadMaxIdleDurationS: 3600\n"
        "WebsocketConnectionTimeoutS: 40\nHandoverTimeoutS: 30\nHandoverConfirmTimeoutS: 300\n"
    )
    assert parse("--config", str(path)) == Config(
        listen="tcp:4711:interface=127.0.0.1",
        storage_dir=Path("/data/in"),
        chunk_size_kb=256,
        send_ahead=6,
        max_idle=3600,
        ws_timeout=40,
        handover_timeout=30,
        handover_confirm_timeout=300,
    )
    config = parse("--config", str(path), "--send-ahead", "2", "--listen", "tcp:1")
    assert (config.send_ahead, config.listen, config.chunk_size_kb) == (2, "tcp:1", 256)


def test_yaml_ipv6_address_is_escaped(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("IncomingIP: '::1'\nIncomingPort: 4000\n")
    assert parse("--config", str(path)).listen == "tcp:4000:interface=\\:\\:1"


def test_the_window_ceiling_and_rate_from_command_line_and_yaml(tmp_path: Path) -> None:
    assert (parse().max_window, parse().window_rate_mbit) == (64 * 1024 * 1024, 1000)
    path = tmp_path / "c.yaml"
    path.write_text("MaxWindowBytes: 16777216\nWindowRateMbit: 400\n")
    assert (
        parse("--config", str(path)).max_window,
        parse("--config", str(path)).window_rate_mbit,
    ) == (16777216, 400)
    config = parse("--config", str(path), "--max-window", "0", "--window-rate", "10000")
    assert (config.max_window, config.window_rate_mbit) == (0, 10000)
    with pytest.raises(usage.UsageError, match="--max-window"):
        parse("--max-window", "-1")
    with pytest.raises(usage.UsageError, match="--window-rate"):
        parse("--window-rate", "0")


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--chunk-size-kb", "0"], "--chunk-size-kb"),
        (["--chunk-size-kb", "big"], "--chunk-size-kb"),
        (["--send-ahead", "-1"], "--send-ahead"),
        (["--max-idle", "0"], "--max-idle"),
        (["--ws-timeout", "soon"], "--ws-timeout"),
        (["--handover-timeout", "-5"], "--handover-timeout"),
        (["--handover-confirm-timeout", "nan"], "--handover-confirm-timeout"),
        (["--listen", " "], "--listen"),
    ],
)
def test_bad_values_are_usage_errors_naming_the_option(argv: list[str], named: str) -> None:
    with pytest.raises(usage.UsageError, match=named):
        parse(*argv)


@pytest.mark.parametrize(
    "text, named",
    [
        ("UploadSendAhead: many\n", "UploadSendAhead"),
        ("IncomingPort: 70000\n", "IncomingPort"),
        ("- just a list\n", "mapping"),
        ("a: [unclosed\n", "cannot read"),
    ],
)
def test_bad_yaml_is_a_usage_error(tmp_path: Path, text: str, named: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(usage.UsageError, match=named):
        parse("--config", str(path))


def test_missing_yaml_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(usage.UsageError, match="cannot read"):
        parse("--config", str(tmp_path / "nope.yaml"))


def test_deployment_options_from_command_line_and_yaml(tmp_path: Path) -> None:
    config = parse(
        "--backend-listen", "unix:/run/incoming.sock", "--handover-hosts", "App.example, b.example",
        "--allowed-origins", "https://app.example/",
    )  # fmt: skip
    assert config.backend_listen == "unix:/run/incoming.sock"
    assert config.handover_hosts == frozenset({"app.example", "b.example"})
    assert config.allowed_origins == frozenset({"https://app.example"})
    path = tmp_path / "c.yaml"
    path.write_text("BackendListen: tcp:4001\nHandoverHosts: [a.example]\n")
    config = parse("--config", str(path))
    assert (config.backend_listen, config.handover_hosts) == ("tcp:4001", frozenset({"a.example"}))
    with pytest.raises(usage.UsageError, match="--handover-hosts"):
        parse("--handover-hosts", " , ")


def test_upload_limit_and_checksum_from_command_line_and_yaml(tmp_path: Path) -> None:
    assert (Config().max_upload_bytes, Config().checksum) == (None, "sha256")
    config = parse("--max-upload-size", "1073741824", "--checksum", "none")
    assert (config.max_upload_bytes, config.checksum) == (1 << 30, "none")
    path = tmp_path / "c.yaml"
    path.write_text("MaxUploadBytes: 5000\nChecksum: SHA256\n")
    config = parse("--config", str(path))
    assert (config.max_upload_bytes, config.checksum) == (5000, "sha256")
    with pytest.raises(usage.UsageError, match="--checksum"):
        parse("--checksum", "md5")
    with pytest.raises(usage.UsageError, match="--max-upload-size"):
        parse("--max-upload-size", "-1")


def test_access_options_from_command_line_and_yaml(tmp_path: Path) -> None:
    default = Config()
    assert (default.backend_networks, default.handover_hosts, default.open_access) == (
        frozenset(),
        frozenset(),
        False,
    )
    config = parse("--backend-networks", "10.0.0.0/8, 192.168.1.5,fd00::/8", "--open-access")
    assert config.backend_networks == frozenset(
        map(ip_network, ["10.0.0.0/8", "192.168.1.5/32", "fd00::/8"])
    )
    assert config.open_access is True
    path = tmp_path / "c.yaml"
    path.write_text("BackendNetworks: [10.1.0.0/16]\nOpenAccess: true\n")
    config = parse("--config", str(path))
    assert (config.backend_networks, config.open_access) == (
        frozenset({ip_network("10.1.0.0/16")}),
        True,
    )
    path.write_text("OpenAccess: false\n")
    assert parse("--config", str(path)).open_access is False
    for bad in ("10.0.0.0/33", "any", " , "):
        with pytest.raises(usage.UsageError, match="--backend-networks"):
            parse("--backend-networks", bad)
    path.write_text("OpenAccess: maybe\n")
    with pytest.raises(usage.UsageError, match="OpenAccess"):
        parse("--config", str(path))


def test_group_names_a_group_of_this_host(tmp_path: Path) -> None:
    name = grp.getgrgid(os.getgid()).gr_name
    assert parse("--group", name).group == name
    assert parse("--group", str(os.getgid())).group == name
    path = tmp_path / "c.yaml"
    path.write_text(f"Group: {name}\n")
    assert parse("--config", str(path)).group == name
    with pytest.raises(usage.UsageError, match="--group: no group 'no-such-group-here'"):
        parse("--group", "no-such-group-here")


def test_object_storage_options_from_command_line_and_yaml(tmp_path: Path) -> None:
    default = Config()
    assert (default.storage, default.s3_endpoint, default.s3_part_size) == (None, None, 16 << 20)
    config = parse(
        "--storage", "s3://uploads/incoming/", "--s3-endpoint", "http://127.0.0.1:7480/",
        "--s3-part-size", "8MiB",
    )  # fmt: skip
    assert config.storage == Location("uploads", "incoming/")
    assert config.storage.key("T") == "incoming/T"
    assert config.storage.url("incoming/T") == "s3://uploads/incoming/T"
    assert (config.s3_endpoint, config.s3_part_size) == ("http://127.0.0.1:7480", 8 << 20)
    path = tmp_path / "c.yaml"
    path.write_text("Storage: s3://b-1\nS3Endpoint: https://s3.example\nS3PartSize: 5242880\n")
    config = parse("--config", str(path))
    assert (config.storage, config.s3_endpoint) == (Location("b-1", ""), "https://s3.example")
    assert config.s3_part_size == 5 << 20
    for option, value in [
        ("--storage", "/srv/files"),
        ("--storage", "s3://"),
        ("--storage", "s3://Bad_Bucket/x"),
        ("--storage", "s3://bucket/x?versionId=1"),
        ("--s3-endpoint", "ftp://host"),
        ("--s3-endpoint", "http://"),
        ("--s3-endpoint", "https://key:secret@s3.example"),  # it would be logged
        ("--s3-part-size", "4MiB"),  # S3's smallest part but the last is 5 MiB
        ("--s3-part-size", "6GiB"),
        ("--s3-part-size", "lots"),
    ]:
        with pytest.raises(usage.UsageError, match=option):
            parse(option, value)


def test_handover_retry_is_a_day_unless_set() -> None:
    assert parse().handover_retry == 86400
    assert parse("--handover-retry", "600").handover_retry == 600


def test_handover_retry_from_yaml(tmp_path: Path) -> None:
    path = tmp_path / "incoming.yaml"
    path.write_text("HandoverRetryS: 3600\n")
    assert parse("--config", str(path)).handover_retry == 3600
    with pytest.raises(usage.UsageError, match="--handover-retry"):
        parse("--handover-retry", "0")


def test_sync_is_on_unless_turned_off(tmp_path: Path) -> None:
    assert (Config().sync, parse().sync) == ("fsync", "fsync")
    assert parse("--sync", "none").sync == "none"
    path = tmp_path / "c.yaml"
    path.write_text("Sync: none\n")
    assert parse("--config", str(path)).sync == "none"
    assert parse("--config", str(path), "--sync", "fsync").sync == "fsync"
    with pytest.raises(usage.UsageError, match="--sync"):
        parse("--sync", "sometimes")
