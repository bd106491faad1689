"""``streammem detect``, ``streammem train detector`` and ``streammem eval detection`` through
typer's CliRunner, on short StreamWorld streams and a tiny checkpoint saved to a temp folder."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from streammem.cli import app
from streammem.io import VideoWriter
from streammem.models.detector import SmallDetector

WORLD = "world:seed=1,preset=hard,size=128,frames=6"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    det = SmallDetector(num_classes=3, class_names=["a", "b", "c"], width=16, fc_dim=32, heads=4, pixel_heads=4,
                        pixel_keys=32, num_proposals=20, bank_proposals=10).eval()
    with torch.no_grad():  # confident enough that some boxes pass the default threshold
        det.cls.bias.copy_(torch.tensor([-3.0, 3.0, 0.0, 0.0]))
    path = tmp_path_factory.mktemp("ckpt") / "det"
    det.save_pretrained(path)
    return path


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def frames_in(path: Path) -> int:
    cap = cv2.VideoCapture(str(path))
    n = 0
    while cap.read()[0]:
        n += 1
    return n


def test_detect_small_writes_video_jsonl_and_summary(ckpt, tmp_path):
    out = tmp_path / "out"
    res = invoke("detect", WORLD, "--out", out, "--checkpoint", ckpt, "--no-progress")
    assert res.exit_code == 0, res.output
    assert "streammem detect: 6 frames" in res.output and "summary:" in res.output
    lines = [json.loads(x) for x in (out / "detections.jsonl").read_text().splitlines()]
    assert [r["frame"] for r in lines] == list(range(6))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames_processed"] == summary["frames_written"] == 6 and summary["error"] is None
    assert summary["detections"] == sum(r["num_detections"] for r in lines) > 0
    assert summary["pipeline"]["memory"] == "feature_bank" and summary["pipeline"]["instance_writes"] > 0
    d = next(r for r in lines if r["detections"])["detections"][0]
    assert set(d) >= {"xyxy", "confidence", "class_id", "class_name"} and d["class_name"] in {"a", "b", "c"}
    assert d["confidence"] >= 0.3  # the small detector's default threshold
    assert frames_in(out / "annotated.mp4") == 6
    assert not list(out.glob("*.partial*"))


def test_detect_options_hog_none_protocol_and_max_frames(ckpt, tmp_path):
    res = invoke("detect", WORLD, "--out", tmp_path / "hog", "--detector", "hog", "--memory", "dual",
                 "--max-frames", "4", "--no-progress")
    assert res.exit_code == 0, res.output
    s = json.loads((tmp_path / "hog" / "summary.json").read_text())
    assert s["frames_written"] == 4 and s["detector"] == "hog" and s["pipeline"]["detector"] == "hog"
    assert s["config"]["memory"] == "dual" and s["config"]["score_threshold"] == 0.0
    res = invoke("detect", WORLD, "--out", tmp_path / "proto", "--checkpoint", ckpt, "--mode", "protocol",
                 "--memory", "none", "--score-threshold", "0.05", "--no-progress")
    assert res.exit_code == 0, res.output
    s = json.loads((tmp_path / "proto" / "summary.json").read_text())
    assert s["frames_written"] == 6 and s["pipeline"]["mode"] == "protocol" and s["config"]["score_threshold"] == 0.05
    lines = (tmp_path / "proto" / "detections.jsonl").read_text().splitlines()
    assert [json.loads(x)["frame"] for x in lines] == list(range(6))  # video order despite the shuffle


def test_detect_bad_input_fails_clearly(ckpt, tmp_path):
    res = invoke("detect", tmp_path / "missing.mp4", "--out", tmp_path / "o1", "--checkpoint", ckpt, "--no-progress")
    assert res.exit_code == 2 and "missing.mp4" in res.output and "no such file" in res.output
    assert not (tmp_path / "o1").exists()
    res = invoke("detect", WORLD, "--out", tmp_path / "o2", "--memory", "pyramid", "--checkpoint", ckpt)
    assert res.exit_code == 2 and "--memory must be one of" in res.output
    res = invoke("detect", WORLD, "--out", tmp_path / "o3", "--checkpoint", tmp_path / "nockpt")
    assert res.exit_code == 2 and "streammem train detector" in res.output
    res = invoke("detect", "world:colour=red", "--out", tmp_path / "o4", "--checkpoint", ckpt)
    assert res.exit_code == 2 and "bad world spec" in res.output


def test_detect_keeps_work_done_before_a_corrupt_frame(ckpt, tmp_path):
    good = tmp_path / "clip.mp4"
    rng = np.random.default_rng(0)
    with VideoWriter(good, fps=8) as w:
        for i in range(24):
            img = rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)
            img[20:60, 10 + 3 * i: 50 + 3 * i] = (220, 30, 30)
            w.write(img)
    bad = tmp_path / "truncated.mp4"
    data = good.read_bytes()
    bad.write_bytes(data[: int(len(data) * 0.6)])
    out = tmp_path / "out"
    res = invoke("detect", bad, "--out", out, "--checkpoint", ckpt, "--no-progress")
    assert res.exit_code == 1, res.output
    assert "truncated.mp4" in res.output and "everything before it was written" in res.output
    n = len((out / "detections.jsonl").read_text().splitlines())
    s = json.loads((out / "summary.json").read_text())
    assert 0 < n == s["frames_written"] < 24 and "stopped at frame" in s["error"]
    assert frames_in(out / "annotated.mp4") == n


def test_eval_detection_writes_results(ckpt, tmp_path):
    out = tmp_path / "res" / "results.json"
    res = invoke("eval", "detection", "--checkpoint", ckpt, "--presets", "clean", "--videos", "1", "--frames", "3",
                 "--size", "64", "--out", out)
    assert res.exit_code == 0, res.output
    assert "| preset | method |" in res.output and "| clean | feature_bank |" in res.output
    r = json.loads(out.read_text())
    assert set(r["clean"]) == {"single", "single+smoother", "single+score_smoother", "feature_bank", "dual"} and "_timing" in r
    res = invoke("eval", "detection", "--checkpoint", ckpt, "--presets", "clean,foggy")
    assert res.exit_code == 2 and "--presets" in res.output
    res = invoke("eval", "detection", "--checkpoint", ckpt, "--presets", "hard", "--corruption", "foggy")
    assert res.exit_code == 2 and "--corruption" in res.output
    res = invoke("eval", "detection", "--checkpoint", ckpt, "--presets", "clean", "--videos", "1", "--frames", "2",
                 "--size", "64", "--no-temporal-state", "--corruption", "clean")
    assert res.exit_code == 0 and "| clean | dual |" in res.output, res.output


def test_train_detector_wraps_train_config(monkeypatch, tmp_path):
    """The command maps its options onto TrainConfig and calls train() (stubbed: no training here)."""
    import streammem.train.detector as td

    seen = {}
    monkeypatch.setattr(td, "train", lambda cfg: seen.setdefault("cfg", cfg))
    res = invoke("train", "detector", "--minutes", "0.5", "--out", tmp_path / "d", "--max-steps", "3", "--size", "64",
                 "--model", '{"width": 16, "fc_dim": 32}')
    assert res.exit_code == 0, res.output
    cfg = seen["cfg"]
    assert isinstance(cfg, td.TrainConfig) and cfg.minutes == 0.5 and cfg.max_steps == 3 and cfg.size == 64
    assert cfg.out == str(tmp_path / "d") and cfg.model == {"width": 16, "fc_dim": 32}
    res = invoke("train", "detector", "--minutes", "0")
    assert res.exit_code == 2 and "TrainConfig.minutes" in res.output
    seen.clear()
    res = invoke("train", "detector", "--minutes", "0.5", "--out", tmp_path / "f", "--history", "4",
                 "--model", '{"fusion_radius": 2}')
    assert res.exit_code == 0, res.output
    assert seen["cfg"].history == 4 and seen["cfg"].model == {"fusion_radius": 2}
