"""Does a generator drift when fed its own frames? (``streammem eval drift``)

Protocol. Each generator (for the error-recycling issue: a plain fine-tune and an error-recycled
fine-tune of the same base, trained with equal compute) starts from the first frame of a
held-out StreamWorld world (:func:`streammem.eval.generation.render_path`: the training's camera
program, so the true continuation is known) and follows the world's camera path (its poses, as
raw pose actions) for ``chunks`` chunks, fed only its own generated frames and the start
image (:class:`~streammem.pipelines.generation.StreamingGenerationPipeline`, default memory,
or clip chaining with ``chain_clip_frames``; by default the start image is re-projected as the
first anchor of every chunk, ``reference_anchor``). Every model sees the same worlds, poses
and seeds.

Metrics per chunk (the mean over the chunk's frames, then over seeds), images uint8 RGB:

- ``psnr``: PSNR against the ground-truth render (data range 255, per frame, then averaged);
- ``colour_drift``: colour statistics drift from the first frame, the mean over the R, G, B
  channels of ``|mean_c(frame) - mean_c(first)| + |std_c(frame) - std_c(first)|`` (0-255
  units; the ground truth's own value is reported beside it, since the true view changes too);
- ``consistency``: consistency with the first frame, the histogram intersection of the frame's
  and the first frame's per-channel colour histograms (32 bins, averaged over channels; 1 is
  the same colour distribution; the ground truth's own value beside it);
- ``detail``: the variance of the frame's Laplacian (grey levels) over the ground truth's: 1 is
  as much fine detail as the truth, below 1 blur, above 1 more high-frequency energy than the
  truth (noise, over-sharpening). PSNR rewards blur where the content is uncertain, so a model
  that keeps its detail can score lower PSNR than one that washes out; this column tells them
  apart.

Degradation, per metric and model: the first chunk against the last chunk, signed so that a
positive value is a loss (:func:`loss`: ``psnr`` and ``consistency``: first - last;
``colour_drift``: last - first; ``detail``: ``|ln last| - |ln first|``, the growth of its
distance from the truth's detail); ``edge`` > 1 averages the first and last ``edge`` chunks. It
is also computed per seed (``<metric>_degradation_seeds``, in seed order; for every metric but
``detail`` their mean is the degradation), and the
recycled / plain ratio gets a seed-bootstrap interval (:func:`seed_bootstrap_ratio`): with the
reference anchor, how much of the start image's ground the last chunks look at varies from
seed to seed, and so does the degradation. Cost: the median seconds per
chunk of each model (rollouts interleaved seed by seed, the order alternating, so that both
see the same machine load).
Outputs (:func:`write_results`): a PNG per metric against chunk index, ``results.md``,
``summary.json`` and ``chunks.jsonl``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import cv2
import numpy as np
from tqdm.auto import tqdm

from streammem.eval.generation import TRAINING_PAN_SPEED, psnr, render_path
from streammem.models.video_dit import CausalVideoDiT
from streammem.pipelines.generation import GenerationConfig, StreamingGenerationPipeline

__all__ = ["METRICS", "loss", "evaluate_drift", "colour_drift", "consistency", "detail", "seed_bootstrap_ratio",
           "summarize", "write_results", "plot_metric"]

#: metric -> (title, sense): "higher" or "lower" is better, or "one" (the truth's own value, 1)
METRICS = {"psnr": ("PSNR vs ground truth (dB)", "higher"),
           "colour_drift": ("colour statistics drift from the first frame (0-255)", "lower"),
           "consistency": ("colour consistency with the first frame (histogram intersection)", "higher"),
           "detail": ("detail: Laplacian variance / the ground truth's (1 = as sharp)", "one")}


def loss(metric: str, first: float, last: float) -> float:
    """The degradation of ``metric`` from ``first`` to ``last`` (positive = worse): the drop for
    a higher-is-better metric, the rise for a lower-is-better one, and for ``detail`` the growth
    of ``|ln value|``, the distance from the truth's own detail (so blur and noise both count)."""
    sense = METRICS[metric][1]
    if sense == "higher":
        return first - last
    if sense == "lower":
        return last - first
    return abs(float(np.log(max(last, 1e-12)))) - abs(float(np.log(max(first, 1e-12))))


def _stats(img: np.ndarray) -> np.ndarray:
    x = img.reshape(-1, 3).astype(np.float64)
    return np.concatenate([x.mean(0), x.std(0)])


def colour_drift(img: np.ndarray, first: np.ndarray) -> float:
    """Mean over channels of ``|mean_c - mean_c(first)| + |std_c - std_c(first)|`` (0-255)."""
    d = np.abs(_stats(img) - _stats(first))
    return float((d[:3] + d[3:]).mean())


def _hist(img: np.ndarray) -> np.ndarray:
    return np.stack([np.bincount(img[..., c].reshape(-1) // 8, minlength=32) / img[..., c].size for c in range(3)])


def consistency(img: np.ndarray, first: np.ndarray) -> float:
    """Histogram intersection (per channel, 32 bins, averaged) of ``img`` and ``first`` in [0, 1]."""
    return float(np.minimum(_hist(img), _hist(first)).sum(1).mean())


def _laplacian_var(img: np.ndarray) -> float:
    grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(np.float32)
    return float(cv2.Laplacian(grey, cv2.CV_32F).var())


def detail(images, truths) -> float:
    """Fine detail of ``images`` relative to ``truths`` (uint8 RGB, one image or a list of
    them, paired): the sum of their Laplacian variances over the truths' (1 = as sharp as the
    truth; a flat truth counts as variance 1e-6, and a sum keeps one flat frame from
    dominating)."""
    if isinstance(images, np.ndarray):
        images, truths = [images], [truths]
    made = sum(_laplacian_var(i) for i in images)
    return made / max(sum(_laplacian_var(t) for t in truths), 1e-6)


def _rollout(model: CausalVideoDiT, cfg: GenerationConfig, gt: list, chunks: int) -> list[dict]:
    pipe = StreamingGenerationPipeline(model, cfg)
    first = pipe.start(gt[0].image, pose=gt[0].pose).image
    f = model.config.chunk_frames
    rows: list[dict] = []
    frames: dict[int, list] = {}
    t0 = [time.perf_counter()]

    def on_chunk(k, out):
        now = time.perf_counter()
        rows.append({"chunk": k, "seconds": now - t0[0]})
        t0[0] = now

    for fr in pipe.stream([g.pose for g in gt[1:chunks * f + 1]], callback=on_chunk, progress=False):
        frames.setdefault((fr.index - 1) // f, []).append(fr)
    for row in rows:
        mine = frames[row["chunk"]]
        truth = [gt[fr.index].image for fr in mine]
        row["psnr"] = float(np.mean([psnr(fr.image, g) for fr, g in zip(mine, truth)]))
        row["colour_drift"] = float(np.mean([colour_drift(fr.image, first) for fr in mine]))
        row["consistency"] = float(np.mean([consistency(fr.image, first) for fr in mine]))
        row["detail"] = detail([fr.image for fr in mine], truth)
        row["gt_colour_drift"] = float(np.mean([colour_drift(g, gt[0].image) for g in truth]))
        row["gt_consistency"] = float(np.mean([consistency(g, gt[0].image) for g in truth]))
    return rows


def evaluate_drift(models: dict[str, CausalVideoDiT], seeds=(20_000, 20_001), chunks: int = 50, steps: int = 8,
                   edge: int = 1, config: GenerationConfig | None = None, progress: bool = True,
                   pan_speed: float = TRAINING_PAN_SPEED) -> dict:
    """Roll out every model on every seed for ``chunks`` chunks (see the module docstring).
    ``models``: label -> model, all with the same frame size and chunk length. ``pan_speed``:
    the camera program's typical pan (world px per second; 80 is the training's, under which
    the view moves over ground the start image shows only in part or at another scale; a slow
    pan keeps most of the view on ground the start image shows, so that most of what is lost is
    drift). Returns
    ``{"curves": {label: {metric: [per chunk]}}, "summary": {label: {...}}, "chunks": rows,
    "setup": {...}}``."""
    if not models:
        raise ValueError("evaluate_drift needs at least one model")
    if not pan_speed > 0:
        raise ValueError(f"pan_speed must be > 0 (world px per second), got {pan_speed}")
    if chunks < 1 or edge < 1 or 2 * edge > chunks + 1:
        raise ValueError(f"need chunks >= 1 and 1 <= edge <= (chunks + 1) / 2, got chunks={chunks}, edge={edge}")
    sizes = {(m.config.sample_size, m.config.chunk_frames) for m in models.values()}
    if len(sizes) != 1:
        raise ValueError(f"the models differ in frame size or chunk length: {sorted(sizes)}")
    size, f = sizes.pop()
    cfg = config or GenerationConfig(num_inference_steps=steps)
    worlds = {s: render_path(s, chunks * f + 1, size, pan_speed=pan_speed) for s in seeds}
    rows: list[dict] = []
    bar = tqdm(total=len(seeds) * len(models), desc="eval drift", disable=not progress)
    for n, (seed, gt) in enumerate(worlds.items()):
        order = list(models.items())
        for label, model in (order if n % 2 == 0 else order[::-1]):  # alternate who goes first
            rows += [{"model": label, "seed": seed, **r} for r in _rollout(model, cfg, gt, chunks)]
            bar.update(1)
    bar.close()
    curves, summary = summarize(rows, list(models), seeds, chunks, edge)
    setup = {"seeds": list(seeds), "chunks": chunks, "chunk_frames": f, "steps": cfg.num_inference_steps,
             "edge": edge, "size": size, "memory": cfg.memory, "chain_clip_frames": cfg.chain_clip_frames,
             "chain_frames": cfg.chain_frames, "chain_ref_pad": cfg.chain_ref_pad,
             "reference_anchor": cfg.reference_anchor, "pan_speed": pan_speed}
    return {"curves": curves, "summary": summary, "chunks": rows, "setup": setup}


def summarize(rows: list[dict], labels: list[str], seeds, chunks: int, edge: int) -> tuple[dict, dict]:
    """Per-chunk curves (means over seeds) and per-model summaries of ``chunks.jsonl`` rows
    (see the module docstring): ``(curves, summary)`` as :func:`evaluate_drift` returns them."""
    curves, summary = {}, {}
    for label in labels:
        mine = [r for r in rows if r["model"] == label]
        curve = {}
        for key in (*METRICS, "gt_colour_drift", "gt_consistency", "seconds"):
            if any(key not in r for r in mine):
                continue  # rows written before the metric existed
            curve[key] = [float(np.mean([r[key] for r in mine if r["chunk"] == k])) for k in range(chunks)]
        curves[label] = curve
        row = {"seconds_per_chunk": float(np.median([r["seconds"] for r in mine]))}
        by_seed = {seed: sorted((r for r in mine if r["seed"] == seed), key=lambda r: r["chunk"]) for seed in seeds}
        for key in METRICS:
            if key not in curve:
                continue
            first, last = _ends(curve[key], edge)
            row[f"{key}_first"], row[f"{key}_last"] = first, last
            row[f"{key}_degradation"] = loss(key, first, last)
            row[f"{key}_mean"] = float(np.mean(curve[key]))
            row[f"{key}_degradation_seeds"] = [loss(key, *_ends([r[key] for r in by_seed[seed]], edge))
                                               for seed in seeds]
        summary[label] = row
    return curves, summary


def _ends(ys: list[float], edge: int) -> tuple[float, float]:
    """The means of the first and the last ``edge`` values."""
    return float(np.mean(ys[:edge])), float(np.mean(ys[-edge:]))


def seed_bootstrap_ratio(plain: list[float], recycled: list[float], level: float = 0.9, draws: int = 2000,
                         seed: int = 0) -> tuple[float, float] | None:
    """The central ``level`` interval of ``mean(recycled[i]) / mean(plain[i])`` over ``draws``
    resamples ``i`` of the seeds with replacement (the two lists are per-seed degradations in the
    same seed order). Resamples whose plain degradation is not positive have no ratio and are
    left out; None when fewer than half of them have one, or with a single seed."""
    p, r = np.asarray(plain, float), np.asarray(recycled, float)
    if p.shape != r.shape or p.ndim != 1:
        raise ValueError(f"need two per-seed lists of the same length, got {p.shape} and {r.shape}")
    if len(p) < 2:
        return None
    idx = np.random.default_rng(seed).integers(0, len(p), (draws, len(p)))
    den, num = p[idx].mean(1), r[idx].mean(1)
    ok = den > 0
    if ok.sum() < draws / 2:
        return None
    lo, hi = np.quantile(num[ok] / den[ok], [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def plot_metric(curves: dict, metric: str, path: Path) -> Path:
    """A PNG of ``metric`` against chunk index, one line per model (and the ground truth's own
    value where there is one): matplotlib if installed, else a plain pillow drawing."""
    title, _ = METRICS[metric]
    lines = {label: c[metric] for label, c in curves.items()}
    gt_key = f"gt_{metric}"
    if any(gt_key in c for c in curves.values()):
        lines["ground truth"] = next(iter(curves.values()))[gt_key]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return _plot_pillow(lines, title, path)
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    for label, ys in lines.items():
        ax.plot(range(len(ys)), ys, label=label, linestyle="--" if label == "ground truth" else "-")
    ax.set_xlabel("chunk index")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _plot_pillow(lines: dict, title: str, path: Path) -> Path:
    from PIL import Image, ImageDraw

    w, h, m = 640, 360, 40
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    vals = [v for ys in lines.values() for v in ys]
    lo, hi = min(vals), max(vals)
    hi = hi if hi > lo else lo + 1
    d.rectangle([m, m, w - m, h - m], outline="black")
    d.text((m, 10), title, fill="black")
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#7f7f7f"]
    for i, (label, ys) in enumerate(lines.items()):
        n = max(len(ys) - 1, 1)
        pts = [(m + (w - 2 * m) * k / n, h - m - (h - 2 * m) * (y - lo) / (hi - lo)) for k, y in enumerate(ys)]
        d.line(pts, fill=colours[i % 4], width=2)
        d.text((w - m - 120, m + 5 + 12 * i), label, fill=colours[i % 4])
    d.text((m, h - m + 5), f"chunk 0 .. {len(next(iter(lines.values()))) - 1}   y {lo:.3g} .. {hi:.3g}", fill="black")
    img.save(path)
    return path


def format_results(res: dict, plots: dict[str, str]) -> str:
    """The results markdown: the setup, a table per model, the targets' ratios and the plots."""
    s, summary = res["setup"], res["summary"]
    edge = "first / last chunk" if s["edge"] == 1 else f"mean of the first / last {s['edge']} chunks"
    lines = [f"Held-out StreamWorld seeds {', '.join(map(str, s['seeds']))}; {s['chunks']} chunks of "
             f"{s['chunk_frames']} frames ({s['size']} px, {s['steps']} steps, memory {s['memory']}"
             + (f", clips of {s['chain_clip_frames']} frames chained on the last {s['chain_frames']}"
                f"{' + the reference image' if s['chain_ref_pad'] else ''}" if s["chain_clip_frames"] else "")
             + (f"; camera pan {s['pan_speed']:g} px/s" if s.get("pan_speed", TRAINING_PAN_SPEED) != TRAINING_PAN_SPEED
                else "")
             + "); each model fed only its own frames"
             + (" and the start image (re-projected as the first anchor)" if s.get("reference_anchor") else "")
             + f". Columns: {edge}, degradation (positive = worse).", "",
             "| model | PSNR (dB) | PSNR degradation | colour drift | colour drift degradation | consistency | "
             "consistency degradation | detail | detail degradation | s / chunk |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, r in summary.items():
        dt = (f"{r['detail_first']:.2f} / {r['detail_last']:.2f} | {r['detail_degradation']:+.2f}"
              if "detail_first" in r else "- | -")
        lines.append(f"| {label} | {r['psnr_first']:.2f} / {r['psnr_last']:.2f} | {r['psnr_degradation']:+.2f} | "
                     f"{r['colour_drift_first']:.2f} / {r['colour_drift_last']:.2f} | "
                     f"{r['colour_drift_degradation']:+.2f} | {r['consistency_first']:.3f} / "
                     f"{r['consistency_last']:.3f} | {r['consistency_degradation']:+.3f} | {dt} | "
                     f"{r['seconds_per_chunk']:.3f} |")
    if "plain" in summary and "recycled" in summary:
        p, r = summary["plain"], summary["recycled"]
        lines.append("")
        for key in METRICS:
            if f"{key}_degradation" not in p or f"{key}_degradation" not in r:
                continue
            if p[f"{key}_degradation"] > 0:
                target = " (target: <= 0.5)" if key == "psnr" else ""
                spread = ""
                ps, rs = p.get(f"{key}_degradation_seeds"), r.get(f"{key}_degradation_seeds")
                if ps and rs:
                    ci = seed_bootstrap_ratio(ps, rs)
                    spread = (f"; 90% seed-bootstrap interval {ci[0]:.2f} to {ci[1]:.2f}" if ci else "")
                    if key == "psnr":
                        spread += ("; per seed, plain " + " ".join(f"{v:+.2f}" for v in ps)
                                   + ", recycled " + " ".join(f"{v:+.2f}" for v in rs))
                lines.append(f"- {key} degradation, recycled / plain: "
                             f"{r[f'{key}_degradation'] / p[f'{key}_degradation']:.2f}{target}{spread}")
            else:
                lines.append(f"- {key}: the plain fine-tune does not degrade ({p[f'{key}_degradation']:+.3f}); no ratio")
        lines.append(f"- time per chunk, recycled / plain: {r['seconds_per_chunk'] / p['seconds_per_chunk']:.3f} "
                     "(target: within 5%)")
    if plots:
        lines.append("")
        lines += [f"![{key}]({name})" for key, name in plots.items()]
    return "\n".join(lines)


def write_results(res: dict, out: Path) -> dict[str, Path]:
    """Write one PNG per metric, ``results.md``, ``summary.json`` and ``chunks.jsonl`` to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    plots = {key: plot_metric(res["curves"], key, out / f"drift_{key}.png") for key in METRICS
             if all(key in c for c in res["curves"].values())}  # rows from before a metric existed lack it
    (out / "results.md").write_text(format_results(res, {k: p.name for k, p in plots.items()}) + "\n")
    (out / "summary.json").write_text(json.dumps({"summary": res["summary"], "setup": res["setup"],
                                                  "curves": res["curves"]}, indent=1))
    (out / "chunks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in res["chunks"]))
    return {"results": out / "results.md", **plots}
