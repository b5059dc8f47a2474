"""A throwaway single-node Ceph for tests and benchmarks: one monitor, one OSD keeping
objects in its own memory (memstore), and radosgw speaking S3 on a free loopback port.

Everything runs as child processes of the caller, from Debian's packages (ceph-mon,
ceph-osd, radosgw, ceph-common), with a config file of its own in a temporary directory
(data, logs, admin sockets, pid files there too): never the system's services, never
/etc/ceph or /var/lib/ceph; any user may run it. Starts in about 2 s; `stop()` kills what
it started, by PID, and removes the directory. With `tls`, S3 is on HTTPS with a
certificate made by Debian's openssl (ceph-common brings it in).

The helpers that read a bucket use boto3 synchronously: from a Twisted test, call them
once the work under test has settled (they take milliseconds), or in a thread.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

BINARIES = ("monmaptool", "ceph-mon", "ceph-osd", "ceph", "radosgw-admin", "radosgw")
ACCESS_KEY = "INCOMINGTESTACCESSKEY"
SECRET_KEY = "incoming-test-secret-key-0123456789abcdef"
REGION = "us-east-1"  # any name does for RGW's signature checks; clients need one
# radosgw's pools, made up front (size 1, few placement groups): radosgw would otherwise
# create them one by one on its first start, a second or more each.
RGW_POOLS = (
    ".rgw.root",
    "default.rgw.control",
    "default.rgw.meta",
    "default.rgw.log",
    "default.rgw.buckets.index",
    "default.rgw.buckets.data",
    "default.rgw.buckets.non-ec",
)
PGS = 8  # placement groups per pool
START_TIMEOUT = 60.0  # seconds; a loaded machine starts it in well under 10

CONF = """\
[global]
fsid = {fsid}
mon host = v2:127.0.0.1:{mon_port}
mon initial members = a
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind msgr1 = false
ms bind ipv6 = false
# no keys: radosgw then needs crc (not "secure") mode to talk to the monitor
auth cluster required = none
auth service required = none
auth client required = none
ms mon client mode = crc
run dir = {dir}/run
pid file = {dir}/run/$name.pid
admin socket = {dir}/run/$name.asok
log file = {dir}/log/$name.log
log to stderr = false
err to stderr = false
crash dir = {dir}/crash
keyring = {dir}/keyring
mon data = {dir}/mon/$id
osd data = {dir}/osd/$id
rgw data = {dir}/rgw
# a throwaway cluster: decide quickly, keep one copy, warn about none of it
paxos propose interval = 0.02
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 1
mon data avail crit = 0
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
osd objectstore = memstore
memstore device bytes = {memory_bytes}
osd op num shards = 2
osd op num threads per shard = 2
# a killed radosgw's watches end after this long (not 30 s): until then, creating a
# bucket waits for it to answer a notification
osd client watch timeout = 3
objecter tick interval = 1  # clients ping their watches each second

[client.rgw]
rgw frontends = beast {frontend}
rgw thread pool size = 64
rgw enable usage log = false
# free the data of deleted objects and aborted uploads (from the OSD's memory) soon
rgw gc obj min wait = 1
rgw gc processor period = 5
"""


_prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before any fork
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In a daemon just forked: be killed when the test run dies, even by SIGKILL."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class CephError(RuntimeError):
    """A Ceph daemon or tool failed; the message ends with its log."""


def missing_binaries() -> list[str]:
    """The Ceph programs this needs that are not on PATH (empty: all there)."""
    return [name for name in BINARIES if shutil.which(name) is None]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Ceph:
    """One throwaway cluster; `start()`, or use as a context manager."""

    def __init__(
        self, memory_bytes: int = 8 << 30, tls: bool = False, parent: str | None = None
    ) -> None:
        # memory_bytes: the capacity the OSD reports; objects live in its RAM as written.
        # tls: S3 over HTTPS, with a self-signed certificate for 127.0.0.1 (`ca_file`).
        self.memory_bytes = memory_bytes
        self.tls = tls
        self.parent = parent
        self.dir = Path()
        self.mon_port = 0
        self.rgw_port = 0
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._client: Any = None

    # Where and how to connect.
    @property
    def endpoint(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.rgw_port}"

    @property
    def ca_file(self) -> str | None:
        """The certificate a client must trust (with `tls`)."""
        return str(self.dir / "rgw.crt") if self.tls else None

    access_key = ACCESS_KEY
    secret_key = SECRET_KEY
    region = REGION

    @property
    def conf(self) -> Path:
        return self.dir / "ceph.conf"

    # Life cycle.
    def start(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="incoming-ceph-", dir=self.parent))
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        for sub in ("run", "log", "crash", "mon", "osd/0", "rgw"):
            (self.dir / sub).mkdir(parents=True)
        fsid, osd_uuid = uuid.uuid4(), uuid.uuid4()
        self.mon_port, self.rgw_port = free_port(), free_port()
        frontend = f"endpoint=127.0.0.1:{self.rgw_port}"
        if self.tls:
            key, crt = self.dir / "rgw.key", self.dir / "rgw.crt"
            subprocess.run(
                ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                 "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj",
                 "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                 "-keyout", str(key), "-out", str(crt)],
                check=True, capture_output=True,
            )  # fmt: skip
            frontend = (f"ssl_endpoint=127.0.0.1:{self.rgw_port} "
                        f"ssl_certificate={crt} ssl_private_key={key}")  # fmt: skip
        self.conf.write_text(
            CONF.format(
                fsid=fsid,
                dir=self.dir,
                mon_port=self.mon_port,
                frontend=frontend,
                memory_bytes=self.memory_bytes,
            )
        )
        monmap = str(self.dir / "monmap")
        self._run("monmaptool", "--create", "--fsid", str(fsid),
                  "--addv", "a", f"[v2:127.0.0.1:{self.mon_port}]", monmap)  # fmt: skip
        self._run("ceph-mon", "--mkfs", "-i", "a", "--monmap", monmap)
        self._spawn("mon", "ceph-mon", "-f", "-i", "a")
        self._run("ceph-osd", "--mkfs", "-i", "0", "--osd-uuid", str(osd_uuid))
        self._spawn("osd", "ceph-osd", "-f", "-i", "0")  # boots once `osd new` is in
        # One `ceph` process for all monitor commands (it reads them from stdin): each
        # start of the CLI costs a quarter of a second.
        # (radosgw uses the pools without an application tag on them; tagging them would
        # cost a monitor round each.)
        commands = [f"osd new {osd_uuid} 0"]
        commands += [f"osd pool create {pool} {PGS} {PGS}" for pool in RGW_POOLS]
        output = self._run("ceph", "--connect-timeout", str(int(START_TIMEOUT)),
                           stdin="\n".join(commands) + "\n")  # fmt: skip
        if "Error" in output:
            raise CephError(f"ceph: {output}")
        # Before radosgw starts: both would set up the default zone if it were missing.
        self._run("radosgw-admin", "user", "create", "--uid", "incoming-test",
                  "--display-name", "Incoming!! tests",
                  "--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY)  # fmt: skip
        self.start_rgw()

    def start_rgw(self) -> None:
        """Start radosgw (on the same port as before) and wait until S3 answers."""
        if "rgw" in self.processes:
            return
        self._spawn("rgw", "radosgw", "-f", "-n", "client.rgw")
        deadline = time.monotonic() + START_TIMEOUT
        while not self._answers():
            if self.processes["rgw"].poll() is not None:
                self._fail("rgw", "radosgw exited")
            if time.monotonic() > deadline:
                self._fail("rgw", f"S3 did not answer on {self.endpoint}")
            time.sleep(0.02)

    def stop_rgw(self, graceful: bool = False) -> None:
        """Stop radosgw alone: SIGKILL (a crash, at once), or SIGTERM (its own shutdown,
        about 2 s). The objects stay: they live in the OSD."""
        self._end("rgw", signal.SIGTERM if graceful else signal.SIGKILL)

    def stop(self) -> None:
        """Kill every process started here (a throwaway cluster needs no clean shutdown)
        and remove the directory."""
        for name in list(self.processes):
            self._end(name, signal.SIGKILL)
        self._client = None
        if self.dir != Path():
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = Path()

    def __enter__(self) -> Ceph:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def pids(self) -> dict[str, int]:
        return {name: process.pid for name, process in self.processes.items()}

    # S3, for tests' set-up and checks.
    def client(self) -> Any:
        """A boto3 S3 client for this cluster (path-style addressing, as RGW needs).
        boto3 clients are thread-safe; this one is shared."""
        if self._client is None:
            import boto3
            from botocore.config import Config

            self._client = boto3.client(
                "s3",
                endpoint_url=self.endpoint,
                aws_access_key_id=ACCESS_KEY,
                aws_secret_access_key=SECRET_KEY,
                region_name=REGION,
                verify=self.ca_file,
                config=Config(
                    s3={"addressing_style": "path"},
                    retries={"max_attempts": 1},
                    # botocore's default (since 1.36) sends bodies over HTTPS aws-chunked
                    # with a CRC32 trailer: RGW 16 answers MissingContentLength.
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required",
                ),
            )
        return self._client

    def make_bucket(self, name: str | None = None) -> str:
        """A new, empty bucket (named uniquely unless a name is given)."""
        bucket = name or f"test-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=bucket)
        return bucket

    def objects(self, bucket: str) -> dict[str, int]:
        """Every object in the bucket: key -> size in bytes."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}

    def read(self, bucket: str, key: str) -> bytes:
        return bytes(self.client().get_object(Bucket=bucket, Key=key)["Body"].read())

    def multipart_uploads(self, bucket: str) -> list[tuple[str, str]]:
        """The bucket's multipart uploads begun and neither completed nor aborted:
        (key, upload id) pairs."""
        pages = self.client().get_paginator("list_multipart_uploads").paginate(Bucket=bucket)
        return [(u["Key"], u["UploadId"]) for page in pages for u in page.get("Uploads", [])]

    # Processes.
    def _environment(self) -> dict[str, str]:
        # The CLI is Debian's Python script: keep the caller's venv and paths out of it.
        drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "CEPH_ARGS", "CEPH_CONF")
        return {k: v for k, v in os.environ.items() if k not in drop}

    def _run(self, program: str, *args: str, stdin: str | None = None) -> str:
        done = subprocess.run(
            [program, "--conf", str(self.conf), *args],
            input=(stdin or "").encode(),
            capture_output=True,
            env=self._environment(),
            timeout=START_TIMEOUT,
        )
        output = (done.stdout + done.stderr).decode(errors="replace")
        if done.returncode != 0:
            raise CephError(f"{program} {' '.join(args)} exited {done.returncode}: {output}")
        return output

    def _spawn(self, name: str, program: str, *args: str) -> None:
        # The kernel sends the parent-death signal when the forking *thread* ends: only
        # the main thread lives as long as the run.
        in_main_thread = threading.current_thread() is threading.main_thread()
        with open(self.dir / "log" / f"{name}.out", "ab") as out:
            self.processes[name] = subprocess.Popen(
                [program, "--conf", str(self.conf), *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self._environment(),
                preexec_fn=_die_with_parent if in_main_thread else None,
            )

    def _end(self, name: str, how: signal.Signals) -> None:
        process = self.processes.pop(name, None)
        if process is not None and process.poll() is None:
            process.send_signal(how)
            process.wait()

    def _answers(self) -> bool:
        context = ssl.create_default_context(cafile=self.ca_file) if self.tls else None
        try:
            with urllib.request.urlopen(self.endpoint, timeout=1, context=context):
                return True
        except urllib.error.HTTPError:
            return True  # an S3 error document is an answer
        except OSError:
            return False

    def _fail(self, name: str, what: str) -> None:
        logs = sorted((self.dir / "log").glob(f"*{name}*"))
        tail = "".join(p.read_text(errors="replace")[-3000:] for p in logs)
        raise CephError(f"{what}; {', '.join(map(str, logs))}:\n{tail}")
