"""Frame times and frame counts on files whose containers mislead: the last B-frames of an AVI
timed at 0.0 s, an AVI whose header counts null frames, a variable-frame-rate mp4; decord and
OpenCV on the same files; and annotated videos that keep the source's timing.

Every file is made here with ffmpeg (imageio-ffmpeg's binary); ``times_by_ffmpeg`` reads the
times ffmpeg itself gives each decoded frame, the reference the reader must agree with.
"""

from __future__ import annotations

import json
import re
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import CODECS, _ffmpeg, vfr_times
from streammem.io import SinkError, SourceWarning, VideoWriter, ffmpeg_exe, open_source

STEP = 0.04  # 25 fps
# the times of conftest's vfr_times(): 20 frames 0.04 s apart, then 10 frames 0.12 s apart (last 1.88 s)
VFR_SETPTS = "setpts='if(lt(N,20),N*0.04,0.8+(N-20)*0.12)/TB'"


@pytest.fixture(scope="module")
def timing_videos(tmp_path_factory) -> dict[str, Path]:
    """Files whose containers mislead a reader (160x120, testsrc2)."""
    root = tmp_path_factory.mktemp("timing")
    src = ["-f", "lavfi", "-i", "testsrc2=size=160x120:rate=25:duration=2"]
    out = {
        # MPEG-4 part 2 with B-frames in AVI: OpenCV times the last frame 0.0 s, decord's table
        # lacks 18 of the 50 times.
        "bframes_avi": (src + ["-c:v", "mpeg4", "-bf", "2", "-q:v", "3"], "bframes.avi"),
        # H.264 with B-frames in AVI: the last two frames at 0.0 s, decord's table lacks every time.
        "h264_avi": (src + ["-c:v", "libx264", "-bf", "2", "-pix_fmt", "yuv420p"], "h264.avi"),
        # Variable frame rate muxed into AVI: the muxer fills each gap with empty chunks (null
        # frames), which the header counts (48) but which hold no picture (30 decode).
        "null_frames_avi": (["-f", "lavfi", "-i", "testsrc2=size=160x120:rate=25:duration=1.2", "-vf", VFR_SETPTS,
                             "-fps_mode", "vfr", "-c:v", "mpeg4", "-q:v", "3"], "null_frames.avi"),
        # Variable frame rate mp4 without B-frames: its duration is exactly 1.88 + 0.04 = 1.92 s.
        "vfr_mp4": (["-f", "lavfi", "-i", "testsrc2=size=160x120:rate=25:duration=1.2", "-vf", VFR_SETPTS,
                     "-fps_mode", "vfr", "-c:v", "libx264", "-bf", "0", "-pix_fmt", "yuv420p",
                     "-movflags", "+faststart"], "vfr.mp4"),
    }
    paths = {}
    for name, (args, fname) in out.items():
        _ffmpeg(*args, str(root / fname))
        paths[name] = root / fname
    return paths


def times_by_ffmpeg(path: Path) -> list[float]:
    """The presentation time ffmpeg gives each decoded frame (its showinfo filter)."""
    res = subprocess.run([ffmpeg_exe(), "-hide_banner", "-i", str(path), "-vf", "showinfo", "-f", "null", "-"],
                         capture_output=True, text=True, check=True)
    return [float(t) for t in re.findall(r"n:\s*\d+ pts:\s*-?\d+ pts_time:(-?[\d.]+)", res.stderr)]


def read(path, **opts):
    """(frames, SourceWarning messages) of one whole read."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        frames = list(open_source(path, prefetch=0, **opts))
    return frames, [str(w.message) for w in caught if issubclass(w.category, SourceWarning)]


# ------------------------------------------------------------------ times that go backwards
@pytest.mark.parametrize("backend", ["opencv", "decord"])
@pytest.mark.parametrize("name, repaired", [("bframes_avi", 1), ("h264_avi", 2)])
def test_times_that_go_back_to_zero_are_repaired_from_the_frame_rate_with_one_warning(timing_videos, name,
                                                                                     repaired, backend):
    path = timing_videos[name]
    frames, said = read(path, backend=backend)
    times = [f.timestamp for f in frames]
    assert len(frames) == 50 and [f.index for f in frames] == list(range(50))
    assert np.all(np.diff(times) > 0), times[-4:]
    np.testing.assert_allclose(np.diff(times), STEP, atol=1e-6)
    # the repaired times are those ffmpeg gives (its first frame is late by the B-frame delay)
    np.testing.assert_allclose(times, times_by_ffmpeg(path), atol=1e-6)
    repairs = [m for m in said if "not after the previous frame" in m]
    assert len(repairs) == 1, said  # reported once, however many frames it repaired
    assert str(path) in repairs[0] and f"frame {50 - repaired}" in repairs[0] and "0.000s" in repairs[0]


def test_selection_by_time_sees_the_repaired_times(timing_videos):
    frames, _ = read(timing_videos["bframes_avi"], start=1.9)
    assert [(f.index, round(f.timestamp, 3)) for f in frames] == [(47, 1.92), (48, 1.96), (49, 2.0)]


# ------------------------------------------------------------------ decord against OpenCV
CODEC_FILES = sorted(CODECS) + ["vfr"]
TIMING_FILES = ["bframes_avi", "h264_avi", "null_frames_avi", "vfr_mp4"]


@pytest.mark.parametrize("name", CODEC_FILES + TIMING_FILES)
def test_decord_and_opencv_deliver_the_same_frames_indices_and_times(videos, timing_videos, name):
    path = videos[name] if name in CODEC_FILES else timing_videos[name]
    a, _ = read(path, backend="opencv")
    b, said = read(path, backend="decord")
    assert [f.index for f in b] == [f.index for f in a] == list(range(len(a)))
    np.testing.assert_allclose([f.timestamp for f in b], [f.timestamp for f in a], atol=1e-4)
    np.testing.assert_allclose([f.timestamp for f in a], times_by_ffmpeg(path), atol=1e-3)
    for fa, fb in zip(a, b):
        diff = np.abs(fa.image.astype(np.int16) - fb.image.astype(np.int16)).mean()
        assert diff < 1.0, f"frame {fa.index} differs by {diff:.2f} on average"
    if name in ("bframes_avi", "h264_avi"):  # decord's own table is broken there: OpenCV reads, and says so
        assert any("decord's frame times for this file are unusable" in m and "reading with OpenCV instead" in m
                   for m in said), said
        with pytest.warns(SourceWarning, match="reading with OpenCV instead"):
            assert open_source(path, backend="decord").info.backend == "opencv"
    else:
        assert not [m for m in said if "decord" in m]
        assert open_source(path, backend="decord").info.backend == "decord"


# ------------------------------------------------------------------ header counts null frames
@pytest.mark.parametrize("backend", ["auto", "opencv", "decord"])
def test_a_header_that_counts_null_frames_is_a_warning_not_an_error(timing_videos, backend):
    path = timing_videos["null_frames_avi"]
    assert open_source(path).info.num_frames == 48  # the header's count
    frames, said = read(path, backend=backend)  # no SourceReadError
    assert [f.index for f in frames] == list(range(30))
    np.testing.assert_allclose([f.timestamp for f in frames], vfr_times(), atol=1e-6)
    counts = [m for m in said if "header counts 48 frames but 30 decode" in m]
    assert len(counts) == 1 and str(path) in counts[0] and "null frames" in counts[0], said


# ------------------------------------------------------------------ annotated videos keep the timing
def _copy_with_times(src: Path, out: Path, fps: float) -> list[float]:
    times = []
    with VideoWriter(out, fps=fps) as w:
        for f in open_source(src):
            w.write(f.image, timestamp=f.timestamp)
            times.append(f.timestamp)
    return times


@pytest.mark.parametrize("encoder", ["pyav", "ffmpeg_constant_rate"])
def test_video_writer_with_timestamps_plays_as_long_as_a_variable_rate_source(timing_videos, tmp_path,
                                                                              monkeypatch, encoder):
    src = timing_videos["vfr_mp4"]
    info = open_source(src).info
    assert info.duration == pytest.approx(1.92, abs=1e-6) and info.num_frames == 30
    if encoder == "ffmpeg_constant_rate":  # what a machine without PyAV gets
        monkeypatch.setattr(VideoWriter, "_start_pyav", lambda self, h, w: False)
    out = tmp_path / "annotated.mp4"
    times = _copy_with_times(src, out, fps=25)
    got = open_source(out).info
    assert abs(got.duration - info.duration) <= STEP  # within one frame of the source
    back = [f.timestamp for f in open_source(out)]
    if encoder == "pyav":  # every frame at its own time
        assert len(back) == 30
        np.testing.assert_allclose(back, times, atol=1e-4)
    else:  # 25 fps, each 0.12 s frame shown three times
        assert len(back) == 48
        np.testing.assert_allclose(back, np.arange(48) * STEP, atol=1e-4)


def test_video_writer_without_timestamps_keeps_its_constant_rate(timing_videos, tmp_path):
    out = tmp_path / "plain.mp4"
    with VideoWriter(out, fps=25) as w:
        for f in open_source(timing_videos["vfr_mp4"]):
            w.write(f.image)
    info = open_source(out).info
    assert info.num_frames == 30 and info.fps == pytest.approx(25) and info.duration == pytest.approx(1.2)


def test_video_writer_refuses_mixed_or_backward_timestamps(tmp_path):
    img = np.zeros((16, 16, 3), np.uint8)
    w = VideoWriter(tmp_path / "a.mp4", fps=10)
    w.write(img, timestamp=0.5)
    with pytest.raises(SinkError, match="frame 1 has timestamp 0.5, not after the previous frame's 0.5"):
        w.write(img, timestamp=0.5)
    with pytest.raises(SinkError, match="frame 1 lacks a timestamp, unlike the frames before it"):
        w.write(img)
    w.write(img, timestamp=0.9)
    assert w.close() == tmp_path / "a.mp4"
    assert open_source(tmp_path / "a.mp4").info.duration == pytest.approx(0.5, abs=1e-3)  # 0.4 s + 1 / fps


# ------------------------------------------------------------------ the commands
def test_detect_on_an_avi_timed_back_to_zero_writes_true_times_and_keeps_the_timing(timing_videos, tmp_path):
    from streammem.cli import app

    path = timing_videos["h264_avi"]
    out = tmp_path / "out"
    with pytest.warns(SourceWarning, match="not after the previous frame"):
        res = CliRunner().invoke(app, ["detect", str(path), "--out", str(out), "--detector", "hog", "--no-progress"])
    assert res.exit_code == 0, res.output
    recs = [json.loads(x) for x in (out / "detections.jsonl").read_text().splitlines()]
    times = [r["timestamp"] for r in recs]
    assert len(recs) == 50 and np.all(np.diff(times) > 0) and times[-1] == pytest.approx(2.04)
    src, ann = open_source(path).info, open_source(out / "annotated.mp4").info
    assert ann.num_frames == 50 and abs(ann.duration - src.duration) <= STEP


def test_run_on_an_avi_timed_back_to_zero_finishes(timing_videos, tmp_path):
    from streammem.cli import app

    out = tmp_path / "out"
    with pytest.warns(SourceWarning, match="not after the previous frame"):
        res = CliRunner().invoke(app, ["run", str(timing_videos["bframes_avi"]), "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    recs = [json.loads(x) for x in (out / "frames.jsonl").read_text().splitlines()]
    assert len(recs) == 50 and recs[-1]["timestamp"] == pytest.approx(2.0)
    assert json.loads((out / "summary.json").read_text())["error"] is None
