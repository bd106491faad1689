"""The detection job (``streammem detect``): stream a source through one detection head and
write ``annotated.mp4``, ``detections.jsonl`` (one line per frame) and ``summary.json``.

Example:
    >>> import tempfile
    >>> from streammem.pipelines.jobs import run_detect
    >>> res = run_detect("world:seed=1,preset=hard,size=128,frames=6", tempfile.mkdtemp(), detector="hog")
    >>> res.summary["frames_processed"], res.jsonl.name
    (6, 'detections.jsonl')
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import asdict, is_dataclass
from pathlib import Path

from streammem.checkpoints import ROOT
from streammem.io import SourceError, open_source
from streammem.pipelines.detection import MEMORIES, MODES, DetectionHead, TrackRescorer
from streammem.pipelines.jobs.base import JobResult, OutputDir, drain, fit_to, output_fps, write_summary
from streammem.pipelines.stream import run_stream

__all__ = ["DEFAULT_CHECKPOINT", "DETECTORS", "DEFAULT_THRESHOLDS", "CANDIDATE_THRESHOLDS", "build_detection_head",
           "run_detect"]

DEFAULT_CHECKPOINT = str(ROOT / "detector")
#: ``--detector`` choices besides ``hf:<model id or folder>`` (a transformers detector)
DETECTORS = ("small", "hog")
#: default score threshold per detector: a class probability for the small detector and hf:
#: models, the (re-scored) SVM margin for HOG.
DEFAULT_THRESHOLDS = {"small": 0.3, "hog": 0.0, "hf": 0.3}
#: with ``--rescore track``, the head passes its candidates down to this score, so that the
#: track re-scoring can lift a weak box of a confident track above the requested threshold
CANDIDATE_THRESHOLDS = {"small": 0.1, "hog": -0.5, "hf": 0.05}
#: protocol mode reads the whole video before detecting: the most frames it holds without --max-frames
PROTOCOL_MAX_FRAMES = 10_000


def build_detection_head(detector: str = "small", checkpoint: str | None = None, memory: str = "feature_bank",
                         mode: str = "causal", score_threshold: float | None = None,
                         image_size: int | None = None, hog_size: int | None = None,
                         classes: str | None = None, rescore: str | None = None,
                         device: str | None = None) -> DetectionHead:
    """The detection head for ``detector``: ``"small"`` (the shipped checkpoint or
    ``checkpoint``; trained on StreamWorld's 11 classes), ``"hog"`` (OpenCV's people detector,
    working at the frame's native size up to ``hog_size`` on the longer side: None is
    ``HOGConfig.max_side``'s default, 0 no cap) or ``"hf:<model id or folder>"`` (a
    ``transformers`` detector; ``classes`` names what an open-vocabulary one looks for).

    ``rescore``: ``"track"`` adds :class:`~streammem.pipelines.detection.TrackRescorer` (the
    head then passes candidates down to ``CANDIDATE_THRESHOLDS`` and the re-scored detections
    are cut at the score threshold), ``"none"`` leaves the head's output as it is; None is
    ``"track"`` for hf: models and ``"none"`` for the others. ``device``: hf: models only (None:
    accelerate's choice). Raises ValueError on bad options or a missing checkpoint, with the fix
    in the message, and HubUnavailable when an hf: model cannot be fetched."""
    from streammem.models.hf import parse_spec
    from streammem.pipelines.detection import RESCORERS, TrackRescoreConfig

    hf_name = parse_spec(detector)
    kind = "hf" if hf_name is not None else detector
    if kind not in DETECTORS + ("hf",):
        raise ValueError(f"--detector must be one of {', '.join(DETECTORS)} or hf:<model id or folder>, "
                         f"got {detector!r}")
    if memory not in MEMORIES:
        raise ValueError(f"--memory must be one of {', '.join(MEMORIES)}, got {memory!r}")
    if mode not in MODES:
        raise ValueError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    rescore = rescore or ("track" if kind == "hf" else "none")
    if rescore not in RESCORERS:
        raise ValueError(f"--rescore must be one of {', '.join(RESCORERS)}, got {rescore!r}")
    if rescore == "track" and mode != "causal":
        raise ValueError("--rescore track follows tracks through the stream's order; use it with --mode causal "
                         "(or pass --rescore none with --mode protocol)")
    thr = DEFAULT_THRESHOLDS[kind] if score_threshold is None else float(score_threshold)
    if hog_size is not None and kind != "hog":
        raise ValueError(f"--hog-size applies to --detector hog only (got --detector {detector})")
    if classes is not None and kind != "hf":
        raise ValueError(f"--classes applies to open-vocabulary hf: models (e.g. hf:google/owlv2-base-patch16-ensemble),"
                         f" not to --detector {detector}")
    if device is not None and kind != "hf":
        raise ValueError(f"--device applies to hf: models only (got --detector {detector})")
    tracker = None
    head_thr = thr
    if rescore == "track":
        tracker = TrackRescorer(TrackRescoreConfig(score_threshold=thr))
        head_thr = min(thr, CANDIDATE_THRESHOLDS[kind])
    if kind == "hf":
        from streammem.pipelines.detection import HF_MEMORIES, HFConfig, HFDetectionPipeline

        if memory not in HF_MEMORIES:
            raise ValueError(f"hf: detectors take --memory {' or '.join(HF_MEMORIES)}, got {memory!r}")
        if image_size is not None:
            raise ValueError("--image-size applies to --detector small; an hf: model's image processor sets its size")
        if not 0.0 <= thr <= 1.0:
            raise ValueError(f"--score-threshold of an hf: detector is a probability in [0, 1], got {thr}")
        cfg = HFConfig(memory=memory, mode=mode, score_threshold=head_thr,
                       candidate_threshold=min(head_thr, HFConfig.candidate_threshold))
        head = HFDetectionPipeline.from_pretrained(hf_name, classes=classes, config=cfg, tracker=tracker, device=device)
        head.display_threshold = thr
        return head
    if kind == "hog":
        from streammem.models.hog import WINDOW
        from streammem.pipelines.detection import HOGConfig, HOGDetectionPipeline

        kw = {}
        if hog_size is not None:
            if hog_size != 0 and hog_size < WINDOW[1]:
                raise ValueError(f"--hog-size must be 0 (native size, no cap) or >= {WINDOW[1]} (the detector's "
                                 f"window height), got {hog_size}")
            kw["max_side"] = hog_size or None
        return HOGDetectionPipeline(config=HOGConfig(memory=memory, mode=mode, score_threshold=head_thr, **kw),
                                    tracker=tracker)
    from streammem.models.detector import SmallDetector
    from streammem.pipelines.detection import (
        DetectionConfig,
        StreamingDetectionPipeline,
    )

    path = Path(checkpoint or DEFAULT_CHECKPOINT)
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise ValueError(f"no detector checkpoint at {path} (config.json + model.safetensors); train one with "
                         f"`streammem train detector --out {path}`, pass --checkpoint, or use --detector hog")
    det = SmallDetector.from_pretrained(str(path)).eval()
    kw = {"memory": memory, "mode": mode, "score_threshold": head_thr}
    if image_size is not None:
        kw["image_size"] = image_size
    return StreamingDetectionPipeline(det, DetectionConfig(**kw), tracker=tracker, display_threshold=thr)


def run_detect(source: str, out: str | os.PathLike, detector: str = "small", checkpoint: str | None = None,
               memory: str = "feature_bank", mode: str = "causal", max_frames: int | None = None,
               score_threshold: float | None = None, image_size: int | None = None, progress: bool = False,
               hog_size: int | None = None, classes: str | None = None, rescore: str | None = None,
               device: str | None = None, **source_options) -> JobResult:
    """Stream ``source`` through a detection head; write ``OUT/annotated.mp4``,
    ``OUT/detections.jsonl`` (one line per frame) and ``OUT/summary.json``.

    Raises ValueError (bad options, no checkpoint) and SourceError (the source cannot be
    opened, or fails before its first frame), leaving nothing behind. A source that fails
    mid-stream keeps everything before the failure: the video and JSONL are finished, the
    summary records the error, and the error is returned in ``result.error``. Protocol mode reads the whole video (up to
    ``max_frames``) before detecting, since its order is shuffled.
    """
    # 1. check inputs, build the head, open the source
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"--max-frames must be >= 1, got {max_frames}")
    head = build_detection_head(detector, checkpoint, memory, mode, score_threshold, image_size, hog_size,
                                classes=classes, rescore=rescore, device=device)
    src = open_source(source, **source_options)
    info = src.info
    counts: Counter = Counter()
    n_frames = 0
    with OutputDir(out) as od:
        out = od.path
        video = od.video("annotated.mp4", fps=output_fps(info, source_options))
        jsonl = od.jsonl(head.records_file, flush_every=16)

        def write(frame, det, latency_ms: float | None) -> None:
            nonlocal n_frames
            video.write(fit_to(head.annotate(frame.image, det), video.size), timestamp=frame.timestamp)
            for rec in head.records(frame, det):
                if latency_ms is not None:
                    rec["latency_ms"] = round(latency_ms, 3)
                jsonl.write(rec)
            counts.update(str(n) for n in (det.data.get("class_name", []) if len(det) else []))
            n_frames += 1
            od.keep()

        # 2. detect, writing as we go
        error: SourceError | None = None
        if mode == "causal":
            run = run_stream(src, head, sink=lambda it: write(it.frame, it.output, it.latency_ms),
                             max_frames=max_frames, progress=progress)
            error = drain(run)
            run_stats = run.stats.summary()
        else:
            frames = []
            cap = max_frames or PROTOCOL_MAX_FRAMES
            try:
                for f in src:
                    frames.append(f)
                    if len(frames) > cap:
                        raise ValueError(f"protocol mode holds the whole video in memory and {source} has more "
                                         f"than {cap} frames; pass --max-frames (or use --mode causal)")
                    if max_frames is not None and len(frames) >= max_frames:
                        break
            except SourceError as exc:
                if not frames:
                    raise  # not one frame: bad input, nothing is left
                error = exc
            t0 = time.perf_counter()
            dets = head.run_protocol(frames)
            wall = time.perf_counter() - t0
            for f, d in zip(frames, dets):
                write(f, d, None)
            run_stats = {"frames_processed": len(frames), "wall_s": round(wall, 3),
                         "fps": len(frames) / wall if wall > 0 else float("nan"),
                         "error": None if error is None else f"{type(error).__name__}: {error}"}
        if error is not None and not od.kept:
            raise error  # not one frame: bad input, nothing is left
        od.close()
        video_path = video.path if video.count else None
        jsonl_path = jsonl.path
        # 3. summary
        cfg = head.config
        tracker = getattr(head, "tracker", None)
        summary = {
            "source": source,
            "source_info": info.to_dict(),
            "detector": detector,
            "checkpoint": str(checkpoint or DEFAULT_CHECKPOINT) if detector == "small" else (
                detector[3:] if detector.startswith("hf:") else None),
            "config": asdict(cfg) if is_dataclass(cfg) else str(cfg),
            "rescore": {"rule": "TrackRescorer", **asdict(tracker.config)} if isinstance(tracker, TrackRescorer) else None,
            "outputs": {"video": str(video_path) if video_path else None, "jsonl": str(jsonl_path)},
            **run_stats,
            "frames_written": n_frames,
            "detections": int(sum(counts.values())),
            "detections_per_frame": sum(counts.values()) / max(1, n_frames),
            "per_class": dict(sorted(counts.items())),
            "pipeline": head.stats(),
            "error": None if error is None else str(error),
        }
        summary_path = write_summary(out / "summary.json", summary)
    return JobResult(summary, video_path, jsonl_path, summary_path, error)
