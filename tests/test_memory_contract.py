"""One parametrized matrix over every memory: bounded, causal, deterministic, snapshot-able."""

import json

import pytest
import torch

from streammem.memory import Memory, build_memory
from streammem.types import Tokens

D = 4


def _pose(i):
    p = torch.eye(4)
    p[0, 3] = float(i)
    return p


def _grid(side, with_score=False, with_pose=False, with_salience=False):
    def make(g, i):
        n = side * side
        return (Tokens.from_grid(torch.randn(side, side, D, generator=g), i, i / 8,
                                 score=torch.rand(n, generator=g) if with_score else None,
                                 pose=_pose(i) if with_pose else None,
                                 salience=torch.rand(n, generator=g) if with_salience else None),)
    return make


def _errors(g, i):
    return (Tokens(torch.randn(2, D, generator=g), [i, i], [0.0, 0.0], torch.zeros(2, 2),
                   torch.randint(0, 2, (2,), generator=g), score=torch.rand(2, generator=g) * 1000),)


def _row(n):
    def make(g, i):
        return (Tokens.from_grid(torch.randn(1, n, D, generator=g), i, i / 8),)
    return make


# name -> (registry kind, config, per-step write arguments from (generator, step))
CASES = {
    "pyramid": ("pyramid", dict(dim=D, capacities=(2, 2, 6), sides=(4, 2, 1)), _grid(4)),
    "pyramid_time": ("pyramid", dict(dim=D, capacities=(2, 3, 5), sides=(4, 2, 1), order="time"), _grid(4)),
    "pyramid_salient": ("pyramid", dict(dim=D, capacities=(2, 2, 6), sides=(4, 2, 1), pool="salient"),
                        _grid(4, with_salience=True)),
    "pyramid_spread": ("pyramid", dict(dim=D, capacities=(2, 3, 5), sides=(4, 2, 1), order="time", time_penalty=0.2,
                                       evict="shorter_gap"), _grid(4)),
    "dual_merge": ("dual", dict(dim=D, slots=8, fifo_frames=3, max_tokens_per_frame=4), _grid(2, with_score=True)),
    "dual_prune": ("dual", dict(dim=D, slots=8, fifo_frames=3, max_tokens_per_frame=4, compress="prune"),
                   _grid(2, with_score=True)),
    "posekv": ("posekv", dict(dim=D, height=4, width=4, window=2, schedule=(1, 4, 2), history_frames=6),
               _grid(4, with_pose=True)),
    "feature_bank": ("feature_bank", dict(dim=D, max_size=16, key_size=5), _row(3)),
    "error_bank": ("error_bank", dict(dim=D, num_bins=5, per_bin=3), _errors),
    "error_bank_fifo16": ("error_bank", dict(dim=D, num_bins=5, per_bin=3, replace="fifo", dtype="float16"), _errors),
    "kvcache_h2o": ("kvcache", dict(dim=D, capacity=12, max_write=3,
                                    press=[["h2o", {"budget": 8, "recent": 3}]]), _row(3)),
    "kvcache_sink_merge": ("kvcache", dict(dim=D, capacity=12, max_write=3, press=[
        ["kvmerger", {"threshold": 0.5, "budget": 12}], ["sink_window", {"n_sink": 2, "window": 6}]]), _row(3)),
}

# a bad value per field, per kind
BAD = {
    "pyramid": [("capacities", (2, -1, 3)), ("order", "random"), ("ratios", (8, 4, 2)), ("pool", "max"),
                ("temperature", 0.0)],
    "dual": [("slots", 0), ("compress", "pool"), ("skip_cos", 2.0)],
    "posekv": [("history_frames", 5), ("window", 0), ("fov_deg", (200.0, 75.0))],
    "feature_bank": [("key_size", 17), ("update", "lru")],
    "error_bank": [("per_bin", 0), ("replace", "lru"), ("max_bytes", 10), ("scale_margin", 1.5)],
    "kvcache": [("capacity", 0), ("press", [["h2o", {"budget": 64}]])],
}


def make(name, **over):
    kind, cfg, step = CASES[name]
    return build_memory(kind, **{**cfg, **over}), step


def stream(step, n, seed=0, start=0):
    g = torch.Generator().manual_seed(seed)
    out = [step(g, i) for i in range(n)]
    return out[start:]


def assert_tokens_equal(a: Tokens, b: Tokens):
    assert len(a) == len(b)
    for f in ("features", "frame_index", "timestamp", "grid", "level", "pose", "score", "salience"):
        x, y = getattr(a, f), getattr(b, f)
        assert (x is None) == (y is None), f
        if x is not None:
            assert torch.equal(x, y), f


def query_for(mem):
    """A query each kind understands (None for kinds without retrieval)."""
    if mem.kind == "dual":
        return torch.ones(1, D)
    if mem.kind == "posekv":
        return _pose(3)
    return None


@pytest.mark.parametrize("name", sorted(CASES))
def test_bounded_after_100k_writes(name):
    mem, step = make(name)
    writes = stream(step, 97)  # a pool of distinct writes, cycled (frame ids keep growing)
    mem.write(*writes[0])
    nbytes = mem.nbytes
    cap = mem.capacity
    peak = 0
    for i in range(1, 100_000):
        mem.write(*writes[i % 97])
        if i % 1000 == 0:
            assert mem.num_tokens <= cap
            assert mem.nbytes == nbytes
            peak = max(peak, mem.num_tokens)
    assert mem.stats()["writes"] == 100_000
    assert mem.num_tokens <= cap and mem.nbytes == nbytes
    assert peak > 0 and len(mem.read()) <= cap


@pytest.mark.parametrize("name", sorted(CASES))
def test_deterministic_and_causal(name):
    n, t = 60, 40
    a, step = make(name)
    b, _ = make(name)
    c, _ = make(name)
    base = stream(step, n, seed=1)
    other = stream(step, n, seed=2)
    for i in range(n):
        a.write(*base[i])
        b.write(*base[i])
        # c sees the same prefix up to t, then a different future
        c.write(*(base[i] if i <= t else other[i]))
        ra, rb = a.read(), b.read()
        assert_tokens_equal(ra, rb)  # same seed, same stream: same reads (random ones included)
        rc = c.read()
        if i <= t:
            assert_tokens_equal(ra, rc)  # a read at i depends only on writes <= i
        assert torch.all(ra.frame_index <= i)  # nothing from the future
    assert a.stats() == b.stats()


@pytest.mark.parametrize("name", sorted(CASES))
def test_save_load_continue_equals_uninterrupted(name, tmp_path):
    n, cut = 80, 37
    ref, step = make(name)
    writes = stream(step, n, seed=3)
    q = query_for(ref)
    reads_ref = []
    for i in range(n):
        ref.write(*writes[i])
        reads_ref.append(ref.read(q) if i % 5 == 0 else ref.read())
    mem, _ = make(name)
    for i in range(cut):
        mem.write(*writes[i])
        mem.read(q) if i % 5 == 0 else mem.read()
    mem.save(tmp_path / "m.safetensors")
    del mem
    loaded = Memory.load(tmp_path / "m.safetensors")
    assert type(loaded).__name__ == type(ref).__name__
    for i in range(cut, n):
        loaded.write(*writes[i])
        got = loaded.read(q) if i % 5 == 0 else loaded.read()
        assert_tokens_equal(got, reads_ref[i])
    assert loaded.stats() == ref.stats()
    for k, v in ref.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    # a state_dict round trip into a fresh memory of the same config works too
    fresh, _ = make(name)
    fresh.load_state_dict(ref.state_dict())
    assert_tokens_equal(fresh.read(), ref.read())
    # reset forgets everything and reseeds
    fresh.reset()
    assert fresh.num_tokens == 0 and fresh.nbytes == ref.nbytes


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_config_names_the_field(kind):
    name = next(n for n, c in CASES.items() if c[0] == kind)
    for field, value in BAD[kind]:
        with pytest.raises(ValueError, match=field):
            make(name, **{field: value})


@pytest.mark.parametrize("name", sorted(CASES))
def test_loading_another_kind_or_shape_fails(name, tmp_path):
    mem, step = make(name)
    for w in stream(step, 5):
        mem.write(*w)
    mem.save(tmp_path / "m.safetensors")
    # another kind
    other = "feature_bank" if CASES[name][0] != "feature_bank" else "pyramid"
    wrong, _ = make(other)
    with pytest.raises(ValueError, match="kind"):
        wrong.load_state_dict(mem.state_dict())
    with pytest.raises(ValueError, match="kind"):
        type(wrong).load(tmp_path / "m.safetensors")
    # another shape (dim)
    bigger, _ = make(name, dim=D + 1)
    with pytest.raises(ValueError, match="dim"):
        bigger.load_state_dict(mem.state_dict())
    # a tampered tensor shape, with the config left alike
    state = mem.state_dict()
    key = next(k for k in state if not k.startswith("meta.") and state[k].ndim >= 1 and state[k].numel() > 1)
    state[key] = state[key][:1]
    twin, _ = make(name)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        twin.load_state_dict(state)
    # the file is safetensors with the config in its header, no pickle
    raw = (tmp_path / "m.safetensors").read_bytes()
    header = json.loads(raw[8: 8 + int.from_bytes(raw[:8], "little")])
    assert header["__metadata__"]["kind"] == CASES[name][0]
    assert json.loads(header["__metadata__"]["config"])["dim"] == D
