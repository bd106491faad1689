"""Render speed and memory of StreamWorld, on one core.

Prints frames/s per preset at 256x256, RSS at the start and after N frames, and the ratio
against a baseline measured in the same run: a plain cv2.warpAffine of the ground canvas alone
(the least any renderer of this scene must do per frame).

    python benchmarks/world.py [--frames 2000] [--size 256]
"""

from __future__ import annotations

import argparse
import resource
import time

import cv2
import torch

from streammem.world import World
from streammem.world.scene import CameraState, plane_to_image


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=2000)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    n, hw = args.frames, (args.size, args.size)

    w = World(seed=args.seed, preset="medium", size=args.size)
    ground = w.scene.ground
    t0 = time.perf_counter()
    for i in range(n):
        cam = CameraState(x=(600 + i % 300) * 16, y=700 * 16, zoom=0, roll=i % 50)
        cv2.warpAffine(ground, plane_to_image(cam, hw), (args.size, args.size), flags=cv2.INTER_LINEAR,
                       borderMode=cv2.BORDER_REFLECT_101)
    base = n / (time.perf_counter() - t0)
    print(f"baseline warpAffine of the canvas alone: {base:8.1f} frames/s")

    for preset in ("clean", "medium", "hard"):
        world = World(seed=args.seed, preset=preset, size=args.size)
        it = iter(world)
        next(it)  # build the canvas and sprites outside the timing
        rss0 = rss_mb()
        t0 = time.perf_counter()
        got = 0
        for f in it:
            got += 1
            if f.index >= n:
                break
        dt = time.perf_counter() - t0
        rss1 = rss_mb()
        # a longer stretch, to show memory stays flat
        for f in it:
            if f.index >= 3 * n:
                break
        rss2 = rss_mb()
        fps = got / dt
        print(f"{preset:6s}: {fps:8.1f} frames/s ({got} frames delivered of {n} simulated), "
              f"{fps / base:.2f}x baseline; RSS start {rss0:.1f} MB, after {n} frames {rss1:.1f} MB, "
              f"after {3 * n} frames {rss2:.1f} MB")

    t0 = time.perf_counter()
    qs = World(seed=args.seed, preset="medium", size=args.size, seconds=600).questions()
    print(f"questions for a 10-minute stream (no rendering): {len(qs)} in {time.perf_counter() - t0:.2f} s")


if __name__ == "__main__":
    main()
