"""Detection evaluation on StreamWorld: AP50 (``supervision.metrics.MeanAveragePrecision``).

For each preset, ``videos`` seeded worlds of ``frames`` frames (world seed ``1000 * seed +
100 * p + v`` for the preset's position ``p`` in ``PRESETS`` (clean 0, medium 1, hard 2) and
video ``v``, so ``presets=("hard",)`` evaluates the same worlds as the full run; seeds stay
``< 10_000``, training uses seeds >= 10_000_000), and these methods in the same run:

- ``single``: the detector alone (keys from the frame itself);
- ``single+smoother``: the same detections through :class:`IoUTracker` and
  ``sv.DetectionsSmoother(length=5)``, which averages each track's boxes and scores over its
  last 5 frames (the usual box-level fix; the box average lags moving objects);
- ``single+score_smoother``: the same tracks rescored by :class:`TrackScoreSmoother` (mean
  confidence over a track's last 5 frames, boxes as detected), the stronger box-level
  baseline;
- ``feature_bank``: causal aggregation with :class:`~streammem.memory.FeatureBank`;
- ``dual``: causal aggregation with :class:`~streammem.memory.DualMemory`;
- ``feature_bank/protocol`` (with ``protocol=True``): MAMBA's non-causal protocol;
- ``feature_bank/oracle`` (with ``oracle=True``): a diagnostic, not a method. Before each frame
  is detected, the same frame rendered *without corruption* (the same world with
  ``corruption="clean"``) is run through the pipeline and written to its memory; the corrupted
  frame is then detected with that memory and writes nothing. It bounds what a memory could
  hand this detector: if even the clean frame itself adds little, the aggregation, not the
  memory's content, is the limit. (For a temporal-fusion detector the state the corrupted frame
  is fused with is then the clean frame's own fused map, a bound of the same kind.)

AP50 is reported overall, per speed bucket (ground truth restricted to the bucket's objects;
detections that match another bucket's object at IoU >= 0.5 are left out, as ImageNet VID's
motion-IoU evaluation ignores them) and per corruption (frames where it was applied; "none"
is frames without any).

Example:
    >>> from streammem.models.detector import SmallDetector
    >>> det = SmallDetector(width=16, fc_dim=32, heads=4).eval()
    >>> res = evaluate(det, presets=("clean",), videos=1, frames=3, size=64)
    >>> sorted(res["clean"])[:2]
    ['dual', 'feature_bank']
"""

from __future__ import annotations

import json
import time
from dataclasses import replace

import numpy as np
import supervision as sv
from supervision.detection.utils.iou_and_nms import box_iou_batch
from supervision.metrics import MeanAveragePrecision

from streammem.models.detector import SmallDetector
from streammem.pipelines.detection import DetectionConfig, IoUTracker, StreamingDetectionPipeline, TrackScoreSmoother

__all__ = ["evaluate", "format_table", "gt_detections", "ap50"]

SPEEDS = ("slow", "medium", "fast")


def gt_detections(frame) -> sv.Detections:
    gt = frame.info["gt"]
    boxes = np.asarray(gt["boxes"], np.float32).reshape(-1, 4)
    return sv.Detections(xyxy=boxes, class_id=np.asarray(gt["class_id"], int).reshape(-1),
                         data={"speed": np.asarray(gt["speed"], dtype=str).reshape(-1)})


def ap50(preds: list[sv.Detections], targets: list[sv.Detections]) -> float:
    """AP50 in percent, or NaN when no frame has a ground-truth object."""
    if not preds or sum(len(t) for t in targets) == 0:
        return float("nan")
    m = MeanAveragePrecision()
    m.update(list(preds), [sv.Detections(xyxy=t.xyxy, class_id=t.class_id) for t in targets])
    return 100.0 * float(m.compute().map50)


def _bucket(pred: sv.Detections, tgt: sv.Detections, speed: str) -> tuple[sv.Detections, sv.Detections]:
    own = tgt.data["speed"] == speed
    other = tgt[~own]
    if len(pred) and len(other):
        ignore = box_iou_batch(pred.xyxy, other.xyxy).max(1) >= 0.5
        pred = pred[~ignore]
    return pred, tgt[own]


def _scores(preds: list[sv.Detections], targets: list[sv.Detections], corruptions: list[list[str]]) -> dict:
    out = {"all": ap50(preds, targets)}
    for s in SPEEDS:
        pairs = [_bucket(p, t, s) for p, t in zip(preds, targets)]
        out[f"speed:{s}"] = ap50([p for p, _ in pairs], [t for _, t in pairs])
    names = sorted({c for cs in corruptions for c in cs})
    for c in ["none", *names]:
        idx = [i for i, cs in enumerate(corruptions) if (c in cs if c != "none" else not cs)]
        if idx:
            out[f"corr:{c}"] = ap50([preds[i] for i in idx], [targets[i] for i in idx])
    return out


def _copy(d: sv.Detections) -> sv.Detections:
    """The fields a tracker or smoother may change, copied (the single-frame outputs stay as they are)."""
    return sv.Detections(xyxy=d.xyxy.copy(), confidence=None if d.confidence is None else d.confidence.copy(),
                         class_id=None if d.class_id is None else d.class_id.copy())


def _box_smoothed(outs: list[sv.Detections]) -> list[sv.Detections]:
    """``sv.DetectionsSmoother(length=5)`` over :class:`IoUTracker` tracks."""
    tracker, smoother, res = IoUTracker(), sv.DetectionsSmoother(length=5), []
    for d in outs:
        d = tracker.update(_copy(d))
        s = smoother.update_with_detections(d) if len(d) else d
        res.append(s if s.confidence is not None or len(s) == 0 else d)
    return res


def _score_smoothed(outs: list[sv.Detections]) -> list[sv.Detections]:
    """:class:`TrackScoreSmoother` (length 5) over :class:`IoUTracker` tracks."""
    tracker, rescore = IoUTracker(), TrackScoreSmoother(length=5)
    return [rescore.update(tracker.update(_copy(d))) for d in outs]


def evaluate(detector: SmallDetector, presets=("clean", "medium", "hard"), videos: int = 3, frames: int = 48,
             size: int = 256, seed: int = 0, protocol: bool = False, config: DetectionConfig | None = None,
             progress: bool = False, oracle: bool = False, corruption: str | None = None) -> dict:
    """AP50 tables: ``{preset: {method: {"all": ap, "speed:fast": ap, "corr:blur": ap, ...}}}``,
    plus ``"_timing"`` (seconds per frame per method). ``corruption`` overrides the presets'
    corruption level (``"clean"``: the same worlds without corruptions, a diagnostic of how
    much of a preset's difficulty is the scene itself)."""
    from tqdm import tqdm

    from streammem.world import PRESETS, World

    base = config or DetectionConfig(image_size=size)
    results: dict = {}
    timing: dict[str, list[float]] = {}
    for preset in presets:
        pi = list(PRESETS).index(preset) if preset in PRESETS else len(PRESETS)
        preds: dict[str, list] = {}
        targets: list[sv.Detections] = []
        corr: list[list[str]] = []
        for v in range(videos):
            world = World(seed=seed * 1000 + pi * 100 + v, preset=preset, size=size, fps=8, frames=frames,
                          corruption=corruption)
            vid = list(world)
            targets += [gt_detections(f) for f in vid]
            corr += [list(f.info["gt"]["corruptions"]) for f in vid]
            methods = {
                "single": DetectionConfig(**{**base.__dict__, "memory": "none"}),
                "feature_bank": replace(base, memory="feature_bank", mode="causal"),
                "dual": replace(base, memory="dual", mode="causal"),
            }
            for name, cfg in methods.items():
                pipe = StreamingDetectionPipeline(detector, cfg)
                t0 = time.perf_counter()
                out = list(tqdm(pipe.run(vid), total=len(vid), desc=f"{preset} v{v} {name}", disable=not progress))
                timing.setdefault(name, []).append((time.perf_counter() - t0) / max(1, len(vid)))
                preds.setdefault(name, []).extend(out)
                if name == "single":
                    preds.setdefault("single+smoother", []).extend(_box_smoothed(out))
                    preds.setdefault("single+score_smoother", []).extend(_score_smoothed(out))
            if protocol:
                pipe = StreamingDetectionPipeline(detector, replace(base, memory="feature_bank", mode="protocol"))
                preds.setdefault("feature_bank/protocol", []).extend(pipe.run_protocol(vid, seed=v))
            if oracle:
                clean = {f.index: f for f in World(seed=world.seed, preset=preset, size=size, fps=8, frames=frames,
                                                   corruption="clean")}
                pipe = StreamingDetectionPipeline(detector, replace(base, memory="feature_bank", mode="causal"))
                out = []
                for f in vid:
                    pipe._process(clean[f.index])
                    out.append(pipe._process(f, write=False))
                preds.setdefault("feature_bank/oracle", []).extend(out)
        results[preset] = {name: _scores(p, targets, corr) for name, p in preds.items()}
    results["_timing"] = {k: float(np.mean(v)) for k, v in timing.items()}
    return results


def format_table(results: dict) -> str:
    """A markdown table: rows preset x method, columns all / speed buckets / corruptions."""
    cols: list[str] = []
    for preset, methods in results.items():
        if preset.startswith("_"):
            continue
        for scores in methods.values():
            cols += [c for c in scores if c not in cols]
    lines = ["| preset | method | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for preset, methods in results.items():
        if preset.startswith("_"):
            continue
        for name, scores in methods.items():
            cells = [f"{scores[c]:.1f}" if c in scores and scores[c] == scores[c] else "-" for c in cols]
            lines.append(f"| {preset} | {name} | " + " | ".join(cells) + " |")
    if "_timing" in results:
        lines.append("")
        lines.append("ms per frame: " + ", ".join(f"{k} {1000 * v:.1f}" for k, v in results["_timing"].items()))
    return "\n".join(lines)


def main(checkpoint: str, out: str | None = None, **kw) -> dict:
    det = SmallDetector.from_pretrained(checkpoint).eval()
    res = evaluate(det, **kw)
    print(format_table(res))
    if out:
        with open(out, "w") as f:
            json.dump(res, f, indent=2)
    return res
