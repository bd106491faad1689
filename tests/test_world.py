"""StreamWorld: determinism, boxes against pixels, loops, questions against the event log,
corruptions against ground truth, datasets and CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from streammem.world import CLASSES, World, open_world
from streammem.world.objects import sprite
from streammem.world.questions import AGE_BUCKETS, QUADRANTS, SIDES, describe
from streammem.world.scene import CameraState, plane_to_image

GT_ARRAYS = ["boxes", "class_id", "track_id", "visible", "velocity", "dynamic_mask"]
GT_LISTS = ["class_name", "speed", "colour", "motion", "events", "corruptions"]


def assert_gt_equal(a: dict, b: dict, skip=()) -> None:
    for k in GT_ARRAYS:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    for k in GT_LISTS:
        if k not in skip:
            assert a[k] == b[k], k


# ------------------------------------------------------------------------ basics
def test_determinism_same_seed_same_frames_and_gt():
    w = World(seed=5, preset="hard", size=96, frames=60)
    a, b = list(w), list(World(seed=5, preset="hard", size=96, frames=60))
    assert [f.index for f in a] == [f.index for f in b]
    for fa, fb in zip(a, b):
        np.testing.assert_array_equal(fa.image, fb.image)
        np.testing.assert_array_equal(fa.pose, fb.pose)
        np.testing.assert_array_equal(fa.action, fb.action)
        assert_gt_equal(fa.info["gt"], fb.info["gt"])
    c = list(World(seed=6, preset="hard", size=96, frames=60))
    assert any(not np.array_equal(fa.image, fc.image) for fa, fc in zip(a, c))
    # iterating the same World twice gives the same stream too
    again = list(w)
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, again))


def test_frame_fields_and_gt_shapes():
    w = World(seed=1, preset="medium", size=(96, 128), fps=10, seconds=3)
    assert w.num_frames == 30 and w.fps == 10 and w.size == (96, 128) and w.preset == "medium"
    frames = list(w)
    assert len(frames) <= 30
    for f in frames:
        g = f.info["gt"]
        n = len(g["boxes"])
        assert f.image.shape == (96, 128, 3) and f.pose.shape == (4, 4) and f.action.shape == (13,)
        assert abs(f.timestamp - f.index / 10) < 1e-9
        assert g["boxes"].dtype == np.float32 and g["boxes"].shape == (n, 4)
        assert len(g["class_name"]) == len(g["speed"]) == len(g["track_id"]) == len(g["visible"]) == n
        assert all(CLASSES[c] == name for c, name in zip(g["class_id"], g["class_name"]))
        assert set(g["speed"]) <= {"slow", "medium", "fast"}
        assert g["dynamic_mask"].shape == (96, 128) and g["dynamic_mask"].dtype == bool
        assert ((g["boxes"][:, 2] > g["boxes"][:, 0]) & (g["boxes"][:, 3] > g["boxes"][:, 1])).all()
        assert (g["boxes"][:, [0, 1]] >= 0).all() and (g["boxes"][:, 2] <= 128).all() and (g["boxes"][:, 3] <= 96).all()
        assert ((g["visible"] >= 0) & (g["visible"] <= 1)).all()


def test_endless_world_and_open_world():
    w = open_world("seed=3,preset=hard,fps=8,size=64")
    assert w.num_frames is None and w.seed == 3 and w.preset == "hard" and w.size == 64
    it = iter(w)
    idx = [next(it).index for _ in range(50)]
    assert idx == sorted(idx) and len(set(idx)) == 50
    assert open_world("world:seconds=2,size=32x48").num_frames == 16
    assert open_world("").preset == "medium"
    with pytest.raises(ValueError, match="bogus"):
        open_world("seed=1,bogus=2")
    with pytest.raises(ValueError, match="seed"):
        open_world("seed=abc")
    with pytest.raises(ValueError, match="preset"):
        World(preset="insane")


# ------------------------------------------------------------------------ boxes vs pixels
def test_boxes_match_rendered_pixels():
    w = World(seed=2, preset="hard", corruption="clean", size=128, frames=80, debug=True)
    sim = w.simulator()
    checked_full = checked_partial = 0
    for f in w:
        sim.step()
        g, ids = f.info["gt"], f.info["id_mask"]
        # outside the object pixels the image is exactly ground + foliage at this camera
        cam = CameraState(*g["camera"]["state"])
        bg = w.scene.render_ground(cam, w.size_hw)
        fg = w.scene.render_foreground(cam, w.size_hw)
        fm = fg[..., 3] > 0
        bg[fm] = fg[..., :3][fm]
        np.testing.assert_array_equal(f.image[ids == 0], bg[ids == 0])
        # object pixels differ from the background behind them (they are really drawn)
        if (ids > 0).sum() > 50:
            assert (np.abs(f.image[ids > 0].astype(int) - bg[ids > 0]).sum(1) > 0).mean() > 0.5
        drawn = set(np.unique(ids[ids > 0]).tolist())
        assert drawn <= set(g["track_id"].tolist())
        scale = 128 / 512 * 1000 / cam.dist
        for box, tid, vis, name, col in zip(g["boxes"], g["track_id"], g["visible"], g["class_name"], g["colour"]):
            ys, xs = np.nonzero(ids == tid)
            assert (len(ys) > 0) == (vis > 0)
            if len(ys):  # every drawn pixel of the object lies in its box
                assert xs.min() >= box[0] and xs.max() < box[2] and ys.min() >= box[1] and ys.max() < box[3]
            x0, y0, x1, y1 = box
            inside = x0 > 0 and y0 > 0 and x1 < 128 and y1 < 96 + 32
            slot = int(np.nonzero(sim.objects.tid == tid)[0][0])
            spr = sprite(name, col)
            k = 2 * sim.objects.r[slot] / max(spr.shape[:2]) * scale
            area = (spr[..., 3] > 0).sum() * k * k  # silhouette area predicted from the sprite
            if vis == 1.0:
                checked_full += 1
                assert xs.min() == x0 and ys.min() == y0 and xs.max() + 1 == x1 and ys.max() + 1 == y1
                assert abs(len(ys) - area) <= 0.12 * area + 6
            elif 0 < vis < 1 and inside and area > 60:
                checked_partial += 1
                assert abs(len(ys) / vis - area) <= 0.12 * area + 6
    assert checked_full > 20 and checked_partial > 3


def test_dynamic_mask_is_moving_object_pixels():
    w = World(seed=4, preset="medium", corruption="clean", size=96, frames=40, debug=True)
    n_dyn = 0
    for f in w:
        g, ids = f.info["gt"], f.info["id_mask"]
        moving = [t for t, v in zip(g["track_id"], g["velocity"]) if np.hypot(*v) > 0]
        np.testing.assert_array_equal(g["dynamic_mask"], np.isin(ids, moving) & (ids > 0))
        n_dyn += g["dynamic_mask"].sum()
    assert n_dyn > 0


# ------------------------------------------------------------------------ camera loops
def test_loop_returns_to_same_pose_and_background():
    found = 0
    for seed in range(6):
        w = World(seed=seed, preset="clean", size=64, frames=400, debug=True)
        start: dict[str, tuple] = {}
        prev = None
        for f in w:
            seg = f.info["gt"]["camera"]["segment"]
            if seg.startswith("loop_out") and (prev is None or prev.info["gt"]["camera"]["segment"] != seg):
                start[seg.split(":")[1]] = (prev.pose, prev.image, prev.info["id_mask"], prev.index) if prev else None
            if prev is not None and prev.info["gt"]["camera"]["segment"].startswith("loop_back") and not seg.startswith(
                "loop_back:" + prev.info["gt"]["camera"]["segment"].split(":")[1]
            ):
                k = prev.info["gt"]["camera"]["segment"].split(":")[1]
                if start.get(k) is not None:
                    pose0, img0, ids0, i0 = start[k]
                    assert prev.index - i0 >= 4
                    np.testing.assert_array_equal(prev.pose, pose0)
                    still = (ids0 == 0) & (prev.info["id_mask"] == 0)
                    assert still.mean() > 0.5
                    np.testing.assert_array_equal(prev.image[still], img0[still])
                    found += 1
            prev = f
        if found >= 2:
            break
    assert found >= 2


def test_actions_integrate_to_poses():
    frames = list(World(seed=7, preset="medium", size=64, frames=80, drop_frames=False))
    for a, b in zip(frames, frames[1:]):
        act = b.action
        dx, dy = act[0] - act[1], act[2] - act[3]
        np.testing.assert_allclose(b.pose[:2, 3] - a.pose[:2, 3], [dx, dy], atol=1e-4)
        np.testing.assert_allclose(b.pose[2, 3] - a.pose[2, 3], act[4] - act[5], atol=1e-4)  # forward = +z
        assert bool(act[12]) == np.array_equal(a.pose, b.pose)


# ------------------------------------------------------------------------ corruptions
def test_corruptions_change_pixels_not_ground_truth():
    kw = dict(seed=11, preset="hard", size=96, frames=160)
    runs = {c: list(World(corruption=c, **kw)) for c in ("clean", "medium", "hard")}
    clean = {f.index: f for f in runs["clean"]}
    assert len(clean) == 160
    log = lambda fs: [e for f in fs for e in f.info["gt"]["events"]]  # noqa: E731
    for level in ("medium", "hard"):
        frames = runs[level]
        assert log(frames) == log(runs["clean"])  # events of dropped frames come with the next one
        n_diff = 0
        for f in frames:
            c = clean[f.index]
            assert_gt_equal(f.info["gt"], c.info["gt"], skip=("events", "corruptions"))
            np.testing.assert_array_equal(f.pose, c.pose)
            names = f.info["gt"]["corruptions"]
            if not names:
                np.testing.assert_array_equal(f.image, c.image)
            elif names != ["duplicate"]:
                n_diff += not np.array_equal(f.image, c.image)
        assert n_diff > 5
    hard = runs["hard"]
    assert len(hard) < 160  # hard drops frames
    seen = {n for f in hard for n in f.info["gt"]["corruptions"]}
    assert len(seen - {"duplicate"}) >= 4, seen


# ------------------------------------------------------------------------ questions
@pytest.fixture(scope="module")
def qa_world():
    w = World(seed=2, preset="medium", size=128, seconds=240, corruption="clean")
    frames = {f.index: f for f in w}
    qs = w.questions(every_s=6)
    return w, frames, qs


def _find(log, ev):
    hits = [e for e in log if e["type"] == ev["type"] and e["track_id"] == ev["track_id"] and e["frame"] == ev["frame"]]
    assert len(hits) == 1, ev
    return hits[0]


def _centre(g, tid):
    j = np.nonzero(g["track_id"] == tid)[0]
    if not len(j):
        return None
    b = g["boxes"][j[0]]
    return (b[0] + b[2]) / 2, (b[1] + b[3]) / 2, b


def test_corrupt_once_applies_one_named_corruption():
    from streammem.world.corruptions import PIXEL_CORRUPTIONS, corrupt_once

    img = np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8)
    for name in PIXEL_CORRUPTIONS:
        out = corrupt_once(img, name, 1.0, seed=3, motion=(2.0, 0.0))
        assert out.shape == img.shape and out.dtype == np.uint8, name
        assert np.abs(out.astype(int) - img).mean() > 1.0, name
        assert np.array_equal(out, corrupt_once(img, name, 1.0, seed=3, motion=(2.0, 0.0))), name  # seeded
    assert corrupt_once(img, "low_light", 1.0, seed=0).mean() < corrupt_once(img, "low_light", 0.2, seed=0).mean()
    with pytest.raises(ValueError, match="drop"):
        corrupt_once(img, "drop", 1.0, seed=0)


def test_questions_shape_types_and_shuffle(qa_world):
    w, frames, qs = qa_world
    assert {q["answer_type"] for q in qs} == {"PM", "SP", "TP", "STP", "HD", "FP"}
    assert any(q["needle"] for q in qs)
    for q in qs:
        for key in ("video", "middle_frame_timestamp", "question", "candidates", "answer", "answer_type",
                    "sub_answer_type", "event_time", "horizon_s"):
            assert key in q
        assert q["answer"] in q["candidates"] and len(set(q["candidates"])) == len(q["candidates"])
        assert q["candidates"]["ABCDE".index(q["answer_letter"])] == q["answer"]
        assert q["end"] == q["middle_frame_timestamp"]
        if q["answer_type"] != "FP":
            assert q["event_time"] <= q["middle_frame_timestamp"] + 1e-9
    letters = {q["answer_letter"] for q in qs if len(q["candidates"]) == 4}
    assert letters == {"A", "B", "C", "D"}
    assert qs == w.questions(every_s=6)  # deterministic
    json.dumps(qs)


def test_question_answers_agree_with_event_log(qa_world):
    w, frames, qs = qa_world
    log = [e for i in sorted(frames) for e in frames[i].info["gt"]["events"]]
    hw = w.size_hw
    checked = {}
    for q in qs:
        t, qf, sub = q["middle_frame_timestamp"], q["query_frame"], q["sub_answer_type"]
        g = frames[qf].info["gt"]
        ev = q["evidence"]
        if q["answer_type"] == "PM":
            e = _find(log, ev["events"][0])
            assert e["time"] <= t and e["in_view"] and abs(e["time"] - q["event_time"]) < 1e-6
            if e["type"] == "changes_colour":
                assert q["answer"] == e["to"] and describe(e["from"], e["class_name"]) in q["question"]
            else:
                assert q["answer"] == describe(e["colour"], e["class_name"])
                assert ("vanished" in q["question"]) == (e["type"] == "disappears")
        elif sub == "TP-1":
            e1, e2 = (_find(log, x) for x in ev["events"])
            first = e1 if e1["time"] < e2["time"] else e2
            assert q["answer"].startswith(describe(first["from"] if first["type"] == "changes_colour" else first["colour"], first["class_name"]))
        elif sub == "TP-2":
            e = _find(log, ev["events"][0])
            age = t - e["time"]
            assert q["answer"] == next(lbl for lo, hi, lbl in AGE_BUCKETS if lo <= age < hi)
        elif sub == "STP-2":
            e = _find(log, ev["events"][0])
            assert e["type"] == "enters" and e["time"] <= t
            c = _centre(frames[e["frame"]].info["gt"], e["track_id"])
            if c is not None and c[2][2] - c[2][0] < 0.8 * hw[1]:
                x, y = c[0], c[1]
                assert SIDES[int(np.argmin([x, hw[1] - x, y, hw[0] - y]))] == q["answer"]
        elif sub == "SP-1":
            c = _centre(g, ev["track_ids"][0])
            assert c is not None
            assert QUADRANTS[int(c[1] >= hw[0] / 2) * 2 + int(c[0] >= hw[1] / 2)] == q["answer"]
        elif sub == "SP-2":
            name = q["question"].split("How many ")[1].split(" objects")[0]
            ids = set(ev["track_ids"])
            assert int(q["answer"]) == len(ids)
            assert all(CLASSES[c] == name for c, tid in zip(g["class_id"], g["track_id"]) if tid in ids)
            assert ids <= set(g["track_id"].tolist())
        elif sub == "SP-3":
            ca, cb = (_centre(g, tid) for tid in ev["track_ids"])
            assert ("left" if ca[0] < cb[0] else "right") == q["answer"]
        elif sub == "HD-1":
            c, k = ev["description"]
            seen = any(col == c and name == k for i in sorted(frames) if i <= qf
                       for col, name in zip(frames[i].info["gt"]["colour"], frames[i].info["gt"]["class_name"]))
            if q["answer"] == "yes":
                assert seen
            else:  # never fully in the picture before the query
                for i in (i for i in frames if i <= qf):
                    gg = frames[i].info["gt"]
                    for col, name, b in zip(gg["colour"], gg["class_name"], gg["boxes"]):
                        if col == c and name == k:
                            assert not (b[0] > 0 and b[1] > 0 and b[2] < hw[1] and b[3] < hw[0])
        elif sub == "HD-2":
            k = ev["class_name"]
            present = k in g["class_name"]
            if q["answer"] == "yes":
                assert present
        elif sub == "STP-1":
            f0, f1 = ev["frames"]
            a, b = _centre(frames[f0].info["gt"], ev["track_ids"][0]), _centre(g, ev["track_ids"][0])
            if a is not None and b is not None:
                d = np.array([b[0] - a[0], b[1] - a[1]])
                ans = ("right" if d[0] > 0 else "left") if abs(d[0]) > abs(d[1]) else ("down" if d[1] > 0 else "up")
                assert ans == q["answer"]
        elif sub == "FP-1":
            f0, f1 = ev["frames"]
            fut = frames[f1]
            c = _centre(fut.info["gt"], ev["track_ids"][0])
            if c is None or q["answer"] == "out of view":
                continue
            b = c[2]
            if not (b[0] > 0 and b[1] > 0 and b[2] < hw[1] and b[3] < hw[0]):
                continue  # clipped boxes have shifted centres
            # back-project the future box centre to the ground, then into the query-time camera
            cam1 = CameraState(*fut.info["gt"]["camera"]["state"])
            m1 = plane_to_image(cam1, hw)
            xy = np.linalg.solve(m1[:, :2], np.array([c[0], c[1]]) - m1[:, 2])
            px = abs(np.linalg.det(m1[:, :2])) ** 0.5  # image px per world px
            np.testing.assert_allclose(xy, ev["world_xy"], atol=2.0 / px)  # box centres are whole-pixel
            m0 = plane_to_image(CameraState(*frames[f0].info["gt"]["camera"]["state"]), hw)
            u, v = m0[:, :2] @ xy + m0[:, 2]
            assert QUADRANTS[int(v >= hw[0] / 2) * 2 + int(u >= hw[1] / 2)] == q["answer"]
        else:
            continue
        checked[sub] = checked.get(sub, 0) + 1
    print(checked)
    for sub in ("PM-2", "PM-3", "PM-N", "TP-1", "TP-2", "SP-1", "SP-2", "SP-3", "HD-1", "HD-2", "STP-1", "STP-2"):
        assert checked.get(sub, 0) >= 2, (sub, checked)
    assert checked.get("FP-1", 0) >= 1 and checked.get("PM-1", 0) >= 1, checked


def test_needle_horizons_are_controlled(qa_world):
    _, _, qs = qa_world
    needles = [q for q in qs if q["needle"]]
    assert len({q["target_horizon_s"] for q in needles}) >= 3
    for q in needles:
        h = q["target_horizon_s"]
        assert abs(q["horizon_s"] - h) <= 0.25 * h + 0.5


def test_questions_are_made_without_rendering(monkeypatch):
    """Questions come from the pixel-free simulator alone (their speed is measured by
    benchmarks/world.py, not here): rendering a frame fails the test."""
    from streammem.world.scene import Scene

    def no_render(*args, **kwargs):
        raise AssertionError("questions() rendered a frame")

    for cls, name in [(World, "_render"), (Scene, "render_ground"), (Scene, "render_foreground")]:
        monkeypatch.setattr(cls, name, no_render)
    w = World(seed=0, preset="hard", size=256, seconds=120)
    qs = w.questions(every_s=5, max_events=256)
    # query frames: from the 4 s warm-up every 5 s, while the 1 s future window is still inside the stream
    fps, n = 8, 120 * 8
    assert sorted({q["middle_frame_timestamp"] for q in qs}) == [f / fps for f in range(4 * fps, n - fps, 5 * fps)]
    assert len(qs) > 100
    with pytest.raises(ValueError, match="endless"):
        World(seed=0).questions()


# ------------------------------------------------------------------------ datasets and CLI
def test_clip_dataset():
    from torch.utils.data import DataLoader

    from streammem.world.datasets import ClipDataset, QuestionDataset, collate_clips

    ds = ClipDataset(seed=1, preset="hard", clip_len=5, size=64, n_clips=3, stride=2)
    a, b = ds[0], ds[0]
    assert a["frames"].shape == (5, 3, 64, 64) and a["frames"].max() <= 1
    assert (a["frames"] == b["frames"]).all() and (a["index"][1:] - a["index"][:-1] == 2).all()
    assert not (ds[1]["frames"] == a["frames"]).all()
    batch = next(iter(DataLoader(ds, batch_size=3, collate_fn=collate_clips)))
    assert batch["frames"].shape == (3, 5, 3, 64, 64) and len(batch["boxes"]) == 3
    with pytest.raises(IndexError):
        ds[3]
    qd = QuestionDataset(seed=0, preset="clean", seconds=30, size=64, clip_len=4, stride=3)
    item = qd[0]
    assert item["frames"].shape[0] == 4 and int(item["index"][-1]) == item["question"]["query_frame"]


def test_cli_export_and_gallery(tmp_path):
    from typer.testing import CliRunner

    from streammem.cli.world import app

    r = CliRunner().invoke(app, ["export", "--seed", "3", "--minutes", "0.25", "--out", str(tmp_path / "e"), "--size", "64"])
    assert r.exit_code == 0, r.output
    lines = (tmp_path / "e" / "ground_truth.jsonl").read_text().splitlines()
    rows = [json.loads(x) for x in lines]
    assert 0 < len(rows) <= 120 and rows[0]["index"] == 0
    qs = json.loads((tmp_path / "e" / "questions.json").read_text())
    assert qs and all("answer" in q for q in qs)
    import cv2

    cap = cv2.VideoCapture(str(tmp_path / "e" / "video.mp4"))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 120
    r = CliRunner().invoke(app, ["gallery", "--out", str(tmp_path / "g"), "--size", "64", "--cols", "2",
                                 "--every-s", "1", "--video-seconds", "1"])
    assert r.exit_code == 0, r.output
    png = tmp_path / "g" / "world_gallery.png"
    img = cv2.imread(str(png))
    assert img.shape[0] == 3 * 66 and img.shape[1] == 2 * 66
    assert (tmp_path / "g" / "world_gallery.mp4").stat().st_size > 1000
