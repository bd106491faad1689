"""How well :class:`~streammem.memory.DualMemory` routes StreamWorld's moving content to its
transient part and the static scene to its persistent part.

Per frame: :class:`~streammem.models.encoder.PatchEncoder` tokens on a 16x16 grid, each with a
static score ``1 - dynamic`` from :class:`~streammem.models.motion.MotionScorer` (frame difference
after camera-motion compensation, image evidence only), are written to a ``DualMemory``. The
cells the memory put in its transient FIFO for that frame are compared with the ground-truth
dynamic mask (a cell is dynamic when at least ``cover`` of its pixels belong to moving objects):

- token precision / recall / F1 of "routed dynamic" against "dynamic in the ground truth";
- object recall: the share of (moving object, frame) pairs with at least one of the object's
  cells routed dynamic.

    python -m streammem.eval.routing [--frames 120 --seeds 0 1 2 3]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from streammem.models.motion import MotionScorer
from streammem.memory import DualMemory
from streammem.models.encoder import PatchEncoder
from streammem.world import World

__all__ = ["RoutingResult", "evaluate_routing"]


@dataclass
class RoutingResult:
    preset: str
    frames: int
    dynamic_share: float
    precision: float
    recall: float
    f1: float
    object_recall: float

    def row(self) -> str:
        return (f"| {self.preset} | {self.frames} | {self.dynamic_share:.3f} | {self.precision:.2f} | "
                f"{self.recall:.2f} | {self.f1:.2f} | {self.object_recall:.2f} |")


def evaluate_routing(
    preset: str = "medium",
    seeds: tuple[int, ...] = (0, 1, 2, 3),
    frames: int = 120,
    size: int = 256,
    grid: int = 16,
    cover: float = 0.25,
    threshold: float = 0.5,
) -> RoutingResult:
    """Route every token of ``frames`` frames per seed and score the routing (see module doc)."""
    tp = fp = fn = 0
    obj_hit = obj_total = dyn_cells = cells = n_frames = 0
    cell_px = size / grid
    for seed in seeds:
        enc, scorer = PatchEncoder(grid=grid), MotionScorer(grid=grid)
        mem = DualMemory(dim=enc.dim, slots=1024, fifo_frames=4, max_tokens_per_frame=grid * grid, threshold=threshold)
        for frame in World(seed=seed, preset=preset, size=size, fps=8.0, frames=frames):
            dyn = scorer(frame.image)
            tokens = enc(frame)
            tokens.extras["static"] = torch.from_numpy(1.0 - dyn.reshape(-1))
            mem.write(tokens)
            if frame.index < scorer.gap:
                continue  # no earlier frame to compare with yet
            out = mem.read()
            mine = (out.extras["part"] == 1) & (out.frame_index == frame.index)
            routed = np.zeros((grid, grid), bool)
            rc = out.grid[mine].long().numpy()
            routed[rc[:, 0], rc[:, 1]] = True
            gt = frame.info["gt"]
            truth = cv2.resize(gt["dynamic_mask"].astype(np.float32), (grid, grid), interpolation=cv2.INTER_AREA) >= cover
            tp += int((routed & truth).sum())
            fp += int((routed & ~truth).sum())
            fn += int((~routed & truth).sum())
            dyn_cells += int(truth.sum())
            cells += truth.size
            n_frames += 1
            moving = np.linalg.norm(np.asarray(gt["velocity"]).reshape(-1, 2), axis=1) > 0
            for box, mv in zip(np.asarray(gt["boxes"]).reshape(-1, 4), moving):
                if not mv:
                    continue
                x0, y0, x1, y1 = (box / cell_px).astype(int)
                obj_total += 1
                obj_hit += bool(routed[max(y0, 0): max(y1, y0 + 1), max(x0, 0): max(x1, x0 + 1)].any())
    precision = tp / max(tp + fp, 1)
    recall = tp / max(tp + fn, 1)
    f1 = 2 * precision * recall / max(precision + recall, 1e-9)
    return RoutingResult(preset, n_frames, dyn_cells / max(cells, 1), precision, recall, f1, obj_hit / max(obj_total, 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["clean", "medium", "hard"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    ap.add_argument("--frames", type=int, default=120)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    results = [evaluate_routing(p, tuple(args.seeds), args.frames) for p in args.presets]
    if args.json:
        print(json.dumps([r.__dict__ for r in results], indent=2))
        return
    print("| preset | frames | dynamic cells | precision | recall | F1 | object recall |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(r.row())


if __name__ == "__main__":
    main()
