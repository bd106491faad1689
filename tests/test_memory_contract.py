"""One parametrized matrix over every memory: bounded, causal, deterministic, snapshot-able."""

import gc
import json
import tracemalloc

import pytest
import torch
from safetensors.torch import save_file

from streammem.memory import (
    MEMORY_KINDS, FeatureQuery, Memory, MemoryConfig, PoseQuery, SupportsFrames, SupportsKV, SupportsQuery,
    SupportsRows, SupportsSample, TimestepQuery, build_memory,
)
from streammem.memory.base import _bytes_tensor
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
    return (Tokens(torch.randn(2, D, generator=g), [i, i], [0.0, 0.0], torch.zeros(2, 2), torch.zeros(2),
                   extras={"bank": torch.randint(0, 2, (2,), generator=g),
                           "timestep": torch.rand(2, generator=g) * 1000}),)


def _routed(side):
    def make(g, i):
        t = Tokens.from_grid(torch.randn(side, side, D, generator=g), i, i / 8)
        t.extras["static"] = torch.rand(side * side, generator=g)
        return (t,)
    return make


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
    "pyramid_released": ("pyramid", dict(dim=D, capacities=(2, 2, 6), sides=(4, 2, 1), promotion="released"), _grid(4)),
    "dual_merge": ("dual", dict(dim=D, slots=8, fifo_frames=3, max_tokens_per_frame=4), _routed(2)),
    "dual_prune": ("dual", dict(dim=D, slots=8, fifo_frames=3, max_tokens_per_frame=4, compress="prune"),
                   _routed(2)),
    "posekv": ("posekv", dict(dim=D, height=4, width=4, window=2, schedule=(1, 4, 2), history_frames=6),
               _grid(4, with_pose=True)),
    "feature_bank": ("feature_bank", dict(dim=D, max_size=16, key_size=5), _row(3)),
    "error_bank": ("error_bank", dict(dim=D, num_bins=5, per_bin=3), _errors),
    "error_bank_fifo16": ("error_bank", dict(dim=D, num_bins=5, per_bin=3, replace="fifo", dtype="float16"), _errors),
    "kvcache_h2o": ("kvcache", dict(dim=D, capacity=12, max_write=3,
                                    press=[["h2o", {"budget": 8, "recent": 3}]]), _row(3)),
    "kvcache_sink_merge": ("kvcache", dict(dim=D, capacity=12, max_write=3, press=[
        ["kvmerger", {"threshold": 0.5, "budget": 12}], ["sink_window", {"n_sink": 2, "window": 6}]]), _row(3)),
    "window": ("window", dict(dim=D, frames=3, side=2, top_side=4), _grid(4)),
    "uniform": ("uniform", dict(dim=D, frames=5, side=2, top_side=4), _grid(4)),
    "empty": ("empty", dict(dim=D), _grid(4)),
    "full": ("full", dict(dim=D, frames=100, side=1, top_side=4), _grid(4)),
    "full_salient": ("full", dict(dim=D, frames=100, side=2, top_side=4, pool="salient"), _grid(4, with_salience=True)),
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
    "window": [("frames", 0), ("side", 0), ("pool", "max")],
    "uniform": [("frames", 0)],
    "full": [("frames", 0), ("temperature", -1.0)],
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
    assert sorted(a.extras) == sorted(b.extras)
    for k in a.extras:
        assert torch.equal(a.extras[k], b.extras[k]), k


def query_for(mem):
    """A query each kind understands (None for kinds without retrieval)."""
    if mem.kind == "dual":
        return FeatureQuery(torch.ones(1, D))
    if mem.kind == "posekv":
        return PoseQuery(_pose(3))
    if mem.kind == "error_bank":
        return TimestepQuery(torch.tensor([10.0, 900.0]), banks=torch.tensor([0, 1]))
    return None


def test_every_registered_kind_is_in_the_matrix():
    assert {c[0] for c in CASES.values()} == set(MEMORY_KINDS) - {"leaky"}


# ---------------------------------------------------------------- boundedness
FAR = 10 ** 7  # stream position the counters are fast-forwarded to


def fast_forward(mem):
    """Move a memory's stream counters (write counts, frames seen) ``FAR`` writes ahead, as if
    it had run ten million writes; its contents stay as they are."""
    state = mem.state_dict()
    state["meta.counters"] = state["meta.counters"] + FAR
    if "meta.frames" in state:  # PoseKVMemory's count of latent frames written
        state["meta.frames"] = state["meta.frames"] + FAR
    mem.load_state_dict(state)


def assert_bounded(mem, step, warm=100, block=300, python_slack=8 * 1024):
    """After ``warm`` writes, with the counters fast-forwarded to 10^7 and frame indices and
    timestamps from there on, two blocks of ``block`` writes: every write keeps ``num_tokens <=
    capacity`` and ``nbytes`` unchanged, and the Python-side state allocates no more than
    ``python_slack`` bytes over the second block (tracemalloc, after a garbage collection):
    a memory keeping ~30 bytes per write anywhere in Python fails."""
    g = torch.Generator().manual_seed(0)
    for i in range(warm):
        mem.write(*step(g, i))
    nbytes, cap = mem.nbytes, mem.capacity
    fast_forward(mem)
    writes = [step(g, FAR + warm + i) for i in range(2 * block)]
    peak = 0

    def run(ws):
        nonlocal peak
        for w in ws:
            mem.write(*w)
            assert mem.num_tokens <= cap
            assert mem.nbytes == nbytes
            peak = max(peak, mem.num_tokens)

    tracemalloc.start()
    try:
        run(writes[:block])
        mem.read()
        gc.collect()  # count what is kept, not garbage waiting for the cycle collector
        before = tracemalloc.get_traced_memory()[0]
        run(writes[block:])
        mem.read()
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    print(f"{type(mem).__name__}: Python-side allocations grew by {grown} bytes over {block} writes")
    assert grown <= python_slack, f"Python-side state grew by {grown} bytes over {block} writes"
    assert mem.stats()["writes"] == FAR + warm + 2 * block
    assert len(mem.read()) <= cap and (peak > 0 or cap == 0)
    if len(mem.read()) and "frame_index" not in mem.read().extras:
        assert int(mem.read().frame_index.max()) >= FAR  # the fast-forwarded stream was really written


@pytest.mark.parametrize("name", sorted(CASES))
def test_bounded_far_into_the_stream(name):
    if CASES[name][0] == "full":  # bounded by refusing: room for this test's writes, and not one more
        mem, step = make(name, frames=700)
        assert_bounded(mem, step)
        with pytest.raises(ValueError, match="frames=700"):
            mem.write(*step(torch.Generator(), FAR + 700))
        assert mem.num_tokens == mem.capacity
        return
    mem, step = make(name)
    assert_bounded(mem, step)


class LeakyConfig(MemoryConfig):
    pass


class LeakyMemory(Memory):
    """A toy that looks bounded (fixed buffers, num_tokens <= capacity) but keeps a Python list
    of every frame it saw: the boundedness check must catch it."""

    kind = "leaky"
    Config = MemoryConfig

    def _allocate(self):
        self.buf = self.buffer("buf", torch.zeros(4, self.config.dim))

    def _on_state(self, event):
        if event != "save":
            self.seen = []

    @property
    def num_tokens(self):
        return min(len(self.seen), 4)

    @property
    def capacity(self):
        return 4

    def write(self, tokens):
        self.buf[len(self.seen) % 4] = tokens.features[0]
        self.seen.append((int(tokens.frame_index[0]), float(tokens.timestamp[0])))
        self.counters["writes"] += 1

    def read(self, query=None):
        return Tokens(self.buf.clone(), [0] * 4, [0.0] * 4, torch.zeros(4, 2), torch.zeros(4))


def test_the_boundedness_check_catches_a_python_side_leak():
    from streammem.memory.base import MEMORY_KINDS as kinds

    try:
        with pytest.raises(AssertionError, match="Python-side state grew"):
            assert_bounded(LeakyMemory(dim=D), _grid(2))
    finally:
        kinds.pop("leaky", None)


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
    key = next((k for k in state if not k.startswith("meta.") and state[k].ndim >= 1 and state[k].numel() > 1), None)
    if key is not None:  # (EmptyMemory has no tensors to tamper with)
        state[key] = state[key][:1]
        twin, _ = make(name)
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            twin.load_state_dict(state)
    # the file is safetensors (no pickle); kind and config live in its meta tensors only
    raw = (tmp_path / "m.safetensors").read_bytes()
    header = json.loads(raw[8: 8 + int.from_bytes(raw[:8], "little")])
    assert header["__metadata__"] == {"format": "streammem.memory"}
    assert {"meta.kind", "meta.config"} <= set(header)
    assert json.loads(bytes(mem.state_dict()["meta.config"].tolist()))["dim"] == D


@pytest.mark.parametrize("name", sorted(CASES))
def test_read_refuses_a_query_it_does_not_take(name):
    mem, step = make(name)
    mem.write(*stream(step, 1)[0])
    for q in (object(), FeatureQuery(torch.ones(1, D)), PoseQuery(torch.eye(4)), TimestepQuery(torch.ones(1))):
        if isinstance(q, type(mem).QUERIES):
            assert isinstance(mem.read(q), Tokens)
            continue
        with pytest.raises(TypeError, match=f"{type(mem).__name__}.read takes .* got a {type(q).__name__}"):
            mem.read(q)


def test_capabilities_are_protocols():
    mems = {k: make(n)[0] for k, n in (("dual", "dual_merge"), ("posekv", "posekv"), ("error", "error_bank"),
                                        ("pyramid", "pyramid"), ("bank", "feature_bank"), ("window", "window"))}
    have = {k: {p.__name__ for p in (SupportsRows, SupportsQuery, SupportsKV, SupportsSample, SupportsFrames)
                if isinstance(m, p)} for k, m in mems.items()}
    assert have == {"dual": {"SupportsRows", "SupportsQuery"}, "posekv": {"SupportsKV"}, "error": {"SupportsSample"},
                    "pyramid": {"SupportsFrames"}, "bank": set(), "window": set()}


# ---------------------------------------------------------------- loading files
def _saved(tmp_path, name="pyramid", n=5):
    mem, step = make(name)
    for w in stream(step, n):
        mem.write(*w)
    path = tmp_path / f"{name}.safetensors"
    mem.save(path)
    return mem, path


def test_load_refuses_files_that_are_not_safetensors(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(ValueError, match=r"junk\.safetensors: not a safetensors file"):
        Memory.load(junk)
    pickled = tmp_path / "pickle.safetensors"
    mem, _ = _saved(tmp_path)
    torch.save(mem.state_dict(), pickled)  # a pickle under a safetensors name
    with pytest.raises(ValueError, match=r"pickle\.safetensors: not a safetensors file"):
        Memory.load(pickled)
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(3)}, str(other))
    with pytest.raises(ValueError, match=r"other\.safetensors: not a streammem memory snapshot"):
        Memory.load(other)


def _rewrite(path, out, **changes):
    """Copy a snapshot with its config fields changed (tensors untouched)."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    cfg = json.loads(bytes(state["meta.config"].tolist()))
    cfg.update(changes)
    state["meta.config"] = _bytes_tensor(json.dumps(cfg))
    save_file(state, str(out))
    return out


def test_load_checks_config_against_tensor_shapes_before_allocating(tmp_path, monkeypatch):
    _, path = _saved(tmp_path)
    built = []
    monkeypatch.setattr(Memory, "_allocate", lambda self: built.append(self), raising=False)
    liar = _rewrite(path, tmp_path / "liar.safetensors", dim=D + 4)
    with pytest.raises(ValueError, match=r"liar\.safetensors: tensor 'L0\.features' is \(2, 16, 4\) in the file "
                                         r"but its config \(pyramid\) makes it \(2, 16, 8\)"):
        Memory.load(liar)
    huge = _rewrite(path, tmp_path / "huge.safetensors", dim=4096, capacities=[2000, 2000, 12000])
    with pytest.raises(ValueError, match=r"huge\.safetensors: the pyramid memory .* takes [\d,]+ bytes, more than "
                                         r"max_bytes=1,073,741,824"):
        Memory.load(huge)
    bad = _rewrite(path, tmp_path / "bad.safetensors", order="random", colour="red")
    with pytest.raises(ValueError, match=r"bad\.safetensors: .*fields \['colour'\]"):
        Memory.load(bad)
    assert built == []  # no memory was built for any of them


def test_load_honours_max_bytes_and_older_files(tmp_path):
    mem, path = _saved(tmp_path, "feature_bank")
    with pytest.raises(ValueError, match=r"feature_bank\.safetensors: .* more than max_bytes=100"):
        Memory.load(path, max_bytes=100)
    assert_tokens_equal(Memory.load(path, max_bytes=mem.nbytes).slots.get(slice(0, 15)),
                        mem.slots.get(slice(0, 15)))
    # files written with the kind and config also in the header (before they lived in one place) load
    old = tmp_path / "old.safetensors"
    save_file(mem.state_dict(), str(old), metadata={"kind": mem.kind, "config": mem.config.to_json()})
    assert Memory.load(old).stats() == mem.stats()


def test_tokens_extras_follow_their_tokens():
    a = Tokens.from_grid(torch.randn(1, 3, D), 0, 0.0)
    a.extras["part"] = torch.tensor([0, 1, 1])
    b = Tokens.from_grid(torch.randn(1, 2, D), 1, 0.1)
    b.extras["part"] = torch.tensor([1, 0])
    both = Tokens.cat([a, b])
    assert both.extras["part"].tolist() == [0, 1, 1, 1, 0]
    assert both.index(torch.tensor([4, 0])).extras["part"].tolist() == [0, 0]
    assert both.index(both.extras["part"] == 1).extras["part"].tolist() == [1, 1, 1]
    assert Tokens.cat([a, Tokens.from_grid(torch.randn(1, 1, D), 2, 0.2)]).extras == {}  # kept only if all have it
    with pytest.raises(ValueError, match=r"extras\['part'\] must have 3 rows"):
        Tokens(a.features, a.frame_index, a.timestamp, a.grid, a.level, extras={"part": torch.zeros(2)})
