"""Bounds for `streammem eval generation`'s revisits: the same held-out worlds, seeds and camera
paths (seeds 20,000-20,003, 96 frames, 8 steps per 2-frame chunk), but **teacher-forced**:
before each chunk the pipeline observes the true frames up to it, so its memory holds the
truth and nothing it made feeds forward. Per memory, mean per-frame PSNR (uint8, data range
255) of revisits beyond the window, within it, and novel frames.

What it bounds: free-running, a revisit can at best copy what the model made at the first
visit; here the memory holds the exact earlier view, so the beyond-window gap between
`posekv` / `full` and `window` is how much the model gains from its memory when the memory is
right, and the scores are the model's quality without drift.
Run: `python benchmarks/revisit_bound.py` (about 5 minutes on one thread)."""
import copy
import sys

import numpy as np
import torch

from streammem.eval.generation import classify, psnr, render_path
from streammem.pipelines.generation import GenerationConfig, StreamingGenerationPipeline
from streammem.pipelines.jobs import load_default_generator

torch.set_num_threads(1)
SEEDS, FRAMES, WINDOW = (20_000, 20_001, 20_002, 20_003), 96, 4
memories = sys.argv[1].split(",") if len(sys.argv) > 1 else ["window", "full", "posekv"]
model = load_default_generator().model
rows = {}
for mem in memories:
    scores: dict[str, list[float]] = {"beyond": [], "within": [], "novel": []}
    for seed in SEEDS:
        gt = render_path(seed, FRAMES, model.config.sample_size)
        kinds = classify([f.info["gt"]["camera"]["state"] for f in gt], WINDOW)
        cfg = GenerationConfig(memory=mem, window=WINDOW, history_frames=72, num_inference_steps=8)
        pipe = StreamingGenerationPipeline(model, cfg)
        pipe.start(gt[0].image, pose=gt[0].pose)
        t = 1
        while t < FRAMES:
            snap = copy.deepcopy(pipe.state_dict())
            for f in pipe.stream([g.pose for g in gt[t:t + 2]], progress=False):
                if kinds[f.index] in scores:
                    scores[kinds[f.index]].append(psnr(f.image, gt[f.index].image))
            chunks = pipe.chunks
            pipe.load_state_dict(snap)  # forget what it made; observe the truth instead
            for g in gt[t:t + 2]:
                pipe.step(g)
            pipe.chunks = chunks  # the next chunk's seed is seed + chunk index, as free-running
            t += 2
    rows[mem] = {k: (float(np.mean(v)), len(v)) for k, v in scores.items()}
    print(mem, {k: f"{m:.2f} ({n})" for k, (m, n) in rows[mem].items()}, flush=True)
print("| memory | beyond window | within window | novel |")
print("|---|---:|---:|---:|")
for mem, r in rows.items():
    print(f"| {mem} | {r['beyond'][0]:.2f} ({r['beyond'][1]}) | {r['within'][0]:.2f} ({r['within'][1]}) | "
          f"{r['novel'][0]:.2f} ({r['novel'][1]}) |")
