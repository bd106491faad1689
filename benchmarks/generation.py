"""Cost of a generation chunk against stream length, and resident memory, on one core.

One rollout of ``--late`` chunks with the generator (the shipped one, or ``--checkpoint``) per
memory, snapshotting the pipeline's state (``state_dict``: memory, camera, anchor, counters) at
chunks ``--early`` (10), ``--mid`` (100, the memory long full) and ``--late`` (200). Then, in
``--rounds`` rounds, each snapshot is restored in a fresh random order and its next chunk timed,
so the three positions are measured interleaved in the same process and a drift of the machine
falls on all of them alike. Printed: the median seconds per chunk at each position, late / early
(the issue's target: <= 1.1) and late / mid, the memory's tokens, and the process's resident
memory (RSS) after the rollout reached each position.

    python benchmarks/generation.py [--late 200] [--rounds 15] [--memory posekv window full]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from streammem.pipelines.generation import GenerationConfig
from streammem.pipelines.jobs import load_default_generator
from streammem.world import World


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--early", type=int, default=10)
    ap.add_argument("--mid", type=int, default=100)
    ap.add_argument("--late", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--memory", nargs="+", default=["posekv", "window", "full"])
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    first = next(iter(World(seed=20_000, preset="clean", size=64, frames=1)))
    rng = np.random.default_rng(0)
    actions = "".join(rng.choice(list("LRUDFBS"), size=2 * args.late))
    pts = (args.early, args.mid, args.late)
    print("| memory | s / chunk @ {} | @ {} | @ {} | late / early | late / mid | tokens @ {} / {} / {} | "
          "RSS MB @ {} / {} / {} |".format(*pts, *pts, *pts))
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.memory:
        pipe = load_default_generator(args.checkpoint, GenerationConfig(memory=name, num_inference_steps=args.steps))
        pipe.start(first.image, pose=first.pose, prompt="clean")
        snaps, tokens, rss = {}, {}, {}

        def on_chunk(k, frames):
            if k + 1 in pts:
                snaps[k + 1] = {key: v.clone() for key, v in pipe.state_dict().items()}
                tokens[k + 1], rss[k + 1] = pipe.memory.num_tokens, rss_mb()

        for _ in pipe.stream(actions, callback=on_chunk, progress=False):
            pass
        times = {p: [] for p in pts}
        order = np.random.default_rng(1)
        for _ in range(args.rounds):
            for p in order.permutation(pts):
                pipe.load_state_dict(snaps[int(p)])
                t0 = time.perf_counter()
                for _ in pipe.stream("RR", progress=False):
                    pass
                times[int(p)].append(time.perf_counter() - t0)
        e, m, la = (statistics.median(times[p]) for p in pts)
        print(f"| {name} | {e:.4f} | {m:.4f} | {la:.4f} | {la / e:.3f} | {la / m:.3f} | "
              f"{' / '.join(str(tokens[p]) for p in pts)} | {' / '.join(f'{rss[p]:.1f}' for p in pts)} |")


if __name__ == "__main__":
    main()
