"""CausalVideoDiT (generation head model) and its training helpers, on tiny seeded configs."""

import numpy as np
import pytest
import torch

from streammem.memory import PoseKVMemory
from streammem.models.video_dit import ChunkContext, CausalVideoDiT, sample_chunk
from streammem.train.generator import ClipSampler, TrainConfig, flow_loss, reverse_actions
from streammem.types import Tokens

TINY = dict(sample_size=16, patch_size=4, dim=32, num_layers=2, num_heads=2, mlp_ratio=2.0)


def _model(seed=0):
    torch.manual_seed(seed)
    m = CausalVideoDiT(**TINY)
    # the output projection and adaLN start at zero (DiT init); give them weights so outputs depend on inputs
    with torch.no_grad():
        for p in m.parameters():
            if p.abs().sum() == 0 and p.ndim == 2:
                p.normal_(0, 0.05)
    return m.eval()


def _pose(x):
    p = torch.eye(4)
    p[0, 3], p[2, 3] = x, -1000.0
    return p


def _inputs(b=2, f=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, f, 3, 16, 16, generator=g)
    poses = torch.stack([torch.stack([_pose(10.0 * (i + j)) for j in range(f)]) for i in range(b)])
    actions = torch.zeros(b, f, 13)
    actions[..., 0] = 1.0
    return x, torch.full((b,), 500.0), actions, poses, torch.tensor([[2, 0], [3, 0]])[:b]


def _context(m, b=2, frames=5, seed=2):
    g = torch.Generator().manual_seed(seed)
    reads = []
    for _ in range(b):
        mem = PoseKVMemory(dim=m.patch_dim, height=m.grid_side, width=m.grid_side, window=2, history_frames=18,
                           retrieval="all")
        for i in range(frames):
            mem.write(m.frame_tokens(torch.rand(3, 16, 16, generator=g) * 2 - 1, _pose(20.0 * i), i, i / 4))
        reads.append(mem.read())
    return ChunkContext.from_tokens(reads)


def test_save_load_round_trip(tmp_path):
    m = _model()
    args = _inputs()
    ctx = _context(m)
    with torch.no_grad():
        before = m(*args, context=ctx)
    m.save_pretrained(tmp_path)
    m2 = CausalVideoDiT.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        after = m2(*args, context=ctx)
    assert torch.equal(before, after)
    assert m2.config.dim == 32 and tuple(m2.config.vocab) == tuple(m.config.vocab)


def test_pose_reaches_queries_and_keys_not_values():
    m = _model()
    x, t, a, poses, ids = _inputs()
    ctx = _context(m)
    attn = m.blocks[0].attn
    seen = {}

    def hook(name):
        def f(_mod, _inp, out):
            seen.setdefault(name, []).append(out.detach().clone())
        return f

    hooks = [getattr(attn, n).register_forward_hook(hook(n)) for n in ("to_q", "to_k", "to_v", "pose_q", "pose_k")]
    with torch.no_grad():
        m(x, t, a, poses, ids, context=ctx)
        moved = poses.clone()
        moved[..., 0, 3] += 300.0
        ctx2 = ChunkContext(ctx.tokens, ctx.pose.clone(), ctx.grid, ctx.level, ctx.mask)
        ctx2.pose[..., 1, 3] += 300.0
        m(x, t, a, moved, ids, context=ctx2)
    for h in hooks:
        h.remove()
    # to_v is called on chunk then context tokens; its outputs do not change with the poses
    for v1, v2 in zip(seen["to_v"][:2], seen["to_v"][2:]):
        assert torch.equal(v1, v2)
    # to_q / to_k are pose-free projections too; the pose enters through pose_q / pose_k added to them
    assert torch.equal(seen["to_q"][0], seen["to_q"][1])
    assert not torch.allclose(seen["pose_q"][0], seen["pose_q"][1])
    assert not torch.allclose(seen["pose_k"][0], seen["pose_k"][2])
    # so the first layer's attention weights (chunk queries over chunk keys) change with the pose
    def weights(pq, pk):
        q, k = seen["to_q"][0] + pq, seen["to_k"][0] + pk
        return torch.softmax(q @ k.transpose(1, 2) / 32 ** 0.5, -1)

    w1 = weights(seen["pose_q"][0], seen["pose_k"][0])
    w2 = weights(seen["pose_q"][1], seen["pose_k"][2])
    assert (w1 - w2).abs().max() > 1e-4
    # and the model has no path from the pose code to the values
    assert not any("pose" in n and "to_v" in n for n, _ in m.named_parameters())


def test_pose_ablation_changes_output():
    m = _model()
    args = _inputs()
    ctx = _context(m)
    with torch.no_grad():
        a = m(*args, context=ctx)
        b = m(*args, context=ctx, use_pose=False)
    assert not torch.allclose(a, b)


def test_training_steps_reduce_loss_on_fixed_batch():
    torch.manual_seed(0)
    m = CausalVideoDiT(**TINY).train()
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(4, 2, 3, 16, 16, generator=g) * 2 - 1
    batch = {"x0": x0, "actions": torch.zeros(4, 2, 13), "poses": torch.eye(4).expand(4, 2, 4, 4),
             "prompt_ids": torch.ones(4, 1, dtype=torch.int64), "context": _context(m, b=4)}
    sigma = torch.tensor([0.2, 0.4, 0.6, 0.8])
    noise = torch.randn(x0.shape, generator=g)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = flow_loss(m, batch, sigma, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_sample_chunk_shape_and_finite():
    m = _model()
    _, _, a, poses, ids = _inputs()
    out = sample_chunk(m, a, poses, ids, _context(m), num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 2, 3, 16, 16)
    assert torch.isfinite(out).all() and out.abs().max() <= 1


def test_context_and_anchor_change_output():
    m = _model()
    _, _, a, poses, ids = _inputs()
    kw = dict(num_inference_steps=3)
    anchor = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    kw["anchor"] = anchor
    with_ctx = sample_chunk(m, a, poses, ids, _context(m), generator=torch.Generator().manual_seed(0), **kw)
    other_ctx = sample_chunk(m, a, poses, ids, _context(m, seed=9), generator=torch.Generator().manual_seed(0), **kw)
    none = sample_chunk(m, a, poses, ids, None, generator=torch.Generator().manual_seed(0), **kw)
    assert (with_ctx - none).abs().max() > 1e-3
    assert (with_ctx - other_ctx).abs().max() > 1e-3
    kw["anchor"] = -anchor
    other_anchor = sample_chunk(m, a, poses, ids, _context(m), generator=torch.Generator().manual_seed(0), **kw)
    assert (with_ctx - other_anchor).abs().max() > 1e-3


def test_padded_context_equals_unpadded():
    m = _model()
    x, t, a, poses, ids = _inputs(b=1)
    short = _context(m, b=1, frames=2)
    long = _context(m, b=1, frames=5)
    def tokens(c):
        n = len(c)
        return Tokens(c.tokens[0], torch.zeros(n, dtype=torch.int64), torch.zeros(n), c.grid[0],
                      torch.zeros(n, dtype=torch.int64), c.pose[0], extras={"pool": c.level[0]})

    padded = ChunkContext.from_tokens([tokens(short), tokens(long)])
    assert len(padded) == len(long) > len(short)
    with torch.no_grad():
        alone = m(x, t, a, poses, ids, context=short)
        both = m(x.expand(2, -1, -1, -1, -1), t.expand(2), a.expand(2, -1, -1), poses.expand(2, -1, -1, -1),
                 ids.expand(2, -1), context=padded)
    assert torch.allclose(alone[0], both[0], atol=1e-5)


def test_training_context_matches_posekv_memory():
    cfg = TrainConfig(batch_size=2, clip_frames=30, window=3)
    m = CausalVideoDiT(**TINY)
    sampler = ClipSampler(cfg, {}, m, np.random.default_rng(0))
    g = torch.Generator().manual_seed(4)
    frames = torch.rand(2, 25, 3, 16, 16, generator=g) * 2 - 1
    poses = torch.stack([torch.stack([_pose(float(i + 7 * b)) for i in range(25)]) for b in range(2)])
    ctx = sampler.context(frames, poses)
    for b in range(2):
        mem = sampler.memory()
        for i in range(25):
            mem.write(m.frame_tokens(frames[b, i], poses[b, i], i, i / 4))
        r = mem.read()
        assert len(r) == len(ctx) < 25 * 16
        assert torch.allclose(r.features, ctx.tokens[b], atol=1e-6)
        assert torch.equal(r.grid, ctx.grid[b]) and torch.equal(r.extras["pool"], ctx.level[b]) and torch.equal(r.pose, ctx.pose[b])


def test_reverse_actions_inverts_directions():
    a = np.zeros((3, 13), np.float32)
    a[1, 0] = 2.0  # right
    a[2, 4] = 1.5  # forward
    r = reverse_actions(a)
    assert r[0, 12] == 1.0
    assert r[1, 5] == 1.5 and r[2, 1] == 2.0  # backward, then left
    assert r.sum() == pytest.approx(1.0 + 1.5 + 2.0)


def test_bad_inputs_raise():
    m = _model()
    x, t, a, poses, ids = _inputs()
    with pytest.raises(ValueError, match="sample must be"):
        m(x[..., :8], t, a, poses, ids)
    with pytest.raises(ValueError, match="actions must be"):
        m(x, t, a[..., :5], poses, ids)
    with pytest.raises(ValueError, match="no pose"):
        ChunkContext.from_tokens([Tokens.from_grid(torch.zeros(4, 4, 48), frame_index=0, timestamp=0.0)])


def test_ground_points_invert_streamworld_projection():
    from streammem.models.video_dit import ground_points
    from streammem.world.scene import CameraState, plane_to_image

    cam = CameraState(x=700 * 16, y=810 * 16, zoom=12, roll=57)
    m = plane_to_image(cam, (64, 64))
    uv = torch.tensor([[0.0, 0.0], [10.0, 20.0], [63.0, 40.0]])
    world = ground_points(torch.from_numpy(cam.pose()).float(), uv, focal=125.0, size=64)
    back = world.double().numpy() @ m[:, :2].T + m[:, 2]
    assert np.allclose(back, uv.numpy(), atol=1e-3)


def test_reproject_follows_the_camera_on_streamworld():
    from streammem.eval.generation import psnr, render_path
    from streammem.models.video_dit import reproject

    gt = render_path(20_000, 12, 64)
    img = lambda f: torch.from_numpy(f.image).permute(2, 0, 1)[None].float()  # noqa: E731
    pose = lambda f: torch.from_numpy(f.pose)[None].float()  # noqa: E731
    same, valid = reproject(img(gt[3]), pose(gt[3]), pose(gt[3]), 125.0)
    assert valid.all() and torch.allclose(same, img(gt[3]), atol=0.02)  # its own pose: identity
    moved = [t for t in range(1, 12) if not np.array_equal(gt[t].pose, gt[t - 1].pose)]
    assert len(moved) >= 3
    gain = []
    for t in moved:
        warped, valid = reproject(img(gt[t - 1]), pose(gt[t - 1]), pose(gt[t]), 125.0)
        out = (warped + img(gt[t - 1]) * (1 - valid))[0].permute(1, 2, 0).round().clamp(0, 255).byte().numpy()
        gain.append(psnr(out, gt[t].image) - psnr(gt[t - 1].image, gt[t].image))
    assert np.mean(gain) > 3.0  # the previous view moved with the camera is much closer than the view as is


def test_reprojecting_model_starts_from_the_reprojected_anchor():
    from streammem.models.video_dit import reproject

    torch.manual_seed(0)
    m = CausalVideoDiT(**TINY, reproject=True, world_bias=True, focal_px=31.25).eval()
    x, t, actions, poses, prompt = _inputs()
    anchor = torch.rand(2, 3, 16, 16) * 2 - 1
    a_pose = poses[:, 0] @ torch.diag(torch.tensor([1.0, 1.0, 1.0, 1.0]))
    a_pose[:, 0, 3] -= 40.0
    v = m(x, t, actions, poses, prompt, None, anchor, anchor_pose=a_pose)
    x0_hat = x - 0.5 * v  # s = 0.5; the output projection starts at zero
    warped, _ = reproject(anchor.repeat_interleave(2, 0), a_pose.repeat_interleave(2, 0), poses.reshape(4, 4, 4), 31.25)
    assert torch.allclose(x0_hat, warped.reshape(2, 2, 3, 16, 16), atol=1e-5)
    with pytest.raises(ValueError, match="anchor_pose"):
        m(x, t, actions, poses, prompt, None, anchor)
    # two anchors: each pixel from the first whose re-projection covers it, the second elsewhere
    first = torch.rand(2, 3, 16, 16) * 2 - 1
    f_pose = a_pose.clone()
    f_pose[:, 0, 3] += 70.0  # off to the other side: it covers part of each frame
    v2 = m(x, t, actions, poses, prompt, None, torch.stack([first, anchor], 1),
           anchor_pose=torch.stack([f_pose, a_pose], 1))
    w1, c1 = reproject(first.repeat_interleave(2, 0), f_pose.repeat_interleave(2, 0), poses.reshape(4, 4, 4), 31.25)
    want = torch.where(c1 > 0, w1, warped).reshape(2, 2, 3, 16, 16)
    assert 0 < c1.mean() < 1 and torch.allclose(x - 0.5 * v2, want, atol=1e-5)
    # the same frame twice is the frame once
    v3 = m(x, t, actions, poses, prompt, None, torch.stack([anchor, anchor], 1),
           anchor_pose=torch.stack([a_pose, a_pose], 1))
    assert torch.allclose(v3, v, atol=1e-6)
    with pytest.raises(ValueError, match="anchor_pose"):
        m(x, t, actions, poses, prompt, None, torch.stack([first, anchor], 1), anchor_pose=a_pose)
    # prepared once per chunk (what sample_chunk does), the same result at every step
    prepared = m.prepare_anchor(torch.stack([first, anchor], 1), torch.stack([f_pose, a_pose], 1), poses)
    assert torch.equal(m(x, t, actions, poses, prompt, None, prepared), v2)
    with pytest.raises(ValueError, match="the prepared anchor is for"):
        m(x[:, :1], t, actions[:, :1], poses[:, :1], prompt, None, prepared)


def test_ground_distance_bias_prefers_keys_over_the_same_ground():
    torch.manual_seed(0)
    m = CausalVideoDiT(**TINY, world_bias=True, focal_px=31.25)
    _, _, _, poses, _ = _inputs(b=1, f=1)
    s = m.grid_side
    ys, xs = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
    grid = torch.stack([ys.reshape(-1), xs.reshape(-1)], 1).float()
    # context: the same frame's tokens, and a frame shifted by exactly one token to the right
    shifted = poses[0, 0].clone()
    shifted[0, 3] += m.config.patch_size * 1000.0 / 31.25
    ctx = ChunkContext(torch.zeros(1, 2 * s * s, m.patch_dim),
                       torch.cat([poses[0, 0].expand(s * s, 4, 4), shifted.expand(s * s, 4, 4)])[None],
                       torch.cat([grid, grid])[None], torch.ones(1, 2 * s * s, dtype=torch.int64),
                       torch.ones(1, 2 * s * s, dtype=torch.bool))
    d = m._ground_distance(poses, grid, m._token_ground(ctx.pose, ctx.grid))[0]  # (hw, 2 hw + hw)
    n = s * s
    assert torch.allclose(d[:, :n].diagonal(), torch.zeros(n), atol=1e-4)  # same pose, same token
    # token (r, c) of the query sits over token (r, c - 1) of the shifted frame
    i = 1 * s + 2
    assert d[i, n:2 * n].argmin().item() == 1 * s + 1 and d[i, n + 1 * s + 1] < 1e-4
    gamma = torch.nn.functional.softplus(m.blocks[0].world_gamma)
    assert gamma[0] > gamma[-1] > 0  # heads from local to nearly global


def test_a_prepared_context_gives_the_same_output():
    m = _model()
    x, t, actions, poses, prompt = _inputs()
    mem = PoseKVMemory(dim=m.patch_dim, height=4, width=4, window=2, history_frames=18, retrieval="all")
    for i in range(5):
        mem.write(m.frame_tokens(torch.rand(3, 16, 16) * 2 - 1, _pose(5.0 * i).numpy(), i, i / 4))
    ctx = ChunkContext.from_tokens([mem.read(), mem.read()])
    for use_pose in (True, False):
        ready = m.prepare_context(ctx, use_pose)
        assert torch.equal(m(x, t, actions, poses, prompt, ctx, use_pose=use_pose),
                           m(x, t, actions, poses, prompt, ready, use_pose=use_pose))
    with pytest.raises(ValueError, match="use_pose"):
        m(x, t, actions, poses, prompt, m.prepare_context(ctx, True), use_pose=False)
