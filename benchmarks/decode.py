"""Decode speed of ``open_source`` against raw decord and raw OpenCV on the same file.

    python benchmarks/decode.py [--width 640 --height 360 --seconds 10 --repeats 5]

Encodes a test video (H.264 mp4 by default) with ffmpeg, then reads it end to end with each
reader, interleaving the readers over several rounds so machine noise hits all of them alike,
and prints frames per second (median over rounds) and the ratio of each ``open_source``
configuration to the faster raw reader. Every reader returns RGB uint8 frames, so raw OpenCV
includes its BGR->RGB conversion. Goal: ``open_source`` (default settings) >= 0.9x the faster
raw reader.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import cv2

from streammem.io import ffmpeg_exe, open_source


def make_video(path: Path, width: int, height: int, seconds: float, fps: int, codec: str) -> None:
    enc = {
        "h264": ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-preset", "medium"],
        "vp9": ["-c:v", "libvpx-vp9", "-b:v", "1M", "-deadline", "realtime"],
        "mpeg4": ["-c:v", "mpeg4", "-q:v", "4"],
        "mjpeg": ["-c:v", "mjpeg", "-q:v", "4"],
    }[codec]
    src = f"testsrc2=size={width}x{height}:rate={fps}:duration={seconds}"
    subprocess.run([ffmpeg_exe(), "-loglevel", "error", "-y", "-f", "lavfi", "-i", src, *enc, str(path)], check=True)


def raw_opencv(path: Path) -> int:
    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    n = 0
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        n += 1
    cap.release()
    return n


def raw_decord(path: Path) -> int:
    import decord

    vr = decord.VideoReader(str(path), ctx=decord.cpu(0))
    n = 0
    for _ in range(len(vr)):
        vr.next().asnumpy()
        n += 1
    return n


def via_open_source(**opts):
    def read(path: Path) -> int:
        return sum(1 for _ in open_source(path, **opts))

    return read


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=360)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--fps", type=int, default=30)
    ap.add_argument("--codec", default="h264", choices=["h264", "vp9", "mpeg4", "mjpeg"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--video", type=Path, help="use this file instead of encoding one")
    args = ap.parse_args()

    readers = {"raw opencv": raw_opencv}
    try:
        import decord  # noqa: F401

        readers["raw decord"] = raw_decord
    except ImportError:
        print("decord not installed: comparing against raw OpenCV only")
    readers["open_source (default: auto, prefetch 8)"] = via_open_source()
    readers["open_source backend=opencv"] = via_open_source(backend="opencv")
    if "raw decord" in readers:
        readers["open_source backend=decord"] = via_open_source(backend="decord")
    readers["open_source prefetch=0 (no thread)"] = via_open_source(prefetch=0)

    with tempfile.TemporaryDirectory() as tmp:
        path = args.video or Path(tmp) / f"bench.{ 'webm' if args.codec == 'vp9' else 'mp4' if args.codec == 'h264' else 'avi'}"
        if args.video is None:
            make_video(path, args.width, args.height, args.seconds, args.fps, args.codec)
        info = open_source(path).info
        print(f"video: {info.codec} {info.width}x{info.height}, {info.num_frames} frames")
        times: dict[str, list[float]] = {name: [] for name in readers}
        counts: dict[str, int] = {}
        for name, fn in readers.items():  # warm-up: page cache, lazy imports
            counts[name] = fn(path)
        for _ in range(args.repeats):
            for name, fn in readers.items():
                t0 = time.perf_counter()
                fn(path)
                times[name].append(time.perf_counter() - t0)
        assert len(set(counts.values())) == 1, f"readers disagree on the frame count: {counts}"
        n = next(iter(counts.values()))
        fps = {name: n / statistics.median(ts) for name, ts in times.items()}
        best_raw_name = max((k for k in fps if k.startswith("raw")), key=fps.get)
        best_raw = fps[best_raw_name]
        print(f"\n{'reader':<42}{'fps':>10}{'vs ' + best_raw_name:>22}")
        for name, value in fps.items():
            print(f"{name:<42}{value:>10.1f}{value / best_raw:>21.2f}x")
        default = fps["open_source (default: auto, prefetch 8)"]
        verdict = "MET" if default >= 0.9 * best_raw else "NOT MET"
        print(f"\ngoal open_source >= 0.9x the faster raw reader: {default / best_raw:.2f}x ({verdict})")


if __name__ == "__main__":
    main()
