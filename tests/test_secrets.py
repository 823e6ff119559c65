"""Secrets stay secret.

- Tried the way a new user would (slow): SeaweedFS with a random secret key, `dmlray pack
  glyphs` to s3://, one `dmlray train` and one 1-trial `dmlray tune` with their run folders
  on s3://, each command in its own interpreter starting its own local Ray cluster.
  Afterwards the secret key must be in no object of the bucket, no file Ray wrote for the
  runs (their session folders: logs, runtime_env agent, Train/Tune staging) and none of the
  commands' output.
- The pieces (fast): what dmlray gives Ray and pyarrow holds no key; credential files are
  owner-only from the moment they exist.
"""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from dmlray.owner_only import write_owner_only

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "secrets"
COMMAND_TIMEOUT = 600.0
# tiny runs: what matters is that Ray Train's controller, a worker and Tune all run
TINY = [
    "run.num_workers=1",
    "run.cpus_per_worker=1",
    "data.classes_per_batch=8",
    "data.samples_per_class=4",
    "data.class_buffer=16",
    "train.steps=4",
    "train.eval_every=4",
    "train.log_every=2",
    "memory.size=0",
    "optim.milestones=[]",
    "eval.baseline=false",
    "eval.ks=[1,2]",
]


def needles(secret: str) -> list[bytes]:
    """The secret as it could appear in a file: raw, and base64-encoded at each of the three
    alignments it could have inside a longer encoded value (the boundary characters dropped)."""
    raw = secret.encode()
    found = [raw]
    for shift in range(3):
        encoded = base64.b64encode(b"\0" * shift + raw)
        # characters that also depend on the neighbouring bytes are cut off at both ends
        start = (shift * 8 + 5) // 6
        end = (len(b"\0" * shift + raw) * 8) // 6
        found.append(encoded[start:end])
    return found


def occurrences(data: bytes, patterns: list[bytes]) -> int:
    return sum(data.count(p) for p in patterns)


def run_command(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    """Run a command in its own process group; on timeout that group (what we started) is killed."""
    proc = subprocess.Popen(
        argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=COMMAND_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
        pytest.fail(f"{argv[3:5]} did not finish within {COMMAND_TIMEOUT:.0f}s:\n{err.decode()[-3000:]}")
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


@pytest.fixture
def private_s3(tmp_path):
    """A SeaweedFS S3 server whose credentials are random, made for this test only."""
    from dmlray.devtools.seaweed import SeaweedS3

    server = SeaweedS3(
        tmp_path / "s3", buckets=[BUCKET], access_key="dmlray-" + secrets.token_hex(4), secret_key=secrets.token_hex(20)
    )
    server.start()
    yield server
    server.stop()


def command_env(server, ray_tmp: Path) -> dict[str, str]:
    """This environment with only the test server's S3 settings, and Ray's files under ray_tmp."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS", "RAY_AUTH_"))}
    env.update(server.env)
    env["RAY_TMPDIR"] = str(ray_tmp)  # this cluster's session folders, apart from everybody else's
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return env


def bucket_objects(server) -> dict[str, bytes]:
    """Every object of the bucket, by key (bounded: the runs write a few hundred at most)."""
    client = server.client()
    objects: dict[str, bytes] = {}
    token = None
    for _ in range(100):
        page = client.list_objects_v2(Bucket=BUCKET, **({"ContinuationToken": token} if token else {}))
        for item in page.get("Contents", []):
            objects[item["Key"]] = client.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read()
        token = page.get("NextContinuationToken")
        if not token:
            return objects
    raise AssertionError("more than 100 pages of objects: the bucket is not this test's")


def files_under(folder: Path) -> dict[str, bytes]:
    """Every regular file below folder (sockets and links left out), by path."""
    out = {}
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                out[str(path)] = path.read_bytes()
            except OSError:  # removed while listed (a process still winding down)
                continue
    return out


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_secret_key_is_nowhere_after_pack_train_and_tune(private_s3, tmp_path):
    server, secret = private_s3, private_s3.secret_key
    # Ray's unix socket paths must stay short: a folder right under /tmp, not pytest's tmp_path
    ray_tmp = Path(tempfile.mkdtemp(prefix="dmlray-sec-", dir="/tmp"))
    try:
        env = command_env(server, ray_tmp)
        recipe = tmp_path / "glyphs40.yaml"
        recipe.write_text("dataset: glyphs\nshard_bytes: 65536\noptions: {max_classes: 40}\n")
        space = tmp_path / "space.yaml"
        space.write_text("optim.lr: {choice: [1.0e-3]}\n")
        data = f"data.url=s3://{BUCKET}/glyphs"
        commands = {
            "pack": ["pack", str(recipe), "--dst", f"s3://{BUCKET}/glyphs", "--no-progress"],
            "train": ["train", "demo", data, f"run.storage_path=s3://{BUCKET}/runs", "run.name=demo", *TINY],
            "tune": [
                "tune",
                "--space",
                str(space),
                "--num-samples",
                "1",
                "--scheduler",
                "none",
                "demo",
                data,
                f"run.storage_path=s3://{BUCKET}/sweeps",
                "run.name=demo",
                *TINY,
            ],
        }
        outputs: dict[str, bytes] = {}
        for name, args in commands.items():
            t0 = time.monotonic()
            done = run_command([sys.executable, "-m", "dmlray", *args], env, tmp_path)
            outputs[f"{name} stdout"], outputs[f"{name} stderr"] = done.stdout, done.stderr
            assert done.returncode == 0, (
                f"dmlray {name} failed:\n{done.stdout.decode()[-2000:]}\n{done.stderr.decode()[-4000:]}"
            )
            print(f"dmlray {name}: {time.monotonic() - t0:.0f}s")

        objects = bucket_objects(server)
        ray_files = files_under(ray_tmp)
        # the scan covers what the issue found the secret in: it must have been written
        assert "runs/demo/result.json" in objects and "sweeps/demo-sweep/tuner.pkl" in objects, sorted(objects)
        assert [k for k in objects if k.startswith("sweeps/demo-sweep/basic-variant-state-")], sorted(objects)
        sessions = {p.name for p in (ray_tmp / "ray").glob("session_2*")}
        assert len(sessions) == 2, f"one Ray session per command that runs Ray: {sessions}"
        agent_logs = [p for p in ray_files if p.endswith("runtime_env_agent.log")]
        assert len(agent_logs) == 2, agent_logs

        patterns = needles(secret)
        leaks = {f"s3://{BUCKET}/{k}": n for k, v in objects.items() if (n := occurrences(v, patterns))}
        leaks |= {k: n for k, v in ray_files.items() if (n := occurrences(v, patterns))}
        leaks |= {k: n for k, v in outputs.items() if (n := occurrences(v, patterns))}
        assert not leaks, f"the secret key is in {len(leaks)} places (path: count): {leaks}"
        # and the check itself finds it where it is (the server's own identities file)
        assert occurrences((server.folder / "s3-identities.json").read_bytes(), patterns) >= 1
        print(f"scanned {len(objects)} objects, {len(ray_files)} Ray files, {len(outputs)} outputs")
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


# ------------------------------------------------------------------------ the pieces

FAKE = {
    "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
    "AWS_ACCESS_KEY_ID": "dmlray-test-access",
    "AWS_SECRET_ACCESS_KEY": "fake-secret-" + secrets.token_hex(8),
    "AWS_SESSION_TOKEN": "fake-session-token",
    "AWS_REGION": "eu-west-3",
}


def test_the_run_filesystem_names_the_endpoint_but_carries_no_key(monkeypatch):
    import pickle

    from dmlray.jobs.launch import storage_arguments

    for key, value in FAKE.items():
        monkeypatch.setenv(key, value)
    args = storage_arguments("s3://bucket/runs")
    assert args["storage_path"] == "bucket/runs"
    blob = pickle.dumps(args["storage_filesystem"])  # what Tune stores in tuner.pkl
    assert b"127.0.0.1:9" in blob and b"eu-west-3" in blob
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        assert FAKE[key].encode() not in blob, f"{key} is in the pickled filesystem"


@pytest.mark.parametrize("address", [None, "ray://head:10001"])
def test_ray_is_started_or_joined_without_credentials_in_a_runtime_env(address, monkeypatch):
    import ray

    from dmlray.jobs import launch

    for key, value in FAKE.items():
        monkeypatch.setenv(key, value)
    if address:
        monkeypatch.setenv("RAY_ADDRESS", address)
    else:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **kw: calls.append((a, kw)))
    launch.ensure_ray(num_cpus=1)
    ((args, kwargs),) = calls
    assert "runtime_env" not in kwargs, kwargs
    for key in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"):
        assert FAKE[key] not in repr((args, kwargs))


def test_tune_trials_get_no_credentials_in_their_runtime_env(monkeypatch):
    import ray
    from ray.tune.execution import class_cache

    from dmlray.jobs import launch

    for key, value in FAKE.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # the patch applies on a running cluster too
    # as Ray 2.60 ships it (an earlier ensure_ray in this process may have changed it already)
    monkeypatch.setattr(
        class_cache, "ENV_VARS_TO_PROPAGATE", set(class_cache.ENV_VARS_TO_PROPAGATE) | launch.CREDENTIAL_ENV
    )

    class Trainable:
        pass

    launch.ensure_ray()
    # what Tune would make of a trainable now: the runtime_env of its actor class
    remote = class_cache._ActorClassCache().get(Trainable)
    options = repr(remote._default_options)
    assert "PL_DISABLE_FORK" in options  # the runtime_env Tune builds is the one seen here
    for key in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"):
        assert FAKE[key] not in options, f"{key} in the trials' runtime_env: {options}"


@pytest.fixture
def umask_zero():
    """A umask that would leave a file created with the default mode readable by everyone."""
    old = os.umask(0)
    yield
    os.umask(old)


def test_credential_files_are_owner_only_before_their_content_is_written(tmp_path, umask_zero, monkeypatch):
    modes_while_writing = []
    real_write = os.write

    def spying_write(fd, data):
        modes_while_writing.append(os.fstat(fd).st_mode & 0o777)
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", spying_write)
    target = tmp_path / "creds.json"
    write_owner_only(target, "secret-1")
    assert target.read_text() == "secret-1" and target.stat().st_mode & 0o777 == 0o600
    assert modes_while_writing and set(modes_while_writing) == {0o600}, modes_while_writing

    # an existing, world-readable file is replaced by a new owner-only one, not rewritten in place
    loose = tmp_path / "loose"
    loose.write_text("old")
    loose.chmod(0o644)
    write_owner_only(loose, b"secret-2")
    assert loose.read_bytes() == b"secret-2" and loose.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["creds.json", "loose"], "temporary files left"


def test_seaweed_and_local_cluster_write_their_secrets_owner_only(tmp_path, umask_zero, capsys):
    from test_deploy import local_cluster

    from dmlray.devtools.seaweed import write_identities

    secret = secrets.token_hex(20)
    write_identities(tmp_path / "s3-identities.json", "dmlray-access", secret)
    state = {
        "dir": str(tmp_path),
        "processes": [],
        "s3": {
            "endpoint": "http://127.0.0.1:9",
            "access_key": "dmlray-access",
            "secret_key": secret,
            "region": "us-east-1",
            "bucket": "b",
            "master_port": 1,
        },
        "ray": {"dashboard_url": "http://127.0.0.1:8", "auth_token_path": str(tmp_path / "auth_token")},
    }
    local_cluster._write_state(tmp_path, state)
    for name in ("s3-identities.json", local_cluster.STATE_FILE):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o600, name
        assert secret in (tmp_path / name).read_text()

    # `env` prints the line that sources the owner-only env file, not the secret itself
    assert local_cluster.main(["env", "--dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert secret not in printed
    env_file = tmp_path / local_cluster.ENV_FILE
    assert env_file.stat().st_mode & 0o777 == 0o600
    shell = subprocess.run(
        ["bash", "-c", 'eval "$1"; printf %s "$AWS_SECRET_ACCESS_KEY"', "-", printed],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert shell.returncode == 0 and shell.stdout == secret, shell.stderr
