"""One way to read and write bytes at a URL: a plain path, ``file://`` or ``s3://``.

S3 goes through boto3 with the standard configuration: credentials from the usual chain,
the endpoint from ``AWS_ENDPOINT_URL`` (SeaweedFS, MinIO, ...), region from
``AWS_DEFAULT_REGION`` / ``AWS_REGION``. Errors name the URL, endpoint and bucket.

An S3 endpoint that is unreachable or failing (5xx, refused connections, timeouts) is
retried with exponential backoff for up to a deadline (``set_retry_deadline``, default
two minutes; training sets it from ``run.storage_retry_s``): an outage shorter than that
costs a pause, logged when it starts and when it ends and counted by ``retry_count()``.
Past it, :class:`StorageUnavailable` names the endpoint. Errors that retrying cannot fix
(wrong credentials, no such bucket or object) are raised at once.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import urlparse

log = logging.getLogger(__name__)
T = TypeVar("T")


class StorageError(IOError):
    """Reading or writing a URL failed; the message names URL, endpoint and bucket.

    ``code`` is the S3 error code (``NoSuchBucket``, ``403``, ...) when there was one.
    """

    def __init__(self, message: str, code: str = ""):
        super().__init__(message)
        self.code = code

    @property
    def permanent(self) -> bool:
        """True when retrying cannot help: wrong credentials, no such bucket or object."""
        return self.code in PERMANENT_CODES

    @property
    def missing(self) -> bool:
        """True when there is no object (or file) at the URL."""
        return self.code in MISSING_OBJECT_CODES


class StorageUnavailable(StorageError):
    """The endpoint kept failing transiently past the retry deadline (it is down or broken)."""


# client errors: the same request fails the same way every time
PERMANENT_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AccessDenied",
        "NoSuchBucket",
        "NoSuchKey",
        "404",
        "403",
        "400",
        "InvalidRange",
        "416",
    }
)


# an object that is not there: GET answers NoSuchKey, HEAD (no body) a bare 404, which some
# S3-compatible servers spell NotFound; a missing local file is reported as 404 too
MISSING_OBJECT_CODES = frozenset({"404", "NoSuchKey", "NotFound"})
MISSING_BUCKET_CODES = frozenset({"404", "NoSuchBucket"})


def is_s3(url: str) -> bool:
    return url.startswith("s3://")


def local_path(url: str) -> Path:
    """The filesystem path of a plain path or file:// URL."""
    if url.startswith("file://"):
        return Path(urlparse(url).path)
    if "://" in url:
        raise StorageError(f"unsupported URL scheme in {url!r}: use a path, file:// or s3://")
    return Path(url)


def split_s3(url: str) -> tuple[str, str]:
    """``s3://bucket/key`` → (bucket, key)."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise StorageError(f"not an s3://bucket/key URL: {url!r}")
    return parsed.netloc, parsed.path.lstrip("/")


def join(base: str, *parts: str) -> str:
    """Join URL path parts with '/', keeping the scheme."""
    out = base.rstrip("/")
    for part in parts:
        out += "/" + part.strip("/")
    return out


def configured_endpoint() -> str | None:
    """The S3 endpoint URL the environment names (``AWS_ENDPOINT_URL_S3``, then
    ``AWS_ENDPOINT_URL``, as boto3 reads them); None for AWS's own endpoints."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def endpoint() -> str:
    """The S3 endpoint for messages."""
    return configured_endpoint() or "AWS default endpoint"


def region(default: str = "us-east-1") -> str:
    """The AWS region from ``AWS_REGION``, then ``AWS_DEFAULT_REGION``, else ``default``."""
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or default


# ------------------------------------------------------------------ transient failures

DEFAULT_RETRY_S = 120.0
BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 8.0  # short enough to notice a returning endpoint within seconds

_retry_deadline_s = DEFAULT_RETRY_S
_retry_lock = threading.Lock()
_retry_total = 0


def set_retry_deadline(seconds: float) -> None:
    """How long this process keeps retrying a failing S3 endpoint before giving up."""
    global _retry_deadline_s
    if not seconds > 0:
        raise ValueError(f"storage retry deadline must be > 0 seconds, got {seconds!r}")
    _retry_deadline_s = float(seconds)


def retry_deadline() -> float:
    return _retry_deadline_s


def retry_count() -> int:
    """S3 requests this process has retried after a transient failure (a metric)."""
    return _retry_total


def _count_retry() -> None:
    global _retry_total
    with _retry_lock:
        _retry_total += 1


def with_retries(action: str, url: str, fn: Callable[[], T]) -> T:
    """``fn()`` retried with exponential backoff while it raises a transient StorageError,
    for up to the retry deadline from the first failure. The outage is logged once when it
    starts and once when it ends (or when it is given up), not at every attempt."""
    first_failure: float | None = None
    attempt = 0
    while True:
        try:
            result = fn()
        except StorageError as exc:
            if exc.permanent or isinstance(exc, StorageUnavailable):
                raise
            now = time.monotonic()
            if first_failure is None:
                first_failure = now
                log.warning(
                    "storage: cannot %s %s (endpoint %s): %s; retrying for up to %.0fs",
                    action,
                    url,
                    endpoint(),
                    exc,
                    _retry_deadline_s,
                )
            waited = now - first_failure
            if waited >= _retry_deadline_s:
                log.error("storage: endpoint %s still failing after %.0fs; giving up on %s", endpoint(), waited, url)
                raise StorageUnavailable(
                    f"S3 endpoint {endpoint()} unreachable or failing for {waited:.0f}s "
                    f"(retry deadline run.storage_retry_s={_retry_deadline_s:g}s): {exc}",
                    exc.code,
                ) from exc
            _count_retry()
            attempt += 1
            time.sleep(min(BACKOFF_START_S * 2 ** (attempt - 1), BACKOFF_MAX_S, _retry_deadline_s - waited))
            continue
        if first_failure is not None:
            log.warning(
                "storage: endpoint %s is back: %s %s succeeded after %.1fs and %d retries",
                endpoint(),
                action,
                url,
                time.monotonic() - first_failure,
                attempt,
            )
        return result


def arrow_retry_attempts(deadline_s: float) -> int:
    """Attempts of the AWS SDK's standard retry strategy (backoff 2**n x 25 ms, at most 20 s
    per attempt) whose backoffs add up to ``deadline_s``: on a refused connection, 15
    attempts (the count for 120 s) measured 190 s, connection attempts included."""
    waited, attempts = 0.0, 1
    while waited < deadline_s and attempts < 1000:
        waited += min(0.025 * 2**attempts, 20.0)
        attempts += 1
    return attempts


def arrow_s3_filesystem(deadline_s: float | None = None, **kwargs):
    """``pyarrow.fs.S3FileSystem(**kwargs)`` retrying for about the storage retry deadline
    (the Ray Train checkpoint uploads and the controller's state go through it).

    pyarrow's own pickling drops ``retry_strategy``, and Ray Train pickles the filesystem
    to its controller and workers: this subclass pickles with its retry strategy.
    """
    attempts = arrow_retry_attempts(deadline_s if deadline_s is not None else _retry_deadline_s)
    return _arrow_s3_class()(attempts, **kwargs)


_ARROW_S3: list[type] = []


def _arrow_s3_class() -> type:
    if not _ARROW_S3:  # defined on first use: importing this module needs no pyarrow
        import pyarrow.fs

        class RetryingS3FileSystem(pyarrow.fs.S3FileSystem):
            def __init__(self, retry_attempts: int, **kwargs):
                super().__init__(
                    retry_strategy=pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=retry_attempts), **kwargs
                )
                self._init_args = (retry_attempts, kwargs)

            def __reduce__(self):
                return _rebuild_arrow_s3, self._init_args

        _ARROW_S3.append(RetryingS3FileSystem)
    return _ARROW_S3[0]


def _rebuild_arrow_s3(retry_attempts: int, kwargs: dict):
    return _arrow_s3_class()(retry_attempts, **kwargs)


_clients: dict[tuple, object] = {}
_clients_lock = threading.Lock()


def reset_clients() -> None:
    """Forget the cached S3 clients (after the credentials or endpoint changed)."""
    with _clients_lock:
        _clients.clear()


def _client_key() -> tuple:
    env = os.environ
    # a changed endpoint or credential gets its own client; the secret only as a digest
    secret = env.get("AWS_SECRET_ACCESS_KEY", "")
    return (
        os.getpid(),
        endpoint(),
        env.get("AWS_ACCESS_KEY_ID", ""),
        hash(secret),
        env.get("AWS_SESSION_TOKEN", ""),
        env.get("AWS_PROFILE", ""),
        region(default=""),
    )


def s3_client():
    """A boto3 S3 client shared by this process's threads (boto3 clients are thread-safe
    but not fork-safe, hence one per process; creating one costs ~1 s of CPU, hence shared)."""
    key = _client_key()
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            import boto3
            from botocore.config import Config as BotoConfig

            cfg = BotoConfig(
                # a few quick retries per request; with_retries() outlasts longer outages
                retries={"max_attempts": 3, "mode": "standard"},
                s3={"addressing_style": "path"},  # S3-compatible servers rarely have virtual hosts
                connect_timeout=10,
                read_timeout=60,
                max_pool_connections=32,  # parallel shard writers and readers share it
            )
            # a fresh session reads the credentials now (the default session caches them)
            client = boto3.session.Session().client("s3", region_name=region(), config=cfg)
            _clients[key] = client
    return client


def _s3_error(url: str, exc: Exception, action: str) -> StorageError:
    bucket, key = split_s3(url)
    code = _error_code(exc)
    hint = {
        "InvalidAccessKeyId": "the access key is not known to the server: check AWS_ACCESS_KEY_ID",
        "SignatureDoesNotMatch": "the secret key is wrong: check AWS_SECRET_ACCESS_KEY",
        "AccessDenied": "the credentials may not do this",
        "NoSuchBucket": f"bucket {bucket!r} does not exist",
        "NoSuchKey": f"object {key!r} does not exist",
        "404": f"object {key!r} does not exist",
        "403": "access denied: check the credentials",
    }.get(code, "")
    detail = f"{code}: {hint}" if hint else (code or type(exc).__name__)
    return StorageError(f"cannot {action} {url} (endpoint {endpoint()}, bucket {bucket!r}): {detail} [{exc}]", code)


def _error_code(exc: Exception) -> str:
    """The S3 error code of a botocore error, "" for anything else."""
    response = getattr(exc, "response", None)
    return response.get("Error", {}).get("Code", "") if isinstance(response, dict) else ""


def _missing(exc: Exception) -> bool:
    """True when a botocore error says there is no such object."""
    return _error_code(exc) in MISSING_OBJECT_CODES


_RAISE = object()


def _s3_request(action: str, url: str, request: Callable[[Any, str, str], T], if_missing: Any = _RAISE) -> T:
    """``request(client, bucket, key)`` on the object at ``url``, retried while the endpoint
    fails transiently (``with_retries``); an error becomes a StorageError naming the URL
    and the action. With ``if_missing`` given, a missing object returns it instead."""
    bucket, key = split_s3(url)

    def attempt() -> T:
        try:
            return request(s3_client(), bucket, key)
        except Exception as exc:  # botocore raises many types; all become StorageError
            if if_missing is not _RAISE and _missing(exc):
                return if_missing
            raise _s3_error(url, exc, action) from exc

    return with_retries(action, url, attempt)


def open_read(url: str, start: int = 0) -> IO[bytes]:
    """A readable binary stream of the object from byte ``start`` on (streamed, not read
    into memory). A non-zero start is an HTTP range request on S3: a reader that lost its
    connection mid-object resumes where it stopped instead of reading it all again."""
    if is_s3(url):
        extra = {"Range": f"bytes={start}-"} if start else {}
        return _s3_request(
            "read", url, lambda client, bucket, key: client.get_object(Bucket=bucket, Key=key, **extra)["Body"]
        )
    try:
        stream = open(local_path(url), "rb")
    except OSError as exc:
        raise StorageError(f"cannot read {url}: {exc}", "404" if isinstance(exc, FileNotFoundError) else "") from exc
    if start:
        stream.seek(start)
    return stream


def read_bytes(url: str) -> bytes:
    if is_s3(url):  # a connection lost mid-body retries the whole (small) object
        return with_retries("read", url, lambda: _read_all(url))
    return _read_all(url)


def _read_all(url: str) -> bytes:
    stream = open_read(url)
    try:
        return stream.read()
    except Exception as exc:
        if is_s3(url):
            raise _s3_error(url, exc, "read") from exc
        raise StorageError(f"cannot read {url}: {exc}") from exc
    finally:
        stream.close()


def write_bytes(url: str, data: bytes) -> None:
    """Write an object whole; locally via a temporary file and rename (never half-visible)."""
    if is_s3(url):
        _s3_request("write", url, lambda client, bucket, key: client.put_object(Bucket=bucket, Key=key, Body=data))
        return
    path = local_path(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def size(url: str) -> int | None:
    """Size in bytes of the object or file at ``url``; None when there is none."""
    if is_s3(url):
        return _s3_request(
            "check",
            url,
            lambda client, bucket, key: int(client.head_object(Bucket=bucket, Key=key)["ContentLength"]),
            if_missing=None,
        )
    try:
        return local_path(url).stat().st_size
    except FileNotFoundError:
        return None


def delete(url: str) -> None:
    """Delete one object or file (nothing happens when it is already gone)."""
    if is_s3(url):
        _s3_request("delete", url, lambda client, bucket, key: client.delete_object(Bucket=bucket, Key=key))
        return
    local_path(url).unlink(missing_ok=True)


def put_file(src: str | Path, url: str) -> None:
    """Publish a finished local file at ``url``, consuming it: a rename when the
    destination is on the same local filesystem (no copy of a 256 MB shard), otherwise
    :func:`upload_file` (multipart on S3). The object is never visible half-written."""
    if not is_s3(url):
        path = local_path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(src, path)
            return
        except OSError:  # another filesystem: copy through a temporary name
            pass
    upload_file(src, url)
    Path(src).unlink(missing_ok=True)


def upload_file(src: str | Path, url: str) -> None:
    """Copy a local file to a URL; S3 uses boto3's managed (multipart) upload."""
    if is_s3(url):
        _s3_request("upload to", url, lambda client, bucket, key: client.upload_file(str(src), bucket, key))
        return
    path = local_path(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(src, "rb") as fin, open(tmp, "wb") as fout:
        while chunk := fin.read(1 << 20):
            fout.write(chunk)
    os.replace(tmp, path)


def exists(url: str) -> bool:
    if is_s3(url):
        return _s3_request(
            "check", url, lambda client, bucket, key: bool(client.head_object(Bucket=bucket, Key=key)), if_missing=False
        )
    return local_path(url).exists()


def check_bucket(url: str) -> None:
    """Fail early, with a clear message, when an s3:// destination cannot be reached."""
    if not is_s3(url):
        return
    bucket, _ = split_s3(url)
    try:
        s3_client().head_bucket(Bucket=bucket)
    except Exception as exc:
        if _error_code(exc) in MISSING_BUCKET_CODES:
            raise StorageError(
                f"bucket {bucket!r} does not exist at endpoint {endpoint()} ({url})", "NoSuchBucket"
            ) from exc
        raise _s3_error(url, exc, "access") from exc


def list_dir(url: str) -> list[str]:
    """Names of the entries directly under a folder URL (objects and sub-prefixes for S3)."""
    if is_s3(url):
        bucket, key = split_s3(url.rstrip("/") + "/")

        def listing() -> list[str]:
            names: list[str] = []
            try:
                pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key, Delimiter="/")
                for page in pages:
                    names += [p["Prefix"][len(key) :].rstrip("/") for p in page.get("CommonPrefixes", [])]
                    names += [o["Key"][len(key) :] for o in page.get("Contents", [])]
            except Exception as exc:
                raise _s3_error(url, exc, "list") from exc
            return sorted(names)

        return with_retries("list", url, listing)
    path = local_path(url)
    return sorted(p.name for p in path.iterdir()) if path.is_dir() else []


def remove_tree(url: str) -> None:
    """Delete a folder URL and everything under it (all objects under the prefix on S3)."""
    if is_s3(url):
        bucket, key = split_s3(url.rstrip("/") + "/")
        client = s3_client()
        try:
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
                objects = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if objects:
                    client.delete_objects(Bucket=bucket, Delete={"Objects": objects})
        except Exception as exc:
            raise _s3_error(url, exc, "delete") from exc
        return
    import shutil

    shutil.rmtree(local_path(url), ignore_errors=True)


# ---------------------------------------------------------------- atomic create and compare-and-swap
# Used by lock objects (dmlray.jobs.run_folder.RunLock). On S3 these are conditional PutObject requests
# (If-None-Match: * and If-Match: <ETag>, both honoured by AWS S3 and by SeaweedFS 4.48 — verified
# against a real server in tests/test_safety.py); locally the file is read and written under an
# flock, so a version check and the write that follows are one step.


def _precondition_failed(exc: Exception) -> bool:
    return _error_code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")


def _digest(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def create_exclusive(url: str, data: bytes) -> str | None:
    """Create the object only if nothing is at ``url``; its version token, or None when one exists."""
    if is_s3(url):
        bucket, key = split_s3(url)
        try:
            return s3_client().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")["ETag"]
        except Exception as exc:
            if _precondition_failed(exc):
                return None
            raise _s3_error(url, exc, "create") from exc
    import fcntl

    path = local_path(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return None
    with os.fdopen(fd, "wb") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # readers wait for the whole content (they take LOCK_SH)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return _digest(data)


def read_versioned(url: str) -> tuple[bytes, str] | None:
    """(content, version token) of the object at ``url``; None when there is none."""
    if is_s3(url):
        bucket, key = split_s3(url)
        try:
            response = s3_client().get_object(Bucket=bucket, Key=key)
            return response["Body"].read(), response["ETag"]
        except Exception as exc:
            if _missing(exc):
                return None
            raise _s3_error(url, exc, "read") from exc
    import fcntl

    try:
        with open(local_path(url), "rb") as f:
            fcntl.flock(f, fcntl.LOCK_SH)
            data = f.read()
    except FileNotFoundError:
        return None
    return data, _digest(data)


def replace_if(url: str, data: bytes, version: str) -> str | None:
    """Overwrite the object only if it is still at ``version``; the new token, or None when it changed."""
    if is_s3(url):
        bucket, key = split_s3(url)
        try:
            return s3_client().put_object(Bucket=bucket, Key=key, Body=data, IfMatch=version)["ETag"]
        except Exception as exc:
            if _precondition_failed(exc) or _missing(exc):
                return None
            raise _s3_error(url, exc, "replace") from exc
    import fcntl

    try:
        f = open(local_path(url), "r+b")
    except FileNotFoundError:
        return None
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        if _digest(f.read()) != version:
            return None
        f.seek(0)
        f.truncate()  # in place: the flock belongs to this inode (a rename would drop it)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return _digest(data)


def modified(url: str) -> float | None:
    """Last-modified time (POSIX seconds) of the object or file at ``url``; None when there is none."""
    if is_s3(url):
        bucket, key = split_s3(url)
        try:
            return s3_client().head_object(Bucket=bucket, Key=key)["LastModified"].timestamp()
        except Exception as exc:
            if _missing(exc):
                return None
            raise _s3_error(url, exc, "check") from exc
    try:
        return local_path(url).stat().st_mtime
    except FileNotFoundError:
        return None
