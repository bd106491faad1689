"""Mechanism tests: each memory and press keeps what its rule says."""

import math

import pytest
import torch

from streammem.memory import (
    DualMemory, ErrorBank, FeatureBank, FeatureQuery, H2OPress, KVCacheMemory, KVMergerPress, MiKVPress, PoseKVMemory,
    PoseQuery, SinkWindowPress, TimestepQuery,
)
from streammem.memory.presses import ComposedPress, quantize
from streammem.types import Tokens


def chi2_critical(df, z=3.09):
    """Upper 0.999 quantile of chi-square (Wilson-Hilferty approximation)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi2(counts):
    counts = torch.as_tensor(counts, dtype=torch.float64)
    e = counts.mean()
    return float(((counts - e) ** 2 / e).sum())


def routed(tokens, static):
    """``tokens`` with DualMemory's static/dynamic score ``static``."""
    tokens.extras["static"] = torch.as_tensor(static, dtype=torch.float32)
    return tokens


def row(n, dim, frame, feats=None):
    f = torch.randn(n, dim) if feats is None else feats
    return Tokens.from_grid(f[None], frame_index=frame, timestamp=float(frame))


# ---------------------------------------------------------------------------------- FeatureBank
def test_feature_bank_eviction_is_uniform():
    size = 50
    bank = FeatureBank(dim=2, max_size=size, key_size=5, seed=7)
    for i in range(size):
        bank.write(row(1, 2, i))
    assert bank.num_tokens == size and bank.counters["evictions"] == 0
    hits = torch.zeros(size)
    for i in range(size, size + 5000):
        before = bank.slots.frame_index.clone()
        bank.write(row(1, 2, i))
        changed = (bank.slots.frame_index != before).nonzero().flatten()
        assert len(changed) == 1
        hits[changed] += 1
    assert bank.counters["evictions"] == 5000
    assert chi2(hits) < chi2_critical(size - 1)
    # several at once: exactly len(new) distinct old entries leave
    before = set(bank.slots.frame_index.tolist())
    bank.write(row(7, 2, 10_000))
    after = bank.slots.frame_index.tolist()
    assert after.count(10_000) == 7 and len(before - set(after)) == 7


def test_feature_bank_fills_before_evicting_and_keys_are_uniform():
    size, k = 40, 8
    bank = FeatureBank(dim=2, max_size=size, key_size=k, seed=3)
    bank.write(row(3, 2, 0))
    assert len(bank.read()) == 3  # fewer than key_size: the whole bank
    for i in range(1, 20):
        bank.write(row(3, 2, i))
    assert bank.num_tokens == size and bank.counters["evictions"] == 3 * 20 - size
    ids = bank.slots.grid[:, 1] * 1000 + bank.slots.frame_index  # unique id per stored entry
    counts = torch.zeros(size)
    for _ in range(3000):
        keys = bank.read()
        assert len(keys) == k
        kid = keys.grid[:, 1] * 1000 + keys.frame_index
        pos = torch.nonzero(kid[:, None] == ids[None]).T[1]
        assert len(set(pos.tolist())) == k  # a key set has no repeats
        counts[pos] += 1
    assert chi2(counts) < chi2_critical(size - 1)
    # two reads give different (fresh) key sets
    assert not torch.equal(bank.read().frame_index, bank.read().frame_index)


def test_feature_bank_recent_keys_are_the_newest_and_the_rest_uniform():
    size, k, r = 40, 8, 3
    bank = FeatureBank(dim=2, max_size=size, key_size=k, recent=r, seed=5)
    for i in range(size):
        bank.write(row(1, 2, i))
    counts = torch.zeros(size)
    for _ in range(3000):
        keys = bank.read()
        fi = keys.frame_index
        assert len(keys) == k and len(set(fi.tolist())) == k  # no repeats
        assert sorted(fi[:r].tolist()) == [size - 3, size - 2, size - 1]  # the newest first
        counts[fi[r:]] += 1
    assert counts[size - r:].sum() == 0
    assert chi2(counts[: size - r]) < chi2_critical(size - r - 1)
    with pytest.raises(ValueError, match="recent"):
        FeatureBank(dim=2, max_size=size, key_size=k, recent=k + 1)


# ---------------------------------------------------------------------------------- ErrorBank
def test_error_bank_bins_follow_shifted_flow_matching_schedule():
    bank = ErrorBank(dim=4)
    shift, n = 5.0, 50

    def shifted(s):
        return shift * s / (1 + (shift - 1) * s)

    s = torch.linspace(1.0, shifted(1 / 1000), n, dtype=torch.float64)
    expect = 1000 * shifted(s)
    assert len(bank.bin_timesteps) == 50
    torch.testing.assert_close(bank.bin_timesteps.double(), expect, atol=1e-3, rtol=0)
    # an error goes to its nearest bin
    for b in (0, 7, 49):
        t = float(bank.bin_timesteps[b]) + 0.1
        bank.add(torch.randn(4), t, side="noise")
        assert bank.stats()["fill_noise"][b] == 1
    assert sum(bank.stats()["fill_clean"]) == 0


def test_error_bank_l2_replacement_and_sampling():
    bank = ErrorBank(dim=3, per_bin=3, seed=1)
    t = float(bank.bin_timesteps[10])
    stored = torch.tensor([[10.0, 0, 0], [0, 10.0, 0], [0, 0, 10.0]])
    bank.add(stored, t, side="clean")
    bank.add(torch.tensor([0.5, 9.0, 0.2]), t, side="clean")  # nearest (L2) to the second
    got = bank.errors[1, 10].float()
    assert torch.equal(got[0], stored[0]) and torch.equal(got[2], stored[2])
    assert torch.equal(got[1], torch.tensor([0.5, 9.0, 0.2]))
    assert bank.counters["replacements"] == 1 and bank.stats()["fill_clean"][10] == 3
    # sampling from a bin draws only that bin's errors; from all bins, any stored one
    bank.add(torch.tensor([-1.0, -1, -1]), float(bank.bin_timesteps[30]), side="clean")
    one = bank.sample(200, side="clean", timestep=t)
    assert all(any(torch.equal(x, y) for y in got) for x in one)
    every = bank.sample(400, side="clean")
    assert (every == -1).all(1).any() and not (one == -1).all(1).any()
    # from the bins whose timestep lies in a range: only those bins' errors
    lo, hi = float(bank.bin_timesteps[32]), float(bank.bin_timesteps[28])
    ranged = bank.sample(100, side="clean", between=(lo, hi))
    assert len(ranged) == 100 and (ranged == -1).all(1).all()
    assert len(bank.sample(5, side="clean", between=(0.0, float(bank.bin_timesteps[40])))) == 0
    assert len(bank.sample(5, side="noise")) == 0
    # a read of one bin (TimestepQuery) gives its errors, tagged by bank and timestep
    near = bank.read(TimestepQuery(torch.tensor([t]), banks=1))
    assert torch.equal(near.features, got) and near.extras["bank"].tolist() == [1, 1, 1]
    assert torch.allclose(near.extras["timestep"], torch.full((3,), t)) and near.score is None
    scaled = ErrorBank(dim=3, per_bin=3, scale_margin=0.2)
    scaled.add(torch.ones(3), t, side="noise")
    x = scaled.sample(500, side="noise", timestep=t)[:, 0]
    assert x.min() >= 0.8 and x.max() <= 1.2 and x.std() > 0.05


def test_error_bank_byte_cap_and_half_precision():
    dim = 1000
    cap = 2_000_000
    full = ErrorBank(dim=dim, per_bin=500, max_bytes=cap)
    assert full.nbytes <= cap and full.per_bin < 500
    half = ErrorBank(dim=dim, per_bin=500, max_bytes=cap, dtype="float16")
    assert half.nbytes <= cap and half.per_bin >= int(1.9 * full.per_bin)
    t = float(full.bin_timesteps[0])
    for _ in range(3 * full.per_bin):
        full.add(torch.randn(dim), t, side="noise")
    assert full.stats()["fill_noise"][0] == full.per_bin and full.nbytes <= cap
    x = torch.randn(dim)
    half.add(x, t, side="clean")
    torch.testing.assert_close(half.read().features[0], x, atol=2e-3, rtol=1e-3)
    with pytest.raises(ValueError, match="max_bytes"):
        ErrorBank(dim=dim, max_bytes=1000)


# ---------------------------------------------------------------------------------- PoseKVMemory
def pose_at(i, x=None):
    p = torch.eye(4)
    p[0, 3] = float(i if x is None else x)
    return p


def test_posekv_about_4x_fewer_tokens_than_full_history():
    mem = PoseKVMemory(dim=2)  # RELIC: 30x52 latents, schedule S, window 7, 72 history frames
    for i in range(200):
        mem.write(Tokens.from_grid(torch.randn(30, 52, 2), i, i / 16, pose=pose_at(i)))
    s = mem.stats()
    assert s["frames_held"] == 79
    assert 3.7 <= s["token_ratio"] <= 4.5, s["token_ratio"]
    # the per-axis schedule keeps 1/6 of a frame on average, so a long history tends to 6x
    long = PoseKVMemory(dim=1, height=8, width=8, window=1, history_frames=18 * 20)
    for i in range(18 * 20 + 1):
        long.write(Tokens.from_grid(torch.randn(8, 8, 1), i, float(i), pose=pose_at(i)))
    assert 5.5 <= long.stats()["token_ratio"] <= 6.0


def test_posekv_schedule_poses_and_qk_only_embedding():
    h, w = 8, 8
    mem = PoseKVMemory(dim=24, value_dim=3, height=h, width=w, window=3, history_frames=18)
    for i in range(25):
        mem.write(Tokens.from_grid(torch.randn(h, w, 24), i, i / 4, pose=pose_at(i)),
                  values=torch.full((h * w, 3), float(i)))
    out = mem.read()
    # every token carries its own frame's pose
    assert torch.equal(out.pose[:, 0, 3], out.frame_index.float())
    # the window holds the last 3 frames at full resolution; older frames follow S[i % 18]
    from streammem.memory import RELIC_SCHEDULE
    for f in range(25):
        n = int((out.frame_index == f).sum())
        if f >= 22:
            assert n == h * w
        elif f >= 25 - 3 - 18:
            s = RELIC_SCHEDULE[f % 18]
            assert n == math.ceil(h / s) * math.ceil(w / s)
            assert int(out.extras["pool"][out.frame_index == f][0]) == s
            assert int(out.level[out.frame_index == f][0]) == {1: 0, 2: 1, 4: 2}[s]  # scale rank
        else:
            assert n == 0
    keys, values, tokens = mem.kv()
    emb = keys - tokens.features
    for f in (5, 23):
        sel = tokens.frame_index == f
        expect = mem.embed_pose(pose_at(f)[None])
        torch.testing.assert_close(emb[sel], expect.expand(int(sel.sum()), -1))
        assert torch.all(values[sel] == float(f))  # values untouched by poses (pooled constants)
    q = torch.zeros(2, 24)
    torch.testing.assert_close(mem.embed_query(q, pose_at(9)), mem.embed_pose(pose_at(9)[None]).expand(2, -1))


def test_posekv_retrieval_by_overlap_and_budget():
    h, w = 4, 4
    mem = PoseKVMemory(dim=2, height=h, width=w, window=1, history_frames=18, schedule=(1,), token_budget=48,
                       age_weight=0.0)
    # cameras along x, all looking down +z; far-apart ones see different points
    for i in range(12):
        mem.write(Tokens.from_grid(torch.randn(h, w, 2), i, float(i), pose=pose_at(i, x=10.0 * i)))
    got = mem.read(PoseQuery(pose_at(0, x=30.0)))
    frames = sorted(set(got.frame_index.tolist()) - {11})  # frame 11 is the window
    assert 3 in frames and len(frames) <= 3
    assert len(got) - h * w <= 48
    dist = PoseKVMemory(dim=2, height=h, width=w, window=1, history_frames=18, schedule=(1,), token_budget=32,
                        retrieval="distance")
    for i in range(12):
        dist.write(Tokens.from_grid(torch.randn(h, w, 2), i, float(i), pose=pose_at(i, x=10.0 * i)))
    near = sorted(set(dist.read(PoseQuery(pose_at(0, x=52.0))).frame_index.tolist()) - {11})
    assert near == [5, 6]


# ---------------------------------------------------------------------------------- DualMemory
def test_dual_routes_by_threshold_and_tags_parts():
    mem = DualMemory(dim=4, slots=32, fifo_frames=2, max_tokens_per_frame=16, threshold=0.3, skip_cos=1.0)
    g = torch.Generator().manual_seed(0)
    total_static = 0
    for i in range(4):
        score = torch.rand(16, generator=g)
        total_static += int((score >= 0.3).sum())
        t = routed(Tokens.from_grid(torch.randn(4, 4, 4, generator=g), i, float(i)), score)
        mem.write(t)
        out = mem.read()
        dyn = out.extras["part"] == 1
        # the FIFO holds exactly this frame's (and the previous frame's) dynamic tokens
        last = out.frame_index[dyn] == i
        assert int(last.sum()) == int((score < 0.3).sum())
        assert torch.equal(out.features[dyn][last], t.features[score < 0.3])
        static = out.extras["static"]
        assert torch.all(static[~dyn] >= 0.3) and torch.all(static[dyn] < 0.3) and out.score is None
    s = mem.stats()
    assert s["routed_static"] == total_static and s["static_tokens"] == min(total_static, 32)
    assert set(mem.read().frame_index[mem.read().extras["part"] == 1].tolist()) == {2, 3}
    # all-dynamic writes (their own path): the FIFO keeps the newest frames, tagged dynamic; the
    # persistent part and its count are untouched; the evicted frames are counted
    before, n_static, dyn_before = mem.stats(), mem.stats()["static_tokens"], mem.stats()["routed_dynamic"]
    evicted = mem.stats()["dynamic_tokens"]  # the two frames now in the FIFO leave it
    for i in (4, 5):
        t = routed(Tokens.from_grid(torch.randn(2, 3, 4, generator=g), i, float(i), level=7), torch.zeros(6))
        mem.write(t)
    out = mem.read()
    assert mem.stats()["static_tokens"] == n_static and mem.stats()["routed_static"] == before["routed_static"]
    assert mem.stats()["routed_dynamic"] == dyn_before + 12
    assert mem.stats()["evictions"] == before["evictions"] + evicted
    dyn = out.extras["part"] == 1
    assert out.frame_index[dyn].tolist() == [4] * 6 + [5] * 6
    assert (out.level[dyn] == 7).all() and not (out.level[~dyn] == 7).any()  # the written level is kept
    assert torch.equal(out.features[dyn][6:], t.features)
    with pytest.raises(ValueError, match="extras\\['static'\\]"):
        mem.write(Tokens.from_grid(torch.randn(1, 1, 4), 9, 9.0))
    # Tokens.score is an importance, not the routing score: a write with only a score is refused
    with pytest.raises(ValueError, match="extras\\['static'\\]"):
        mem.write(Tokens.from_grid(t.features[None], 5, 5.0, score=torch.zeros(6)))
    # a typed query retrieves; an untyped one is refused, naming the type it takes
    best = mem.read(FeatureQuery(t.features[:1], k=3))
    assert len(best) == 3 and torch.equal(best.features[0], t.features[0])
    with pytest.raises(TypeError, match="FeatureQuery"):
        mem.read(t.features[:1])

def test_dual_skip_merge_and_prune():
    e = torch.eye(4)
    one = torch.ones(1)
    mem = DualMemory(dim=4, slots=2, fifo_frames=1, max_tokens_per_frame=4)
    mem.write(routed(Tokens.from_grid(e[:2][None], 0, 0.0), torch.ones(2)))
    mem.write(routed(Tokens.from_grid((e[0] * 2)[None, None], 1, 1.0), one))  # cosine 1 > 0.95: skipped
    assert mem.counters["skipped"] == 1 and mem.num_tokens == 2
    x = torch.tensor([[0.9, 0.3, 0.0, 0.0]])
    mem.write(routed(Tokens.from_grid(x[None], 2, 2.0), one))  # full: merged into slot 0 (running mean)
    torch.testing.assert_close(mem.static.features[0], (e[0] + x[0]) / 2)
    assert mem.counters["merges"] == 1 and int(mem.static.frame_index[0]) == 2
    pr = DualMemory(dim=4, slots=2, fifo_frames=1, max_tokens_per_frame=4, compress="prune", skip_cos=1.0)
    pr.write(routed(Tokens.from_grid(e[:2][None], 0, 0.0), torch.ones(2)))
    pr.query(e[1:2] * 5, k=1)  # slot 1 receives most attention
    pr.write(routed(Tokens.from_grid(e[2:3][None], 1, 1.0), one))
    kept = pr.read(None)
    assert sorted(kept.features.argmax(1).tolist()) == [1, 2]  # slot 0 (least used) was pruned
    best = pr.query(e[2:3], k=1)
    assert torch.equal(best.features[0], e[2])


# ---------------------------------------------------------------------------------- presses
def ids(tokens):
    return tokens.grid[:, 1].long().tolist()


def test_sink_window_press():
    t = row(20, 3, 0)
    assert ids(SinkWindowPress(n_sink=3, window=4)(t)) == [0, 1, 2, 16, 17, 18, 19]
    assert ids(SinkWindowPress(n_sink=3, window=40)(t)) == list(range(20))
    v = torch.arange(20.0)[:, None]
    _, kv = SinkWindowPress(n_sink=1, window=2).compress(t, v)
    assert kv[:, 0].tolist() == [0.0, 18.0, 19.0]


def test_h2o_press_and_scissorhands_cache():
    score = torch.tensor([3.0, 0.1, 7.0, 0.2, 5.0, 0.0, 0.0, 0.0])
    t = Tokens.from_grid(torch.randn(1, 8, 2), 0, 0.0, score=score)
    assert ids(H2OPress(budget=5, recent=2)(t)) == [0, 2, 4, 6, 7]
    with pytest.raises(ValueError, match="score"):
        H2OPress(budget=2, recent=1)(row(5, 2, 0))
    # in a cache: the tokens that receive attention survive (H2O) ...
    keys = torch.eye(6) * 4
    for persistence in (False, True):
        cache = KVCacheMemory(dim=6, capacity=4, max_write=1,
                              press=[["h2o", {"budget": 3, "recent": 1, "persistence": persistence}]])
        for i in range(4):
            cache.write(Tokens.from_grid(keys[i][None, None], i, float(i)))
            cache.attend(keys[1:2])  # everyone asks for key 1
        cache.write(Tokens.from_grid(keys[4][None, None], 4, 4.0))  # over capacity: compress to 3
        kept = cache.read().frame_index.tolist()
        assert len(kept) == 3 and 1 in kept and 4 in kept, (persistence, kept)


def test_kvmerger_press_merges_runs_with_gaussian_weights():
    a = torch.tensor([1.0, 0.0])
    feats = torch.stack([a, a + torch.tensor([0.0, 0.1]), a + torch.tensor([0.0, 0.2]),
                         torch.tensor([0.0, 1.0]), torch.tensor([-1.0, 0.0])])
    score = torch.tensor([0.0, 5.0, 1.0, 0.0, 0.0])
    t = Tokens.from_grid(feats[None], 0, 0.0, score=score)
    values = torch.arange(5.0)[:, None]
    press = KVMergerPress(threshold=0.95, sigma=0.5)
    out, v = press.compress(t, values)
    assert len(out) == 3 and ids(out) == [1, 3, 4]  # the run's pivot (max score) gives provenance
    w = torch.exp(-((feats[:3] - feats[1]) ** 2).sum(1) / (2 * 0.5 ** 2))
    torch.testing.assert_close(out.features[0], (w[:, None] * feats[:3]).sum(0) / w.sum())
    torch.testing.assert_close(v[0, 0], (w * torch.arange(3.0)).sum() / w.sum())
    assert float(out.score[0]) == 6.0
    assert torch.equal(out.features[1:], feats[3:])
    assert len(KVMergerPress(threshold=0.95, budget=2)(t)) == 2


def test_mikv_press_keeps_evicted_tokens_in_low_precision():
    torch.manual_seed(0)
    t = row(12, 64, 0)
    inner = SinkWindowPress(n_sink=2, window=3)
    err = {}
    for bits in (4, 8):
        out = MiKVPress(inner=inner, bits=bits)(t)
        assert len(out) == 12 and ids(out) == list(range(12))
        important = [0, 1, 9, 10, 11]
        low = [i for i in range(12) if i not in important]
        assert torch.equal(out.features[important], t.features[important])
        diff = (out.features[low] - t.features[low]).abs()
        _, scale, _ = quantize(t.features[low], bits)
        assert torch.all(diff <= scale / 2 + 1e-5) and diff.max() > 0
        err[bits] = float(diff.mean())
    assert err[8] < err[4] / 8
    assert MiKVPress(bits=4).nbytes(10, 10, 64) < 20 * 64 * 2


def test_presses_compose():
    t = row(30, 2, 0)
    both = ComposedPress([SinkWindowPress(n_sink=2, window=10), SinkWindowPress(n_sink=1, window=3)])
    assert ids(both(t)) == [0, 27, 28, 29]
    assert both.max_kept() == 4


@pytest.mark.parametrize("compress", ["merge", "prune"])
def test_dual_read_rows_and_the_slot_cache_match_the_plain_rules(compress, tmp_path):
    """``read_rows(rows)`` is ``read().index(rows)``; the unit-norm slot cache a write compares
    against stays equal to the normalised slots through fills, merges, prunes, reset and load."""
    import torch.nn.functional as F
    from dataclasses import fields

    g = torch.Generator().manual_seed(0)
    mem = DualMemory(dim=8, slots=16, fifo_frames=3, max_tokens_per_frame=10, compress=compress, seed=0)

    def frame(i: int) -> Tokens:
        return Tokens(features=torch.rand(10, 8, generator=g), frame_index=torch.full((10,), i),
                      timestamp=torch.full((10,), i / 8), grid=torch.rand(10, 2, generator=g),
                      level=torch.zeros(10, dtype=torch.int64), extras={"static": torch.rand(10, generator=g)})

    for i in range(12):
        mem.write(frame(i))
        assert torch.allclose(mem._units(), F.normalize(mem.static.features, dim=1))
        full = mem.read()
        mixed = torch.randperm(len(full), generator=g)[: 1 + i]
        static_only, fifo_only = mixed[mixed < mem._n], mixed[mixed >= mem._n]  # the one-store fast paths
        for rows in (mixed, static_only, fifo_only, mixed.repeat(2), mixed[:0]):  # + duplicates, empty
            part = mem.read_rows(rows)
            for f in fields(Tokens):
                a, b = getattr(full.index(rows), f.name), getattr(part, f.name)
                if f.name == "extras":
                    assert sorted(a) == sorted(b) == ["part", "static"]
                    assert all(torch.equal(a[k], b[k]) for k in a)
                    continue
                assert (a is None and b is None) or torch.equal(a, b), f.name
    assert mem.counters["merges" if compress == "merge" else "prunes"] > 0
    with pytest.raises(IndexError, match="rows"):
        mem.read_rows(torch.tensor([mem.num_tokens]))
    mem.save(tmp_path / "dual")
    back = DualMemory.load(tmp_path / "dual")
    nxt = frame(12)
    mem.write(nxt)
    back.write(nxt)
    assert torch.equal(mem.static.features, back.static.features)
    assert torch.equal(mem.read().features, back.read().features)  # the FIFO's cached row order too
    other = DualMemory(dim=8, slots=16, fifo_frames=3, max_tokens_per_frame=10, compress=compress, seed=0)
    for i in range(5):
        other.write(frame(100 + i))
    mem.read()  # the FIFO row-order cache is in use too
    mem.load_state_dict(other.state_dict())  # into a memory whose cache is in use
    assert torch.allclose(mem._units(), F.normalize(other.static.features, dim=1))
    assert torch.equal(mem.read().features, other.read().features)  # no stale FIFO row order
    mem.reset()
    assert len(mem.read()) == 0 and mem.read_rows(torch.zeros(0, dtype=torch.int64)).features.shape == (0, 8)
    mem.write(frame(0))
    assert torch.allclose(mem._units(), F.normalize(mem.static.features, dim=1))
    # the cache is preallocated and counted: slots x dim float32 on top of the buffers
    assert mem.nbytes == sum(t.numel() * t.element_size() for t in mem._buffers.values()) + 16 * 8 * 4
