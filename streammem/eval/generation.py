"""Does the generator remember a place when the camera comes back? (``streammem eval generation``)

Protocol. On held-out StreamWorld seeds (the training's camera program: loops that leave a
place and return to the exact same integer camera state, whose background renders
bit-identically), the generator starts from the world's first frame and follows the world's
camera path (its poses, as raw pose actions), fed only its own frames. Each generated frame is
classed by its camera state:

- **revisit**: the state was seen before, and the camera moved in between; ``within`` the
  rolling window when the last visit is at most ``window`` frames back, ``beyond`` it otherwise;
- **novel**: the state was never seen before in the stream;
- the rest (the camera holding still) is not scored.

Metrics, per frame then averaged over the frames of a class: PSNR against the exact
ground-truth render (uint8 RGB, data range 255; moving objects included), SSIM (scikit-image,
same range), and for revisits PSNR against the model's own frame at the last visit (its
consistency with itself) and the PSNR of the model's own frame at the *first* visit against the
truth (``copy``: what a memory that copied the model's first visit of the place exactly would
score; revisits cannot gain more than this over the window by copying the model's own frames).
Per chunk: memory tokens and seconds. LPIPS is not reported: its
packages fetch network weights at first use, which this machine cannot.

Memories compared: ``window`` (rolling window only), ``full`` (every frame of the history
unpooled, up to the memory's bound), ``posekv`` (RELIC's pooled history), ``posekv_nopose``
(the same without the pose embedding), ``dual`` (Mem4D's static / dynamic split at the
same token budget as ``posekv``).
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING

import numpy as np
from tqdm.auto import tqdm

from streammem.world import PRESETS, World

if TYPE_CHECKING:
    from streammem.models.video_dit import CausalVideoDiT

__all__ = ["MEMORIES", "evaluate_generation", "format_table", "frame_strip", "psnr", "render_path"]

MEMORIES = ("window", "full", "posekv", "posekv_nopose", "dual")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images (data range 255); 100 for identical images."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 100.0 if mse == 0 else 10.0 * np.log10(255.0 ** 2 / mse)


#: the generator training's typical camera pan (world px per second)
TRAINING_PAN_SPEED = 80.0


def render_path(seed: int, frames: int, size: int, fps: float = 4.0, loop_prob: float = 0.6,
                pan_speed: float = TRAINING_PAN_SPEED) -> list:
    """The ground-truth stream of a held-out world with the training's camera program."""
    w = World(seed=seed, preset="clean", size=size, fps=fps, frames=frames, drop_frames=False)
    w.params = dataclasses.replace(PRESETS["clean"], loop_prob=loop_prob, pan_speed=pan_speed)
    return list(w)


def classify(states: list[tuple], window: int) -> list[str]:
    """Per frame: ``"within"`` / ``"beyond"`` (a revisit, by how far back the last visit is),
    ``"novel"``, or ``""`` (held still, or frame 0)."""
    last_seen: dict[tuple, int] = {}
    out = []
    for t, s in enumerate(states):
        kind = ""
        if t > 0 and s != states[t - 1]:
            if s in last_seen:
                kind = "within" if t - last_seen[s] <= window else "beyond"
            else:
                kind = "novel"
        out.append(kind)
        last_seen[s] = t
    return out


def evaluate_generation(model: CausalVideoDiT, seeds=(20_000, 20_001, 20_002, 20_003), frames: int = 96,
                        memories=MEMORIES, steps: int = 8, window: int = 4, history_frames: int = 72,
                        reference_anchor: bool = True, progress: bool = True) -> dict:
    """Roll out every memory on every seed; returns per-memory summaries, per-frame records and
    per-chunk cost (see the module docstring)."""
    from skimage.metrics import structural_similarity

    from streammem.pipelines.generation import GenerationConfig, StreamingGenerationPipeline

    size = model.config.sample_size
    records, chunks = [], []
    worlds = {s: render_path(s, frames, size) for s in seeds}
    shown: dict[str, list[np.ndarray]] = {"truth": [f.image for f in worlds[seeds[0]]]}  # the first seed's frames
    bar = tqdm(total=len(seeds) * len(memories), desc="eval generation", disable=not progress)
    for name in memories:
        mem = "posekv" if name == "posekv_nopose" else name
        cfg = GenerationConfig(memory=mem, window=window, history_frames=history_frames, num_inference_steps=steps,
                               reference_anchor=reference_anchor,
                               use_pose=name != "posekv_nopose")
        for seed, gt in worlds.items():
            states = [f.info["gt"]["camera"]["state"] for f in gt]
            kinds = classify(states, window)
            pipe = StreamingGenerationPipeline(model, cfg)
            made = {0: pipe.start(gt[0].image, pose=gt[0].pose).image}
            last_visit: dict[tuple, int] = {states[0]: 0}
            first_visit: dict[tuple, int] = {states[0]: 0}
            t0 = time.perf_counter()

            def on_chunk(k, out, t0=[t0]):  # noqa: B006 - a cell for the chunk timer
                now = time.perf_counter()
                chunks.append({"memory": name, "seed": seed, "chunk": k, "seconds": now - t0[0],
                               "tokens": pipe.memory.num_tokens})
                t0[0] = now

            for f in pipe.stream([g.pose for g in gt[1:]], callback=on_chunk, progress=False):
                t = f.index
                made[t] = f.image
                rec = {"memory": name, "seed": seed, "frame": t, "kind": kinds[t], "psnr": psnr(f.image, gt[t].image),
                       "ssim": float(structural_similarity(f.image, gt[t].image, channel_axis=2, data_range=255))}
                if kinds[t] in ("within", "beyond"):
                    rec["psnr_self"] = psnr(f.image, made[last_visit[states[t]]])
                    rec["psnr_copy"] = psnr(made[first_visit[states[t]]], gt[t].image)
                last_visit[states[t]] = t
                first_visit.setdefault(states[t], t)
                records.append(rec)
            if seed == seeds[0]:
                shown[name] = [made[t] for t in sorted(made)]
            bar.update(1)
    bar.close()
    return {"summary": summarise(records, chunks), "records": records, "chunks": chunks, "frames": shown,
            "setup": {"seeds": list(seeds), "frames": frames, "steps": steps, "window": window,
                      "history_frames": history_frames, "size": size,
                      "reference_anchor": reference_anchor}}


def frame_strip(frames: dict[str, list[np.ndarray]], kinds: list[str] | None = None, columns: int = 12,
                scale: int = 2) -> np.ndarray:
    """One RGB image: a row per entry of ``frames`` (name -> the rollout's frames, the same count
    each), ``columns`` frames spread evenly over the rollout, each ``scale`` times larger, the
    row's name on the left and, with ``kinds`` (per frame, :func:`classify`), "beyond" revisits
    outlined in green."""
    import cv2

    names = list(frames)
    n = min(len(v) for v in frames.values())
    cols = np.linspace(0, n - 1, min(columns, n)).round().astype(int)
    h, w = frames[names[0]][0].shape[:2]
    h, w, label, pad = h * scale, w * scale, 120, 4
    out = np.full((len(names) * (h + pad) + 20, label + len(cols) * (w + pad), 3), 255, np.uint8)
    for j, t in enumerate(cols):
        x = label + j * (w + pad)
        cv2.putText(out, f"{t}", (x + 2, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        for i, name in enumerate(names):
            y = 20 + i * (h + pad)
            out[y:y + h, x:x + w] = cv2.resize(frames[name][t], (w, h), interpolation=cv2.INTER_NEAREST)
            if kinds is not None and kinds[t] == "beyond":
                cv2.rectangle(out, (x, y), (x + w - 1, y + h - 1), (0, 170, 0), 2)
    for i, name in enumerate(names):
        cv2.putText(out, name, (4, 20 + i * (h + pad) + h // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1,
                    cv2.LINE_AA)
    return out


def summarise(records: list[dict], chunks: list[dict]) -> dict:
    out: dict = {}
    for name in dict.fromkeys(r["memory"] for r in records):
        mine = [r for r in records if r["memory"] == name]
        row: dict = {}
        for kind in ("within", "beyond", "novel"):
            rs = [r for r in mine if r["kind"] == kind]
            row[f"{kind}_frames"] = len(rs)
            row[f"{kind}_psnr"] = float(np.mean([r["psnr"] for r in rs])) if rs else float("nan")
            row[f"{kind}_ssim"] = float(np.mean([r["ssim"] for r in rs])) if rs else float("nan")
            if kind != "novel":
                row[f"{kind}_psnr_self"] = float(np.mean([r["psnr_self"] for r in rs])) if rs else float("nan")
                row[f"{kind}_psnr_copy"] = float(np.mean([r["psnr_copy"] for r in rs])) if rs else float("nan")
        cs = [c for c in chunks if c["memory"] == name]
        row["tokens_max"] = max(c["tokens"] for c in cs)
        row["seconds_per_chunk"] = float(np.median([c["seconds"] for c in cs]))
        out[name] = row
    return out


def format_table(summary: dict) -> str:
    head = ("| memory | revisit in window PSNR / SSIM | revisit beyond window PSNR / SSIM | beyond: vs own last "
            "visit PSNR | beyond: own first visit vs truth | novel PSNR / SSIM | tokens held | s per chunk |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in summary.items():
        lines.append(f"| {name} | {r['within_psnr']:.2f} / {r['within_ssim']:.3f} ({r['within_frames']}) | "
                     f"{r['beyond_psnr']:.2f} / {r['beyond_ssim']:.3f} ({r['beyond_frames']}) | "
                     f"{r['beyond_psnr_self']:.2f} | {r['beyond_psnr_copy']:.2f} | {r['novel_psnr']:.2f} / {r['novel_ssim']:.3f} ({r['novel_frames']}) | "
                     f"{r['tokens_max']} | {r['seconds_per_chunk']:.3f} |")
    return "\n".join(lines)
