"""The main job (``streammem run`` / ``make run``): stream a source through the pipeline and
write an annotated mp4, a JSONL of per-frame stats and a summary into an output folder."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from streammem.io import JsonlWriter, SourceError, VideoWriter, open_source
from streammem.io.sinks import to_jsonable
from streammem.memory import PyramidMemory
from streammem.models.encoder import PatchEncoder
from streammem.pipelines.base import StatsOutput, StatsPipeline, annotate_text
from streammem.pipelines.stream import StreamItem, run_stream
from streammem.types import Frame

__all__ = ["DEFAULT_SOURCE", "MainJobResult", "MemoryStatsPipeline", "run_main_job"]

DEFAULT_SOURCE = "world:seed=0,preset=medium,seconds=20,fps=8,size=256"


class MemoryStatsPipeline:
    """Per-frame statistics plus a Pyramid Memory Bank fed by a :class:`PatchEncoder`.

    Each output carries the memory's occupancy after the frame; ``memory`` can be saved as a
    safetensors snapshot at any time.
    """

    def __init__(self, preset: str = "ovbench", encoder: PatchEncoder | None = None) -> None:
        self.stats = StatsPipeline()
        self.encoder = encoder or PatchEncoder()
        self.memory = PyramidMemory.from_preset(preset, dim=self.encoder.dim)

    def step(self, frame: Frame) -> StatsOutput:
        out = self.stats.step(frame)
        self.memory.write(self.encoder(frame))
        ms = self.memory.stats()
        out.extra.update(
            memory_tokens=ms["num_tokens"],
            memory_frames=ms["frames_per_level"],
            memory_promotions=ms.get("promotions", 0),
        )
        return out

    def reset(self) -> None:
        self.stats.reset()
        self.memory.reset()


@dataclass
class MainJobResult:
    summary: dict
    video: Path | None
    memory: Path
    jsonl: Path
    summary_path: Path
    error: SourceError | None = None


def run_main_job(
    source: str = DEFAULT_SOURCE,
    out: str | os.PathLike = "outputs",
    realtime: bool = False,
    max_frames: int | None = None,
    progress: bool = True,
    memory: str = "ovbench",
    **source_options,
) -> MainJobResult:
    """Run the main job. A source that fails mid-stream keeps everything processed before the
    failure: the video and JSONL are finished, the summary records the error, and the error is
    returned in ``result.error``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    src = open_source(source, **source_options)
    info = src.info
    fps = info.fps or 8.0
    if source_options.get("fps"):
        fps = min(fps, source_options["fps"])
    video = VideoWriter(out / "annotated.mp4", fps=fps / max(1, source_options.get("stride", 1)))
    jsonl = JsonlWriter(out / "frames.jsonl", flush_every=16)
    pipeline = MemoryStatsPipeline(memory)

    def sink(item: StreamItem) -> None:
        f, o = item.frame, item.output
        lines = [
            f"frame {f.index}  t={f.timestamp:7.2f}s",
            f"latency {item.latency_ms:6.2f} ms" + (f"  dropped {item.dropped}" if item.dropped else ""),
            f"motion {o.motion:5.1f}  brightness {o.brightness:5.1f}",
            f"memory {o.extra['memory_tokens']} tokens, frames/level {o.extra['memory_frames']}",
        ]
        video.write(annotate_text(f.image, lines))
        record = {
            "frame": f.index,
            "timestamp": round(f.timestamp, 6),
            "latency_ms": round(item.latency_ms, 3),
            "dropped_before": item.dropped,
            **o.to_dict(),
        }
        if item.lag_ms is not None:
            record["lag_ms"] = round(item.lag_ms, 3)
        jsonl.write(record)

    run = run_stream(src, pipeline, sink=sink, realtime=realtime, max_frames=max_frames, progress=progress)
    error = None
    try:
        for _ in run:
            pass
    except SourceError as exc:
        error = exc
    finally:
        video_path = video.close()
        jsonl_path = jsonl.close(commit=True)
    snapshot = out / "memory.safetensors"
    pipeline.memory.save(snapshot)
    summary = {
        "source": source,
        "source_info": info.to_dict(),
        "outputs": {"video": str(video_path) if video_path else None, "jsonl": str(jsonl_path), "memory": str(snapshot)},
        **run.stats.summary(),
        "memory": pipeline.memory.stats(),
    }
    summary_path = out / "summary.json"
    tmp = summary_path.with_name(summary_path.name + ".partial")
    tmp.write_text(json.dumps(to_jsonable(summary), indent=2, allow_nan=False, default=str) + "\n")
    os.replace(tmp, summary_path)
    return MainJobResult(summary, video_path, snapshot, jsonl_path, summary_path, error)
