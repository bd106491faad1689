"""Detection commands, mounted by ``streammem.cli``:

    streammem detect SOURCE --out DIR     detections with memory aggregation: annotated mp4,
                                          per-frame JSONL, summary.json
    streammem train detector              train the shipped small detector on StreamWorld
    streammem eval detection              AP50 tables on StreamWorld (single / smoother / banks)

:func:`run_detect` is the job behind ``streammem detect``, usable from Python.

Example:
    >>> from streammem.detect_cli import run_detect                                  # doctest: +SKIP
    >>> res = run_detect("world:seed=1,preset=hard,size=128,frames=6", "out", detector="hog")  # doctest: +SKIP
    >>> res.summary["frames_processed"]                                               # doctest: +SKIP
    6
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Optional

import supervision as sv
import typer

from streammem.io import JsonlWriter, SourceError, VideoWriter, open_source
from streammem.io.sinks import to_jsonable

__all__ = ["DEFAULT_CHECKPOINT", "DetectResult", "build_pipeline", "run_detect", "register"]

DEFAULT_CHECKPOINT = str(Path(__file__).resolve().parent / "checkpoints" / "detector")
DETECTORS = ("small", "hog")
MEMORIES = ("feature_bank", "dual", "none")
MODES = ("causal", "protocol")
#: default --score-threshold per detector: a class probability for the small detector, the
#: (re-scored) SVM margin for HOG.
DEFAULT_THRESHOLDS = {"small": 0.3, "hog": 0.0}


@dataclass
class DetectResult:
    """What :func:`run_detect` wrote. ``error`` is the source error that stopped the run early
    (everything before it is written), or None."""

    summary: dict
    video: Path | None
    jsonl: Path
    summary_path: Path
    error: SourceError | None = None


def build_pipeline(detector: str = "small", checkpoint: str | None = None, memory: str = "feature_bank",
                   mode: str = "causal", score_threshold: float | None = None, image_size: int | None = None):
    """The detection pipeline for ``detector`` (``"small"``: the shipped checkpoint or
    ``checkpoint``; ``"hog"``: OpenCV's people detector). Raises ValueError on bad options or
    a missing checkpoint, with the fix in the message."""
    if detector not in DETECTORS:
        raise ValueError(f"--detector must be one of {', '.join(DETECTORS)}, got {detector!r}")
    if memory not in MEMORIES:
        raise ValueError(f"--memory must be one of {', '.join(MEMORIES)}, got {memory!r}")
    if mode not in MODES:
        raise ValueError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    thr = DEFAULT_THRESHOLDS[detector] if score_threshold is None else float(score_threshold)
    if detector == "hog":
        from streammem.models.hog import HOGConfig, HOGDetectionPipeline

        return HOGDetectionPipeline(config=HOGConfig(memory=memory, mode=mode, score_threshold=thr))
    from streammem.models.detector import SmallDetector
    from streammem.pipelines.detection import DetectionConfig, StreamingDetectionPipeline

    path = Path(checkpoint or DEFAULT_CHECKPOINT)
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise ValueError(f"no detector checkpoint at {path} (config.json + model.safetensors); train one with "
                         f"`streammem train detector --out {path}`, pass --checkpoint, or use --detector hog")
    det = SmallDetector.from_pretrained(str(path)).eval()
    kw = {"memory": memory, "mode": mode, "score_threshold": thr}
    if image_size is not None:
        kw["image_size"] = image_size
    return StreamingDetectionPipeline(det, DetectionConfig(**kw))


def _record(frame, det: sv.Detections, latency_ms: float | None) -> dict:
    names = det.data.get("class_name") if len(det) else None
    dets = []
    for i in range(len(det)):
        d = {"xyxy": [round(float(v), 2) for v in det.xyxy[i]], "confidence": round(float(det.confidence[i]), 5),
             "class_id": int(det.class_id[i]), "class_name": str(names[i]) if names is not None else None}
        if det.tracker_id is not None:
            d["tracker_id"] = int(det.tracker_id[i])
        dets.append(d)
    rec = {"frame": frame.index, "timestamp": round(float(frame.timestamp), 6), "num_detections": len(det),
           "detections": dets}
    if latency_ms is not None:
        rec["latency_ms"] = round(latency_ms, 3)
    return rec


def _labels(det: sv.Detections) -> list[str]:
    names = det.data.get("class_name", [str(c) for c in det.class_id]) if len(det) else []
    return [f"{n} {c:.2f}" for n, c in zip(names, det.confidence)]


def run_detect(source: str, out: str | os.PathLike, detector: str = "small", checkpoint: str | None = None,
               memory: str = "feature_bank", mode: str = "causal", max_frames: int | None = None,
               score_threshold: float | None = None, image_size: int | None = None, progress: bool = False,
               **source_options) -> DetectResult:
    """Stream ``source`` through a detection pipeline; write ``OUT/annotated.mp4``,
    ``OUT/detections.jsonl`` (one line per frame) and ``OUT/summary.json``.

    Raises ValueError (bad options, no checkpoint) and SourceError (the source cannot be
    opened) before writing anything. A source that fails mid-stream keeps everything before
    the failure: the video and JSONL are finished, the summary records the error, and the
    error is returned in ``result.error``. Protocol mode reads the whole video (up to
    ``max_frames``) before detecting, since its order is shuffled.
    """
    from streammem.pipelines.stream import run_stream

    # 1. check inputs, build the pipeline, open the source
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"--max-frames must be >= 1, got {max_frames}")
    pipe = build_pipeline(detector, checkpoint, memory, mode, score_threshold, image_size)
    src = open_source(source, **source_options)
    info = src.info
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fps = info.fps or 8.0
    if source_options.get("fps"):
        fps = min(fps, source_options["fps"])
    fps /= max(1, source_options.get("stride", 1))
    video = VideoWriter(out / "annotated.mp4", fps=fps)
    jsonl = JsonlWriter(out / "detections.jsonl", flush_every=16)
    boxes, labels = sv.BoxAnnotator(thickness=2), sv.LabelAnnotator(text_scale=0.4, text_padding=3)
    counts: Counter = Counter()
    n_frames = 0

    def write(frame, det: sv.Detections, latency_ms: float | None) -> None:
        nonlocal n_frames
        img = boxes.annotate(frame.image.copy(), det)
        img = labels.annotate(img, det, labels=_labels(det))
        video.write(img)
        jsonl.write(_record(frame, det, latency_ms))
        counts.update(str(n) for n in (det.data.get("class_name", []) if len(det) else []))
        n_frames += 1

    # 2. detect, writing as we go
    error: SourceError | None = None
    run_stats: dict = {}
    try:
        if mode == "causal":
            run = run_stream(src, pipe, sink=lambda it: write(it.frame, it.output, it.latency_ms),
                             max_frames=max_frames, progress=progress)
            try:
                for _ in run:
                    pass
            except SourceError as exc:
                error = exc
            run_stats = run.stats.summary()
        else:
            import time

            frames = []
            try:
                for f in src:
                    frames.append(f)
                    if max_frames is not None and len(frames) >= max_frames:
                        break
            except SourceError as exc:
                error = exc
            t0 = time.perf_counter()
            dets = pipe.run_protocol(frames)
            wall = time.perf_counter() - t0
            for f, d in zip(frames, dets):
                write(f, d, None)
            run_stats = {"frames_processed": len(frames), "wall_s": round(wall, 3),
                         "fps": len(frames) / wall if wall > 0 else float("nan"),
                         "error": None if error is None else f"{type(error).__name__}: {error}"}
    finally:
        video_path = video.close()
        jsonl_path = jsonl.close(commit=True)
    # 3. summary
    cfg = pipe.config
    summary = {
        "source": source,
        "source_info": info.to_dict(),
        "detector": detector,
        "checkpoint": None if detector != "small" else str(checkpoint or DEFAULT_CHECKPOINT),
        "config": asdict(cfg) if is_dataclass(cfg) else str(cfg),
        "outputs": {"video": str(video_path) if video_path else None, "jsonl": str(jsonl_path)},
        **run_stats,
        "frames_written": n_frames,
        "detections": int(sum(counts.values())),
        "detections_per_frame": sum(counts.values()) / max(1, n_frames),
        "per_class": dict(sorted(counts.items())),
        "pipeline": pipe.stats(),
        "error": None if error is None else str(error),
    }
    summary_path = out / "summary.json"
    tmp = summary_path.with_name(summary_path.name + ".partial")
    tmp.write_text(json.dumps(to_jsonable(summary), indent=2, allow_nan=False, default=str) + "\n")
    os.replace(tmp, summary_path)
    return DetectResult(summary, video_path, jsonl_path, summary_path, error)


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def register(app: typer.Typer, train_app: typer.Typer, eval_app: typer.Typer) -> None:
    """Add ``detect``, ``train detector`` and ``eval detection``."""

    @app.command("detect")
    def detect(
        source: str = typer.Argument(..., help="video file, image folder, camera:N, URL or world:..."),
        out: str = typer.Option("outputs/detect", "--out", "-o", help="output folder"),
        detector: str = typer.Option("small", help="small (the shipped checkpoint) or hog (OpenCV people detector)"),
        checkpoint: Optional[str] = typer.Option(None, help="small detector folder (default: the shipped one)"),
        memory: str = typer.Option("feature_bank", help="feature_bank, dual or none (the detector alone)"),
        mode: str = typer.Option("causal", help="causal (streaming) or protocol (MAMBA's shuffled whole-video test)"),
        max_frames: Optional[int] = typer.Option(None, help="stop after this many frames"),
        score_threshold: Optional[float] = typer.Option(
            None, help="drop detections below this (default: 0.3 for small, a probability; 0.0 for hog, an SVM margin)"),
        image_size: Optional[int] = typer.Option(None, help="small detector: resize the long side to this"),
        stride: int = typer.Option(1, help="keep every n-th frame"),
        max_side: Optional[int] = typer.Option(None, help="downscale frames so the longer side is at most this"),
        backend: str = typer.Option("auto", help="video reader: auto, decord or opencv"),
        progress: bool = typer.Option(True, help="show a progress bar"),
    ) -> None:
        """Detect objects in SOURCE with memory aggregation.

        Writes OUT/annotated.mp4, OUT/detections.jsonl (one line per frame) and OUT/summary.json.
        """
        opts: dict = {"stride": stride, "backend": backend}
        if max_side is not None:
            opts["max_side"] = max_side
        try:
            res = run_detect(source, out, detector=detector, checkpoint=checkpoint, memory=memory, mode=mode,
                             max_frames=max_frames, score_threshold=score_threshold, image_size=image_size,
                             progress=progress, **opts)
        except (SourceError, ValueError) as exc:
            _fail(str(exc))
        s = res.summary
        fps = s.get("fps")
        typer.echo(f"streammem detect: {s['frames_written']} frames, {s['detections']} detections "
                   f"({s['detections_per_frame']:.2f} per frame), detector {detector}, memory {memory}, mode {mode}"
                   + (f", {fps:.1f} fps" if isinstance(fps, float) and fps == fps else ""))
        if s["per_class"]:
            typer.echo("  classes: " + ", ".join(f"{k} {v}" for k, v in s["per_class"].items()))
        typer.echo(f"  video:   {res.video}")
        typer.echo(f"  jsonl:   {res.jsonl}")
        typer.echo(f"  summary: {res.summary_path}")
        if res.error is not None:
            _fail(f"{res.error} (everything before it was written)", code=1)

    @train_app.command("detector")
    def train_detector(
        minutes: float = typer.Option(30.0, help="wall-clock training budget"),
        out: str = typer.Option(DEFAULT_CHECKPOINT, "--out", "-o", help="checkpoint folder"),
        batch: int = typer.Option(3, help="triples per step"),
        lr: float = typer.Option(2e-3, help="peak learning rate"),
        size: int = typer.Option(256, help="frame side in pixels"),
        seed: int = typer.Option(0, help="data and init seed"),
        workers: int = typer.Option(1, help="DataLoader worker processes rendering clips"),
        threads: int = typer.Option(2, help="torch threads of the training process"),
        save_every_min: float = typer.Option(5.0, help="checkpoint period (minutes)"),
        max_steps: Optional[int] = typer.Option(None, help="stop after this many steps"),
        log: Optional[str] = typer.Option(None, help="append per-step losses to this JSONL file"),
        model: Optional[str] = typer.Option(None, help='SmallDetector keyword arguments as JSON, e.g. \'{"width": 32}\'; with --resume they override the checkpoint\'s config (e.g. \'{"geo_pos": true}\': new parameters start at their init)'),
        resume: Optional[str] = typer.Option(None, help="start from this checkpoint folder's weights"),
        clip_len: int = typer.Option(12, help="frames per rendered clip (references come from the same clip)"),
        self_ref: float = typer.Option(0.2, help="share of single-frame triples (one frame three times)"),
        key_corrupt: float = typer.Option(0.0, help="share of triples whose key frame gets an extra corruption"),
        history: int = typer.Option(0, help="most consecutive frames before a key frame that its temporal fusion state is built from (a fusion_radius model)"),
    ) -> None:
        """Train the small detector on StreamWorld clips (MAMBA-style triples); saves
        config.json + model.safetensors to OUT as it goes."""
        from streammem.train.detector import TrainConfig, train

        try:
            model_kw = json.loads(model) if model else {}
            if not isinstance(model_kw, dict):
                raise ValueError("--model must be a JSON object")
            kw = {"resume": resume} if resume else {}
            if resume and "resume" not in TrainConfig.__dataclass_fields__:
                raise ValueError("--resume is not supported by this version of streammem.train.detector")
            cfg = TrainConfig(out=out, minutes=minutes, batch=batch, lr=lr, size=size, seed=seed, workers=workers,
                              threads=threads, save_every_min=save_every_min, max_steps=max_steps, log=log,
                              model=model_kw, clip_len=clip_len, self_ref=self_ref, key_corrupt=key_corrupt,
                              history=history, **kw)
        except (ValueError, json.JSONDecodeError) as exc:
            _fail(str(exc))
        try:
            train(cfg)
        except ValueError as exc:  # e.g. history without a temporal-fusion model
            _fail(str(exc))
        typer.echo(f"streammem train detector: saved to {out}")

    @eval_app.command("detection")
    def eval_detection(
        checkpoint: str = typer.Option(DEFAULT_CHECKPOINT, help="small detector folder"),
        presets: str = typer.Option("clean,medium,hard", help="comma-separated StreamWorld presets"),
        videos: int = typer.Option(3, help="worlds per preset"),
        frames: int = typer.Option(48, help="frames per world"),
        size: int = typer.Option(256, help="frame side in pixels"),
        seed: int = typer.Option(0, help="evaluation seed (world seeds < 10,000)"),
        protocol: bool = typer.Option(False, "--protocol", help="also MAMBA's non-causal protocol"),
        key_size: Optional[int] = typer.Option(None, help="instance keys per read (default: DetectionConfig's)"),
        recent_keys: Optional[int] = typer.Option(None, help="of them, the newest entries (default: DetectionConfig's)"),
        oracle: bool = typer.Option(False, "--oracle", help="also the clean-frame oracle (a diagnostic bound)"),
        corruption: Optional[str] = typer.Option(None, help="override the presets' corruption level (clean, medium or hard; e.g. 'clean': the same worlds without corruptions)"),
        temporal_state: bool = typer.Option(True, "--temporal-state/--no-temporal-state",
                                            help="keep the temporal fusion state (a fusion_radius detector)"),
        out: Optional[str] = typer.Option(None, "--out", "-o", help="write the results as JSON here"),
        progress: bool = typer.Option(False, help="show progress bars"),
    ) -> None:
        """AP50 of the small detector on StreamWorld: single frame, + smoother, FeatureBank, DualMemory."""
        from streammem.eval.detection import evaluate, format_table
        from streammem.models.detector import SmallDetector
        from streammem.pipelines.detection import DetectionConfig
        from streammem.world import PRESETS

        names = tuple(p.strip() for p in presets.split(",") if p.strip())
        bad = [p for p in names if p not in PRESETS]
        if not names or bad:
            _fail(f"--presets must be a comma-separated list of {', '.join(PRESETS)}; got {presets!r}")
        if videos < 1 or frames < 1:
            _fail(f"--videos and --frames must be >= 1, got {videos} and {frames}")
        from streammem.world.corruptions import LEVELS

        if corruption is not None and corruption not in LEVELS:
            _fail(f"--corruption must be one of {', '.join(LEVELS)}; got {corruption!r}")
        path = Path(checkpoint)
        if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
            _fail(f"no detector checkpoint at {path}; train one with `streammem train detector --out {path}`")
        det = SmallDetector.from_pretrained(str(path)).eval()
        try:
            kw = {k: v for k, v in (("key_size", key_size), ("recent_keys", recent_keys)) if v is not None}
            cfg = DetectionConfig(image_size=size, temporal_state=temporal_state, **kw)
        except ValueError as e:
            _fail(str(e))
        res = evaluate(det, presets=names, videos=videos, frames=frames, size=size, seed=seed, protocol=protocol,
                       config=cfg, progress=progress, oracle=oracle, corruption=corruption)
        typer.echo(format_table(res))
        if out:
            p = Path(out)
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(p.name + ".partial")
            tmp.write_text(json.dumps(to_jsonable(res), indent=2, allow_nan=False) + "\n")
            os.replace(tmp, p)
            typer.echo(f"results: {p}")
