"""bench/gpu_check.py --smoke: every section runs on the CPU with only what the GPU machine has.

The GPU machine's python has torch, torchvision, numpy and pillow but no Ray, boto3,
prometheus_client, webdataset, faiss or pytorch-metric-learning: the smoke run hides those
(an import of any of them fails), so a hard dependency on one shows up here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from dmlray import losses

ROOT = Path(__file__).resolve().parents[1]
ABSENT_ON_GPU_MACHINE = (
    "ray",
    "boto3",
    "botocore",
    "prometheus_client",
    "webdataset",
    "faiss",
    "pytorch_metric_learning",
)
SECTIONS = ("numerics", "loss_speed", "stream", "eval")

sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402


def test_smoke_run_writes_every_section_without_the_absent_packages(tmp_path):
    out = tmp_path / "out"
    code = (
        "import sys, runpy; "
        f"[sys.modules.__setitem__(m, None) for m in {ABSENT_ON_GPU_MACHINE!r}]; "
        f"sys.argv = ['gpu_check.py', '--smoke', '--out', {str(out)!r}]; "
        "runpy.run_path('bench/gpu_check.py', run_name='__main__')"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    report = json.loads((out / "gpu-check.json").read_text())
    assert report["meta"]["torch"] == torch.__version__ and report["meta"]["smoke"]
    for name in SECTIONS:
        assert report[name]["status"] in ("pass", "fail", "done"), (name, report[name])
    numerics = report["numerics"]["result"]
    judged = {(row["loss"], row["dtype"]): row["pass"] for row in numerics["losses"]}
    for name in losses.names():
        for dtype in ("float32", "bfloat16"):
            assert isinstance(judged.get((name, dtype)), bool), (name, dtype)
    assert {c["check"].split(" (")[0] for c in numerics["checks"]} >= {"cross-batch memory", "world-size-1 gathers"}
    assert report["loss_speed"]["result"]["pml"] == "not importable" and report["loss_speed"]["result"]["dmlray_ms"] > 0
    feeds = {(r["backbone"], r["feed"]) for r in report["stream"]["result"]["runs"]}
    assert len(feeds) == 6 and all(r["images_per_s"] > 0 for r in report["stream"]["result"]["runs"])
    assert report["eval"]["result"]["metrics"]["recall@1"] > 0

    markdown = (out / "gpu-check.md").read_text()
    assert all(f"## {name} (" in markdown for name in SECTIONS)
    assert all(f"| {name}" in markdown for name in losses.names())
    assert "stream resize 256" in markdown and "| floor" in markdown


def test_a_wrong_gradient_is_flagged():
    inputs = gpu_check.loss_inputs(3, 2, 8, 20)
    loss = losses.build("multi_similarity")
    want = gpu_check.run_loss(loss.double(), inputs, True, torch.device("cpu"), torch.float64, False)
    got = gpu_check.run_loss(loss.float(), inputs, True, torch.device("cpu"), torch.float32, False)
    tol = gpu_check.TOLERANCES["float32"]
    assert gpu_check.compare(got, want, tol)["pass"]

    wrong = dict(got, **{"grad embeddings": got["grad embeddings"] * 1.01})
    result = gpu_check.compare(wrong, want, tol)
    assert not result["pass"] and result["worst_at"] == "grad embeddings" and result["worst"] > 1
    # a missing gradient and a non-finite value fail too, they do not pass by omission
    assert not gpu_check.compare({"value": got["value"]}, want, tol)["pass"]
    assert not gpu_check.compare(dict(got, value=torch.tensor(float("nan"))), want, tol)["pass"]
    # and bf16's looser tolerance is still a tolerance
    assert not gpu_check.compare(dict(got, value=got["value"] * 1.2), want, gpu_check.TOLERANCES["bfloat16"])["pass"]
