"""``streammem webcam``: live detection or questions on a camera, in real time.

    streammem webcam --task detect --camera 0              boxes in a window (or OUT/annotated.mp4)
    streammem webcam --task qa                             type questions while it runs
    streammem webcam --task detect --source clip.mp4       any source, replayed in real time

The job is :func:`streammem.pipelines.jobs.webcam.run_webcam`: stale frames are dropped and
counted, a lost camera is retried with exponential back-off (``--retry-initial``,
``--retry-factor``, ``--retry-max-wait``, ``--max-retries``) and the stream resumes into the
same memory; Ctrl-C stops after the current frame and writes OUT/summary.json (a second Ctrl-C
stops at once).
"""

from __future__ import annotations

import sys
import threading
from typing import Optional

import typer

from streammem.cli.common import app, default, fail, job_errors
from streammem.cli.qa import SHIPPED_NOTE, _print_answer, _refusal_text, split_options
from streammem.pipelines.detection import DetectionConfig
from streammem.pipelines.jobs.webcam import VIEWS, Backoff, display_available, run_webcam, stop_on_sigint
from streammem.pipelines.qa import QAConfig

TASKS = ("detect", "qa")


def _parse(line: str) -> tuple[str, list[str]]:
    """``question | option | option`` or options written in the question (``(A) x (B) y``)."""
    parts = [p.strip() for p in line.split("|")]
    return split_options(parts[0], [p for p in parts[1:] if p])


def _print(q: str, t: float, a) -> None:
    if isinstance(a, ValueError):
        typer.echo(f"  ! {a}")
    elif getattr(a, "refused", False):
        typer.echo(f"[{t:7.2f}s] {q}\n           -> {_refusal_text(a)}")
    else:
        _print_answer(q, t, a)


@app.command("webcam")
def webcam(
    task: str = typer.Option("detect", help="detect (boxes with memory aggregation) or qa (type questions)"),
    camera: int = typer.Option(0, help="camera index (camera:N)"),
    source: Optional[str] = typer.Option(None, help="any source instead of the camera (a file is replayed in real time)"),
    out: str = typer.Option("outputs/webcam", "--out", "-o", help="output folder"),
    view: str = typer.Option("auto", help="auto (a window where a display exists, else a file), window or file"),
    detector: str = typer.Option("small", help="detect: small (the shipped checkpoint) or hog (people, for real footage)"),
    det_memory: str = typer.Option(default(DetectionConfig, "memory"), "--det-memory",
                                   help="detect: feature_bank, dual or none"),
    memory: str = typer.Option(default(QAConfig, "memory"), help="qa: Pyramid Memory Bank preset (ovbench or offline)"),
    max_frames: Optional[int] = typer.Option(None, help="stop after this many processed frames"),
    max_side: Optional[int] = typer.Option(None, help="downscale frames so the longer side is at most this"),
    retry_initial: float = typer.Option(default(Backoff, "initial_s"), help="first wait after the camera is lost (s)"),
    retry_factor: float = typer.Option(default(Backoff, "factor"), help="each next wait is this many times longer"),
    retry_max_wait: float = typer.Option(default(Backoff, "max_wait_s"), help="longest wait between retries (s)"),
    max_retries: Optional[int] = typer.Option(None, help="give up after this many failed reopens (default: never)"),
) -> None:
    """Run a head live on a camera (or --source), in real time, with overlays.

    Frames that arrive while the head is busy are dropped (the newest wins) and counted. The
    overlay is shown in an OpenCV window where a display exists ('q' or Esc closes it) and
    otherwise written to OUT/annotated.mp4. With --task qa, each line typed on stdin
    ('question | option | option', or a yes/no question alone) is answered at the current
    stream time. When the camera disappears it says so, retries with back-off and resumes with
    its memory intact. Ctrl-C stops and writes OUT/summary.json.
    """
    if task not in TASKS:
        fail(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    uri = source or f"camera:{camera}"
    interrupt = threading.Event()
    shown, why = display_available()
    if view not in VIEWS:
        fail(f"--view must be one of {', '.join(VIEWS)}, got {view!r}")
    if view == "window" and not shown:
        fail(f"cannot show a window: {why}; use --view file")
    with job_errors():
        backoff = Backoff(retry_initial, retry_factor, retry_max_wait, max_retries)
        if task == "detect":
            from streammem.pipelines.jobs.detect import build_detection_head

            head = build_detection_head(detector, memory=det_memory)
        else:
            from streammem.pipelines.qa import load_default_qa

            head = load_default_qa(memory=memory)
        if view == "auto" and not shown:
            typer.echo(f"streammem webcam: {why}; the overlay goes to {out}/annotated.mp4", err=True)
        if task == "qa":
            typer.echo(f"streammem webcam: {SHIPPED_NOTE}", err=True)
            typer.echo("type a question ('question | option | option ...'); Ctrl-C stops", err=True)
        with stop_on_sigint(interrupt):
            res = run_webcam(
                head, uri, out, view=view, backoff=backoff,
                questions=sys.stdin if task == "qa" else None, parse=_parse,
                on_event=lambda msg: typer.secho(f"webcam: {msg}", fg=typer.colors.YELLOW, err=True),
                on_answer=_print, interrupt=interrupt, max_frames=max_frames,
                **({"max_side": max_side} if max_side else {}),
            )
    s = res.summary
    typer.echo(f"streammem webcam: {s['frames_processed']} frames processed, {s['frames_dropped']} dropped "
               f"({100 * s['drop_rate']:.1f}%), {s['fps']:.1f} fps, latency p50 {s['latency_ms_p50']:.1f} ms; "
               f"stopped: {s['stopped']}")
    if s["losses"]:
        typer.echo(f"  source lost {len(s['losses'])}x, resumed {s['reconnects']}x")
    if s.get("per_class"):
        typer.echo("  classes: " + ", ".join(f"{k} {v}" for k, v in s["per_class"].items()))
    if "answers" in s:
        typer.echo(f"  answers: {s['answers']} -> {s['outputs']['records']}")
    if res.video is not None:
        typer.echo(f"  video:   {res.video}")
    typer.echo(f"  summary: {res.summary_path}")
    if res.error is not None:
        fail(f"gave up: {res.error}", code=1)
