"""Server settings: defaults, the 2014 YAML file, and `twistd incoming` options.

Precedence is defaults < YAML file (`--config`) < command-line options.
"""

from __future__ import annotations

import grp
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from ipaddress import ip_network
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from twisted.python import usage

from .access import Network
from .objectstore import MAX_PART_SIZE, MIN_PART_SIZE, Location


@dataclass(frozen=True)
class Config:
    """Everything the service needs to know, already validated."""

    listen: str = "tcp:4000:interface=0.0.0.0"
    storage_dir: Path = Path("incoming-storage")
    chunk_size_kb: int = 512
    send_ahead: int = 4
    max_window: int = 64 * 1024 * 1024  # bytes a WebSocket client may send ahead at most
    window_rate_mbit: int = 1000  # the window covers a round trip at this rate
    max_idle: float = 43200.0
    ws_timeout: float = 58.0
    handover_timeout: float = 55.0
    handover_confirm_timeout: float = 600.0
    handover_retry: float = 86400.0  # retrying a handover while the backend is away
    backend_listen: str | None = None  # serve the backend API here only, not on `listen`
    # who may call the backend API on `listen` besides this host (docs: access)
    backend_networks: frozenset[Network] = frozenset()
    handover_hosts: frozenset[str] = frozenset()  # signalFinishURL hosts besides the caller's
    open_access: bool = False  # the 2014 server's: backend API for all, handovers anywhere
    group: str | None = None  # shares the storage directory with this group (docs: sharing)
    allowed_origins: frozenset[str] = frozenset()  # allowed browser Origins; empty: any
    max_upload_bytes: int | None = None  # the largest upload a client may announce
    checksum: str = "sha256"  # of every stored file, sent in the handover; or "none"
    sync: str = "fsync"  # make acknowledged bytes and state durable; "none": storage needing none
    redis: str | None = None  # cluster mode: redis://host[:port][/db], shared by all instances
    storage: Location | None = None  # finished files in this S3 bucket; None: in storage_dir
    s3_endpoint: str | None = None  # the S3 store's URL, when not AWS (Ceph RGW, MinIO)
    s3_part_size: int = 16 * 1024 * 1024
    max_body_bytes: int = 64 * 1024

    @property
    def chunk_size(self) -> int:
        return self.chunk_size_kb * 1024


def _int_in(low: int, high: int) -> Callable[[str, Any], int]:
    def parse(name: str, value: Any) -> int:
        try:
            number = int(str(value), 10)
        except ValueError:
            raise usage.UsageError(f"{name}: {value!r} is not an integer") from None
        if not low <= number <= high:
            raise usage.UsageError(f"{name}: {number} is not between {low} and {high}")
        return number

    return parse


def _seconds(name: str, value: Any) -> float:
    try:
        number = float(str(value))
    except ValueError:
        raise usage.UsageError(f"{name}: {value!r} is not a number of seconds") from None
    if not 0 < number < 10**8:
        raise usage.UsageError(f"{name}: {number} must be a positive number of seconds")
    return number


def _text(name: str, value: Any) -> str:
    text = str(value).strip()
    if not text:
        raise usage.UsageError(f"{name}: must not be empty")
    return text


def _choice(*choices: str) -> Callable[[str, Any], str]:
    def parse(name: str, value: Any) -> str:
        text = str(value).strip().lower()
        if text not in choices:
            raise usage.UsageError(f"{name}: {value!r} is not one of {', '.join(choices)}")
        return text

    return parse


def _redis_url(name: str, value: Any) -> str:
    url = _text(name, value)
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
        int(parts.path.strip("/") or 0)
    except ValueError:
        raise usage.UsageError(f"{name}: {url!r} has a bad port or database number") from None
    if parts.scheme != "redis" or not parts.hostname:
        raise usage.UsageError(f"{name}: {url!r} is not a redis://host[:port][/db] URL")
    return url


def _s3_url(name: str, value: Any) -> Location:
    try:
        return Location.parse(_text(name, value))
    except ValueError as e:
        raise usage.UsageError(f"{name}: {e}") from None


def _http_url(name: str, value: Any) -> str:
    url = _text(name, value).rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise usage.UsageError(f"{name}: {url!r} is not an http:// or https:// URL")
    if parts.username is not None or parts.password is not None:  # logged, sent to backends
        raise usage.UsageError(f"{name}: no credentials in the URL (AWS_ACCESS_KEY_ID ...)")
    return url


_UNITS = {"": 1, "k": 1024, "kib": 1024, "m": 1024**2, "mib": 1024**2, "g": 1024**3, "gib": 1024**3}


def _size_in(low: int, high: int) -> Callable[[str, Any], int]:
    """Bytes, as a number with an optional unit: 16MiB, 16M, 16777216."""

    def parse(name: str, value: Any) -> int:
        text = str(value).strip().lower().replace(" ", "")
        digits = text.rstrip("kmgib")
        unit = _UNITS.get(text[len(digits) :])
        if not digits.isdigit() or unit is None:
            raise usage.UsageError(f"{name}: {value!r} is not a size such as 16MiB")
        size = int(digits) * unit
        if not low <= size <= high:
            raise usage.UsageError(f"{name}: {size} bytes is not between {low} and {high}")
        return size

    return parse


def _names(name: str, value: Any) -> frozenset[str]:
    """A comma-separated string (or a YAML list) of names, compared lower-cased."""
    items = value if isinstance(value, list) else str(value).split(",")
    names = frozenset(str(item).strip().lower().rstrip("/") for item in items) - {""}
    if not names:
        raise usage.UsageError(f"{name}: give at least one name")
    return names


def _networks(name: str, value: Any) -> frozenset[Network]:
    """A comma-separated string (or a YAML list) of networks (10.0.0.0/8) or addresses."""
    items = value if isinstance(value, list) else str(value).split(",")
    try:
        networks = frozenset(
            ip_network(str(i).strip(), strict=False) for i in items if str(i).strip()
        )
    except ValueError as e:
        raise usage.UsageError(f"{name}: {e}") from None
    if not networks:
        raise usage.UsageError(f"{name}: give at least one network, such as 10.0.0.0/8")
    return networks


def _flag(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in ("true", "false", "yes", "no"):
        raise usage.UsageError(f"{name}: {value!r} is not true or false")
    return text in ("true", "yes")


def _group(name: str, value: Any) -> str:
    """A group's name (or number) that exists on this host."""
    text = _text(name, value)
    try:
        return grp.getgrgid(int(text)).gr_name if text.isdigit() else grp.getgrnam(text).gr_name
    except KeyError:
        raise usage.UsageError(f"{name}: no group {text!r} on this host") from None


# field name -> (command-line option, YAML key, parser)
_SETTINGS: dict[str, tuple[str, str | None, Callable[[str, Any], Any]]] = {
    "listen": ("listen", None, _text),
    "storage_dir": ("storage-dir", "StorageDir", lambda n, v: Path(_text(n, v))),
    "chunk_size_kb": ("chunk-size-kb", "UploadChunkSizeKB", _int_in(1, 16 * 1024)),
    "send_ahead": ("send-ahead", "UploadSendAhead", _int_in(1, 1024)),
    "max_window": ("max-window", "MaxWindowBytes", _int_in(0, 2**40)),
    "window_rate_mbit": ("window-rate", "WindowRateMbit", _int_in(1, 10**6)),
    "max_idle": ("max-idle", "UploadMaxIdleDurationS", _seconds),
    "ws_timeout": ("ws-timeout", "WebsocketConnectionTimeoutS", _seconds),
    "handover_timeout": ("handover-timeout", "HandoverTimeoutS", _seconds),
    "handover_confirm_timeout": (
        "handover-confirm-timeout",
        "HandoverConfirmTimeoutS",
        _seconds,
    ),
    "handover_retry": ("handover-retry", "HandoverRetryS", _seconds),
    "backend_listen": ("backend-listen", "BackendListen", _text),
    "backend_networks": ("backend-networks", "BackendNetworks", _networks),
    "handover_hosts": ("handover-hosts", "HandoverHosts", _names),
    "open_access": ("open-access", "OpenAccess", _flag),
    "group": ("group", "Group", _group),
    "allowed_origins": ("allowed-origins", "AllowedOrigins", _names),
    "max_upload_bytes": ("max-upload-size", "MaxUploadBytes", _int_in(0, 2**63 - 1)),
    "checksum": ("checksum", "Checksum", _choice("sha256", "none")),
    "sync": ("sync", "Sync", _choice("fsync", "none")),
    "redis": ("redis", "Redis", _redis_url),
    "storage": ("storage", "Storage", _s3_url),
    "s3_endpoint": ("s3-endpoint", "S3Endpoint", _http_url),
    "s3_part_size": ("s3-part-size", "S3PartSize", _size_in(MIN_PART_SIZE, MAX_PART_SIZE)),
}


def _listen_from_yaml(document: Mapping[str, Any]) -> str | None:
    """The 2014 file names an IP and a port; we speak endpoint strings."""
    if "IncomingIP" not in document and "IncomingPort" not in document:
        return None
    ip = str(document.get("IncomingIP", "0.0.0.0"))
    port = _int_in(1, 65535)("IncomingPort", document.get("IncomingPort", 4000))
    if ":" in ip:  # an IPv6 address must be escaped inside an endpoint string
        ip = ip.replace(":", "\\:")
    return f"tcp:{port}:interface={ip}"


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read the old server's YAML file into Config field values."""
    try:
        document = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise usage.UsageError(f"config: cannot read {path}: {e}") from None
    if not isinstance(document, dict):
        raise usage.UsageError(f"config: {path} does not hold a mapping of settings")
    values: dict[str, Any] = {}
    listen = _listen_from_yaml(document)
    if listen is not None:
        values["listen"] = listen
    for field, (_option, key, parse) in _SETTINGS.items():
        if key is not None and key in document:
            values[field] = parse(key, document[key])
    return values


class Options(usage.Options):
    """`twistd incoming` command line."""

    synopsis = "[options]"
    longdesc = "Incoming!! upload server. Options override the YAML file given by --config."
    optParameters = [
        ["config", "c", None, "YAML settings file of the 2014 server (IncomingPort, ...)"],
        ["listen", "l", None, "Endpoint for browsers and backends [tcp:4000:interface=0.0.0.0]"],
        ["storage-dir", "s", None, "Directory for uploads, created if missing [incoming-storage]"],
        ["chunk-size-kb", None, None, "Chunk size announced to uploaders, KiB [512]"],
        ["send-ahead", None, None, "Chunks a client may send before an ack, at least [4]"],
        [
            "max-window",
            None,
            None,
            "Bytes a WebSocket client may send before an ack, at most; the window covers the "
            "connection's round trip x --window-rate [67108864]",
        ],
        [
            "window-rate",
            None,
            None,
            "Mbit/s a WebSocket connection's window is sized for [1000]",
        ],
        ["max-idle", None, None, "Seconds after which an idle upload expires [43200]"],
        ["ws-timeout", None, None, "Seconds before a silent WebSocket is dropped [58]"],
        [
            "handover-timeout",
            None,
            None,
            "Seconds for each handover POST; then the browser is told the handover is pending [55]",
        ],
        [
            "handover-confirm-timeout",
            None,
            None,
            "Seconds to wait for finish_upload after a 'wait' [600]",
        ],
        [
            "handover-retry",
            None,
            None,
            "Seconds to keep retrying a handover (or cancel notice) while the backend is "
            "away: no answer, 429 or 5xx [86400]",
        ],
        [
            "backend-listen",
            None,
            None,
            "Endpoint for the backend API, metrics and health; they then leave --listen",
        ],
        [
            "backend-networks",
            None,
            None,
            "Comma-separated networks (10.0.0.0/8) whose hosts may call the backend API and "
            "metrics on --listen, besides this host [this host only]",
        ],
        [
            "handover-hosts",
            None,
            None,
            "Comma-separated hosts allowed in signalFinishURL besides the caller's own "
            "[the caller's]",
        ],
        [
            "allowed-origins",
            None,
            None,
            "Comma-separated Origins allowed to upload (WebSocket and tus), e.g. "
            "https://app.example.com [any]",
        ],
        ["max-upload-size", None, None, "Largest upload in bytes a client may announce [none]"],
        ["checksum", None, None, "Digest of every file for the handover: sha256 or none [sha256]"],
        [
            "sync",
            None,
            None,
            "fsync: what is acknowledged survives a power cut; none: for storage that needs "
            "no syncing, such as a tmpfs [fsync]",
        ],
        [
            "redis",
            None,
            None,
            "Cluster mode: redis://host[:port][/db] shared by all instances, which also share "
            "--storage-dir [none: one process]",
        ],
        [
            "storage",
            None,
            None,
            "s3://BUCKET/PREFIX: finished files go to this S3-compatible store (credentials: "
            "AWS_ACCESS_KEY_ID and co., the AWS config files); --storage-dir is then the "
            "spool [none: files stay in --storage-dir]",
        ],
        [
            "s3-endpoint",
            None,
            None,
            "URL of the S3 store when it is not AWS (Ceph RGW, MinIO): path-style requests",
        ],
        ["s3-part-size", None, None, "Parts sent to the S3 store, 5MiB to 5GiB [16MiB]"],
        [
            "group",
            None,
            None,
            "Group that may move and delete handed-over files: the storage directory becomes "
            "its, group-writable [none]",
        ],
    ]
    optFlags = [
        [
            "open-access",
            None,
            "As the 2014 server: the backend API and metrics for any address, handovers to "
            "any host",
        ],
    ]

    def postOptions(self) -> None:
        values = load_yaml(self["config"]) if self["config"] else {}
        flags = {long for long, _short, _doc in self.optFlags}
        for field, (option, _key, parse) in _SETTINGS.items():
            given = (True if self[option] else None) if option in flags else self[option]
            if given is not None:
                values[field] = parse(f"--{option}", given)
        self.config = Config(**values)
