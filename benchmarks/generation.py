"""Cost of a generation chunk against stream length, and resident memory, on one core.

One rollout of ``--chunks`` chunks with the generator (the shipped one, or ``--checkpoint``) on
each memory; the median seconds per chunk over a block of chunks around chunk 10, around chunk
``--mid`` (100, when the memory has long been full) and around chunk ``--late`` (200); the ratios
late / early (the issue's target: <= 1.1) and late / mid (flatness once full: the memory is
bounded, so a late chunk reads no more than a mid one); the memory's tokens and the process's
resident memory (RSS) at each. The early and mid blocks are the baselines, in the same run.

    python benchmarks/generation.py [--chunks 210] [--late 200] [--block 10] [--memory posekv]
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
    ap.add_argument("--chunks", type=int, default=210)
    ap.add_argument("--early", type=int, default=10)
    ap.add_argument("--mid", type=int, default=100)
    ap.add_argument("--late", type=int, default=200)
    ap.add_argument("--block", type=int, default=10)
    ap.add_argument("--memory", nargs="+", default=["posekv", "window", "full"])
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    first = next(iter(World(seed=20_000, preset="clean", size=64, frames=1)))
    rng = np.random.default_rng(0)
    actions = "".join(rng.choice(list("LRUDFBS"), size=2 * args.chunks))
    print("| memory | s / chunk @ {e} | @ {m} | @ {l} | late / early | late / mid | tokens @ {e} / {m} / {l} | "
          "RSS MB @ {e} / {m} / {l} |".format(e=args.early, m=args.mid, l=args.late))
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.memory:
        pipe = load_default_generator(args.checkpoint, GenerationConfig(memory=name, num_inference_steps=args.steps))
        pipe.start(first.image, pose=first.pose, prompt="clean")
        times, tokens, rss = [], [], []
        t0 = [time.perf_counter()]

        def on_chunk(k, frames):
            now = time.perf_counter()
            times.append(now - t0[0])
            tokens.append(pipe.memory.num_tokens)
            rss.append(rss_mb())
            t0[0] = now

        for _ in pipe.stream(actions, callback=on_chunk, num_frames=2 * args.chunks, progress=False):
            pass
        e, m, la = (statistics.median(times[c - args.block // 2: c + args.block // 2])
                    for c in (args.early, args.mid, args.late))
        pts = (args.early, args.mid, args.late)
        print(f"| {name} | {e:.4f} | {m:.4f} | {la:.4f} | {la / e:.3f} | {la / m:.3f} | "
              f"{' / '.join(str(tokens[c]) for c in pts)} | {' / '.join(f'{rss[c]:.1f}' for c in pts)} |")


if __name__ == "__main__":
    main()
