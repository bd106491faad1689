"""HOG people detector adapter: proposals and features on real pixels, the training-free
memory aggregation, and the streaming API.

The scenes: a standing-person silhouette (head, torso, arms, legs) textured with the
astronaut photo's pixels, pasted on skimage photos, walking across the frame
(:mod:`streammem.eval.hog`'s test bed). skimage has no full-body pedestrian photo, and
OpenCV's people detector is trained on full bodies, so the person's outline is drawn; every
other pixel is a real photo.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import supervision as sv
import torch
from skimage import data

from streammem.eval.hog import clip_ap50, paste_person, person_clip, record
from streammem.models.detector import nms
from streammem.models.hog import HOGPeopleDetector, support
from streammem.pipelines.detection import HOGConfig, HOGDetectionPipeline
from streammem.types import Frame

H, W = 240, 320


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
    in more frames than HOG alone at the same threshold. Measured (beta 2): 25 vs 23 of 32 frames
    for both memories (beta 8, the old default: 28, with one extra false positive)."""
    found = {"none": 0, "feature_bank": 0, "dual": 0}
    fps = dict.fromkeys(found, 0)
    for bg in ("chelsea", "brick", "rocket", "coffee"):
        frames, boxes = walking(bg, h=130)
        for memory in found:
            f, fp = hits(list(HOGDetectionPipeline(config=HOGConfig(memory=memory)).run(frames)), boxes)
            found[memory] += int(f.sum())
            fps[memory] += int(fp.sum())
    assert found["feature_bank"] >= found["none"] + 2, found
    assert found["dual"] >= found["none"] + 2, found
    assert fps["feature_bank"] <= fps["none"] and fps["dual"] <= fps["none"], fps


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


# ---------------------------------------------------------------------- working size
def person_frame(size_hw: tuple[int, int], h: int) -> tuple[Frame, tuple]:
    img = cv2.resize(background("brick"), size_hw[::-1], interpolation=cv2.INTER_LINEAR)
    box = paste_person(img, h, size_hw[1] // 3, size_hw[0] - 10 - h)
    return Frame(index=0, timestamp=0.0, image=img), box


def test_working_size_follows_the_footage():
    """Native size below the cap, capped above it; None never resizes; tiny frames are upscaled."""
    pipe = HOGDetectionPipeline(config=HOGConfig(memory="none"))
    assert pipe.config.max_side == 1280

    def size(h, w, p=pipe):
        img, s = p.working_image(Frame(index=0, timestamp=0.0, image=np.zeros((h, w, 3), np.uint8)))
        return img.shape[:2], s

    assert size(576, 768) == ((576, 768), 1.0)
    assert size(720, 1280) == ((720, 1280), 1.0)
    assert size(1080, 1920) == ((720, 1280), 1280 / 1920)
    assert size(100, 60)[0] == (128, 77)  # too small for one window: upscaled to fit it
    native = HOGDetectionPipeline(config=HOGConfig(memory="none", max_side=None))
    assert size(1080, 1920, native) == ((1080, 1920), 1.0)
    with pytest.raises(ValueError, match="HOGConfig.max_side"):
        HOGConfig(max_side=100)


def test_a_100px_person_on_768x576_footage_is_found_at_the_default_size_not_at_480():
    """The issue's case: 768x576 footage with a person 100 px tall. At native size (the default)
    HOG finds the person; shrunk to 480 px the person is ~62 px tall, under the detector's ~96 px."""
    frame, box = person_frame((576, 768), 100)
    found = {}
    for ms in (1280, 480):
        d = HOGDetectionPipeline(config=HOGConfig(memory="none", max_side=ms)).step(frame)
        found[ms] = bool(len(d)) and bool((box_iou(d.xyxy, box) >= 0.5).any())
    assert found == {1280: True, 480: False}


def box_iou(xyxy: np.ndarray, box: tuple) -> np.ndarray:
    from supervision.detection.utils.iou_and_nms import box_iou_batch

    return box_iou_batch(xyxy, np.float32([box]))[:, 0]


def test_hog_size_reaches_the_pipeline_through_the_cli(tmp_path):
    import json

    from typer.testing import CliRunner

    from streammem.cli import app

    runner = CliRunner()
    src = "world:seed=1,preset=clean,size=160,frames=2"
    for flag, want in ((["--hog-size", "320"], 320), (["--hog-size", "0"], None), ([], 1280)):
        out = tmp_path / f"o{want}"
        r = runner.invoke(app, ["detect", src, "--detector", "hog", "--out", str(out), "--no-progress", *flag])
        assert r.exit_code == 0, r.output
        cfg = json.loads((out / "summary.json").read_text())["config"]
        assert cfg["max_side"] == want
    r = runner.invoke(app, ["detect", src, "--detector", "hog", "--hog-size", "100", "--out", str(tmp_path / "bad")])
    assert r.exit_code == 2 and "--hog-size" in r.output
    r = runner.invoke(app, ["detect", src, "--hog-size", "640", "--out", str(tmp_path / "bad2")])
    assert r.exit_code == 2 and "--detector hog only" in r.output


# ---------------------------------------------------------------------- calibration
def test_default_rescoring_does_not_lower_clean_frame_ap_on_the_photo_test_bed():
    """The memory's re-scoring against HOG alone at every number of detections (AP50 of the
    whole ranking, a threshold far below any margin), on the clean frames of four test-bed
    clips (photos fixed before measuring; each clip has two 3-frame bursts of corruptions).
    Measured: clean frames 94.18 for HOG alone and for the default (beta 2; 0.003 below, a tie
    of AP's interpolation), 90.84 for beta 8 (the old default); degraded frames 73.7 / 79.7 /
    83.5. The tolerance (0.05 AP points) is far below the old default's loss (3.3)."""
    pipe = HOGDetectionPipeline(config=HOGConfig())
    betas = (0.0, pipe.config.beta, 8.0)
    preds: dict = {b: {"clean": [], "bad": []} for b in betas}
    gts: dict = {"clean": [], "bad": []}
    for i, photo in enumerate(("brick", "chelsea", "coffee", "rocket")):
        kinds = ("noise", "low_light", "motion_blur", "jpeg")
        frames, boxes, kind = person_clip(photo, n=16, bursts=((6, 9, kinds[i]), (12, 15, kinds[(i + 1) % 4])), seed=i)
        for ws, g, k in zip(record(pipe, frames), boxes, kind):
            part = "clean" if k == "none" else "bad"
            gts[part].append(g)
            for b in betas:
                score = ws.raw + ws.memory_term(b)
                keep = nms(torch.from_numpy(ws.boxes), torch.from_numpy(score), pipe.config.nms_iou).numpy()
                preds[b][part].append(sv.Detections(xyxy=ws.boxes[keep], confidence=score[keep],
                                                    class_id=np.zeros(len(keep), int)))
    ap = {b: {p: clip_ap50(preds[b][p], gts[p]) for p in gts} for b in betas}
    hog, ours, old = ap[0.0], ap[pipe.config.beta], ap[8.0]
    assert ours["clean"] >= hog["clean"] - 0.05, ap
    assert ours["bad"] > hog["bad"] + 3, ap
    assert old["clean"] < hog["clean"] - 1, ap  # the test bed tells the calibrations apart
