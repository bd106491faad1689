"""StreamingGenerationPipeline on a tiny seeded model: actions become poses, chunks read the
memory, the interrupt / callback / prompt stream work, memory and cost stay flat over a long
rollout, a snapshot restored mid-rollout continues exactly, and bad input gets clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streammem.models.video_dit import CausalVideoDiT
from streammem.pipelines import Head
from streammem.pipelines.generation import (
    GenerationConfig,
    StreamingGenerationPipeline,
    camera_from_pose,
)
from streammem.types import Frame
from streammem.world import World
from streammem.world.scene import CameraState


def tiny(seed: int = 0) -> CausalVideoDiT:
    torch.manual_seed(seed)
    m = CausalVideoDiT(sample_size=16, patch_size=4, dim=32, num_layers=1, num_heads=2,
                       vocab=("<empty>", "<unk>", "clean", "hard"))
    with torch.no_grad():  # the output projection starts at zero: give it weights so outputs depend on inputs
        for p in m.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return m.eval()


def image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (24, 24, 3), dtype=np.uint8)


def pipe(**kw) -> StreamingGenerationPipeline:
    return StreamingGenerationPipeline(tiny(), GenerationConfig(num_inference_steps=2, **kw))


def test_actions_move_the_camera_and_frames_carry_their_pose():
    p = pipe()
    out = p(image(), "RRUF", prompt="clean", progress=False)
    assert [f.action for f in out.frames] == ["R", "R", "U", "F"] and out.chunks == 2
    x0 = 768.0
    assert [f.pose[0, 3] for f in out.frames] == [x0 + 20, x0 + 40, x0 + 40, x0 + 40]
    assert out.frames[2].pose[1, 3] == x0 - 20 and out.frames[3].pose[2, 3] > out.frames[2].pose[2, 3]  # closer
    assert all(f.image.dtype == np.uint8 and f.image.shape == (16, 16, 3) for f in out.frames)
    assert isinstance(p, Head) and p.stats()["frames"] == 5  # the start frame + 4
    # raw poses work too: the camera goes exactly there, each pose of a chunk from the one before
    targets = [CameraState(x=800 * 16, y=700 * 16).pose(), CameraState(x=900 * 16, y=700 * 16).pose()]
    f = list(p.stream(targets, progress=False))
    assert all(np.allclose(a.pose, b) for a, b in zip(f, targets)) and f[0].action == "pose"
    assert f[1].action == "pose"
    # forward stops at the camera's zoom limit, within a chunk too
    zoomed = list(p.stream("F" * 40, progress=False))
    assert camera_from_pose(zoomed[-1].pose).zoom == 30
    assert camera_from_pose(targets[0]) == CameraState(x=800 * 16, y=700 * 16)


def test_the_memory_conditions_each_chunk():
    a, b = pipe(), pipe()
    a.start(image(0))
    b.start(image(0))
    b.step(Frame(index=1, timestamp=0.25, image=image(5)))  # b also remembers another frame
    b.anchor = a.anchor.clone()  # same anchor and camera, another memory
    fa = list(a.stream("RR", progress=False))
    fb = list(b.stream("RR", progress=False))
    assert not np.array_equal(fa[0].image, fb[0].image)


def test_interrupt_callback_and_prompt_change():
    p = pipe()
    seen = []

    def callback(chunk, frames):
        seen.append((chunk, [f.info["prompt"] for f in frames], [f.info["seed"] for f in frames]))
        if chunk == 2:
            p.interrupt.set()

    out = p(image(), "R" * 40, prompt=iter(["clean", "hard"]), callback=callback, progress=False)
    assert out.interrupted and out.chunks == 3 and len(out.frames) == 6
    assert seen == [(0, ["clean"] * 2, [0, 0]), (1, ["hard"] * 2, [1, 1]), (2, ["hard"] * 2, [2, 2])]
    # the prompt changes what is made: same seed, same memory, another prompt
    x, y = pipe(), pipe()
    fx = x(image(), "RR", prompt="clean", progress=False).frames
    fy = y(image(), "RR", prompt="hard", progress=False).frames
    assert not np.array_equal(fx[0].image, fy[0].image)


def test_memory_is_bounded_over_a_long_rollout():
    p = pipe(window=2, history_frames=18)
    p.start(image())
    sizes = []
    for _ in p.stream("LR" * 40, callback=lambda k, fr: sizes.append((p.memory.num_tokens, p.memory.nbytes)),
                      progress=False):
        pass
    assert len(sizes) == 40
    tokens, nbytes = zip(*sizes)
    assert max(tokens) <= p.memory.capacity and len(set(nbytes)) == 1
    assert tokens[-1] == tokens[-10]  # full: flat from here on
    assert p.memory.stats()["frames_held"] == 2 + 18


@pytest.mark.parametrize("memory", ["posekv", "window", "full", "dual"])
def test_snapshot_mid_rollout_continues_exactly(memory):
    actions = "RRUULLDDFB" * 2
    whole = pipe(memory=memory)
    ref = whole(image(), actions, prompt="clean", progress=False).frames
    first = pipe(memory=memory)
    first.start(image(), prompt="clean")
    list(first.stream(actions[:8], progress=False))
    state = first.state_dict()
    second = pipe(memory=memory)
    second.load_state_dict(state)
    rest = list(second.stream(actions[8:], progress=False))
    assert all(np.array_equal(a.image, b.image) and np.allclose(a.pose, b.pose) for a, b in zip(ref[8:], rest))
    with pytest.raises(ValueError, match="another configuration"):
        pipe(memory="window" if memory != "window" else "full").load_state_dict(state)


def reprojecting(seed: int = 0) -> CausalVideoDiT:
    torch.manual_seed(seed)
    m = CausalVideoDiT(sample_size=16, patch_size=4, dim=32, num_layers=1, num_heads=2, reproject=True,
                       focal_px=31.25, vocab=("<empty>", "<unk>", "clean", "hard"))
    with torch.no_grad():
        for p in m.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return m.eval()


def test_the_observed_frame_is_the_first_anchor_while_the_model_generates():
    model = reprojecting()
    on = StreamingGenerationPipeline(model, GenerationConfig(num_inference_steps=2))
    off = StreamingGenerationPipeline(model, GenerationConfig(num_inference_steps=2, reference_anchor=False))
    outs = []
    for p in (on, off):
        p.start(image(), prompt="clean")
        a, pose = p._anchors()
        assert a.shape == (1, 3, 16, 16)  # the observed frame is the newest: one anchor
        outs.append([f.image for f in p.stream("RRRRUU", progress=False)])
    a, pose = on._anchors()
    assert a.shape == (1, 2, 3, 16, 16) and pose.shape == (1, 2, 4, 4)
    assert torch.equal(a[0, 0], on.observed[0]) and torch.equal(a[0, 1], on.anchor)
    assert off._anchors()[0].shape == (1, 3, 16, 16)
    assert np.array_equal(outs[0][0], outs[1][0])  # the first chunk continues the observed frame either way
    assert not np.array_equal(outs[0][-1], outs[1][-1])  # later chunks read the observed frame too
    # a real frame observed mid-stream becomes the reference
    w = next(iter(World(seed=3, preset="clean", size=16, frames=1)))
    on.step(w)
    assert torch.equal(on.observed[0], on.anchor) and on._anchors()[0].shape == (1, 3, 16, 16)
    # snapshot and restore keep the reference: the same continuation
    list(on.stream("LL", progress=False))
    state = on.state_dict()
    again = StreamingGenerationPipeline(model, GenerationConfig(num_inference_steps=2))
    again.load_state_dict(state)
    assert all(np.array_equal(x.image, y.image) for x, y in
               zip(on.stream("DDRR", progress=False), again.stream("DDRR", progress=False)))


@pytest.mark.parametrize("ref_pad", [False, True])
def test_chained_clips_read_the_observed_frame_only_with_ref_pad(ref_pad):
    p = StreamingGenerationPipeline(reprojecting(), GenerationConfig(num_inference_steps=1, chain_clip_frames=2,
                                                                     chain_frames=1, chain_ref_pad=ref_pad))
    p.start(image(), prompt="clean")
    list(p.stream("RR", progress=False))  # clip 0: continues the start image
    assert p._anchors()[0].shape == (1, 2, 3, 16, 16)
    list(p.stream("RR", progress=False))  # clip 1: its conditioning is the last frame (and the start image with ref_pad)
    assert p.clip == 1 and p._anchors()[0].shape == ((1, 2, 3, 16, 16) if ref_pad else (1, 3, 16, 16))


def test_a_snapshot_older_than_a_config_field_loads_with_its_default():
    from streammem.pipelines.base import json_tensor, tensor_json

    a = pipe()
    a.start(image(), prompt="clean")
    list(a.stream("RRUU", progress=False))
    state = a.state_dict()
    meta = tensor_json(state["head.meta"])
    meta["config"].pop("reference_anchor")
    older = {**state, "head.meta": json_tensor(meta)}
    b = pipe()
    b.load_state_dict(older)
    assert b.frames == a.frames
    with pytest.raises(ValueError, match=r"another configuration \(fields \['reference_anchor'\]\)"):
        pipe(reference_anchor=False).load_state_dict(older)


def test_dual_memory_is_bounded_keeps_poses_and_routes_what_moved():
    from streammem.eval.generation import render_path
    from streammem.memory import DualMemory

    p = pipe(memory="dual", window=2, history_frames=18)
    ref = pipe(memory="posekv", window=2, history_frames=18)
    assert isinstance(p.memory, DualMemory) and p.memory.capacity == ref.memory.capacity  # the same budget
    p.start(image())
    sizes = []
    for _ in p.stream("LRUD" * 20, callback=lambda k, fr: sizes.append(p.memory.num_tokens), progress=False):
        pass
    assert max(sizes) <= p.memory.capacity and sizes[-1] == sizes[-5]
    got = p.memory.read()
    assert got.pose is not None and len({tuple(q[:2, 3].tolist()) for q in got.pose}) > 2  # poses of many frames

    # static scores on a real StreamWorld pan: the ground explained by the previous frame moved
    # with the camera scores high; a patch painted over (something that moved) scores low
    torch.manual_seed(0)
    big = StreamingGenerationPipeline(CausalVideoDiT(sample_size=64, patch_size=8, dim=32, num_layers=1, num_heads=2),
                                      GenerationConfig(memory="dual"))
    gt = render_path(20_000, 12, 64)
    t = next(i for i in range(1, 12) if not np.array_equal(gt[i].pose, gt[i - 1].pose))
    x = lambda a: torch.from_numpy(a).permute(2, 0, 1).float() / 127.5 - 1  # noqa: E731
    big._last = (x(gt[t - 1].image), gt[t - 1].pose)
    moved = gt[t].image.copy()
    moved[24:32, 24:32] = 255 - moved[24:32, 24:32]
    scores = big.static_scores(x(moved), gt[t].pose)
    assert scores.shape == (64,)
    assert scores[3 * 8 + 3] < 0.2 and float(scores.median()) > 0.6


def test_a_world_frame_starts_at_its_pose():
    f = next(iter(World(seed=4, size=32, frames=1)))
    p = pipe()
    first = p.start(f)
    assert np.allclose(first.pose, f.pose) and first.image.shape == (16, 16, 3)


def test_bad_input_gets_clear_errors():
    p = pipe()
    with pytest.raises(RuntimeError, match="start"):
        list(p.stream("R", progress=False))
    p.start(image())
    with pytest.raises(ValueError, match="unknown action 'X'"):
        list(p.stream("RX", progress=False))
    with pytest.raises(ValueError, match="num_frames must be >= 1"):
        list(p.stream("R", num_frames=0, progress=False))
    with pytest.raises(ValueError, match="RGB uint8"):
        p.start(np.zeros((8, 8), np.float32))
    with pytest.raises(ValueError, match=r"does not know the prompt words \['sunset'\]; it knows \['clean', 'hard'\]"):
        p.start(image(), prompt="clean sunset")
    with pytest.raises(ValueError, match="GenerationConfig.memory"):
        GenerationConfig(memory="mem4d")
    with pytest.raises(ValueError, match="GenerationConfig.history_frames"):
        GenerationConfig(history_frames=20)


def test_eval_classes_revisits_and_scores_every_memory():
    from streammem.eval.generation import (
        classify,
        evaluate_generation,
        format_table,
        psnr,
    )

    a = (0, 0, 0, 0)
    b, c = (1, 0, 0, 0), (2, 0, 0, 0)
    # held still, moved, a quick return (2 frames back), then a return after 5 frames
    assert classify([a, a, b, a, c, c, b, c, b, a], window=2) == ["", "", "novel", "within", "novel", "",
                                                                   "beyond", "within", "within", "beyond"]
    img = np.full((4, 4, 3), 100, np.uint8)
    assert psnr(img, img) == 100.0 and abs(psnr(img, img + 1) - 48.13) < 0.01
    res = evaluate_generation(tiny(), seeds=(15,), frames=12, steps=1, window=2, history_frames=18, progress=False)
    assert set(res["summary"]) == {"window", "full", "posekv", "posekv_nopose", "dual"}
    assert len(res["records"]) == 5 * 11 and all(np.isfinite(r["psnr"]) for r in res["records"])
    assert res["summary"]["window"]["tokens_max"] < res["summary"]["full"]["tokens_max"]
    assert "| posekv |" in format_table(res["summary"])
    # the copy bound: the model's own frame at the place's first visit against the truth
    from streammem.eval.generation import render_path

    gt = render_path(15, 12, res["setup"]["size"])
    states = [f.info["gt"]["camera"]["state"] for f in gt]
    revisits = [r for r in res["records"] if r["kind"] in ("within", "beyond")]
    assert revisits
    for r in revisits:
        first = states.index(states[r["frame"]])
        assert first < r["frame"] and r["psnr_copy"] == psnr(res["frames"][r["memory"]][first], gt[r["frame"]].image)
    from streammem.eval.generation import frame_strip

    assert set(res["frames"]) == {"truth", "window", "full", "posekv", "posekv_nopose", "dual"}
    assert all(len(v) == 12 for v in res["frames"].values())
    strip = frame_strip(res["frames"], columns=4, scale=2)
    assert strip.shape == (6 * (32 + 4) + 20, 120 + 4 * (32 + 4), 3)
    assert np.array_equal(strip[20:52, 120:152], np.kron(res["frames"]["truth"][0], np.ones((2, 2, 1), np.uint8)))


def test_the_shipped_generator_continues_a_world_seeded():
    from streammem.eval.generation import psnr
    from streammem.pipelines.jobs import load_default_generator

    first = next(iter(World(seed=20_000, preset="clean", size=64, frames=1)))
    runs = []
    for _ in range(2):
        gen = load_default_generator(config=GenerationConfig(num_inference_steps=4, seed=3))
        runs.append(gen(first, "RRSS", prompt="clean", progress=False).frames)
    assert all(np.array_equal(a.image, b.image) for a, b in zip(*runs))  # same seed, same frames
    made = runs[0]
    assert [f.image.shape for f in made] == [(64, 64, 3)] * 4
    # a trained model continues the scene: its first frame is far closer to the start frame than noise is
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert psnr(made[0].image, first.image) > psnr(noise, first.image) + 5
