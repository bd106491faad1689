"""PyramidMemory against a plain, per-write recomputation of the published PMB rule."""

import pytest
import torch
import torch.nn.functional as F

from streammem.memory import PyramidMemory
from streammem.types import Tokens


def naive_pmb(frames, capacities, sides, ratios, order, time_penalty=0.0, evict="earlier", promotion="cascade"):
    """The rule as written in the paper, with nothing cached (plus our spread retention: a merge
    penalty per second between frames, the shorter-gap frame evicted). ``promotion="released"``
    restates the released reference code: ``_update_group``'s recursive call gets no
    ``next_group``, so the frame a promotion pushes out of the next level is dropped.

    levels[L] is a list of (grid (side, side, D), frame_index, timestamp) in list order.
    """
    levels = [[] for _ in sides]

    def pool(x, side):  # (s, s, D) -> (side, side, D), adaptive average pooling
        return F.adaptive_avg_pool2d(x.permute(2, 0, 1), side).permute(1, 2, 0)

    def put(lvl, x, fi, ts, next_group=True):
        items = levels[lvl]
        if len(items) >= capacities[lvl]:
            desc = torch.stack([it[0].mean(dim=(0, 1)) for it in items])
            if len(items) >= 2:
                cos = F.cosine_similarity(desc[1:], desc[:-1], dim=-1).double()
                times = torch.tensor([it[2] for it in items], dtype=torch.float64)
                j = int(torch.argmax(cos - time_penalty * (times[1:] - times[:-1]).abs()))
                if evict == "shorter_gap":
                    j = min((j, j + 1), key=lambda r: (gap_left(times.tolist(), r, lvl == len(sides) - 1), r))
            else:
                j = 0
            v = items.pop(j)
            if next_group and lvl + 1 < len(sides):
                put(lvl + 1, pool(v[0], sides[lvl + 1]), v[1], v[2], next_group=promotion == "cascade")
        item = (x, fi, ts)
        if order == "list":
            items.append(item)
        else:
            pos = len(items)
            while pos > 0 and (items[pos - 1][2], items[pos - 1][1]) > (ts, fi):
                pos -= 1
            items.insert(pos, item)

    for t, (x, fi, ts) in enumerate(frames):
        lvl = next(i for i, r in enumerate(ratios) if t % r == 0)
        put(lvl, pool(x, sides[lvl]), fi, ts)
    return levels


def gap_left(times, r, last_level):
    """Seconds between the frames around position r once it is taken out of ``times`` (at an end:
    the distance to its one neighbour); the last level's oldest frame is never chosen."""
    if r == 0 and last_level:
        return float("inf")
    rest = times[:r] + times[r + 1:]
    if 0 < r < len(times) - 1:
        return rest[r] - rest[r - 1]  # r's two former neighbours, now adjacent
    return abs(times[r] - times[r - 1 if r else 1])  # at an end: the distance to its one neighbour


def random_stream(n, side, dim, seed, drift=0.9):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(side, side, dim, generator=g)
    out = []
    for t in range(n):
        # a drifting stream with occasional cuts, so similarities are far from ties
        if t % 17 == 0:
            x = torch.randn(side, side, dim, generator=g)
        x = drift * x + (1 - drift) * torch.randn(side, side, dim, generator=g)
        out.append((x.clone(), t, t * 0.125))
    return out


@pytest.mark.parametrize("promotion", ["cascade", "released"])
@pytest.mark.parametrize("order", ["list", "time"])
@pytest.mark.parametrize("caps,sides,ratios", [
    ((2, 2, 12), (8, 4, 2), (8, 4, 1)),
    ((3, 4, 5), (4, 2, 1), (8, 4, 1)),
    ((5, 40, 3), (4, 2, 1), (3, 2, 1)),
    ((1, 1, 2), (4, 2, 1), (2, 1, 1)),
])
def test_pyramid_matches_naive_rule(order, caps, sides, ratios, promotion):
    dim = 6
    frames = random_stream(300, sides[0], dim, seed=sum(caps))
    mem = PyramidMemory(dim=dim, capacities=caps, sides=sides, ratios=ratios, order=order, promotion=promotion)
    for i, (x, fi, ts) in enumerate(frames):
        mem.write(Tokens.from_grid(x, frame_index=fi, timestamp=ts))
        if i % 37 == 0 or i == len(frames) - 1:
            ref = naive_pmb(frames[: i + 1], caps, sides, ratios, order, promotion=promotion)
            # same frames, at the same levels, in the same list order
            got = mem.frames()
            want = [(lvl, it[1], it[2]) for lvl, items in enumerate(ref) for it in items]
            assert got == want
            # same contents, read back sorted by time
            out = mem.read()
            flat = sorted(
                ((it[2], it[1], lvl, it[0].reshape(-1, dim)) for lvl, items in enumerate(ref) for it in items),
                key=lambda r: (r[0], r[1]),
            )
            feats = torch.cat([r[3] for r in flat])
            torch.testing.assert_close(out.features, feats, atol=1e-5, rtol=0)
            assert out.level.tolist() == sum(([r[2]] * r[3].shape[0] for r in flat), [])
            assert out.timestamp.tolist() == sum(([r[0]] * r[3].shape[0] for r in flat), [])


@pytest.mark.parametrize("penalty,evict,caps,sides,ratios", [
    (0.05, "earlier", (2, 3, 6), (4, 2, 1), (8, 4, 1)),
    (0.05, "shorter_gap", (2, 3, 6), (4, 2, 1), (8, 4, 1)),
    (1.0, "shorter_gap", (2, 3, 6), (4, 2, 1), (8, 4, 1)),
    (0.03, "shorter_gap", (2, 2, 12), (8, 4, 2), (8, 4, 1)),
    (0.03, "shorter_gap", (5, 40, 3), (4, 2, 1), (3, 2, 1)),  # a level that fills late
    (0.2, "shorter_gap", (1, 1, 2), (4, 2, 1), (2, 1, 1)),
])
def test_spread_pyramid_matches_naive_rule(penalty, evict, caps, sides, ratios):
    dim = 6
    frames = random_stream(300, sides[0], dim, seed=7)
    mem = PyramidMemory(dim=dim, capacities=caps, sides=sides, ratios=ratios, order="time", time_penalty=penalty,
                        evict=evict)
    for i, (x, fi, ts) in enumerate(frames):
        mem.write(Tokens.from_grid(x, frame_index=fi, timestamp=ts))
        if i % 29 == 0 or i == len(frames) - 1:
            ref = naive_pmb(frames[: i + 1], caps, sides, ratios, "time", penalty, evict)
            assert mem.frames() == [(lvl, it[1], it[2]) for lvl, items in enumerate(ref) for it in items]
    # the same state after a snapshot round trip, and the same retention afterwards
    twin = PyramidMemory(dim=dim, capacities=caps, sides=sides, ratios=ratios, order="time", time_penalty=penalty,
                         evict=evict)
    twin.load_state_dict(mem.state_dict())
    for x, fi, ts in random_stream(40, sides[0], dim, seed=8):
        for m in (mem, twin):
            m.write(Tokens.from_grid(x, frame_index=fi + 300, timestamp=ts + 300 / 8))
    assert twin.frames() == mem.frames()


def test_spread_retention_covers_a_long_uneventful_stream():
    """Frames that all look alike: the reference rule keeps only the newest ones (a window);
    spread retention keeps frames over the whole stream, evenly."""
    from streammem.memory import PYRAMID_SPREAD

    x = torch.ones(2, 2, 4)
    kept = {}
    for name, extra in (("reference", {}), ("spread", PYRAMID_SPREAD)):
        mem = PyramidMemory(dim=4, capacities=(20,), sides=(2,), ratios=(1,), **extra)
        for t in range(800):
            mem.write(Tokens.from_grid(x, frame_index=t, timestamp=t / 8))
        kept[name] = sorted(ts for _, _, ts in mem.frames())
    assert kept["reference"] == [t / 8 for t in range(780, 800)]
    spread = kept["spread"]
    assert len(spread) == 20 and spread[0] < 10.0 and spread[-1] == 799 / 8
    gaps = [b - a for a, b in zip(spread[:-1], spread[1:])]
    assert max(gaps) < 2.5 * (100 / 20)  # 100 s over 20 frames: no gap much over the even spacing


def test_spread_retention_lets_lower_levels_move_on_and_keeps_the_stream_start():
    """Only the last level holds on to its oldest frame; the full-resolution levels keep recent
    frames (their evicted frames move one level down, so nothing is lost by letting them go)."""
    from streammem.memory import PYRAMID_SPREAD

    mem = PyramidMemory.from_preset("ovbench", dim=4, **PYRAMID_SPREAD)
    for x, fi, ts in random_stream(800, 16, 4, seed=4):
        mem.write(Tokens.from_grid(x, frame_index=fi, timestamp=ts))
    levels = [[fi for lvl, fi, _ in mem.frames() if lvl == k] for k in range(3)]
    assert levels[0] == [784, 792] and levels[1] == [788, 796]  # the newest frames entering each
    assert levels[2][0] == 0 and levels[2][-1] == 799  # frame 0 came down from level 0; the newest frame


def test_spread_retention_still_keeps_the_odd_frame_out():
    """Among look-alikes, a frame unlike its neighbours survives: similarity still counts."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, 2, 4, generator=g)
    mem = PyramidMemory(dim=4, capacities=(12,), sides=(2,), ratios=(1,), order="time", time_penalty=0.001,
                        evict="shorter_gap")
    for t in range(400):
        x = -base if t == 123 else base + 0.01 * torch.randn(2, 2, 4, generator=g)
        mem.write(Tokens.from_grid(x, frame_index=t, timestamp=t / 8))
    assert 123 in [fi for _, fi, _ in mem.frames()]


def test_spread_options_are_checked():
    with pytest.raises(ValueError, match="time_penalty"):
        PyramidMemory(dim=4, time_penalty=-1.0)
    with pytest.raises(ValueError, match="evict"):
        PyramidMemory(dim=4, evict="random")
    with pytest.raises(ValueError, match="order"):
        PyramidMemory(dim=4, evict="shorter_gap")  # compares time gaps: needs order="time"


def test_list_order_quirk_differs_from_time_order():
    """With promotions appended at the end, list order and time order disagree on some stream."""
    frames = random_stream(200, 4, 6, seed=3)
    kept = {}
    for order in ("list", "time"):
        mem = PyramidMemory(dim=6, capacities=(2, 2, 6), sides=(4, 2, 1), order=order)
        for x, fi, ts in frames:
            mem.write(Tokens.from_grid(x, frame_index=fi, timestamp=ts))
        kept[order] = mem.frames()
    assert [f for f in kept["list"] if f[0] == 2] != [f for f in kept["time"] if f[0] == 2]
    times = [f[2] for f in kept["time"] if f[0] == 2]
    assert times == sorted(times)


def test_presets_and_read_tags():
    mem = PyramidMemory.from_preset("offline", dim=4)
    assert mem.capacity == 9984
    mem = PyramidMemory.from_preset("ovbench", dim=4)
    assert mem.capacity == 832
    for t in range(64):
        mem.write(Tokens.from_grid(torch.randn(16, 16, 4), frame_index=t, timestamp=t / 8))
    out = mem.read()
    assert len(out) == 832 and mem.num_tokens == 832
    assert torch.all(out.timestamp[1:] >= out.timestamp[:-1])
    assert out.level.bincount().tolist() == [512, 128, 192]
    # pooled tokens sit at cell centres of the 16x16 grid: level 2 cells are 4 wide
    lvl2 = out.grid[out.level == 2]
    assert set(lvl2[:, 0].tolist()) == {1.5, 5.5, 9.5, 13.5}
    with pytest.raises(ValueError, match="preset"):
        PyramidMemory.from_preset("nope", dim=4)


def test_write_rejects_non_square_frames():
    mem = PyramidMemory(dim=4)
    with pytest.raises(ValueError, match="square grid"):
        mem.write(Tokens.from_grid(torch.randn(3, 5, 4), frame_index=0, timestamp=0.0))


# ---------------------------------------------------------------- salient pooling
def test_pool_grid_salient_limits_and_object_survival():
    from streammem.memory.base import pool_grid, pool_grid_salient

    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 8, 5, generator=g)
    sal = torch.rand(8, 8, generator=g)
    # equal salience is plain average pooling; a huge temperature nearly so
    same, s_same = pool_grid_salient(x, torch.full((8, 8), 0.3), 2, 2)
    assert torch.allclose(same, pool_grid(x, 2, 2), atol=1e-6) and torch.allclose(s_same, torch.full((2, 2), 0.3))
    assert torch.allclose(pool_grid_salient(x, sal, 2, 2, temperature=1e6)[0], pool_grid(x, 2, 2), atol=1e-4)
    # a tiny temperature keeps each block's most salient token, and its salience
    tiny, s_tiny = pool_grid_salient(x, sal, 2, 2, temperature=1e-4)
    for a in range(2):
        for b in range(2):
            blk = sal[4 * a:4 * a + 4, 4 * b:4 * b + 4]
            i, j = divmod(int(blk.argmax()), 4)
            assert torch.allclose(tiny[a, b], x[4 * a + i, 4 * b + j], atol=1e-5)
            assert abs(float(s_tiny[a, b]) - float(blk.max())) < 1e-4
    # one object token in a background block: averaging dilutes it 16x, salient pooling keeps it
    bg = torch.zeros(4, 4, 5)
    bg[1, 2] = torch.tensor([1.0, 0, 0, 0, 0])
    obj_sal = torch.zeros(4, 4)
    obj_sal[1, 2] = 1.0
    pooled, ps = pool_grid_salient(bg, obj_sal, 1, 1)
    assert float(pool_grid(bg, 1, 1)[0, 0, 0]) == pytest.approx(1 / 16)
    assert float(pooled[0, 0, 0]) > 0.99 and float(ps[0, 0]) > 0.99
    with pytest.raises(ValueError, match="salience must be"):
        pool_grid_salient(x, sal[:4], 2, 2)
    with pytest.raises(ValueError, match="divide"):
        pool_grid_salient(x, sal, 3, 3)


def test_salient_pyramid_with_uniform_salience_is_the_reference():
    cfg = dict(dim=6, capacities=(2, 2, 5), sides=(4, 2, 1))
    ref, sal = PyramidMemory(**cfg), PyramidMemory(**cfg, pool="salient")
    for x, fi, ts in random_stream(60, 4, 6, seed=3):
        ref.write(Tokens.from_grid(x, fi, ts))
        sal.write(Tokens.from_grid(x, fi, ts, salience=torch.full((16,), 0.5)))
    a, b = ref.read(), sal.read()
    assert ref.frames() == sal.frames()
    assert torch.allclose(a.features, b.features, atol=1e-5) and torch.equal(a.level, b.level)
    assert a.salience is None and torch.allclose(b.salience, torch.full((len(b),), 0.5))


def test_salient_pyramid_keeps_small_objects_through_promotions():
    cfg = dict(dim=6, capacities=(1, 1, 64), sides=(4, 2, 1), ratios=(1, 1, 1))
    mean, sal = PyramidMemory(**cfg), PyramidMemory(**cfg, pool="salient")
    for t, (x, fi, ts) in enumerate(random_stream(40, 4, 6, seed=1)):
        x = 0.1 * x
        s = torch.zeros(4, 4)
        if t == 0:  # frame 0 holds one object token; it ends at the 1 x 1 level after two promotions
            x[2, 1] = torch.tensor([5.0, 0, 0, 0, 0, 0])
            s[2, 1] = 1.0
        for m in (mean, sal):
            m.write(Tokens.from_grid(x, fi, ts, salience=s.reshape(-1)))
    first = lambda m: m.read().index(m.read().frame_index == 0)  # noqa: E731
    assert int(first(sal).level[0]) == 2 and len(first(sal)) == 1
    assert float(first(sal).features[0, 0]) > 4.5  # the object, intact
    assert float(first(mean).features[0, 0]) < 0.5  # averaged into the background
    assert float(first(sal).salience[0]) > 0.9
    assert sal.stats()["frames_per_level"] == [1, 1, 38]  # every frame but the newest two came down


def test_salient_pyramid_needs_salience():
    m = PyramidMemory(dim=6, capacities=(2, 2, 5), sides=(4, 2, 1), pool="salient")
    with pytest.raises(ValueError, match="Tokens.salience"):
        m.write(Tokens.from_grid(torch.randn(4, 4, 6), 0, 0.0))
    with pytest.raises(ValueError, match="divide"):
        PyramidMemory(dim=6, sides=(6, 4, 1), pool="salient")


def test_snapshots_saved_before_a_config_field_existed_still_load():
    import json

    m = PyramidMemory(dim=6, capacities=(2, 2, 5), sides=(4, 2, 1))
    for x, fi, ts in random_stream(20, 4, 6, seed=2):
        m.write(Tokens.from_grid(x, fi, ts))
    state = m.state_dict()
    cfg = json.loads(bytes(state["meta.config"].tolist()).decode())
    del cfg["pool"], cfg["temperature"]  # as written before salient pooling was added
    state["meta.config"] = torch.tensor(list(json.dumps(cfg).encode()), dtype=torch.uint8)
    fresh = PyramidMemory(dim=6, capacities=(2, 2, 5), sides=(4, 2, 1))
    fresh.load_state_dict(state)
    assert fresh.frames() == m.frames() and torch.equal(fresh.read().features, m.read().features)
    with pytest.raises(ValueError, match="pool: snapshot 'mean' vs this 'salient'"):
        PyramidMemory(dim=6, capacities=(2, 2, 5), sides=(4, 2, 1), pool="salient").load_state_dict(state)


# ---------------------------------------------------------------- the released reference code
def test_released_promotion_first_differs_at_write_16_of_the_ovbench_preset():
    """The paper cascades promotions; the released code drops the frame a promotion pushes out of
    level 1. On the 2/2/12 preset the two first differ at write 16 (0-based): frame 16 enters a
    full level 0, frame 0 moves to a full level 1, and frame 4, pushed out of it, goes to level 2
    (cascade) or is dropped (released)."""
    frames = random_stream(200, 16, 4, seed=11)
    mems = {p: PyramidMemory.from_preset("ovbench", dim=4, promotion=p) for p in ("cascade", "released")}
    first = None
    for i, (x, fi, ts) in enumerate(frames):
        for m in mems.values():
            m.write(Tokens.from_grid(x, frame_index=fi, timestamp=ts))
        if first is None and mems["cascade"].frames() != mems["released"].frames():
            first = i
    assert first == 16
    assert mems["released"].stats()["promotions"] < mems["cascade"].stats()["promotions"]
    # both still keep within the preset's budget, and each matches its naive restatement
    for p, m in mems.items():
        assert m.num_tokens <= 832
        ref = naive_pmb(frames, (2, 2, 12), (16, 8, 4), (8, 4, 1), "list", promotion=p)
        assert m.frames() == [(lvl, it[1], it[2]) for lvl, items in enumerate(ref) for it in items]


@pytest.mark.parametrize("promotion", ["cascade", "released"])
def test_promotion_rules_match_naive_on_a_held_out_stream(promotion):
    """A few hundred writes of another stream (seed not used above) on the 2/2/12 preset."""
    dim = 4
    frames = random_stream(400, 8, dim, seed=1234, drift=0.8)
    mem = PyramidMemory(dim=dim, capacities=(2, 2, 12), sides=(8, 4, 2), promotion=promotion)
    for x, fi, ts in frames:
        mem.write(Tokens.from_grid(x, frame_index=fi, timestamp=ts))
    ref = naive_pmb(frames, (2, 2, 12), (8, 4, 2), (8, 4, 1), "list", promotion=promotion)
    assert mem.frames() == [(lvl, it[1], it[2]) for lvl, items in enumerate(ref) for it in items]


def test_every_level_is_bounded_by_construction():
    for caps in ((2, 0, 12), (0,), (2, -1, 3)):
        with pytest.raises(ValueError, match="capacities.*bounded"):
            PyramidMemory(dim=4, capacities=caps, sides=(16, 8, 4)[: len(caps)], ratios=(8, 4, 1)[-len(caps):])
    with pytest.raises(ValueError, match="promotion"):
        PyramidMemory(dim=4, promotion="one_level")
