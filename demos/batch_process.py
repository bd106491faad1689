"""Batch processing through the Python API: many videos through the detection and QA heads,
on a local process pool or on Ray Data, resumable.

    python demos/batch_process.py                          # 4 StreamWorld videos, made here
    python demos/batch_process.py "videos/*.mp4" --out outputs/batch
    python demos/batch_process.py "videos/*.mp4" --ray     # Ray Data on a local Ray
    python demos/batch_process.py "videos/*.mp4" --ray-address ray://head:10001

The same as ``streammem batch``; see docs/batch.md. Run it twice: the second run skips the
videos the first finished (``OUT/manifest.jsonl``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from streammem.io import VideoWriter, open_source
from streammem.pipelines.jobs.batch import run_batch


def make_videos(folder: Path, n: int = 4, seconds: float = 4.0) -> str:
    """``n`` StreamWorld clips as mp4 files in ``folder`` (kept if already there); returns a
    glob pattern matching them."""
    folder.mkdir(parents=True, exist_ok=True)
    for seed in range(n):
        path = folder / f"world_{seed}.mp4"
        if path.is_file():
            continue
        with VideoWriter(path, fps=8) as video:
            for frame in open_source(f"world:seed={seed},preset=medium,seconds={seconds},fps=8,size=128"):
                video.write(frame.image)
    return str(folder / "*.mp4")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("patterns", nargs="*", help="video files, folders or glob patterns (default: demo videos)")
    ap.add_argument("--out", default="outputs/batch_demo", help="output folder")
    ap.add_argument("--task", default="detect,qa", help="comma-separated: detect, qa")
    ap.add_argument("--workers", type=int, default=None, help="processes or Ray actors (default: one per CPU)")
    ap.add_argument("--ray", action="store_true", help="Ray Data on a local Ray")
    ap.add_argument("--ray-address", default=None, help="Ray Data on the cluster at this address")
    args = ap.parse_args()

    patterns = args.patterns or [make_videos(Path(args.out) / "videos")]
    result = run_batch(patterns, Path(args.out) / "results", tasks=args.task.split(","), workers=args.workers,
                       ray=args.ray_address or args.ray)
    print(result.summary())
    for rec in result.records:  # one manifest record per video
        if rec["status"] != "done":
            continue
        folder = result.manifest.parent / rec["name"]
        summary = json.loads((folder / "summary.json").read_text())
        answers = summary["heads"].get("qa", {}).get("records", [])
        line = f"  {rec['name']}: {rec['frames']} frames in {rec['wall_s']:.1f} s"
        if "detection" in summary["heads"]:
            n = sum(json.loads(r)["num_detections"] for r in (folder / "detections.jsonl").read_text().splitlines())
            line += f", {n} detections"
        line += "".join(f"; @{a['at']:.1f}s {a['question']} {a.get('answer', 'refused')}" for a in answers[:2])
        print(line)
    return result.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
