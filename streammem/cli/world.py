"""``streammem world ...``: export StreamWorld streams and draw a gallery.

    streammem world export --seed 3 --minutes 10 --out runs/world3
    streammem world gallery --out docs
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import typer
from tqdm import tqdm

from streammem.cli.common import job_errors
from streammem.io import VideoWriter
from streammem.io.sinks import atomic_path
from streammem.pipelines.jobs.base import OutputDir
from streammem.world import PRESETS, World
from streammem.world.truth import annotate_truth, gt_to_json

app = typer.Typer(help="StreamWorld: procedural video streams with exact ground truth.", no_args_is_help=True)


@app.command()
def export(
    out: Path = typer.Option(..., help="output folder"),
    seed: int = typer.Option(0),
    minutes: float = typer.Option(1.0, help="stream length in minutes"),
    preset: str = typer.Option("medium", help=f"one of {', '.join(PRESETS)}"),
    fps: float = typer.Option(8.0),
    size: int = typer.Option(256),
) -> None:
    """Write video.mp4, ground_truth.jsonl (one line per delivered frame), questions.json and
    meta.json. A bad option exits 2 and writes nothing; a failure part-way keeps the frames
    written before it (exit 1)."""
    with job_errors():
        world = World(seed=seed, preset=preset, fps=fps, size=size, seconds=minutes * 60)
        with OutputDir(out) as od:
            n = world.num_frames
            last = None
            vw, gf = od.video("video.mp4", fps, crf=20), od.jsonl("ground_truth.jsonl", flush_every=64)
            written = 0
            for f in tqdm(world, total=n, desc="render", unit="frame"):
                while last is not None and written < f.index:  # dropped frames: hold the last image
                    vw.write(last)
                    written += 1
                vw.write(f.image)
                written += 1
                last = f.image
                gf.write(gt_to_json(f))
                od.keep()
            while last is not None and written < n:
                vw.write(last)
                written += 1
            od.close()
            qs = world.questions()
            meta = {"seed": seed, "preset": preset, "fps": fps, "size": size, "frames": n, "questions": len(qs)}
            for name, content in (("questions.json", qs), ("meta.json", meta)):
                with atomic_path(out / name) as tmp:
                    tmp.write_text(json.dumps(content, indent=1))
    typer.echo(f"wrote {out}/video.mp4 ({n} frames), ground_truth.jsonl, questions.json ({len(qs)} questions)")


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
        tiles = [annotate_truth(f) for f in w if f.index % step == step // 2][:cols]
        for tile, k in zip(tiles, range(cols)):
            cv2.putText(tile, f"{preset} t={(step // 2 + k * step) / w.fps:.0f}s", (3, size - 5),
                        cv2.FONT_HERSHEY_SIMPLEX, 0.35, (255, 255, 255), 1, cv2.LINE_AA)
        rows.append(np.hstack([np.pad(t, ((1, 1), (1, 1), (0, 0))) for t in tiles]))
    sheet = np.vstack(rows)
    Image.fromarray(sheet).quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(out / "world_gallery.png", optimize=True)
    w = World(seed=seed, preset="medium", size=256, seconds=video_seconds)
    with VideoWriter(out / "world_gallery.mp4", w.fps, crf=20) as vw:
        for f in tqdm(w, total=w.num_frames, desc="video", unit="frame"):
            vw.write(annotate_truth(f))
    typer.echo(f"wrote {out}/world_gallery.png and {out}/world_gallery.mp4")
