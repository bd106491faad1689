"""``streammem world ...``: export StreamWorld streams and draw a gallery.

Example (shell):
    streammem world export --seed 3 --minutes 10 --out runs/world3
    streammem world gallery --out docs
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import typer
from tqdm import tqdm

from .world import PRESETS, World

app = typer.Typer(help="StreamWorld: procedural video streams with exact ground truth.", no_args_is_help=True)


class VideoWriter:
    """mp4 writer: ffmpeg (libx264, yuv420p) when on PATH, else OpenCV ('avc1', then 'mp4v')."""

    def __init__(self, path: Path, fps: float, size_hw: tuple[int, int]):
        self.path, self.fps = Path(path), fps
        h, w = size_hw
        self.proc = self.cv = None
        if shutil.which("ffmpeg"):
            self.proc = subprocess.Popen(
                ["ffmpeg", "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}",
                 "-r", f"{fps:g}", "-i", "-", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "20", str(self.path)],
                stdin=subprocess.PIPE,
            )
        else:
            for code in ("avc1", "mp4v"):
                vw = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*code), fps, (w, h))
                if vw.isOpened():
                    self.cv = vw
                    break
            if self.cv is None:
                raise RuntimeError(f"cannot open an mp4 writer for {self.path} (no ffmpeg, OpenCV avc1/mp4v failed)")

    def write(self, rgb: np.ndarray) -> None:
        if self.proc is not None:
            self.proc.stdin.write(np.ascontiguousarray(rgb).tobytes())
        else:
            self.cv.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            if self.proc.wait() != 0:
                raise RuntimeError(f"ffmpeg failed writing {self.path}")
        elif self.cv is not None:
            self.cv.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def gt_to_json(frame) -> dict:
    """JSON-ready ground truth of one frame (the dynamic mask is summarised by its pixel count)."""
    g = frame.info["gt"]
    cam = g["camera"]
    return {
        "index": frame.index,
        "timestamp": frame.timestamp,
        "pose": np.round(frame.pose, 6).tolist(),
        "action": np.round(frame.action, 6).tolist(),
        "action_name": cam["action_name"],
        "camera_segment": cam["segment"],
        "camera_state": list(cam["state"]),
        "boxes": np.round(g["boxes"], 2).tolist(),
        "class_id": g["class_id"].tolist(),
        "class_name": g["class_name"],
        "track_id": g["track_id"].tolist(),
        "visible": np.round(g["visible"], 4).tolist(),
        "speed": g["speed"],
        "colour": g["colour"],
        "motion": g["motion"],
        "dynamic_pixels": int(g["dynamic_mask"].sum()),
        "events": g["events"],
        "corruptions": g["corruptions"],
    }


@app.command()
def export(
    out: Path = typer.Option(..., help="output folder"),
    seed: int = typer.Option(0),
    minutes: float = typer.Option(1.0, help="stream length in minutes"),
    preset: str = typer.Option("medium", help=f"one of {', '.join(PRESETS)}"),
    fps: float = typer.Option(8.0),
    size: int = typer.Option(256),
) -> None:
    """Write video.mp4, ground_truth.jsonl (one line per delivered frame) and questions.json."""
    world = World(seed=seed, preset=preset, fps=fps, size=size, seconds=minutes * 60)
    out.mkdir(parents=True, exist_ok=True)
    n = world.num_frames
    last = None
    with VideoWriter(out / "video.mp4", fps, world.size_hw) as vw, open(out / "ground_truth.jsonl", "w") as gf:
        written = 0
        for f in tqdm(world, total=n, desc="render", unit="frame"):
            while last is not None and written < f.index:  # dropped frames: hold the last image
                vw.write(last)
                written += 1
            vw.write(f.image)
            written += 1
            last = f.image
            gf.write(json.dumps(gt_to_json(f)) + "\n")
        while last is not None and written < n:
            vw.write(last)
            written += 1
    qs = world.questions()
    (out / "questions.json").write_text(json.dumps(qs, indent=1))
    meta = {"seed": seed, "preset": preset, "fps": fps, "size": size, "frames": n, "questions": len(qs)}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    typer.echo(f"wrote {out}/video.mp4 ({n} frames), ground_truth.jsonl, questions.json ({len(qs)} questions)")


def annotate(frame) -> np.ndarray:
    """The frame's image with its ground-truth boxes and labels drawn (supervision annotators)."""
    import supervision as sv

    g = frame.info["gt"]
    keep = g["visible"] > 0
    det = sv.Detections(xyxy=g["boxes"][keep].astype(np.float32), class_id=g["class_id"][keep],
                        tracker_id=g["track_id"][keep])
    labels = [f"{c}#{t}" for c, t, k in zip(g["class_name"], g["track_id"], keep) if k]
    img = frame.image.copy()
    if len(det):
        img = sv.BoxAnnotator(thickness=1).annotate(img, det)
        img = sv.LabelAnnotator(text_scale=0.3, text_thickness=1, text_padding=1).annotate(img, det, labels=labels)
    return img


@app.command()
def gallery(
    out: Path = typer.Option(Path("docs"), help="output folder"),
    seed: int = typer.Option(3),
    size: int = typer.Option(160),
    cols: int = typer.Option(5),
    every_s: float = typer.Option(6.0, help="seconds between the frames of a row"),
    video_seconds: float = typer.Option(10.0),
) -> None:
    """Write world_gallery.png (a row of annotated frames per preset) and world_gallery.mp4."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for preset in tqdm(list(PRESETS), desc="gallery", unit="preset"):
        w = World(seed=seed, preset=preset, size=size, frames=int(cols * every_s * 8) + 8, drop_frames=False)
        step = int(every_s * w.fps)
        tiles = [annotate(f) for f in w if f.index % step == step // 2][:cols]
        for tile, k in zip(tiles, range(cols)):
            cv2.putText(tile, f"{preset} t={(step // 2 + k * step) / w.fps:.0f}s", (3, size - 5),
                        cv2.FONT_HERSHEY_SIMPLEX, 0.35, (255, 255, 255), 1, cv2.LINE_AA)
        rows.append(np.hstack([np.pad(t, ((1, 1), (1, 1), (0, 0))) for t in tiles]))
    sheet = np.vstack(rows)
    Image.fromarray(sheet).quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(out / "world_gallery.png", optimize=True)
    w = World(seed=seed, preset="medium", size=256, seconds=video_seconds)
    with VideoWriter(out / "world_gallery.mp4", w.fps, w.size_hw) as vw:
        for f in tqdm(w, total=w.num_frames, desc="video", unit="frame"):
            vw.write(annotate(f))
    typer.echo(f"wrote {out}/world_gallery.png and {out}/world_gallery.mp4")


if __name__ == "__main__":
    app()
