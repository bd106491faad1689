"""``streammem info`` and ``streammem run`` (the main job).

    streammem info VIDEO             frames, fps, duration, codec, resolution
    streammem run [SOURCE] --out D   the main job: annotated mp4 + per-frame JSONL + summary
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from streammem.cli.common import app, default, fail, job_errors, source_options
from streammem.io import probe
from streammem.pipelines.jobs import DEFAULT_SOURCE, run_main_job
from streammem.pipelines.qa import QAConfig


@app.command()
def info(
    source: str = typer.Argument(..., help="video file, image folder, camera:N, URL or world:..."),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Print what a source holds: frames, fps, duration, codec, resolution."""
    with job_errors():
        meta = probe(source)
    if as_json:
        typer.echo(json.dumps(meta.to_dict(), indent=2))
        return
    dur = f"{meta.duration:.3f} s" if meta.duration is not None else "unknown (live)"
    rows = [
        ("source", meta.uri),
        ("kind", meta.kind),
        ("backend", meta.backend),
        ("frames", meta.num_frames if meta.num_frames is not None else "unknown (live)"),
        ("fps", f"{meta.fps:.3f}" if meta.fps else "unknown"),
        ("duration", dur),
        ("codec", meta.codec or "unknown"),
        ("resolution", f"{meta.width}x{meta.height}"),
    ]
    for key, value in rows:
        typer.echo(f"{key:>10}: {value}")


@app.command()
def run(
    source: str = typer.Argument(DEFAULT_SOURCE, help="what to stream (default: a StreamWorld stream)"),
    out: str = typer.Option("outputs", "--out", "-o", help="output folder"),
    realtime: bool = typer.Option(False, help="drop frames that arrive while busy (newest wins)"),
    max_frames: Optional[int] = typer.Option(None, help="stop after this many frames"),
    stride: int = typer.Option(1, help="keep every n-th frame"),
    start: float = typer.Option(0.0, help="start time (s)"),
    end: Optional[float] = typer.Option(None, help="end time (s)"),
    fps: Optional[float] = typer.Option(None, help="resample to this frame rate"),
    max_side: Optional[int] = typer.Option(None, help="downscale so the longer side is at most this"),
    backend: str = typer.Option("auto", help="video reader: auto, decord or opencv"),
    progress: bool = typer.Option(True, help="show a progress bar"),
    memory: str = typer.Option(default(QAConfig, "memory"), help="Pyramid Memory Bank preset: ovbench (832 tokens) or offline (9,984)"),
    retention: str = typer.Option(default(QAConfig, "retention"), help="pyramid retention: reference (VideoChat-Online) or spread "
                                  "(kept frames spread over the whole stream)"),
    detection: bool = typer.Option(True, help="run the detection head"),
    qa: bool = typer.Option(True, help="run the QA head (a few questions during the stream)"),
    save_heads: bool = typer.Option(False, help="also write every head's state to OUT/heads.safetensors"),
) -> None:
    """The main job: stream SOURCE through the memory and the heads.

    Writes OUT/annotated.mp4, OUT/frames.jsonl, OUT/detections.jsonl, OUT/answers.jsonl,
    OUT/summary.json, OUT/report.html (self-contained: answers with evidence thumbnails, the
    detection table, memory occupancy plots) and OUT/memory.safetensors.
    """
    with job_errors():
        result = run_main_job(
            source, out, realtime=realtime, max_frames=max_frames, progress=progress, memory=memory,
            retention=retention, save_heads=save_heads,
            heads=tuple(h for h, on in (("detection", detection), ("qa", qa)) if on),
            **source_options(stride, start, end, fps, max_side, backend),
        )
    s = result.summary
    typer.echo(
        f"streammem run: {s['frames_processed']} frames in {s['wall_s']:.2f} s "
        f"({s['fps']:.1f} fps), {s['frames_dropped']} dropped, "
        f"latency p50 {s['latency_ms_p50']:.2f} ms / p95 {s['latency_ms_p95']:.2f} ms"
    )
    m = s["memory"]
    typer.echo(
        f"  memory:  PyramidMemory {m['num_tokens']}/{m['capacity']} tokens, frames per level "
        f"{m['frames_per_level']}, {m.get('promotions', 0)} promotions -> {result.memory}"
    )
    det = s["heads"].get("detection")
    if det is not None:
        bank = det.get("instance_memory", {})
        typer.echo(f"  detect:  {det['frames']} frames, instance bank {bank.get('num_tokens', 0)}/{bank.get('capacity', 0)} "
                   f"tokens -> {s['outputs']['detection']}")
    qa = s["heads"].get("qa")
    if qa is not None:
        typer.echo(f"  ask:     {len(qa['records'])} answers -> {s['outputs']['qa']}")
        for a in qa["records"]:
            if a.get("refused"):
                typer.echo(f"    @{a['at']:5.1f}s {a['question']} -> refused: {a['reason']}")
                continue
            ev = ", ".join(f"{e['timestamp']:.1f}s" for e in a["evidence"][:3])
            truth = {True: "  [right]", False: "  [wrong]"}.get(a.get("correct"), "")
            typer.echo(f"    @{a['at']:5.1f}s {a['question']} -> {a['answer']} ({a['confidence']:.2f}){truth}; "
                       f"evidence {ev}")
    for note in s.get("notes", []):
        typer.echo(f"  note:    {note}")
    typer.echo(f"  video:   {result.video}")
    typer.echo(f"  stats:   {result.jsonl}")
    typer.echo(f"  summary: {result.summary_path}")
    if s["outputs"].get("report"):
        typer.echo(f"  report:  {Path(s['outputs']['report']).resolve()}  (self-contained HTML: open it in a browser)")
    if result.error is not None:
        fail(f"{result.error} (everything before it was written)", code=1)
