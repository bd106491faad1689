"""HOG people detector adapter: proposals and features on real pixels, the training-free
memory aggregation, and the streaming API.

The scenes: a standing-person silhouette (head, torso, arms, legs) textured with the
astronaut photo's pixels, pasted on skimage photos, walking across the frame. skimage has no
full-body pedestrian photo, and OpenCV's people detector is trained on full bodies, so the
person's outline is drawn; every other pixel is a real photo.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import supervision as sv
import torch
from skimage import data

from streammem.models.hog import HOGPeopleDetector, support
from streammem.pipelines.detection import HOGConfig, HOGDetectionPipeline
from streammem.types import Frame

H, W = 240, 320


def person_mask(h: int) -> np.ndarray:
    """A standing person's silhouette, ``h`` pixels tall, as a uint8 mask ``(h, ~0.46 h)``."""
    w = int(0.46 * h) | 1
    m = np.zeros((h, w), np.uint8)
    cx, u = w / 2, h / 100.0

    def poly(pts):
        return np.array([[int(cx + x * u), int(y * u)] for x, y in pts], np.int32)

    cv2.ellipse(m, (int(cx), int(7 * u)), (max(2, int(5 * u)), max(2, int(6.5 * u))), 0, 0, 360, 255, -1)
    cv2.fillPoly(m, [poly([(-2.5, 12), (2.5, 12), (2.5, 16), (-2.5, 16)])], 255)
    cv2.fillPoly(m, [poly([(-11, 16), (11, 16), (12, 20), (9, 52), (-9, 52), (-12, 20)])], 255)
    for s in (-1, 1):
        cv2.fillPoly(m, [poly([(s * 11, 16), (s * 15.5, 21), (s * 17, 50), (s * 13.5, 51), (s * 11.5, 26)])], 255)
        cv2.fillPoly(m, [poly([(s * 1.0, 50), (s * 9, 50), (s * 9.5, 96), (s * 3.5, 96)])], 255)
        cv2.fillPoly(m, [poly([(s * 2.5, 95), (s * 10.5, 95), (s * 12, 99.5), (s * 2.5, 99.5)])], 255)
    return m


def paste_person(img: np.ndarray, h: int, x: int, y: int) -> tuple[int, int, int, int]:
    """Paste a person ``h`` tall at top-left ``(x, y)``; returns its box xyxy."""
    m = person_mask(h)
    hh, ww = m.shape
    ast = data.astronaut()[180:480, 120:380].astype(np.float32)
    lum = cv2.resize(ast, (ww, hh)).mean(-1, keepdims=True) / 255.0
    rows = np.arange(hh)[:, None, None]
    tex = np.where(rows < hh // 2, np.float32([40, 50, 90]), np.float32([60, 55, 50])) * (0.6 + 0.8 * lum)
    tex[: int(0.12 * hh)] = np.float32([200, 160, 130]) * (0.8 + 0.4 * lum[: int(0.12 * hh)])
    a = (cv2.GaussianBlur(m, (3, 3), 0) / 255.0)[..., None]
    roi = img[y:y + hh, x:x + ww].astype(np.float32)
    img[y:y + hh, x:x + ww] = (roi * (1 - a) + tex.clip(0, 255) * a).astype(np.uint8)
    return x, y, x + ww, y + hh


def background(name: str) -> np.ndarray:
    img = getattr(data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    return cv2.resize(img, (W, H), interpolation=cv2.INTER_AREA)


def walking(bg: str, h: int = 125, n: int = 8, bad: tuple[int, ...] = (3, 6), noise: float = 15.0,
            seed: int = 0) -> tuple[list[Frame], list[tuple]]:
    """``n`` frames of a person walking right on a photo; frames in ``bad`` get Gaussian noise."""
    rng = np.random.default_rng(seed)
    base = background(bg)
    frames, boxes = [], []
    for t in range(n):
        img = base.copy()
        boxes.append(paste_person(img, h, 40 + 20 * t, H - 5 - h))
        if t in bad:
            img = (img + rng.normal(0, noise, img.shape)).clip(0, 255).astype(np.uint8)
        frames.append(Frame(index=t, timestamp=t / 8, image=img))
    return frames, boxes


def hits(dets: list[sv.Detections], boxes: list[tuple]) -> tuple[np.ndarray, np.ndarray]:
    """Per frame: person found (IoU >= 0.5), and false positives (IoU <= 0.1 with the person)."""
    from supervision.detection.utils.iou_and_nms import box_iou_batch

    found, fps = [], []
    for d, b in zip(dets, boxes):
        iou = box_iou_batch(d.xyxy, np.float32([b]))[:, 0] if len(d) else np.zeros(0)
        found.append(bool((iou >= 0.5).any()))
        fps.append(int((iou <= 0.1).sum()))
    return np.array(found), np.array(fps)


# ---------------------------------------------------------------------- detector parts
def test_proposals_find_the_person_and_features_are_unit_vectors():
    frames, boxes = walking("brick", bad=())
    det = HOGPeopleDetector()
    win, score = det.propose(frames[2].image)
    assert win.shape[1] == 4 and len(win) == len(score) > 0 and len(win) <= det.max_proposals
    assert (np.diff(score) <= 0).all()  # best first
    assert score.min() >= det.proposal_threshold - 1e-4
    # the best window holds the person (the window includes HOG's margin around the body)
    cx, cy = (win[0, 0] + win[0, 2]) / 2, (win[0, 1] + win[0, 3]) / 2
    b = boxes[2]
    assert b[0] <= cx <= b[2] and b[1] <= cy <= b[3] and score[0] > 0.5
    f = det.features(frames[2].image, win)
    assert f.shape == (len(win), det.dim) == (len(win), 3780) and f.dtype == np.float32
    assert np.allclose(np.linalg.norm(f, axis=1), 1, atol=1e-4) and np.allclose(f.mean(1), 0, atol=1e-5)
    # windows past the border are reflect-padded, not an error
    edge = det.features(frames[2].image, np.float32([[-20, -30, 44, 98], [300, 200, 364, 328]]))
    assert np.isfinite(edge).all()
    # too small an image: no windows, no error
    assert len(det.propose(np.zeros((100, 50, 3), np.uint8))[0]) == 0


def test_support_is_attention_weighted_cosine():
    q = torch.nn.functional.normalize(torch.randn(5, 16), dim=1)
    k = torch.nn.functional.normalize(torch.randn(30, 16), dim=1)
    sim = q @ k.t()
    # a tiny temperature picks the nearest key; a huge one averages all keys
    assert torch.allclose(support(q, k, 1e-4), sim.max(1).values, atol=1e-4)
    assert torch.allclose(support(q, k, 1e4), sim.mean(1), atol=1e-3)
    assert torch.equal(support(q, k[:0], 0.1), torch.zeros(5))


def test_config_is_checked():
    with pytest.raises(ValueError, match="HOGConfig.memory"):
        HOGConfig(memory="pyramid")
    with pytest.raises(ValueError, match="HOGConfig.key_size"):
        HOGConfig(max_size=10, key_size=20)
    with pytest.raises(ValueError, match="HOGConfig.tau"):
        HOGConfig(tau=0)


# ---------------------------------------------------------------------- aggregation
def test_memory_keeps_the_person_through_a_noisy_frame():
    """The person is in every frame; frame 3 is noisy. At the same threshold HOG alone loses
    the person there, the memory's re-scoring keeps it."""
    frames, boxes = walking("brick", h=130, bad=(3,))
    alone, _ = hits(list(HOGDetectionPipeline(config=HOGConfig(memory="none")).run(frames)), boxes)
    agg, fp = hits(list(HOGDetectionPipeline(config=HOGConfig(memory="feature_bank")).run(frames)), boxes)
    assert alone.tolist() == [True, True, True, False, True, True, True, True]
    assert agg.all() and fp.sum() == 0


def test_memory_finds_the_person_in_more_frames_over_four_scenes():
    """Four photos (chosen before measuring), frames 3 and 6 noisy: the memory finds the person
    in more frames than HOG alone at the same threshold. Measured: 28 vs 23 of 32 frames for
    both memories, and one extra false positive (coffee, frame 4) against none."""
    found = {"none": 0, "feature_bank": 0, "dual": 0}
    fps = dict.fromkeys(found, 0)
    for bg in ("chelsea", "brick", "rocket", "coffee"):
        frames, boxes = walking(bg, h=130)
        for memory in found:
            f, fp = hits(list(HOGDetectionPipeline(config=HOGConfig(memory=memory)).run(frames)), boxes)
            found[memory] += int(f.sum())
            fps[memory] += int(fp.sum())
    assert found["feature_bank"] >= found["none"] + 4, found
    assert found["dual"] >= found["none"] + 4, found
    assert fps["feature_bank"] <= fps["none"] + 1 and fps["dual"] <= fps["none"] + 1, fps


def test_writes_follow_the_rules_and_reads_are_causal():
    frames, boxes = walking("brick", bad=())
    pipe = HOGDetectionPipeline(config=HOGConfig(max_size=50, key_size=20))
    first = pipe.step(frames[0])
    # frame 0 has an empty memory: scores are the raw SVM margins
    assert np.allclose(first.confidence, first.data["hog_score"]) and np.all(first.data["support"] == 0)
    s = pipe.stats()
    assert 1 <= s["positive_writes"] <= pipe.config.max_positive_writes
    assert pipe.positive_memory.num_tokens == s["positive_writes"]
    assert pipe.negative_memory.num_tokens == s["negative_writes"] <= pipe.config.negative_writes
    stored = pipe.positive_memory.read()
    assert (stored.frame_index == 0).all() and (stored.score >= pipe.config.write_score).all()
    # later frames: the memory term is used, and the banks stay bounded
    for f in frames[1:]:
        d = pipe.step(f)
    assert np.any(d.data["support"] != 0)
    assert pipe.positive_memory.num_tokens <= 50 and pipe.negative_memory.num_tokens <= 50
    # reset forgets
    pipe.reset()
    assert pipe.positive_memory.num_tokens == 0 and pipe.stats()["frames"] == 0


def test_streaming_api_outputs_and_protocol():
    frames, boxes = walking("coffee", n=4, bad=())
    pipe = HOGDetectionPipeline(config=HOGConfig(memory="dual"))
    outs = list(pipe.run(frames))
    assert len(outs) == 4 and all(isinstance(d, sv.Detections) for d in outs)
    d = outs[-1]
    assert len(d) and (d.class_id == 0).all() and list(d.data["class_name"]) == ["person"] * len(d)
    assert d.metadata["frame_index"] == 3 and d.metadata["mode"] == "causal"
    assert (d.xyxy[:, 2] <= W).all() and (d.xyxy[:, 3] <= H).all()
    st = pipe.stats()
    assert st["detector"] == "hog" and st["dual_memory"]["num_tokens"] > 0
    # protocol mode: one output per frame in video order; step() refuses
    proto = HOGDetectionPipeline(config=HOGConfig(mode="protocol", warmup=2))
    res = proto.run_protocol(frames, seed=0)
    assert [r.metadata["frame_index"] for r in res] == [0, 1, 2, 3]
    with pytest.raises(RuntimeError, match="causal"):
        proto.step(frames[0])
    # a large frame is downscaled to max_side and boxes come back in frame pixels
    big = Frame(index=0, timestamp=0.0, image=cv2.resize(frames[1].image, (640, 480)))
    out = HOGDetectionPipeline(config=HOGConfig(memory="none", max_side=320)).step(big)
    assert len(out) and out.xyxy[:, 2].max() <= 640 and out.xyxy[:, 3].max() > 240
