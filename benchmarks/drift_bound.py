"""How much of `streammem eval drift`'s degradation is drift? The knowledge-limited, drift-free
rollout of each generator.

A generator fed only its own frames loses two things over a rollout: what it made wrong earlier
(drift, which error recycling targets) and what it cannot know (ground the start image never
showed). This benchmark removes the first and keeps the second. Before each chunk the pipeline's
memory holds, for every earlier frame, the best that can be known from the start image alone:
the start image re-projected to that frame's pose through the ground plane where it covers the
view, and the start image's mean colour elsewhere (the colour that minimises the squared error
of ground never seen, given what was seen). Nothing the model made feeds forward. The chunk is
then generated with the rollout's own per-chunk seed and scored against the truth; with the
reference anchor (the default) the start image stays the observed frame it re-projects.

Its first-minus-last degradation (``--edge`` chunks at each end, as in `streammem eval drift`)
estimates what a generator of this quality loses with no drift at all. Chunk 0 is the normal
rollout's (memory = the start image); later chunks, the first ``edge`` included, read the known
frames. The estimate leans high: the flat mean-colour fill is not the best guess of unseen
ground, and the model never saw such frames in training, so a rollout can measure below it.
With ``--drift DIR`` (an `eval drift` output with the same seeds and settings) it prints, for
each model, the share of its measured degradation the drift-free rollout shows, and that
rollout's degradation over plain's measured one (``ratio floor``: roughly where a model as good
as each one would stand with zero drift).

    python benchmarks/drift_bound.py --model plain=DIR --model recycled=DIR [--drift OUT] \
        [--seed 20000 --seed 20001 ...] [--chunks 50] [--edge 3] [--no-reference-anchor] [--pan-speed 80]

Without ``--model`` it measures the shipped generator.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from streammem.eval.generation import TRAINING_PAN_SPEED, psnr, render_path
from streammem.models.video_dit import CausalVideoDiT, reproject
from streammem.pipelines.generation import GenerationConfig, StreamingGenerationPipeline, _to_image, _to_tensor
from streammem.pipelines.jobs import load_default_generator
from streammem.types import Frame


def known_frames(gt: list, focal: float, plane_z: float = 0.0) -> list[np.ndarray]:
    """Per frame of ``gt``: the start image re-projected to its pose where it covers the view,
    the start image's mean colour elsewhere (uint8 RGB)."""
    x0 = _to_tensor(gt[0].image, gt[0].image.shape[0])[None]
    p0 = torch.from_numpy(gt[0].pose)[None].float()
    mean = x0.mean((2, 3), keepdim=True)
    out = []
    for g in gt:
        warped, cover = reproject(x0, p0, torch.from_numpy(g.pose)[None].float(), focal, plane_z)
        f = torch.where(cover > 0, warped, mean)
        out.append(_to_image(f[0]))
    return out


def drift_free(model: CausalVideoDiT, cfg: GenerationConfig, gt: list, known: list, chunks: int) -> list[float]:
    """Per-chunk PSNR of the knowledge-limited, drift-free rollout (see the module docstring)."""
    f = model.config.chunk_frames
    pipe = StreamingGenerationPipeline(model, cfg)
    pipe.start(gt[0].image, pose=gt[0].pose)
    start_image = pipe.observed  # the reference anchor stays the start image, as in the rollout
    per = []
    for c in range(chunks):
        t = 1 + c * f
        before = {k: v.clone() for k, v in pipe.state_dict().items()}
        pipe.chunks = c  # the rollout's seed for this chunk
        made = list(pipe.stream([g.pose for g in gt[t:t + f]], progress=False))
        per.append(float(np.mean([psnr(m.image, gt[t + j].image) for j, m in enumerate(made)])))
        pipe.load_state_dict(before)  # forget what it made; observe what can be known instead
        for j in range(f):
            pipe.step(Frame(index=t + j, timestamp=0.0, image=known[t + j], pose=gt[t + j].pose))
        pipe.observed = start_image
    return per


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", default=[], help="LABEL=DIR (repeatable)")
    ap.add_argument("--seed", type=int, action="append", default=None)
    ap.add_argument("--chunks", type=int, default=50)
    ap.add_argument("--edge", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--no-reference-anchor", action="store_true")
    ap.add_argument("--pan-speed", type=float, default=TRAINING_PAN_SPEED,
                    help="camera pan, world px/s (as `eval drift`)")
    ap.add_argument("--drift", type=Path, default=None, help="an `eval drift` output folder to compare with")
    args = ap.parse_args()
    torch.set_num_threads(1)
    seeds = args.seed or [20_000, 20_001]
    cfg = GenerationConfig(num_inference_steps=args.steps, reference_anchor=not args.no_reference_anchor)
    models = {}
    for spec in args.model:
        label, _, path = spec.partition("=")
        if not path:
            raise SystemExit(f"--model takes LABEL=DIR, got {spec!r}")
        models[label] = CausalVideoDiT.from_pretrained(path).eval()
    if not models:
        models["shipped"] = load_default_generator().model
    mc = next(iter(models.values())).config
    size, f = mc.sample_size, mc.chunk_frames
    measured = {}
    if args.drift is not None:
        d = json.loads((args.drift / "summary.json").read_text())
        st = d["setup"]
        if st["seeds"] != seeds or st["chunks"] != args.chunks or st["edge"] != args.edge \
                or st["steps"] != args.steps or st["memory"] != cfg.memory or st.get("chain_clip_frames") \
                or bool(st.get("reference_anchor")) == args.no_reference_anchor \
                or st.get("pan_speed", TRAINING_PAN_SPEED) != args.pan_speed:
            raise SystemExit(f"{args.drift} was run with other settings: {d['setup']}")
        measured = {k: v["psnr_degradation"] for k, v in d["summary"].items()}
    print(f"seeds {seeds}, {args.chunks} chunks of {f} frames, edge {args.edge}, pan {args.pan_speed:g} px/s, "
          f"reference anchor {'off' if args.no_reference_anchor else 'on'}")
    print("| model | drift-free PSNR first / last | drift-free degradation | measured degradation | "
          "drift-free share | ratio floor vs plain |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, model in models.items():
        curves = []
        for seed in seeds:
            gt = render_path(seed, args.chunks * f + 1, size, pan_speed=args.pan_speed)
            curves.append(drift_free(model, cfg, gt, known_frames(gt, mc.focal_px, mc.plane_z), args.chunks))
        m = np.mean(curves, 0)
        first, last = float(m[:args.edge].mean()), float(m[-args.edge:].mean())
        deg = first - last
        meas = measured.get(label)
        share = f"{deg / meas:.2f}" if meas and meas > 0 else "-"
        floor = f"{deg / measured['plain']:.2f}" if measured.get("plain", 0) > 0 else "-"
        print(f"| {label} | {first:.2f} / {last:.2f} | {deg:+.2f} | "
              f"{'-' if meas is None else f'{meas:+.2f}'} | {share} | {floor} |", flush=True)


if __name__ == "__main__":
    main()
