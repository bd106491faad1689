"""The webcam job: a source that goes away and comes back (loss reported, back-off waits by
the rule, resumed into the same memory), stale frames dropped and counted, questions typed while
it runs, and the command on a replayed source."""

from __future__ import annotations

import io
import json
import signal
import threading
import time

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from streammem.cli import app
from streammem.io import SourceOpenError, SourceReadError, open_source
from streammem.memory import PyramidMemory
from streammem.models.answerer import SmallAnswerer, Vocab
from streammem.pipelines import HeadBase
from streammem.pipelines.jobs.webcam import Backoff, display_available, run_webcam, stop_on_sigint
from streammem.pipelines.qa import StreamingQAPipeline
from streammem.types import Frame, Tokens


class GridSpy:
    """A deterministic encoder: a 4 x 4 grid whose features encode the frame index."""

    dim, grid = 8, 4

    def __call__(self, frame: Frame) -> Tokens:
        x = torch.full((4, 4, 8), float(frame.index)) + torch.arange(8.0)
        return Tokens.from_grid(x, frame.index, frame.timestamp)


class FakeCamera:
    """A live source of ``n`` frames at ``1 / fps`` (timestamps from 0, as a reopened camera's
    are), ``delay`` seconds apart in wall time; with ``fail``, it then stops delivering."""

    live = True

    def __init__(self, n: int, fps: float = 20.0, fail: bool = False, delay: float = 0.0) -> None:
        self.n, self.fps, self.fail, self.delay = n, fps, fail, delay

    def __iter__(self):
        rng = np.random.default_rng(self.n)
        for k in range(self.n):
            if self.delay:
                time.sleep(self.delay)
            yield Frame(k, k / self.fps, rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
        if self.fail:
            raise SourceReadError("camera:9", "the camera stopped delivering frames", self.n, None, self.n)


def scripted(*steps):
    """An opener that returns (or raises) each step in turn, and counts its calls."""
    calls = []

    def opener():
        calls.append(len(calls))
        step = steps[len(calls) - 1]
        if isinstance(step, Exception):
            raise step
        return step

    opener.calls = calls
    return opener


class FakeClock:
    """``sleep`` records each wait and advances ``clock`` by it (no real waiting)."""

    def __init__(self) -> None:
        self.now, self.waits = 100.0, []

    def sleep(self, s: float) -> None:
        self.waits.append(s)
        self.now += s

    def clock(self) -> float:
        return self.now


class Recorder(HeadBase):
    """Records the frames it steps on; ``delay`` makes it slower than the source."""

    name, records_file = "recorder", "recorder.jsonl"

    def __init__(self, delay: float = 0.0) -> None:
        self.delay, self.seen = delay, []

    def step(self, frame):
        if self.delay:
            time.sleep(self.delay)
        self.seen.append(frame.index)
        return frame.index

    def reset(self):
        self.seen = []

    def stats(self):
        return {"frames": len(self.seen)}


def qa_head() -> StreamingQAPipeline:
    torch.manual_seed(0)
    vocab = Vocab.fit(["is there a cat in view now ?", "yes no red blue"])
    answerer = SmallAnswerer(vocab=vocab.words, token_dim=8, d=16, heads=2, layers=1, grid=4).eval()
    memory = PyramidMemory(dim=8, sides=(4, 2, 1), capacities=(16, 16, 16))  # room for every test frame
    return StreamingQAPipeline(GridSpy(), answerer, memory=memory)


GONE = SourceOpenError("camera:9", "camera 9 could not be opened (no such device or it is busy)")


def test_a_lost_source_is_reported_retried_by_the_rule_and_resumed_into_the_same_memory(tmp_path):
    head = qa_head()
    fake = FakeClock()
    events = []
    # 6 frames, lost; gone twice; back for 6 frames, lost again; back for 4 frames, which end
    opener = scripted(FakeCamera(6, fail=True), GONE, GONE, FakeCamera(6, fail=True), FakeCamera(4))
    res = run_webcam(head, "camera:9", tmp_path / "out", view="file", backoff=Backoff(0.5, 2.0, 1.5),
                     opener=opener, sleep=fake.sleep, clock=fake.clock, on_event=events.append, realtime=False)
    # the waits: min(1.5, 0.5 * 2**k), k counted from the last frame processed
    assert [x["waits_s"] for x in res.losses] == [[0.5, 1.0, 1.5], [0.5]]
    assert fake.waits == [0.5, 1.0, 1.5, 0.5]
    assert len(opener.calls) == 5 and res.summary["reconnects"] == 2 and res.summary["stopped"] == "end"
    assert [x["down_s"] for x in res.losses] == [3.0, 0.5]
    assert any("lost" in e and "stopped delivering" in e for e in events)
    assert sum("back after" in e for e in events) == 2
    # one stream for the head: indices go on, times go on after the time spent disconnected
    assert res.summary["frames_processed"] == head.frames == 16
    held = {fi: t for _, fi, t in head.memory.frames()}
    assert set(held) == set(range(16))  # frames from before each gap are still in memory
    assert held[5] == pytest.approx(0.25) and held[6] == pytest.approx(0.25 + 3.0)
    assert held[12] == pytest.approx(3.25 + 0.25 + 0.5)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["losses"][0]["frame"] == 5 and summary["losses"][0]["resumed"] is True
    assert (tmp_path / "out" / "annotated.mp4").stat().st_size > 0


def test_it_gives_up_after_max_retries_and_keeps_what_it_wrote(tmp_path):
    fake = FakeClock()
    opener = scripted(FakeCamera(3, fail=True), GONE, GONE, GONE, GONE, GONE)
    res = run_webcam(Recorder(), "camera:9", tmp_path, view="file", opener=opener, sleep=fake.sleep,
                     clock=fake.clock, backoff=Backoff(1.0, 3.0, 5.0, max_retries=3), realtime=False)
    assert fake.waits == [1.0, 3.0, 5.0]
    assert res.summary["stopped"] == "gave_up" and isinstance(res.error, SourceReadError)
    assert res.summary["frames_processed"] == 3 and len(opener.calls) == 4
    assert (tmp_path / "annotated.mp4").stat().st_size > 0  # the frames before the loss are kept
    assert json.loads((tmp_path / "summary.json").read_text())["error"].startswith("camera:9")


def test_a_source_that_never_delivers_is_bad_input_and_leaves_nothing(tmp_path):
    with pytest.raises(SourceReadError):
        run_webcam(Recorder(), "camera:9", tmp_path / "out", view="file",
                   opener=scripted(FakeCamera(0, fail=True)), realtime=False)
    assert not (tmp_path / "out").exists()


def test_stale_frames_are_dropped_and_counted_when_the_head_is_slower_than_the_source(tmp_path):
    """A StreamWorld stream replayed in real time at 50 fps into a head taking 45 ms a frame."""
    head = Recorder(delay=0.045)
    res = run_webcam(head, "world", tmp_path, view="file",
                     opener=lambda: open_source("world:seed=0,size=32,frames=30,fps=50", prefetch=0))
    s = res.summary
    assert s["frames_dropped"] > 3 and s["frames_processed"] + s["frames_dropped"] == 30
    assert s["frames_processed"] == len(head.seen) and head.seen == sorted(head.seen)
    assert head.seen[-1] == 29  # the newest frame wins
    assert s["drop_rate"] == pytest.approx(s["frames_dropped"] / 30)


def test_questions_typed_while_it_runs_are_answered_at_the_current_time(tmp_path):
    head = qa_head()
    said = []
    lines = io.StringIO("Is there a cat in view now?\n\nIs there a red cat? | yes | no\nIs there a zebra?\n")
    res = run_webcam(head, "camera:9", tmp_path, view="file", questions=lines,
                     opener=scripted(FakeCamera(40, delay=0.02)), on_answer=lambda q, t, a: said.append((q, t, a)))
    assert [a["question"] for a in res.answers] == ["Is there a cat in view now?", "Is there a red cat?",
                                                     "Is there a zebra?"]
    first, second, zebra = res.answers
    for a in (first, second):
        assert a["text"] in ("yes", "no") and 0 < a["confidence"] <= 1 and a["evidence"]
        assert all(e["timestamp"] <= a["at"] for e in a["evidence"])
    assert zebra["refused"] is True and zebra["kind"] == "vocabulary"
    assert [q for q, _, _ in said] == [a["question"] for a in res.answers]
    lines_written = (tmp_path / "answers.jsonl").read_text().splitlines()
    assert len(lines_written) == 3 and res.summary["answers"] == 3


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_stops_and_writes_the_summary(tmp_path, presses):
    """A first Ctrl-C stops after the current frame; a second one stops at once. Both write
    the summary and keep the video."""

    class CtrlC(Recorder):
        def step(self, frame):
            if frame.index == 5:
                for _ in range(presses):
                    signal.raise_signal(signal.SIGINT)
            return super().step(frame)

    interrupt = threading.Event()
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN in a background job
    with stop_on_sigint(interrupt):
        res = run_webcam(CtrlC(), "camera:9", tmp_path, view="file", interrupt=interrupt,
                         opener=scripted(FakeCamera(1000)), realtime=False)
    assert signal.getsignal(signal.SIGINT) is before  # put back
    assert res.summary["stopped"] == "interrupt" and interrupt.is_set()
    assert res.summary["frames_processed"] == (6 if presses == 1 else 5)
    assert json.loads((tmp_path / "summary.json").read_text())["stopped"] == "interrupt"
    assert (tmp_path / "annotated.mp4").stat().st_size > 0


def test_questions_need_a_qa_head(tmp_path):
    with pytest.raises(ValueError, match="QA head"):
        run_webcam(Recorder(), "camera:9", tmp_path, questions=["Is there a cat?"], opener=scripted(FakeCamera(2)))


def test_display_detection():
    assert display_available({}, gui="GTK3") == (False, "no display (DISPLAY is not set)")
    assert display_available({"DISPLAY": ":0"}, gui="GTK3") == (True, "GTK3")
    assert display_available({"DISPLAY": ":0"}, gui="NONE")[0] is False
    with pytest.raises(ValueError, match="max_wait_s"):
        Backoff(initial_s=2.0, max_wait_s=1.0)


def test_the_command_on_a_replayed_source(tmp_path):
    out = tmp_path / "wc"
    r = CliRunner().invoke(app, ["webcam", "--task", "detect", "--detector", "hog", "--view", "file",
                                 "--source", "world:seed=1,preset=hard,size=128,frames=6,fps=30", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "6 frames processed" in r.output or "dropped" in r.output
    s = json.loads((out / "summary.json").read_text())
    assert s["frames_processed"] + s["frames_dropped"] == 6 and s["stopped"] == "end"
    assert (out / "annotated.mp4").is_file() and (out / "detections.jsonl").is_file()
    r = CliRunner().invoke(app, ["webcam", "--task", "nope", "--source", "world:seed=1"])
    assert r.exit_code == 2 and "--task" in r.output
