"""What preparing a chunk's re-projected anchors once saves (`CausalVideoDiT.prepare_anchor`):
the shipped generator, one 2-frame chunk, 8 denoising steps, two anchors (the pipeline's default:
the start image and the newest frame), no memory context; the anchors re-projected at every
step against once per chunk, interleaved in one process, median of 12 rounds (one CPU thread).
Run: `python benchmarks/prepared_anchor.py` (about 10 seconds)."""
import time

import numpy as np
import torch

from streammem.pipelines.jobs import load_default_generator

torch.set_num_threads(1)
model = load_default_generator().model
pose = torch.eye(4)
pose[2, 3] = -1000.0
poses = pose.expand(1, 2, 4, 4).clone()
poses[0, 1, 0, 3] += 20.0
g = torch.Generator().manual_seed(0)
anchors, anchor_poses = torch.rand(1, 2, 3, 64, 64, generator=g) * 2 - 1, pose.expand(1, 2, 4, 4).clone()
x, actions, prompt = torch.randn(1, 2, 3, 64, 64, generator=g), torch.zeros(1, 2, 13), torch.zeros(1, 4, dtype=torch.long)


@torch.no_grad()
def chunk(prepared: bool) -> None:
    a = model.prepare_anchor(anchors, anchor_poses, poses) if prepared else anchors
    for i in range(8):
        model(x, torch.tensor([1000.0 - 125 * i]), actions, poses, prompt, None, a, anchor_pose=anchor_poses)


times: dict[bool, list[float]] = {False: [], True: []}
for _ in range(12):
    for prepared in (False, True):
        t0 = time.perf_counter()
        chunk(prepared)
        times[prepared].append(time.perf_counter() - t0)
every, once = np.median(times[False]), np.median(times[True])
print(f"8 steps, two anchors: re-projected every step {every * 1000:.1f} ms, once per chunk {once * 1000:.1f} ms "
      f"(once / every {once / every:.3f})")
