"""The streaming loop (offline and real-time drop accounting), sinks, and the main job CLI."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import N_FRAMES
from streammem import Frame
from streammem.cli import app
from streammem.io import JsonlWriter, SinkError, SourceError, SourceReadError, VideoWriter, open_source
from streammem.pipelines import StatsPipeline, run_stream


def synthetic(n: int, fps: float = 50.0, size: int = 32):
    for i in range(n):
        yield Frame(index=i, timestamp=i / fps, image=np.full((size, size, 3), i % 256, np.uint8))


class Slow:
    """A pipeline that takes `delay` seconds per frame and records what it saw."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.seen: list[int] = []

    def step(self, frame: Frame) -> int:
        time.sleep(self.delay)
        self.seen.append(frame.index)
        return frame.index

    def reset(self) -> None:
        self.seen.clear()


def test_offline_processes_every_frame_and_measures_latency():
    pipe = Slow(0.002)
    run = run_stream(synthetic(20), pipe, progress=False)
    items = list(run)
    assert [it.output for it in items] == list(range(20))
    assert all(it.latency_ms >= 2.0 for it in items)
    s = run.stats.summary()
    assert s["frames_processed"] == 20 and s["frames_dropped"] == 0
    assert s["latency_ms_p50"] >= 2.0


def test_realtime_drops_frames_that_arrive_while_busy_newest_wins():
    # 50 fps input (a frame every 20 ms) into a pipeline that needs 70 ms per frame.
    arrived = [-1]  # the newest frame handed to the loop (the source is asked for the next one after it)
    newest_at_end: list[int] = []  # arrived[0] at the end of each step

    def source():
        for f in synthetic(60, fps=50.0):
            yield f
            arrived[0] = f.index

    class Recording(Slow):
        def step(self, frame: Frame) -> int:
            out = super().step(frame)
            newest_at_end.append(arrived[0])
            return out

    pipe = Recording(0.07)
    run = run_stream(source(), pipe, realtime=True, progress=False)
    items = list(run)
    stats = run.stats
    assert stats.processed == len(items) == len(pipe.seen)
    assert stats.processed + stats.dropped == 60, "every frame is either processed or counted as dropped"
    assert stats.dropped > 30
    assert sum(it.dropped for it in items) == stats.dropped
    # The processed frames are in order, and each gap equals the drops reported on that item.
    seen = [it.frame.index for it in items]
    assert seen == sorted(seen) and seen[0] == 0 and seen[-1] == 59
    for prev, cur in zip(items, items[1:]):
        assert cur.frame.index - prev.frame.index - 1 == cur.dropped
    assert set(stats.dropped_indices) == set(range(60)) - set(seen)
    # Newest wins: after a busy step, the frame processed is at least as new as every frame that
    # had arrived by the end of that step (not the oldest one waiting).
    for prev_end, cur in zip(newest_at_end, items[1:]):
        assert cur.frame.index >= prev_end


def test_realtime_pipeline_that_keeps_up_drops_nothing():
    """Frames paced at 200 fps, each arriving only once the pipeline has taken the one before
    (however loaded the machine): a pipeline that keeps up loses nothing."""
    took = threading.Semaphore(0)

    class Signalling(Slow):
        def step(self, frame: Frame) -> int:
            took.release()
            return super().step(frame)

    def source():
        for f in synthetic(30, fps=200.0):
            if f.index:
                assert took.acquire(timeout=60), f"the pipeline never took frame {f.index - 1}"
            yield f

    pipe = Signalling(0.0)
    run = run_stream(source(), pipe, realtime=True, progress=False)
    items = list(run)
    assert [it.frame.index for it in items] == pipe.seen == list(range(30))
    assert run.stats.dropped == 0 and not any(it.dropped for it in items)


def test_source_error_is_raised_after_every_good_frame(videos):
    src = open_source(videos["truncated_h264_mp4"])
    run = run_stream(src, StatsPipeline(), progress=False)
    got = []
    with pytest.raises(SourceReadError):
        for item in run:
            got.append(item.frame.index)
    assert got == list(range(len(got))) and len(got) > 0
    assert run.stats.processed == len(got) and "SourceReadError" in run.stats.error


def test_max_frames_and_interrupt():
    run = run_stream(synthetic(100), StatsPipeline(), max_frames=7, progress=False)
    assert len(list(run)) == 7
    stop = threading.Event()
    run = run_stream(synthetic(100), StatsPipeline(), interrupt=stop, progress=False)
    for i, _ in enumerate(run):
        if i == 4:
            stop.set()
    assert run.stats.processed == 5


def test_jsonl_writer_is_atomic(tmp_path):
    target = tmp_path / "out.jsonl"
    with pytest.raises(RuntimeError):
        with JsonlWriter(target) as w:
            w.write({"a": 1, "x": np.float32(0.5), "v": np.arange(2)})
            assert not target.exists(), "nothing under the final name while writing"
            raise RuntimeError("crash")
    assert not target.exists()
    partial = tmp_path / "out.jsonl.partial"
    assert json.loads(partial.read_text()) == {"a": 1, "x": 0.5, "v": [0, 1]}
    with JsonlWriter(target) as w:
        for i in range(3):
            w.write({"i": i})
    assert [json.loads(line)["i"] for line in target.read_text().splitlines()] == [0, 1, 2]


def test_video_writer_writes_browser_playable_h264(tmp_path):
    path = tmp_path / "v.mp4"
    with VideoWriter(path, fps=10) as w:
        for f in synthetic(12, size=33):  # odd size: padded to even for yuv420p
            w.write(f.image)
    assert w.codec == "h264"
    info = open_source(path).info
    assert info.codec == "h264" and info.num_frames == 12 and (info.width, info.height) == (34, 34)
    with VideoWriter(tmp_path / "w.mp4", fps=10) as w2:
        w2.write(np.zeros((8, 8, 3), np.uint8))
        with pytest.raises(SinkError, match="frame 1 is 16x8"):
            w2.write(np.zeros((8, 16, 3), np.uint8))


def test_cli_run_main_job(videos, tmp_path):
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["run", str(videos["h264_mp4"]), "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert f"{N_FRAMES} frames" in res.output
    lines = (out / "frames.jsonl").read_text().splitlines()
    assert len(lines) == N_FRAMES
    rec = json.loads(lines[3])
    assert rec["frame"] == 3 and rec["latency_ms"] > 0 and "motion" in rec
    assert open_source(out / "annotated.mp4").info.num_frames == N_FRAMES
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames_processed"] == N_FRAMES and summary["error"] is None
    # The memory stayed within the ovbench budget and its snapshot reloads as the same state.
    from streammem.memory import Memory

    assert summary["memory"]["num_tokens"] <= summary["memory"]["capacity"] == 832
    mem = Memory.load(out / "memory.safetensors")
    assert mem.stats()["num_tokens"] == summary["memory"]["num_tokens"]
    assert mem.stats()["writes"] == N_FRAMES
    assert rec["memory_tokens"] > 0
    # the heads ran: detections for every frame, and the scheduled questions answered causally
    dets = [json.loads(x) for x in (out / "detections.jsonl").read_text().splitlines()]
    assert [d["frame"] for d in dets] == list(range(N_FRAMES))
    answers = [json.loads(x) for x in (out / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 4 and all(a["answer"] in ("yes", "no") and a["evidence"] for a in answers)
    assert all(e["timestamp"] <= a["at"] for a in answers for e in a["evidence"])
    assert "answers ->" in res.output and "detect:" in res.output
    res = CliRunner().invoke(app, ["run", str(videos["h264_mp4"]), "--out", str(tmp_path / "o2"), "--no-progress",
                                   "--retention", "newest"])
    assert res.exit_code != 0 and "retention must be one of ['reference', 'spread'], got 'newest'" in res.output


def test_cli_run_keeps_work_done_before_a_truncation(videos, tmp_path):
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["run", str(videos["truncated_h264_mp4"]), "--out", str(out), "--no-progress"])
    assert res.exit_code == 1
    assert "truncated" in res.output and "everything before it was written" in res.output
    n = len((out / "frames.jsonl").read_text().splitlines())
    summary = json.loads((out / "summary.json").read_text())
    assert n == summary["frames_processed"] > 0
    assert "SourceReadError" in summary["error"]


def test_cli_info_and_errors(videos):
    res = CliRunner().invoke(app, ["info", str(videos["mjpeg_avi"])])
    assert res.exit_code == 0 and "MJPG" in res.output and "320x240" in res.output
    res = CliRunner().invoke(app, ["info", "/no/such/video.mp4"])
    assert res.exit_code == 2 and "no such file" in res.output


def test_world_source_through_the_loop():
    src = open_source("world:seed=2,preset=clean,seconds=2,fps=8,size=96")
    frames = list(src)
    assert len(frames) == 16 and frames[0].image.shape == (96, 96, 3)
    assert frames[0].pose.shape == (4, 4) and "boxes" in frames[0].info["gt"]
    again = [f.image for f in open_source("world:seed=2,preset=clean,seconds=2,fps=8,size=96")]
    assert all(np.array_equal(a.image, b) for a, b in zip(frames, again))
    with pytest.raises(SourceError, match="bad world spec"):
        open_source("world:seed=1,colour=blue")
