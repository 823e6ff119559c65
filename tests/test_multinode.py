"""A real multi-node Ray cluster on this machine (separate `ray start` raylets), a job
submitted through the Ray Jobs API with the config shipped in its runtime_env, training
with its two workers on different nodes, shards and checkpoints on SeaweedFS."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from test_deploy import local_cluster, local_ray_cluster, submit_ray_job  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow


@pytest.mark.timeout(900)
def test_job_submit_trains_across_nodes_from_s3(local_ray_cluster, tmp_path, monkeypatch):  # noqa: F811
    from recipes import RECIPE_40

    from dmlray.config import config_to_dict, load_config
    from dmlray.data import storage
    from dmlray.data.pack import pack

    state = local_ray_cluster
    env = local_cluster.cluster_env(state)
    for key, value in env.items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)
    storage.reset_clients()
    bucket = state["s3"]["bucket"]
    pack(RECIPE_40, f"s3://{bucket}/glyphs40", progress=False)

    # the config travels with the job: a working_dir holding job.yaml
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    cfg = load_config(
        "demo",
        [
            f"data.url=s3://{bucket}/glyphs40",
            f"run.storage_path=s3://{bucket}/runs",
            "run.name=multinode",
            "run.num_workers=2",
            "data.classes_per_batch=8",
            "data.class_buffer=16",
            "train.steps=40",
            "train.eval_every=20",
            "memory.size=256",
            "memory.start=10",
            "optim.milestones=[]",
        ],
    )
    (job_dir / "job.yaml").write_text(yaml.safe_dump(config_to_dict(cfg)))
    job = submit_ray_job(
        state, "python -m dmlray train job.yaml", timeout=600, runtime_env={"working_dir": str(job_dir)}
    )
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
    assert "R@1" in job.stdout and "raw pixels" in job.stdout

    # result and checkpoints landed on S3 (Ray's storage through pyarrow, ours through boto3)
    result = json.loads(storage.read_bytes(f"s3://{bucket}/runs/multinode/result.json"))
    assert result["steps"] == 40
    assert result["metrics"]["recall@1"] > result["baseline_raw_pixels"]["recall@1"]
    assert any(n.startswith("checkpoint_") for n in storage.list_dir(f"s3://{bucket}/runs/multinode"))

    # the two training workers ran on two different raylets
    probe = (
        "import json, ray; from ray.util.state import list_actors; "
        "import sys; ray.init(address=sys.argv[1]); "
        "actors = list_actors(filters=[('class_name', '=', 'RayTrainWorker')], detail=True, limit=100); "
        "print(json.dumps(sorted({a['node_id'] for a in actors})))"
    )
    client_env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    client_env.update({k: v for k, v in env.items() if k != "RAY_ADDRESS"})
    out = subprocess.run(
        [sys.executable, "-c", probe, state["ray"]["address"]],
        capture_output=True,
        text=True,
        timeout=180,
        env=client_env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    nodes = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(nodes) == 2, f"workers ran on nodes {nodes}"
