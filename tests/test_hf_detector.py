"""``--detector hf:<folder>``: transformers detectors (DETR, RT-DETR, YOLOS, OWLv2) built as tiny
random configurations (as transformers' own tests do), saved to a temp folder and loaded through
the same ``hf:`` path a hub id takes; the memory re-scoring (track level for any head, feature
level for per-box features) on hand-computed cases; the one-line error without the hub."""

from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np
import pytest
import supervision as sv
import torch
from typer.testing import CliRunner

from streammem.cli import app
from streammem.io import VideoWriter
from streammem.models.hf_detector import HFBoxes, HFDetector
from streammem.pipelines.detection import (
    FeatureRescorer,
    HFConfig,
    HFDetectionPipeline,
    TrackRescoreConfig,
    TrackRescorer,
)
from streammem.pipelines.jobs.detect import build_detection_head
from streammem.types import Frame

ID2LABEL = {0: "cat", 1: "dog", 2: "car"}
H, W = 72, 112  # not square: OWL's padding and the scaling to the frame are exercised


def _closed_set(kind: str, path: Path) -> None:
    import transformers as tf

    torch.manual_seed(0)
    common = dict(id2label=ID2LABEL, label2id={v: k for k, v in ID2LABEL.items()})
    if kind == "detr":
        backbone = tf.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], out_features=["stage2"])
        cfg = tf.DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=backbone,
                            d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                            decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16, num_queries=12, **common)
        model, proc = tf.DetrForObjectDetection(cfg), tf.DetrImageProcessor(size={"shortest_edge": 48,
                                                                                 "longest_edge": 80})
    elif kind == "rtdetr":
        backbone = tf.RTDetrResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16], depths=[1, 1, 1],
                                         out_features=["stage1", "stage2", "stage3"], layer_type="basic")
        cfg = tf.RTDetrConfig(backbone_config=backbone, encoder_hidden_dim=16, encoder_in_channels=[8, 16, 16],
                              encoder_layers=1, encoder_ffn_dim=16, encoder_attention_heads=2, d_model=16,
                              num_queries=12, decoder_in_channels=[16, 16, 16], decoder_ffn_dim=16, decoder_n_points=2,
                              decoder_layers=1, decoder_attention_heads=2, num_denoising=0, anchor_image_size=None,
                              **common)
        model, proc = tf.RTDetrForObjectDetection(cfg), tf.RTDetrImageProcessor(size={"height": 64, "width": 64})
    else:
        cfg = tf.YolosConfig(image_size=[64, 64], patch_size=16, hidden_size=16, num_hidden_layers=1,
                             num_attention_heads=2, intermediate_size=16, num_detection_tokens=12, **common)
        model, proc = tf.YolosForObjectDetection(cfg), tf.YolosImageProcessor(size={"shortest_edge": 48,
                                                                                   "longest_edge": 80})
    model.save_pretrained(path)
    proc.save_pretrained(path)


def _owlv2(path: Path) -> None:
    """A tiny OWLv2 with a CLIP tokenizer over single letters (no merges), written locally."""
    import transformers as tf

    path.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    for c in string.ascii_lowercase:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    # as in CLIP, the special tokens come last: OWL masks a query whose first id is 0 as padding,
    # and pools the text at the highest id, the end token
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    # one token per letter: "a photo of a person" takes 17 of the 32 positions
    tok = tf.CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=32)
    torch.manual_seed(0)
    end = vocab["<|endoftext|>"]
    cfg = tf.Owlv2Config(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=end - 1, eos_token_id=end,
                         pad_token_id=end),
        vision_config=dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                           image_size=64, patch_size=16),
        projection_dim=16)
    tf.Owlv2ForObjectDetection(cfg).save_pretrained(path)
    tf.Owlv2Processor(image_processor=tf.Owlv2ImageProcessor(size={"height": 64, "width": 64}),
                      tokenizer=tok).save_pretrained(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf_detectors")
    out = {}
    for kind in ("detr", "rtdetr", "yolos"):
        _closed_set(kind, root / kind)
        out[kind] = root / kind
    _owlv2(root / "owlv2")
    out["owlv2"] = root / "owlv2"
    return out


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    """5 frames, 112x72: a red square moving right on a grey background."""
    path = tmp_path_factory.mktemp("hf_video") / "clip.mp4"
    with VideoWriter(path, fps=5) as w:
        for i in range(5):
            img = np.full((H, W, 3), 110, np.uint8)
            img[20:50, 10 + 8 * i: 40 + 8 * i] = (220, 30, 30)
            w.write(img)
    return path


def invoke(*args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (H, W, 3), dtype=np.uint8)


@pytest.mark.parametrize("kind", ["detr", "rtdetr", "yolos", "owlv2"])
def test_boxes_in_frame_pixels_with_their_query_features(models, kind):
    from transformers.image_transforms import center_to_corners_format

    det = HFDetector.from_pretrained(str(models[kind]), classes="cat, car" if kind == "owlv2" else None)
    img = _image()
    out = det(img, threshold=0.0)
    assert len(out) > 0 and out.boxes.shape == (len(out), 4) and out.boxes.dtype == np.float32
    assert (out.boxes[:, [0, 2]] >= 0).all() and (out.boxes[:, [0, 2]] <= W).all()
    assert (out.boxes[:, [1, 3]] >= 0).all() and (out.boxes[:, [1, 3]] <= H).all()
    expected = ["cat", "car"] if kind == "owlv2" else ["cat", "dog", "car"]
    assert det.class_names == expected and set(out.labels.tolist()) <= set(range(len(expected)))
    # the box of each kept entry is its query's predicted box, scaled to the frame (OWL: to the padded square)
    with torch.no_grad():
        raw = det.model(**det._inputs(img))
    side = (max(H, W), max(H, W)) if kind == "owlv2" else (H, W)
    ref = center_to_corners_format(raw.pred_boxes[0, torch.from_numpy(out.queries)]).numpy()
    ref = ref * np.array([side[1], side[0], side[1], side[0]], np.float32)
    ref[:, [0, 2]], ref[:, [1, 3]] = ref[:, [0, 2]].clip(0, W), ref[:, [1, 3]].clip(0, H)
    np.testing.assert_allclose(out.boxes, ref, rtol=1e-5, atol=1e-3)
    # and its features are that query's hidden state
    states = HFDetector.query_states(raw)
    assert out.features is not None and out.features.shape == (len(out), states.shape[1])
    np.testing.assert_array_equal(out.features, states[torch.from_numpy(out.queries)].numpy())
    if kind == "rtdetr":  # RT-DETR ranks (query, class) pairs: the queries are not in order
        assert len(set(out.queries.tolist())) > 1


def test_track_rescorer_hand_computed():
    r = TrackRescorer(TrackRescoreConfig(alpha=0.5, history=2, score_threshold=0.3))
    a, b = np.array([[10, 10, 50, 50]], np.float32), np.array([[200, 200, 240, 240]], np.float32)

    def frame(*boxes):
        xyxy = np.concatenate([x for x, _ in boxes]).astype(np.float32)
        return sv.Detections(xyxy=xyxy, confidence=np.array([s for _, s in boxes], np.float32),
                             class_id=np.zeros(len(boxes), int))

    assert r.update(frame((a, 0.9))).confidence.tolist() == pytest.approx([0.9])  # a new track keeps its score
    assert r.update(frame((a, 0.7))).confidence.tolist() == pytest.approx([0.5 * 0.7 + 0.5 * 0.9])
    # a weak box on the confident track is lifted above 0.3; a lone weak box is dropped
    d = r.update(frame((a + 2, 0.1), (b, 0.2)))
    assert d.confidence.tolist() == pytest.approx([0.5 * 0.1 + 0.5 * (0.9 + 0.7) / 2])
    assert d.data["raw_score"].tolist() == pytest.approx([0.1]) and d.xyxy.tolist() == (a + 2).tolist()
    # the bank is bounded: history=2 keeps 0.7 and 0.1 (raw scores, not re-scored ones)
    d = r.update(frame((a, 0.5)))
    assert d.confidence.tolist() == pytest.approx([0.5 * 0.5 + 0.5 * (0.7 + 0.1) / 2])
    assert [len(h) for h, _ in r.history.values()] == [2, 1]


def test_track_rescoring_for_any_head_small_detector():
    """TrackRescorer as the tracker of another head (a tiny small detector): every output is
    (1 - a) * raw + a * mean(its track's earlier raw scores), candidates below the cut included."""
    from streammem.io import open_source
    from streammem.models.detector import SmallDetector
    from streammem.pipelines.detection import DetectionConfig, StreamingDetectionPipeline

    torch.manual_seed(0)
    det = SmallDetector(num_classes=3, class_names=["a", "b", "c"], width=16, fc_dim=32, heads=4, pixel_heads=4,
                        pixel_keys=32, num_proposals=20, bank_proposals=10).eval()
    with torch.no_grad():
        det.cls.bias.copy_(torch.tensor([-3.0, 3.0, 0.0, 0.0]))
    rescorer = TrackRescorer(TrackRescoreConfig(score_threshold=0.3))
    head = StreamingDetectionPipeline(det, DetectionConfig(score_threshold=0.1, image_size=128), tracker=rescorer)
    past: dict[int, list[float]] = {}
    seen = 0
    for f in open_source("world:seed=1,preset=hard,size=128,frames=4"):
        d = head.step(f)
        assert len(d) and (d.confidence >= 0.3).all()
        for tid, raw, s in zip(d.tracker_id.tolist(), d.data["raw_score"].tolist(), d.confidence.tolist()):
            want = raw if not past.get(tid) else 0.5 * raw + 0.5 * float(np.mean(past[tid][-8:]))
            assert s == pytest.approx(want, abs=1e-5)
            seen += tid in past
        for tid, (h, _) in rescorer.history.items():  # every candidate joins its track's bank
            past[tid] = list(h)
    assert seen > 0  # some tracks were re-scored
    # the CLI's builder plugs the same rescorer into any detector, and refuses it where order is shuffled
    with pytest.raises(ValueError, match="--mode causal"):
        build_detection_head("hog", rescore="track", mode="protocol")
    hog = build_detection_head("hog", rescore="track")
    assert isinstance(hog.tracker, TrackRescorer) and hog.config.score_threshold == -0.5
    assert hog.tracker.config.score_threshold == 0.0 and build_detection_head("hog").tracker is None


class _Stub:
    """An HFDetector stand-in giving fixed boxes with 2-d features, one list per call."""

    open_vocabulary, name, model_type, class_names = False, "stub", "stub", ["cat", "dog", "car"]

    def __init__(self, frames):
        self.frames = list(frames)

    def __call__(self, image, threshold=0.0):
        boxes = self.frames.pop(0)
        return HFBoxes(boxes=np.array([b for b, _, _ in boxes], np.float32), scores=np.array([s for _, s, _ in boxes],
                       np.float32), labels=np.zeros(len(boxes), np.int64), queries=np.arange(len(boxes)),
                       features=np.array([f for _, _, f in boxes], np.float32))


def test_feature_level_rescoring_hand_computed():
    box1, box2 = [0, 0, 10, 10], [20, 20, 40, 40]
    stub = _Stub([[(box1, 0.9, [1, 0]), (box2, 0.05, [0, 1])],  # a confident box and a rejected one
                  [(box1, 0.2, [2, 0]), (box2, 0.35, [0, 3])]])
    pipe = HFDetectionPipeline(stub, HFConfig(beta=0.25, score_threshold=0.3))
    img = np.zeros((48, 48, 3), np.uint8)
    d0 = pipe.step(Frame(0, 0.0, img))  # empty banks: the model's scores
    assert d0.confidence.tolist() == pytest.approx([0.9]) and d0.data["support"].tolist() == [0.0]
    assert pipe.stats()["positive_memory"]["num_tokens"] == pipe.stats()["negative_memory"]["num_tokens"] == 1
    d1 = pipe.step(Frame(1, 0.1, img))
    # [2, 0] matches the confident key (cosine 1) and not the rejected one (0): 0.2 + 0.25 * (1 - 0);
    # [0, 3] the other way round: 0.35 + 0.25 * (0 - 1) = 0.10 < 0.3, dropped
    assert d1.confidence.tolist() == pytest.approx([0.45]) and d1.xyxy.tolist() == [box1]
    assert d1.data["class_name"].tolist() == ["cat"] and pipe.stats()["rescued"] == 1
    ev = FeatureRescorer(2)
    assert ev.evidence(np.ones((3, 2), np.float32)).tolist() == [0.0, 0.0, 0.0]  # empty banks
    # the banks survive a snapshot into a fresh head
    other = HFDetectionPipeline(_Stub([]), HFConfig(beta=0.25, score_threshold=0.3))
    other.load_state_dict(pipe.state_dict())
    assert other.stats()["positive_memory"]["num_tokens"] == 1 and other.counters["frames"] == 2


def test_cli_hf_closed_set_writes_records_in_frame_coordinates(models, video, tmp_path):
    out = tmp_path / "detr"
    res = invoke("detect", video, "--detector", f"hf:{models['detr']}", "--out", out, "--score-threshold", "0.2",
                 "--no-progress")
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in (out / "detections.jsonl").read_text().splitlines()]
    assert [r["frame"] for r in lines] == list(range(5))
    dets = [d for r in lines for d in r["detections"]]
    assert dets and {d["class_name"] for d in dets} <= set(ID2LABEL.values())
    assert all(ID2LABEL[d["class_id"]] == d["class_name"] and d["confidence"] >= 0.2 for d in dets)
    xy = np.array([d["xyxy"] for d in dets])
    assert (xy >= 0).all() and (xy[:, [0, 2]] <= W).all() and (xy[:, [1, 3]] <= H).all()
    assert all("tracker_id" in d for d in dets)  # track re-scoring is hf:'s default
    s = json.loads((out / "summary.json").read_text())
    assert s["detector"] == f"hf:{models['detr']}" and s["checkpoint"] == str(models["detr"])
    assert s["rescore"]["rule"] == "TrackRescorer" and s["rescore"]["alpha"] == 0.5
    # per-box features reached the feature-level memory (random scores stay below its write rule)
    assert s["pipeline"]["model_type"] == "detr" and s["pipeline"]["positive_memory"]["capacity"] == 2000
    assert s["frames_written"] == 5 and (out / "annotated.mp4").is_file()


def test_cli_hf_open_vocabulary_and_its_errors(models, video, tmp_path):
    out = tmp_path / "owl"
    res = invoke("detect", video, "--detector", f"hf:{models['owlv2']}", "--classes", "person,car", "--out", out,
                 "--score-threshold", "0", "--rescore", "none", "--memory", "none", "--max-frames", "2",
                 "--no-progress")
    assert res.exit_code == 0, res.output
    dets = [d for line in (out / "detections.jsonl").read_text().splitlines() for d in json.loads(line)["detections"]]
    assert dets and {d["class_name"] for d in dets} <= {"person", "car"} and "tracker_id" not in dets[0]
    xy = np.array([d["xyxy"] for d in dets])
    assert (xy[:, [0, 2]] <= W).all() and (xy[:, [1, 3]] <= H).all()
    # an open-vocabulary model without --classes, --classes on a closed-set model: exit 2, nothing written
    for args in ([f"hf:{models['owlv2']}"], [f"hf:{models['yolos']}", "--classes", "cat"]):
        bad = tmp_path / "bad"
        res = invoke("detect", video, "--detector", *args, "--out", bad, "--no-progress")
        assert res.exit_code == 2 and "--classes" in res.output and not bad.exists(), res.output
        assert "Traceback" not in res.output


def test_python_api_hf_pipeline(models, video):
    from streammem.io import open_source

    pipe = HFDetectionPipeline.from_pretrained(f"hf:{models['yolos']}", config=HFConfig(score_threshold=0.0),
                                               tracker=TrackRescorer())
    dets = list(pipe.run(open_source(str(video))))
    assert len(dets) == 5 and all(d.tracker_id is not None for d in dets if len(d))
    assert any(len(d) for d in dets) and pipe.stats()["frames"] == 5
    assert dets[-1].data["features"].shape[1] == 16  # YOLOS detection tokens, hidden size 16


def test_no_hub_is_one_line_exit_2(video, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "nohub"
    res = invoke("detect", video, "--detector", "hf:streammem-tests/no-such-detector", "--out", out, "--no-progress")
    assert res.exit_code == 2, res.output
    lines = [x for x in res.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: could not fetch 'streammem-tests/no-such-detector'")
    assert "hf:DIR" in lines[0] and not out.exists()
