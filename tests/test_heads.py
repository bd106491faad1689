"""The head contract (streammem.pipelines.base.Head): every shipped head keeps it, snapshots
taken mid-stream continue exactly as the uninterrupted stream, a snapshot of another head or
configuration is refused, and the main job runs any list of heads, a new one included."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from streammem.models.answerer import SmallAnswerer, Vocab
from streammem.models.detector import SmallDetector
from streammem.pipelines import Head, HeadBase
from streammem.pipelines.detection import DetectionConfig, HOGConfig, HOGDetectionPipeline, StreamingDetectionPipeline
from streammem.pipelines.jobs import MainPipeline, run_main_job
from streammem.pipelines.qa import StreamingQAPipeline
from streammem.types import Frame, Tokens
from streammem.world import World


def tiny_detector(seed: int = 0) -> SmallDetector:
    torch.manual_seed(seed)
    return SmallDetector(num_classes=3, width=16, fc_dim=32, heads=4, pixel_heads=4, pixel_keys=32,
                         num_proposals=20, bank_proposals=10, fusion_radius=1).eval()


class GridSpy:
    """A deterministic encoder: a 4 x 4 grid whose features encode the frame index."""

    dim, grid = 8, 4

    def __call__(self, frame: Frame) -> Tokens:
        x = torch.full((4, 4, 8), float(frame.index)) + torch.arange(8.0)
        return Tokens.from_grid(x, frame.index, frame.timestamp)


def tiny_qa() -> StreamingQAPipeline:
    torch.manual_seed(0)
    vocab = Vocab.fit(["is there a cat in view now ?", "yes no"])
    ans = SmallAnswerer(vocab=vocab.words, token_dim=8, d=16, heads=2, layers=1, grid=4).eval()
    return StreamingQAPipeline(GridSpy(), ans, memory="ovbench")


def world_frames(n: int) -> list[Frame]:
    return list(World(seed=1, preset="medium", size=64, frames=n))


def same_detections(a, b) -> bool:
    return (np.array_equal(a.xyxy, b.xyxy) and np.array_equal(a.confidence, b.confidence)
            and np.array_equal(a.class_id, b.class_id))


def test_every_shipped_head_keeps_the_contract():
    heads = [StreamingDetectionPipeline(tiny_detector()), HOGDetectionPipeline(), tiny_qa()]
    assert all(isinstance(h, Head) for h in heads)
    assert [h.name for h in heads] == ["detection", "detection", "qa"]
    assert not isinstance(object(), Head)


@pytest.mark.parametrize("memory", ["feature_bank", "dual"])
def test_detection_snapshot_mid_stream_continues_exactly(memory):
    frames = world_frames(8)
    cfg = DetectionConfig(memory=memory, image_size=64, pixel_write_score=0.0, max_size=200, key_size=10)
    whole = StreamingDetectionPipeline(tiny_detector(), cfg)
    ref = [whole.step(f) for f in frames]
    first = StreamingDetectionPipeline(tiny_detector(), cfg)
    for f in frames[:4]:
        first.step(f)
    state = first.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert first.counters["pixel_writes"] > 0 and "extra.temporal_state" in state
    second = StreamingDetectionPipeline(tiny_detector(), cfg)
    second.load_state_dict(state)
    rest = [second.step(f) for f in frames[4:]]
    assert all(same_detections(a, b) for a, b in zip(ref[4:], rest))
    assert second.stats() == whole.stats()


@pytest.mark.parametrize("kind", ["rescorer", "smoother"])
def test_a_detection_snapshot_carries_its_tracker(kind):
    """Track ids and re-scored confidences after a restore match the uninterrupted stream."""
    from streammem.pipelines.detection import IoUTracker, TrackRescoreConfig, TrackRescorer, TrackScoreSmoother

    class Tracked:  # an IoU tracker, then the smoother (what `streammem eval detection` chains)
        def __init__(self):
            self.tracker, self.smoother = IoUTracker(), TrackScoreSmoother(length=3)

        def reset(self):
            self.tracker.reset()
            self.smoother.reset()

        def update(self, det):
            return self.smoother.update(self.tracker.update(det))

        def state(self):
            return {"tracker": self.tracker.state(), "smoother": self.smoother.state()}

        def load_state(self, state):
            self.tracker.load_state(state["tracker"])
            self.smoother.load_state(state["smoother"])

    def make():
        tr = TrackRescorer(TrackRescoreConfig(history=3)) if kind == "rescorer" else Tracked()
        return StreamingDetectionPipeline(tiny_detector(), DetectionConfig(memory="none", image_size=64,
                                                                           score_threshold=0.0), tracker=tr)

    frames = world_frames(10)
    whole = make()
    ref = [whole.step(f) for f in frames]
    assert sum(len(d) for d in ref) > 10 and max(int(d.tracker_id.max()) for d in ref if len(d)) > 1
    first = make()
    for f in frames[:5]:
        first.step(f)
    second = make()
    second.load_state_dict(first.state_dict())
    rest = [second.step(f) for f in frames[5:]]
    assert all(same_detections(a, b) and np.array_equal(a.tracker_id, b.tracker_id) for a, b in zip(ref[5:], rest))
    # without its tracker's state a restored head would renumber the tracks
    fresh = make()
    state = first.state_dict()
    fresh.load_state_dict(state)
    fresh.tracker.reset()
    renumbered = [fresh.step(f) for f in frames[5:]]
    assert not all(np.array_equal(a.tracker_id, b.tracker_id) for a, b in zip(ref[5:], renumbered))
    bare = StreamingDetectionPipeline(tiny_detector(), DetectionConfig(memory="none", image_size=64,
                                                                      score_threshold=0.0))
    with pytest.raises(ValueError, match="carries a .* state, this head has no tracker"):
        bare.load_state_dict(state)
    assert bare.counters == StreamingDetectionPipeline(tiny_detector(), bare.config).counters  # nothing restored


def test_qa_snapshot_mid_stream_answers_as_the_uninterrupted_stream():
    frames = world_frames(24)
    whole = tiny_qa()
    fut = whole.schedule("is there a cat in view now ?", ["yes", "no"], at=2.5)
    for f in frames:
        whole.step(f)
    first = tiny_qa()
    for f in frames[:10]:
        first.step(f)
    second = tiny_qa()
    second.load_state_dict(first.state_dict())
    assert second.time == first.time and second.frames == 10
    fut2 = second.schedule("is there a cat in view now ?", ["yes", "no"], at=2.5)
    for f in frames[10:]:
        second.step(f)
    assert fut2.result().probs == fut.result().probs
    assert fut2.result().evidence == fut.result().evidence


def test_a_snapshot_of_another_head_or_configuration_is_refused():
    det = StreamingDetectionPipeline(tiny_detector(), DetectionConfig(image_size=64))
    with pytest.raises(ValueError, match="snapshot is of head 'qa', this is 'detection'"):
        det.load_state_dict(tiny_qa().state_dict())
    other = StreamingDetectionPipeline(tiny_detector(), DetectionConfig(image_size=128))
    with pytest.raises(ValueError, match=r"another configuration \(fields \['image_size'\]\)"):
        other.load_state_dict(det.state_dict())
    with pytest.raises(ValueError, match="not a streammem head snapshot"):
        det.load_state_dict({"x": torch.zeros(1)})
    hog = HOGDetectionPipeline(config=HOGConfig(memory="none"))
    hog.load_state_dict(HOGDetectionPipeline(config=HOGConfig(memory="none")).state_dict())


class FrameCounter(HeadBase):
    """A new head, written outside streammem: counts bright frames."""

    name, records_file = "bright", "bright.jsonl"

    def __init__(self, threshold: float = 100.0) -> None:
        self.config, self.threshold, self.count = None, threshold, 0

    def step(self, frame: Frame) -> bool:
        bright = float(frame.image.mean()) > self.threshold
        self.count += bright
        return bright

    def reset(self) -> None:
        self.count = 0

    def stats(self) -> dict:
        return {"bright_frames": self.count}

    def records(self, frame, output) -> list[dict]:
        return [] if frame is None else [{"frame": frame.index, "bright": output}]


def test_the_main_job_runs_any_list_of_heads(tmp_path):
    head = FrameCounter()
    res = run_main_job("world:seed=2,preset=clean,frames=6,size=64", tmp_path / "out", heads=[head], progress=False)
    assert res.error is None and res.summary["frames_processed"] == 6
    lines = [json.loads(x) for x in (tmp_path / "out" / "bright.jsonl").read_text().splitlines()]
    assert [r["frame"] for r in lines] == list(range(6))
    assert res.summary["heads"]["bright"] == {"bright_frames": sum(r["bright"] for r in lines)}
    assert res.summary["outputs"]["bright"].endswith("bright.jsonl")
    # no head has a memory: the job keeps its own PatchEncoder pyramid and saves it
    assert res.summary["memory"]["kind"] == "pyramid" and res.memory.is_file()
    with pytest.raises(ValueError, match="distinct names"):
        MainPipeline([FrameCounter(), FrameCounter()])
    with pytest.raises(TypeError, match="does not keep the Head contract"):
        MainPipeline([object()])


def test_loading_a_snapshot_cancels_the_questions_pending_on_the_old_stream():
    frames = world_frames(8)
    src = tiny_qa()
    for f in frames:
        src.step(f)
    state = src.state_dict()
    head = tiny_qa()
    fut = head.schedule("is there a cat in view now ?", ["yes", "no"], at=0.3)
    head.load_state_dict(state)  # the snapshot's stream is already past 0.3 s
    assert fut.cancelled() and head.stats()["pending"] == 0 and head.thumbs == {}


def test_the_main_pipeline_restores_every_head():
    frames = world_frames(6)
    cfg = DetectionConfig(image_size=64, pixel_write_score=0.0, max_size=200, key_size=10)
    a = MainPipeline([StreamingDetectionPipeline(tiny_detector(), cfg), tiny_qa()])
    for f in frames[:3]:
        a.step(f)
    b = MainPipeline([StreamingDetectionPipeline(tiny_detector(), cfg), tiny_qa()])
    b.load_state_dict(a.state_dict())
    outs_a, outs_b = [a.step(f) for f in frames[3:]], [b.step(f) for f in frames[3:]]
    assert all(same_detections(x.heads["detection"], y.heads["detection"]) for x, y in zip(outs_a, outs_b))
    with pytest.raises(ValueError, match="no state for head 'qa'"):
        b.load_state_dict({k: v for k, v in a.state_dict().items() if k.startswith("detection.")})


def test_a_source_whose_resolution_changes_still_makes_one_annotated_video(tmp_path):
    import cv2

    from streammem.pipelines.jobs import run_detect

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, (h, w) in enumerate([(120, 160), (120, 160), (240, 320)]):
        cv2.imwrite(str(folder / f"{i:03d}.png"), np.full((h, w, 3), 60 * i, np.uint8))
    res = run_detect(str(folder), tmp_path / "out", detector="hog")
    assert res.error is None and res.summary["frames_written"] == 3
    cap = cv2.VideoCapture(str(res.video))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 3 and int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)) == 160
