"""Sources: codecs and containers, timestamps, backend agreement, options, bad input."""

from __future__ import annotations

import itertools
import threading
import time

import numpy as np
import pytest

from conftest import CODECS, FPS, N_FRAMES, VFR_N, vfr_times
from streammem.io import (
    SourceError,
    SourceNotFoundError,
    SourceOpenError,
    SourceReadError,
    open_source,
    probe,
)
from streammem.io.sources import _prefetch

BACKENDS = ["opencv", "decord"]


def read(uri, **opts):
    return list(open_source(uri, **opts))


@pytest.mark.parametrize("codec", sorted(CODECS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_codec_reads_all_frames_with_container_timestamps(videos, codec, backend):
    frames = read(videos[codec], backend=backend)
    assert len(frames) == N_FRAMES
    assert [f.index for f in frames] == list(range(N_FRAMES))
    np.testing.assert_allclose([f.timestamp for f in frames], np.arange(N_FRAMES) / FPS, atol=1e-4)
    first = frames[0].image
    assert first.dtype == np.uint8 and first.shape == (240, 320, 3)


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_backends_agree(videos, codec):
    a = read(videos[codec], backend="opencv")
    b = read(videos[codec], backend="decord")
    assert len(a) == len(b)
    assert [f.timestamp for f in a] == pytest.approx([f.timestamp for f in b], abs=1e-4)
    for fa, fb in zip(a, b):
        diff = np.abs(fa.image.astype(np.int16) - fb.image.astype(np.int16))
        assert diff.mean() < 1.0, f"frame {fa.index} differs by {diff.mean():.2f} on average"


def test_frames_are_rgb(videos):
    # testsrc2 has a saturated colour-bar region; RGB vs BGR swaps channels 0 and 2.
    ocv = read(videos["h264_mp4"], backend="opencv")[0].image
    dec = read(videos["h264_mp4"], backend="decord")[0].image
    assert np.abs(ocv.astype(int) - dec.astype(int)).mean() < 1.0
    assert not np.array_equal(ocv[..., 0], ocv[..., 2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_variable_frame_rate_timestamps_come_from_the_container(videos, backend):
    frames = read(videos["vfr"], backend=backend)
    assert len(frames) == VFR_N
    np.testing.assert_allclose([f.timestamp for f in frames], vfr_times(), atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vfr_resampling_uses_timestamps(videos, backend):
    # At 5 fps the 0.04 s part keeps every 5th frame; the 0.12 s part keeps each frame that
    # reaches the next 0.2 s tick.
    frames = read(videos["vfr"], backend=backend, fps=5)
    kept, tick = [], 0
    for t in vfr_times():  # the rule, written plainly: first frame at or after each 0.2 s tick
        if t >= tick * 0.2 - 1e-9:
            kept.append(t)
            tick = int(t / 0.2 + 1e-9) + 1
    assert [f.timestamp for f in frames] == pytest.approx(kept, abs=1e-3)
    assert kept[:6] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.04])


@pytest.mark.parametrize("backend", BACKENDS)
def test_stride_start_end(videos, backend):
    frames = read(videos["h264_mp4"], backend=backend, stride=3, start=0.4, end=1.2)
    idx = [f.index for f in frames]
    assert idx == list(range(10, 30, 3))
    assert all(0.4 - 1e-6 <= f.timestamp < 1.2 for f in frames)


@pytest.mark.parametrize("backend", BACKENDS)
def test_resample_to_target_fps(videos, backend):
    frames = read(videos["mpeg4_avi"], backend=backend, fps=5)
    assert [f.index for f in frames] == list(range(0, N_FRAMES, 5))
    assert len(open_source(videos["mpeg4_avi"], backend=backend, fps=5)) == len(frames)


def test_max_side_resizes_keeping_aspect(videos):
    src = open_source(videos["h264_mp4"], max_side=100)
    f = next(iter(src))
    assert f.image.shape == (75, 100, 3)
    assert (src.info.width, src.info.height) == (100, 75)


def test_probe_reports_the_facts(videos):
    info = probe(videos["h264_mp4"])
    assert info.num_frames == N_FRAMES and info.fps == pytest.approx(FPS)
    assert info.duration == pytest.approx(N_FRAMES / FPS)
    assert info.codec == "h264" and (info.width, info.height) == (320, 240)
    assert probe(videos["vp9_webm"]).codec.lower().startswith("vp9") or probe(videos["vp9_webm"]).codec == "VP90"


def test_image_folder_sorted_naturally_at_given_fps(image_folder):
    frames = read(image_folder, input_fps=4)
    assert len(frames) == 12
    assert [f.timestamp for f in frames] == pytest.approx([i / 4 for i in range(12)])
    means = [int(f.image[..., 2].mean()) for f in frames]  # blue = i * 20 for file i.png
    assert means == [i * 20 for i in range(1, 13)]
    assert int(frames[0].image[0, 0, 0]) == 255 - 20  # red channel first: RGB


def test_iterating_twice_restarts(videos):
    src = open_source(videos["h264_mp4"], end=0.2)
    assert [f.index for f in src] == [f.index for f in src] == [0, 1, 2, 3, 4]


def test_breaking_out_early_stops_the_decode_thread(videos):
    before = set(threading.enumerate())
    for _ in range(5):
        for f in open_source(videos["h264_mp4"], prefetch=2):
            break
    started = [t for t in threading.enumerate() if t not in before]
    for t in started:
        t.join(timeout=30)  # each decode thread ends on its own once its consumer is gone
    assert not [t.name for t in started if t.is_alive()]


def test_close_stops_the_running_iterations_and_a_closed_source_refuses_to_read(videos):
    before = set(threading.enumerate())
    with open_source(videos["h264_mp4"], prefetch=4) as src:
        running = iter(src)
        next(running)
        unstarted = iter(src)  # asked for nothing yet: no decode thread
        assert len([t for t in threading.enumerate() if t not in before]) == 1
    assert src.closed
    assert list(running) == [] and list(unstarted) == []  # both stopped
    started = [t for t in threading.enumerate() if t not in before]
    for t in started:
        t.join(timeout=30)
    assert not [t.name for t in started if t.is_alive()]
    with pytest.raises(SourceError, match="the source is closed"):
        iter(src)
    src.close()  # idempotent


def test_prefetch_queue_is_bounded():
    produced = itertools.count()
    made = []

    def gen():
        for i in range(1000):
            made.append(next(produced))
            yield i

    it = _prefetch(gen(), 4)
    assert next(it) == 0
    # the producer runs ahead by the queue (1-4) and the item in its hand (5), then waits there
    for _ in range(300):
        if len(made) == 6:
            break
        time.sleep(0.1)
    time.sleep(0.3)
    assert made == list(range(6))
    assert list(it) == list(range(1, 1000))  # and hands on everything, in order


# ----------------------------------------------------------------------------- bad input
def test_missing_file(tmp_path):
    with pytest.raises(SourceNotFoundError, match="no such file"):
        open_source(tmp_path / "nope.mp4")


def test_empty_file(videos):
    with pytest.raises(SourceOpenError, match=r"empty.mp4: the file is empty \(0 bytes\)"):
        open_source(videos["empty"])


def test_text_file_named_mp4(videos):
    with pytest.raises(SourceOpenError, match="text.mp4.*text, not a video container"):
        open_source(videos["text"])


def test_unknown_codec(videos):
    with pytest.raises(SourceOpenError, match="unknown_codec.avi.*unknown video codec 'QQQQ'"):
        open_source(videos["unknown_codec"])


@pytest.mark.parametrize("name", ["h264_mp4", "mpeg4_avi", "vp9_webm", "mjpeg_avi"])
@pytest.mark.parametrize("backend", ["auto", "opencv", "decord"])
def test_truncated_file_yields_what_it_can_then_says_where_it_stopped(videos, name, backend):
    path = videos[f"truncated_{name}"]
    got = []
    try:
        src = open_source(path, backend=backend)
    except SourceOpenError as exc:
        # decord cannot even open an mp4 whose tail is missing; that must be said clearly.
        assert backend == "decord" and str(path) in str(exc)
        return
    with pytest.raises(SourceReadError) as info:
        for f in src:
            got.append(f)
    err = info.value
    assert str(path) in str(err) and "truncated" in str(err)
    assert 0 < len(got) < N_FRAMES
    assert err.frames_read == len(got)
    assert err.frame_index == got[-1].index + 1
    assert err.timestamp == pytest.approx(got[-1].timestamp + 1 / FPS, abs=1e-3)
    assert f"frame {err.frame_index}" in str(err)
    # every frame before the failure was delivered, in order, none skipped
    assert [f.index for f in got] == list(range(len(got)))


def test_camera_that_does_not_exist():
    with pytest.raises(SourceOpenError, match="camera:97: camera 97 could not be opened"):
        open_source("camera:97")


@pytest.mark.timeout(60)  # a refused connection is an error, not a hang
def test_unreachable_url():
    with pytest.raises(SourceOpenError, match=r"http://127.0.0.1:9/video.mp4: the stream could not be opened"):
        open_source("http://127.0.0.1:9/video.mp4")


def test_bad_options_name_the_field(videos):
    with pytest.raises(ValueError, match="stride"):
        open_source(videos["h264_mp4"], stride=0)
    with pytest.raises(ValueError, match="end must be > start"):
        open_source(videos["h264_mp4"], start=2, end=1)
    with pytest.raises(ValueError, match="unknown source option"):
        open_source(videos["h264_mp4"], strid=2)
    with pytest.raises(ValueError, match="backend"):
        open_source(videos["h264_mp4"], backend="gstreamer")


def test_one_except_source_error_catches_every_failure_as_its_own_class(tmp_path, videos):
    def failure(path) -> type | None:
        try:
            for _ in open_source(path, backend="opencv"):
                pass
        except SourceError as exc:  # what a caller writes to handle any bad source
            assert str(path) in str(exc)
            return type(exc)
        return None

    assert failure(tmp_path / "nope.mp4") is SourceNotFoundError
    assert failure(videos["text"]) is SourceOpenError
    assert failure(videos["truncated_h264_mp4"]) is SourceReadError
    assert failure(videos["h264_mp4"]) is None


def test_a_registered_scheme_opens_and_an_unknown_one_names_the_known_ones():
    from streammem.io import known_schemes, register_scheme, unregister_scheme
    from streammem.types import Frame

    frames = [Frame(index=i, timestamp=i / 2, image=np.full((6, 10, 3), i, np.uint8)) for i in range(4)]
    register_scheme("blank-test", lambda spec: (frames[: int(spec)], {"width": 10, "height": 6, "fps": 2.0,
                                                                      "num_frames": int(spec)}))
    try:
        src = open_source("blank-test:3", stride=2, prefetch=0)
        assert (src.info.kind, src.info.width, src.info.height, src.info.duration) == ("blank-test", 10, 6, 1.5)
        assert [f.index for f in src] == [0, 2]
        with pytest.raises(SourceOpenError, match="bad blank-test spec"):
            open_source("blank-test:x")
    finally:
        unregister_scheme("blank-test")
    assert "blank-test" not in known_schemes() and "world" in known_schemes()
    with pytest.raises(SourceOpenError, match=r"unknown source scheme 'blank-test'; known schemes: camera:, .*world:"):
        open_source("blank-test:3")
