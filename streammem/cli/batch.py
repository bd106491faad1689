"""``streammem batch``: many videos through the heads, on a local process pool or Ray Data.

    streammem batch "videos/*.mp4" --task detect,qa --out DIR [--workers N] [--ray | --ray-address ADDRESS]

The job behind it is :func:`streammem.pipelines.jobs.batch.run_batch`.
"""

from __future__ import annotations

from typing import List, Optional

import typer

from streammem.cli.common import app, default, fail, job_errors
from streammem.pipelines.qa import QAConfig


@app.command("batch")
def batch(
    patterns: List[str] = typer.Argument(..., help="video files, folders or glob patterns (quote them: "
                                                   "\"videos/*.mp4\"; ** recurses)"),
    out: str = typer.Option(..., "--out", "-o",
                            help="output folder: OUT/<video name>/ per video and OUT/manifest.jsonl"),
    task: str = typer.Option("detect,qa", "--task", "-t", help="comma-separated heads to run: detect, qa"),
    workers: Optional[int] = typer.Option(None, help="worker processes or Ray actors (default: one per CPU, at most "
                                                     "one per video; 0: in this process)"),
    ray: bool = typer.Option(False, "--ray", help="distribute with Ray Data on a local Ray (num_cpus = --workers)"),
    ray_address: Optional[str] = typer.Option(
        None, "--ray-address", metavar="ADDRESS", help="distribute with Ray Data on the cluster at ADDRESS (implies "
                                                       "--ray; OUT and the videos must be reachable from every node)"),
    memory: str = typer.Option(default(QAConfig, "memory"), help="Pyramid Memory Bank preset: ovbench or offline"),
    retention: str = typer.Option(default(QAConfig, "retention"), help="pyramid retention: reference or spread"),
    max_frames: Optional[int] = typer.Option(None, help="stop each video after this many frames"),
    stride: int = typer.Option(1, help="keep every n-th frame"),
    max_side: Optional[int] = typer.Option(None, help="downscale frames so the longer side is at most this"),
    backend: str = typer.Option("auto", help="video reader: auto, decord or opencv"),
    threads: int = typer.Option(1, help="torch threads per worker (the parallelism is across videos)"),
    progress: bool = typer.Option(True, help="show a progress bar over videos"),
) -> None:
    """Process many videos: per video OUT/<name>/ holds annotated.mp4, frames.jsonl,
    detections.jsonl (detect), answers.jsonl (qa), memory.safetensors and summary.json.

    OUT/manifest.jsonl records each video's status (done or failed), timings, outputs and
    error. A rerun skips the videos already done; a video that fails is recorded and the
    others go on. Exit code 0 when every video is done, 1 when some failed, 2 for bad options
    or patterns that match nothing.
    """
    from streammem.pipelines.jobs.batch import run_batch

    tasks = [t.strip() for t in task.split(",") if t.strip()]
    with job_errors():
        res = run_batch(patterns, out, tasks=tasks, workers=workers,
                        ray=ray_address or ray, memory=memory,
                        retention=retention, max_frames=max_frames, progress=progress, threads=threads,
                        stride=stride, max_side=max_side, backend=backend)
    typer.echo(res.summary())
    if res.failed:
        fail(f"{res.failed} of {len(res.records)} videos failed (see {res.manifest}); rerun to retry them", code=1)
