"""`dmlray demo` as a user runs it (a subprocess, its own stdout and stderr), on a 60-class subset:
a short story with each progress line once, and none of Ray's or boto's chatter."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dmlray.cli import parse

REPO = Path(__file__).resolve().parents[1]
STEPS, EVAL_EVERY, LOG_EVERY = 30, 15, 5
# what Ray and the libraries print when their output reaches the driver
CHATTER = (
    "TrainingReport(",
    "PreemptionWatcher",
    "Found credentials in environment variables",
    "(RayTrainWorker",
    "(TrainController",
    "Started a local Ray instance",
    "Token authentication is enabled",
    "Setting up process group",
)


def test_verbose_is_an_option_of_every_subcommand():
    assert parse(["demo", "train.steps=3", "--verbose", "--classes", "60"]).verbose
    assert not parse(["demo"]).verbose
    args = parse(["train", "demo", "-v", "train.steps=3"])
    assert args.verbose and args.config == "demo" and args.overrides == ["train.steps=3"]
    assert parse(["tune", "demo", "--space", "s.yaml", "--verbose", "a.b=1"]).verbose
    assert parse(["eval", "runs/x", "--verbose"]).verbose and parse(["presets", "-v"]).verbose


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_demo_tells_a_short_story_each_step_once(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "AWS_", "DMLRAY_"))}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    out_dir = tmp_path / "demo-out"
    cmd = [
        sys.executable,
        "-m",
        "dmlray.cli",
        "demo",
        "--out",
        str(out_dir),
        "--classes",
        "60",
        f"train.steps={STEPS}",
        f"train.eval_every={EVAL_EVERY}",
        f"train.log_every={LOG_EVERY}",
        "data.classes_per_batch=8",
        "data.class_buffer=16",
        "memory.size=128",
        "memory.start=10",
        "optim.milestones=[]",
    ]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=840)
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-6000:]

    step_lines = [line for line in text.splitlines() if line.startswith("[dmlray] step ")]
    printed = [int(m) for m in re.findall(r"^\[dmlray\] step (\d+)/", text, flags=re.M)]
    expected = list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    assert printed == expected, step_lines  # each once, in order, none missing
    history = [json.loads(line) for line in (out_dir / "runs" / "demo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history if "loss" in r] == expected
    # a Recall@1 on each evaluation's line, the value the run recorded
    evaluations = {r["step"]: r["recall@1"] for r in history if "recall@1" in r}
    assert sorted(evaluations) == [EVAL_EVERY, STEPS]
    for line in step_lines:
        step = int(line.split()[2].split("/")[0])
        assert (f"R@1 {evaluations[step]:.4f}" in line) == (step in evaluations), line

    found = [s for s in CHATTER if s in text]
    assert not found, f"chatter in the demo's output without --verbose: {found}\n{text[-6000:]}"
    for story in ("[1/3] starting SeaweedFS", "[2/3]", "held-out classes", "[3/3] training", "demo finished in"):
        assert story in text, (story, text[-4000:])
    assert "Retrieval on the held-out 'test' classes" in text and "raw pixels" in text
    assert f"run folder: {out_dir / 'runs' / 'demo'}" in text
    pictures = re.findall(r"^(?:plot|picture): +(\S+)$", text, flags=re.M)
    assert pictures and all(Path(p).read_bytes()[:4] == b"\x89PNG" for p in pictures), pictures
    assert len(text.splitlines()) < 40, text  # a story, not a log
