"""Detection commands:

    streammem detect SOURCE --out DIR     detections with memory aggregation: annotated mp4,
                                          per-frame JSONL, summary.json (--detector small,
                                          hog or hf:<model id or folder>)
    streammem train detector              train the shipped small detector on StreamWorld
    streammem eval detection              AP50 tables on StreamWorld (single / smoother / banks)

The job behind ``streammem detect`` is :func:`streammem.pipelines.jobs.run_detect`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from streammem.cli.common import app, default, eval_app, fail, job_errors, source_options, train_app
from streammem.pipelines.detection import DetectionConfig
from streammem.pipelines.jobs.base import write_summary
from streammem.pipelines.jobs.detect import DEFAULT_CHECKPOINT, run_detect
from streammem.train.detector import TrainConfig


@app.command("detect")
def detect(
    source: str = typer.Argument(..., help="video file, image folder, camera:N, URL or world:..."),
    out: str = typer.Option("outputs/detect", "--out", "-o", help="output folder"),
    detector: str = typer.Option(
        "small", help="small: the shipped checkpoint, trained on StreamWorld only (its 11 classes: person, cat, cup, "
                      "rocket, shuttle, motorcycle, horse, circle, square, triangle, star; on real footage its labels "
                      "mislead); hog: OpenCV's people detector; hf:<model id or folder>: a transformers detector for "
                      "real footage (DETR, RT-DETR, YOLOS, or OWLv2 with --classes), e.g. hf:PekingU/rtdetr_r18vd "
                      "(downloaded from the Hugging Face hub on first use)"),
    classes: Optional[str] = typer.Option(
        None, help='open-vocabulary hf: models (OWLv2): comma-separated classes to find, e.g. "person,car"'),
    rescore: Optional[str] = typer.Option(
        None, help="track: blend each box's score with its track's past scores (any detector; the default for hf:); "
                   "none: the detector's own output (the default for small and hog)"),
    device: Optional[str] = typer.Option(None, help="hf: models: cpu, cuda, mps or auto (default: accelerate's choice)"),
    checkpoint: Optional[str] = typer.Option(None, help="small detector folder (default: the shipped one)"),
    memory: str = typer.Option(default(DetectionConfig, "memory"), help="feature_bank, dual or none (the detector alone); hf: models take feature_bank (where the model has per-box features) or none"),
    mode: str = typer.Option(default(DetectionConfig, "mode"), help="causal (streaming) or protocol (MAMBA's shuffled whole-video test)"),
    max_frames: Optional[int] = typer.Option(None, help="stop after this many frames"),
    score_threshold: Optional[float] = typer.Option(
        None, help="drop detections below this (default: 0.3 for small and hf:, a probability; 0.0 for hog, an SVM margin)"),
    image_size: Optional[int] = typer.Option(None, help="small detector: resize the long side to this"),
    hog_size: Optional[int] = typer.Option(
        None, help="hog: longest side HOG works at; smaller frames keep their native size (default 1280; "
                   "0: always native). People under ~96 px at that size are missed"),
    stride: int = typer.Option(1, help="keep every n-th frame"),
    max_side: Optional[int] = typer.Option(None, help="downscale frames so the longer side is at most this"),
    backend: str = typer.Option("auto", help="video reader: auto, decord or opencv"),
    progress: bool = typer.Option(True, help="show a progress bar"),
) -> None:
    """Detect objects in SOURCE with memory aggregation.

    The shipped detector (--detector small) knows StreamWorld's 11 classes only; for real
    footage use --detector hf:<model id or folder> (needs the model from the Hugging Face hub,
    or a folder holding it) or --detector hog (people).

    Writes OUT/annotated.mp4, OUT/detections.jsonl (one line per frame) and OUT/summary.json.
    """
    from streammem.models.hf import HubUnavailable

    opts = source_options(stride=stride, max_side=max_side, backend=backend)
    try:
        with job_errors():
            res = run_detect(source, out, detector=detector, checkpoint=checkpoint, memory=memory, mode=mode,
                             max_frames=max_frames, score_threshold=score_threshold, image_size=image_size,
                             progress=progress, hog_size=hog_size, classes=classes, rescore=rescore, device=device,
                             **opts)
    except HubUnavailable as exc:  # nothing was written: bad input, as job_errors' rule says
        fail(str(exc), code=2)
    s = res.summary
    fps = s.get("fps")
    if detector == "small":
        typer.echo("note: the shipped detector was trained on StreamWorld (11 synthetic classes); for real footage "
                   "use --detector hf:<model> or --detector hog", err=True)
    typer.echo(f"streammem detect: {s['frames_written']} frames, {s['detections']} detections "
               f"({s['detections_per_frame']:.2f} per frame), detector {detector}, memory {memory}, mode {mode}"
               + (f", {fps:.1f} fps" if isinstance(fps, float) and fps == fps else ""))
    if s["per_class"]:
        typer.echo("  classes: " + ", ".join(f"{k} {v}" for k, v in s["per_class"].items()))
    typer.echo(f"  video:   {res.video}")
    typer.echo(f"  jsonl:   {res.jsonl}")
    typer.echo(f"  summary: {res.summary_path}")
    if res.error is not None:
        fail(f"{res.error} (everything before it was written)", code=1)

@train_app.command("detector")
def train_detector(
    minutes: float = typer.Option(default(TrainConfig, "minutes"), help="wall-clock training budget"),
    out: str = typer.Option(default(TrainConfig, "out"), "--out", "-o", help="checkpoint folder (never the shipped one unless named)"),
    batch: int = typer.Option(default(TrainConfig, "batch"), help="triples per step"),
    lr: float = typer.Option(default(TrainConfig, "lr"), help="peak learning rate"),
    size: int = typer.Option(default(TrainConfig, "size"), help="frame side in pixels"),
    seed: int = typer.Option(default(TrainConfig, "seed"), help="data and init seed"),
    workers: int = typer.Option(default(TrainConfig, "workers"), help="DataLoader worker processes rendering clips"),
    threads: int = typer.Option(default(TrainConfig, "threads"), help="torch threads of the training process"),
    save_every_min: float = typer.Option(default(TrainConfig, "save_every_min"), help="checkpoint period (minutes)"),
    max_steps: Optional[int] = typer.Option(None, help="stop after this many steps"),
    log: Optional[str] = typer.Option(None, help="append per-step losses to this JSONL file"),
    model: Optional[str] = typer.Option(None, help='SmallDetector keyword arguments as JSON, e.g. \'{"width": 32}\'; with --resume they override the checkpoint\'s config (e.g. \'{"geo_pos": true}\': new parameters start at their init)'),
    resume: Optional[str] = typer.Option(None, help="start from this checkpoint folder's weights"),
    clip_len: int = typer.Option(default(TrainConfig, "clip_len"), help="frames per rendered clip (references come from the same clip)"),
    self_ref: float = typer.Option(default(TrainConfig, "self_ref"), help="share of single-frame triples (one frame three times)"),
    key_corrupt: float = typer.Option(default(TrainConfig, "key_corrupt"), help="share of triples whose key frame gets an extra corruption"),
    history: int = typer.Option(default(TrainConfig, "history"), help="most consecutive frames before a key frame that its temporal fusion state is built from (a fusion_radius model)"),
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
        fail(str(exc))
    try:
        train(cfg)
    except ValueError as exc:  # e.g. history without a temporal-fusion model
        fail(str(exc))
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
        fail(f"--presets must be a comma-separated list of {', '.join(PRESETS)}; got {presets!r}")
    if videos < 1 or frames < 1:
        fail(f"--videos and --frames must be >= 1, got {videos} and {frames}")
    from streammem.world.corruptions import LEVELS

    if corruption is not None and corruption not in LEVELS:
        fail(f"--corruption must be one of {', '.join(LEVELS)}; got {corruption!r}")
    path = Path(checkpoint)
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        fail(f"no detector checkpoint at {path}; train one with `streammem train detector --out {path}`")
    det = SmallDetector.from_pretrained(str(path)).eval()
    try:
        kw = {k: v for k, v in (("key_size", key_size), ("recent_keys", recent_keys)) if v is not None}
        cfg = DetectionConfig(image_size=size, temporal_state=temporal_state, **kw)
    except ValueError as e:
        fail(str(e))
    res = evaluate(det, presets=names, videos=videos, frames=frames, size=size, seed=seed, protocol=protocol,
                   config=cfg, progress=progress, oracle=oracle, corruption=corruption)
    typer.echo(format_table(res))
    if out:
        p = Path(out)
        p.parent.mkdir(parents=True, exist_ok=True)
        write_summary(p, res)
        typer.echo(f"results: {p}")
