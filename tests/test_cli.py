"""The commands as a user runs them, in-process: pack, train (local mode), eval."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
from recipes import TINY_RUN

from dmlray.cli import build_parser, main
from dmlray.data.glyphs import glyph_classes
from dmlray.devtools.ports import free_ports


def test_pack_to_a_file_url_and_a_plain_path_give_the_same_shards(tmp_path):
    args = ["pack", "glyphs", "--no-progress"]
    opts = "--dst"
    assert main(args + [opts, f"file://{tmp_path / 'a'}"]) == 0
    shards_yaml = Path(__file__).resolve().parents[1] / "shards" / "glyphs.yaml"
    assert main(["pack", str(shards_yaml), "--no-progress", "--dst", str(tmp_path / "b")]) == 0
    a = json.loads((tmp_path / "a" / "manifest.json").read_text())
    b = json.loads((tmp_path / "b" / "manifest.json").read_text())
    for split in ("train", "test"):
        assert [s["sha256"] for s in a["splits"][split]["shards"]] == [
            s["sha256"] for s in b["splits"][split]["shards"]
        ]
    assert a["splits"]["train"]["num_classes"] + a["splits"]["test"]["num_classes"] == len(glyph_classes()) >= 650
    assert a["splits"]["train"]["num_samples"] == 16 * a["splits"]["train"]["num_classes"]


def test_train_in_local_mode_then_eval_the_run(glyphs_small, tmp_path, capsys):
    port = free_ports(1)[0]
    rc = main(
        [
            "train",
            "demo",
            f"data.url={glyphs_small}",
            f"run.storage_path={tmp_path}",
            "run.name=cli",
            f"run.metrics_port={port}",
            "train.eval_every=15",
            "train.log_every=5",
            *TINY_RUN,
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "R@1" in out and "raw pixels" in out and str(tmp_path / "cli") in out
    run = tmp_path / "cli"
    result = json.loads((run / "result.json").read_text())
    assert result["steps"] == 30
    assert result["metrics"]["recall@1"] > result["baseline_raw_pixels"]["recall@1"]
    assert (run / "training.png").stat().st_size > 1000
    # outside Ray the same gauges are served by prometheus_client
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'dmlray_step{rank="0",run="cli",trial=""} 30.0' in text
    assert any(line.startswith("dmlray_recall_at_1{") for line in text.splitlines())

    for picture in ("retrieval_grid.png", "recall_at_k.png"):
        assert (run / picture).stat().st_size > 1000, picture  # drawn at the final evaluation
        (run / picture).unlink()
    assert main(["eval", str(run), "--export", "--html"]) == 0
    out = capsys.readouterr().out
    assert "R@1" in out and "retrieval_grid.png" in out and "report.html" in out
    assert (run / "retrieval_grid.png").exists() and (run / "recall_at_k.png").exists()
    page = (run / "report.html").read_text()
    # self-contained: 12 worst queries with 5 neighbours each, inlined, plus the grid; no script, no links out
    assert page.count("<div class='query'>") == 12 and page.count("data:image/png;base64,") >= 12 * 6 + 1
    assert "<script" not in page and "http" not in page
    import numpy as np

    exported = np.load(run / "embeddings-test.npz")
    assert exported["embeddings"].shape == (len(exported["labels"]), 64)
    assert len(set(exported["keys"].tolist())) == len(exported["keys"])
    np.testing.assert_allclose(np.linalg.norm(exported["embeddings"], axis=1), 1.0, rtol=1e-5)
    assert (run / "embeddings-test.parquet").stat().st_size > 0
    evaluated = json.loads((run / "eval.json").read_text())
    assert evaluated["steps"] == 30
    # the same weights on the same split give the same numbers as at the end of training
    assert evaluated["metrics"]["recall@1"] == pytest.approx(result["metrics"]["recall@1"])
    assert evaluated["metrics"]["map@r"] == pytest.approx(result["metrics"]["map@r"])
    # both go through dmlray.evaluation.report: every metric and the raw-pixel baseline agree
    assert evaluated["metrics"] == pytest.approx(result["metrics"])
    assert evaluated["baseline_raw_pixels"] == pytest.approx(result["baseline_raw_pixels"])
    assert f"{evaluated['metrics']['recall@1']:.4f}" in page  # the page shows the evaluated numbers


def test_eval_of_a_folder_without_checkpoints_is_a_clear_error(tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 2
    assert "neither a checkpoint" in capsys.readouterr().err


def test_unknown_key_fails_before_anything_runs(tmp_path, capsys):
    assert main(["train", "demo", "train.stepz=3", f"run.storage_path={tmp_path}"]) == 2
    assert "train.stepz" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_parser_knows_every_documented_subcommand():
    parser = build_parser()
    for argv in (
        ["pack", "glyphs", "--dst", "x"],
        ["train", "demo", "a.b=1"],
        ["eval", "runs/x"],
        ["demo"],
        ["tune", "demo", "--space", "s.yaml"],
        ["presets"],
    ):
        assert parser.parse_args(argv).command == argv[0]
    with pytest.raises(SystemExit):
        parser.parse_args(["pack", "glyphs"])  # --dst is required
