"""Memory benchmark: per-write and per-read cost against stream position, peak memory, and
PyramidMemory against a naive per-write recomputation of the reference PMB rule.

    python benchmarks/memory.py            # D = 256, 1024, 4096; positions 1k, 10k, 100k
    python benchmarks/memory.py --quick    # a fast smoke run

How positions are reached (stated in the output too): every memory is first warmed up with
real writes until all its buffers are full (``--warmup`` writes, enough to fill each one);
a later stream position p is then reached by advancing the stream-position counters in its
snapshot (``writes``, frame counters) to p with ``state_dict`` / ``load_state_dict``, which is
what p real writes would leave apart from the (already full) contents. Costs are medians over
``--repeats`` writes and reads taken at each position, in five rounds that visit the positions
in turn (each position continues from its own snapshot), so a slow drift of a noisy machine
does not read as growth with stream position. Peak resident memory is measured over
real writes only (``--rss-writes``, 100k by default, at D = 256).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import psutil
import torch
import torch.nn.functional as F

from streammem.memory import FeatureQuery, PYRAMID_SPREAD, Memory, PyramidMemory, build_memory
from streammem.types import Tokens


def configs(d: int) -> dict[str, tuple[str, dict, int, int]]:
    """name -> (kind, config, tokens per write as a grid side or a count, warm-up writes)."""
    return {
        "pyramid ovbench": ("pyramid", dict(preset="ovbench", dim=d), 16, 64),
        "pyramid offline": ("pyramid", dict(preset="offline", dim=d), 16, 400),
        "pyramid offline spread": ("pyramid", dict(preset="offline", dim=d, **PYRAMID_SPREAD), 16, 400),
        "dual": ("dual", dict(dim=d, slots=1024, fifo_frames=8, max_tokens_per_frame=64), 8, 80),
        "posekv 16x16": ("posekv", dict(dim=d, height=16, width=16), 16, 90),
        "feature_bank": ("feature_bank", dict(dim=d), -75, 300),
        "error_bank": ("error_bank", dict(dim=d, per_bin=500, max_bytes=64 * 2 ** 20), -2, 0),
        "kvcache": ("kvcache", dict(dim=d, capacity=2048, max_write=64), -64, 40),
    }


def make_writes(kind: str, side: int, d: int, n: int = 8) -> list[tuple]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        if side > 0:
            x = torch.randn(side, side, d, generator=g)
            pose = torch.eye(4)
            pose[0, 3] = float(i)
            t = Tokens.from_grid(x, i, i / 8, pose=pose if kind == "posekv" else None)
            if kind == "dual":
                t.extras["static"] = torch.rand(side * side, generator=g)
            out.append(t)
        else:
            m = -side
            timestep = torch.rand(m, generator=g) * 1000
            out.append(Tokens(torch.randn(m, d, generator=g), torch.full((m,), i), torch.zeros(m, dtype=torch.float64),
                              torch.zeros(m, 2), torch.zeros(m, dtype=torch.int64),
                              extras={"timestep": timestep, "bank": torch.arange(m) % 2}))
    return out


def error_bank_warmup(mem: Memory, d: int) -> None:
    """Fill every bin of both banks (direct tensor copies, then the real counters)."""
    n = mem.per_bin
    mem.errors.copy_(torch.randn(mem.errors.shape).to(mem.errors.dtype))
    mem.count.fill_(n)
    mem._on_state("load")


PERIOD = 2520  # a multiple of every cyclic period in these configs (8, 7, 72, 18, fifo 8)


def advance(mem: Memory, position: int) -> None:
    """Move the stream-position counters forward to about ``position`` through a snapshot, by a
    multiple of ``PERIOD`` so every cyclic rule (entry level t % 8, window slot, schedule
    i % 18, history slot, FIFO block) stays where real writes would have left it."""
    state = mem.state_dict()
    k = mem.COUNTERS.index("writes")
    counters = state["meta.counters"].clone()
    delta = max(position - int(counters[k]), 0) // PERIOD * PERIOD
    counters[k] += delta
    state["meta.counters"] = counters
    if "meta.frames" in state:  # PoseKVMemory's latent-frame counter
        state["meta.frames"] = state["meta.frames"] + delta
    if "meta.sizes" in state:  # DualMemory: static count, frames seen
        sizes = state["meta.sizes"].clone()
        sizes[1] += delta
        state["meta.sizes"] = sizes
    mem.load_state_dict(state)


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_costs(dims, positions, repeats, only, rounds=5):
    print(f"\n## Cost per write / read (median of {repeats}, in {rounds} interleaved rounds) against stream position")
    print("positions past the warm-up are reached by advancing the snapshot's stream counters (see docstring)\n")
    head = "| memory | D | " + " | ".join(f"write @{p // 1000}k ms" for p in positions) + " | " + \
        " | ".join(f"read @{p // 1000}k ms" for p in positions) + " | write late/early | read late/early |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    worst = 0.0
    for d in dims:
        for name, (kind, cfg, side, warm) in configs(d).items():
            if only and not any(o in name for o in only):
                continue
            mem = build_memory(kind, **cfg)
            writes = make_writes(kind, side, d)
            if kind == "error_bank":
                error_bank_warmup(mem, d)
            for i in range(warm):
                mem.write(writes[i % len(writes)])
            q = FeatureQuery(torch.randn(4, d)) if kind == "dual" else None
            # one snapshot per position; rounds visit the positions in turn, so a drift of the
            # machine over time is spread over all positions instead of reading as growth
            states = {}
            for p in positions:
                advance(mem, p)
                states[p] = {k: v.clone() for k, v in mem.state_dict().items()}
            per_round = max(1, repeats // rounds)
            w_times = {p: [] for p in positions}
            r_times = {p: [] for p in positions}
            it = iter(range(10 ** 9))
            for _ in range(rounds):
                for p in positions:
                    mem.load_state_dict(states[p])
                    for _ in range(per_round):
                        w_times[p].append(timed(lambda m=mem: m.write(writes[next(it) % len(writes)]), 1))
                        r_times[p].append(timed(lambda m=mem: m.read(q), 1))
                    states[p] = {k: v.clone() for k, v in mem.state_dict().items()}
            w_cost = [statistics.median(w_times[p]) for p in positions]
            r_cost = [statistics.median(r_times[p]) for p in positions]
            wr, rr = w_cost[-1] / w_cost[0], r_cost[-1] / r_cost[0]
            worst = max(worst, wr, rr)
            print(f"| {name} | {d} | " + " | ".join(f"{c * 1e3:.3f}" for c in w_cost) + " | " +
                  " | ".join(f"{c * 1e3:.3f}" for c in r_cost) + f" | {wr:.2f} | {rr:.2f} |")
            del mem
            gc.collect()
    print(f"\nworst late/early ratio: {worst:.2f} (target <= 1.1)")


def bench_rss(d, n_writes, only):
    print(f"\n## Resident memory over {n_writes:,} real writes, D = {d}")
    print("| memory | nbytes MiB | RSS after 10% MiB | peak RSS MiB | growth after 10% MiB |")
    print("|---|---|---|---|---|")
    proc = psutil.Process()
    for name, (kind, cfg, side, _) in configs(d).items():
        if only and not any(o in name for o in only):
            continue
        gc.collect()
        mem = build_memory(kind, **cfg)
        writes = make_writes(kind, side, d)
        base, peak = None, 0
        for i in range(n_writes):
            mem.write(writes[i % len(writes)])
            if i % 1000 == 0 or i == n_writes - 1:
                rss = proc.memory_info().rss
                if i >= n_writes // 10 and base is None:
                    base = rss
                peak = max(peak, rss)
        mib = 2 ** 20
        print(f"| {name} | {mem.nbytes / mib:.1f} | {base / mib:.1f} | {peak / mib:.1f} | {(peak - base) / mib:.1f} |")
        del mem


# ------------------------------------------------------------------------------------ PMB
class NaivePMB:
    """The reference rule recomputed on every write: descriptors re-reduced over every stored
    token of the level, reference pooling ops (adaptive average pooling, bilinear x2 resize
    with align_corners=False for promotion), Python lists in list order."""

    def __init__(self, capacities, sides=(16, 8, 4), ratios=(8, 4, 1)):
        self.caps, self.sides, self.ratios = capacities, sides, ratios
        self.levels = [[] for _ in sides]
        self.t = 0

    def put(self, lvl, x, fi, ts):  # x: (D, side, side)
        items = self.levels[lvl]
        if self.caps[lvl] > 0 and len(items) >= self.caps[lvl]:
            desc = torch.stack([it[0].mean(dim=(1, 2)) for it in items])
            j = int(torch.argmax(F.cosine_similarity(desc[1:], desc[:-1], dim=-1))) if len(items) > 1 else 0
            v = items.pop(j)
            if lvl + 1 < len(self.sides):
                small = F.interpolate(v[0][None], scale_factor=0.5, mode="bilinear", align_corners=False)[0]
                self.put(lvl + 1, small, v[1], v[2])
        items.append((x, fi, ts))

    def write(self, frame, fi, ts):  # frame: (s, s, D)
        lvl = next(i for i, r in enumerate(self.ratios) if self.t % r == 0)
        x = F.adaptive_avg_pool2d(frame.permute(2, 0, 1), self.sides[lvl])
        self.put(lvl, x, fi, ts)
        self.t += 1


def bench_pmb(n_frames, d, strict):
    print(f"\n## PyramidMemory vs naive per-write recomputation, 24/24/144, D = {d}, {n_frames} frames")
    g = torch.Generator().manual_seed(0)
    pool = [torch.randn(16, 16, d, generator=g) for _ in range(16)]
    coef = torch.rand(n_frames, 3, generator=g)  # random mixtures: no near-ties in similarity
    frames = [(coef[i, 0] * pool[i % 16] + coef[i, 1] * pool[(7 * i + 3) % 16] + coef[i, 2] * pool[(5 * i + 1) % 16],
               i, i / 8) for i in range(n_frames)]
    mem = PyramidMemory.from_preset("offline", dim=d)
    naive = NaivePMB((24, 24, 144))
    t_mem, t_naive = [], []
    for x, fi, ts in frames:
        tok = Tokens.from_grid(x, fi, ts)
        t0 = time.perf_counter()
        mem.write(tok)
        t1 = time.perf_counter()
        naive.write(x, fi, ts)
        t2 = time.perf_counter()
        t_mem.append(t1 - t0)
        t_naive.append(t2 - t1)
    # identical contents: same frames, levels and list order; same features
    want = [(lvl, it[1], it[2]) for lvl, items in enumerate(naive.levels) for it in items]
    assert mem.frames() == want, "PyramidMemory kept other frames than the reference rule"
    out = mem.read()
    flat = sorted(((it[2], it[1], it[0]) for items in naive.levels for it in items), key=lambda r: (r[0], r[1]))
    ref = torch.cat([r[2].reshape(r[2].shape[0], -1).t() for r in flat])
    err = float((out.features - ref).abs().max())
    assert err <= 1e-4, f"features differ by {err}"
    late = slice(n_frames // 2, None)
    mm, nm = statistics.mean(t_mem[late]), statistics.mean(t_naive[late])
    print("| | mean ms/write (full memory) | total s |")
    print("|---|---|---|")
    print(f"| naive reference | {nm * 1e3:.2f} | {sum(t_naive):.2f} |")
    print(f"| PyramidMemory | {mm * 1e3:.2f} | {sum(t_mem):.2f} |")
    print(f"speed-up {nm / mm:.1f}x (goal >= 5x); contents identical: same {len(want)} frames in the same levels "
          f"and order, max feature difference {err:.1e}")
    if strict:
        assert nm / mm >= 5, "speed-up below 5x"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", type=int, nargs="+", default=[256, 1024, 4096])
    ap.add_argument("--positions", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    ap.add_argument("--repeats", type=int, default=51)
    ap.add_argument("--rss-writes", type=int, default=100_000)
    ap.add_argument("--rss-dim", type=int, default=256)
    ap.add_argument("--pmb-frames", type=int, default=600)
    ap.add_argument("--only", nargs="*", default=[], help="substrings of memory names to run")
    ap.add_argument("--skip", nargs="*", default=[], choices=["costs", "rss", "pmb"])
    ap.add_argument("--strict", action="store_true", help="also assert the 5x PMB goal")
    ap.add_argument("--quick", action="store_true", help="small smoke run")
    args = ap.parse_args()
    if args.quick:
        args.dims, args.repeats, args.rss_writes, args.pmb_frames = [256], 7, 3_000, 250
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if "costs" not in args.skip:
        bench_costs(args.dims, args.positions, args.repeats, args.only)
    if "rss" not in args.skip:
        bench_rss(args.rss_dim, args.rss_writes, args.only)
    if "pmb" not in args.skip:
        bench_pmb(args.pmb_frames, 4096, args.strict)


if __name__ == "__main__":
    main()
