"""Web demo benchmark: frames per second of the Detect and Ask tabs through the app (gradio_client,
over HTTP, the app launched in this process) against the same pipeline called directly.

    python benchmarks/app.py                       # 80 frames of 128 px, 3 rounds
    python benchmarks/app.py --frames 200 --size 256 --rounds 5

One StreamWorld stream is rendered to an mp4 (8 fps, what a visitor would upload). Per round,
in turn:

- **direct**: the video is opened as the app opens it (``open_source`` with the app's
  ``max_side``; Ask resamples to 8 fps) and each frame goes through a fresh head:
  ``StreamingQAPipeline.step`` for Ask; ``step`` + ``annotate`` + the mp4 writer for Detect
  (what the Detect tab does per frame).
- **app**: ``gradio_client.Client.submit`` of the same file to ``/ask_process`` or
  ``/detect_video`` (the small detector with FeatureBank) until the result: the upload, the
  queue, the handler, the streamed views (pyramid views every second, annotated frames every
  0.1 s) and their encoding, without downloading the files.

Reported: medians over rounds of frames per second, and the app's overhead as the ratio of its
time to the direct time (1.0: none). Also the time of one question (``/ask_question`` against
``StreamingQAPipeline.ask``). The client runs in the server's process, so both share the CPU
as a browser on the same machine would not.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from demos.app import Limits, Models, build_app  # noqa: E402
from streammem.io import VideoWriter, open_source  # noqa: E402
from streammem.pipelines.jobs.base import fit_to  # noqa: E402
from streammem.world import World  # noqa: E402

QUESTION = "Is there a cat in view now?"


def render(path: Path, frames: int, size: int, seed: int = 0) -> Path:
    w = VideoWriter(path, fps=8)
    for f in World(seed=seed, preset="medium", size=size, frames=frames):
        w.write(f.image)
    return w.close()


def direct_ask(models: Models, video: Path, limits: Limits) -> tuple[int, float, float]:
    """Frames, seconds, and seconds per question of the QA head fed directly."""
    qa = models.qa_pipeline()
    t0 = time.perf_counter()
    n = 0
    for frame in open_source(str(video), max_side=limits.max_side, fps=limits.ask_fps):
        qa.step(frame)
        n += 1
    wall = time.perf_counter() - t0
    t1 = time.perf_counter()
    qa.ask(QUESTION)
    return n, wall, time.perf_counter() - t1


def direct_detect(models: Models, video: Path, limits: Limits, out: Path) -> tuple[int, float]:
    head = models.detection_head("small", "feature_bank")
    t0 = time.perf_counter()
    src = open_source(str(video), max_side=limits.max_side)
    writer = VideoWriter(out, fps=src.info.fps or 8.0)
    n = 0
    for frame in src:
        image = head.annotate(frame.image, head.step(frame))
        writer.write(fit_to(image, writer.size), timestamp=frame.timestamp)
        n += 1
    writer.close()
    return n, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=80, help="frames of the uploaded video (8 fps)")
    p.add_argument("--size", type=int, default=128, help="its side in pixels")
    p.add_argument("--rounds", type=int, default=3, help="rounds of (direct, app) per tab; medians are reported")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from gradio_client import Client, handle_file

    tmp = Path(tempfile.mkdtemp(prefix="bench-app-"))
    video = render(tmp / "upload.mp4", args.frames, args.size)
    limits = Limits(max_video_s=max(180.0, args.frames / 8 + 1))
    models = Models.load()
    demo = build_app(models, limits)
    demo.queue(default_concurrency_limit=limits.concurrency)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True,
                            max_file_size=limits.max_upload_bytes)
    client = Client(url, verbose=False, download_files=False)
    times: dict[str, list[float]] = {k: [] for k in ("ask direct", "ask app", "detect direct", "detect app",
                                                     "question direct", "question app")}
    frames: dict[str, int] = {}
    try:
        for r in range(args.rounds):
            n, wall, q = direct_ask(models, video, limits)
            frames["ask"] = n
            times["ask direct"].append(wall)
            times["question direct"].append(q)
            t0 = time.perf_counter()
            client.submit(handle_file(str(video)), api_name="/ask_process").result(timeout=600)
            times["ask app"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            client.predict(QUESTION, "", api_name="/ask_question")
            times["question app"].append(time.perf_counter() - t0)
            n, wall = direct_detect(models, video, limits, tmp / f"direct{r}.mp4")
            frames["detect"] = n
            times["detect direct"].append(wall)
            t0 = time.perf_counter()
            client.submit(handle_file(str(video)), "small", "feature_bank",
                          api_name="/detect_video").result(timeout=600)
            times["detect app"].append(time.perf_counter() - t0)
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()),
                  flush=True)
    finally:
        demo.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\n{args.frames} frames of {args.size} px at 8 fps, {args.rounds} rounds (medians), "
          f"torch threads 1, load average {load:.1f} on {os.cpu_count()} CPUs\n")
    print("| tab | frames | direct fps | app fps | app time / direct time |")
    print("|---|---:|---:|---:|---:|")
    for tab in ("ask", "detect"):
        d, a = med[f"{tab} direct"], med[f"{tab} app"]
        print(f"| {tab.capitalize()} | {frames[tab]} | {frames[tab] / d:.1f} | {frames[tab] / a:.1f} | {a / d:.2f} |")
    qd, qa = med["question direct"] * 1e3, med["question app"] * 1e3
    print(f"| one question | - | {qd:.0f} ms | {qa:.0f} ms | {qa / qd:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
