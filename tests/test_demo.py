"""`dmlray demo` as a user runs it (a subprocess, its own stdout and stderr), on a 60-class subset:
a short story with each progress line once, and none of Ray's or boto's chatter."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dmlray.cli import parse
from dmlray.jobs.output import ProgressPrinter
from dmlray.jobs.run_folder import MetricsWriter, RunFolder

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


def record(step: int, **extra) -> dict:
    return {"step": step, "loss": 1.0 / step, **extra}


def test_the_driver_prints_each_logged_step_once_while_the_run_writes_them(tmp_path, capsys):
    """The worker side's MetricsWriter rewrites metrics.jsonl as it grows; a restart replays
    steps 15-20 from a checkpoint at 10; the steps of an earlier driver are not printed again."""
    folder = RunFolder(str(tmp_path), "run")
    writer = MetricsWriter(folder)
    history = [record(5)]
    writer.submit(history)
    writer.flush()
    with ProgressPrinter(folder, lambda r: f"[dmlray] step {r['step']}", interval_s=0.02) as printer:
        assert printer.last_step == 5  # printed by the driver of an earlier attempt
        for step in (10, 15, 20):
            history.append(record(step, **({"recall@1": 0.5} if step == 10 else {})))
            writer.submit(history)
            writer.flush()
            time.sleep(0.05)
        history = history[:2] + [record(15), record(20), record(25)]  # resumed at 10
        writer.submit(history)
        writer.close()
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[dmlray] step")]
    assert printed == [f"[dmlray] step {s}" for s in (10, 15, 20, 25)]


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
        if step in evaluations:
            assert f"R@1 {evaluations[step]:.4f}" in line, line
        else:
            assert "R@1" not in line, line

    found = [s for s in CHATTER if s in text]
    assert not found, f"chatter in the demo's output without --verbose: {found}\n{text[-6000:]}"
    for story in ("[1/3] starting SeaweedFS", "[2/3]", "held-out classes", "[3/3] training", "demo finished in"):
        assert story in text, (story, text[-4000:])
    assert "Retrieval on the held-out 'test' classes" in text and "raw pixels" in text
    assert f"run folder: {out_dir / 'runs' / 'demo'}" in text
    pictures = re.findall(r"^(?:plot|picture): +(\S+)$", text, flags=re.M)
    assert pictures and all(Path(p).read_bytes()[:4] == b"\x89PNG" for p in pictures), pictures
    assert len(text.splitlines()) < 40, text  # a story, not a log
