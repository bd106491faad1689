"""The main job (``streammem run`` / ``make run``): stream a source through every head and
write an annotated mp4, JSONL files and a summary into an output folder.

Per frame: statistics; the **detection head** (the shipped small detector with MAMBA-style
FeatureBank aggregation) draws boxes and writes ``detections.jsonl``; the **QA head** (the
shipped GridEncoder into a Pyramid Memory Bank, read by the shipped answerer) answers a few
questions scheduled during the stream (StreamWorld's own questions for a ``world:`` source,
"is there a <class> in view now?" otherwise) and writes ``answers.jsonl``. A head whose
checkpoint is missing is skipped with a note; the memory then falls back to raw patches.
"""

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

__all__ = ["DEFAULT_SOURCE", "MainJobResult", "MemoryStatsPipeline", "MainPipeline", "run_main_job", "default_questions"]

DEFAULT_SOURCE = "world:seed=0,preset=medium,seconds=20,fps=8,size=256"
CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"


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


class MainPipeline:
    """Statistics + the detection head + the QA head (each optional) on one stream.

    ``step`` returns a :class:`StatsOutput` whose ``extra`` holds the memory occupancy, the
    frame's detections (``detections``: list of dicts) and the answers resolved at this frame
    (``answers``).
    """

    def __init__(self, memory: str = "ovbench", detection: bool = True, qa: bool = True,
                 questions: list[dict] | None = None, retention: str = "spread") -> None:
        from streammem.pipelines.qa import retention_overrides

        overrides = retention_overrides(retention)
        self.stats = StatsPipeline()
        self.notes: list[str] = []
        self.detector = None
        if detection:
            try:
                from streammem.models.detector import SmallDetector
                from streammem.pipelines.detection import StreamingDetectionPipeline

                self.detector = StreamingDetectionPipeline(SmallDetector.from_pretrained(str(CHECKPOINTS / "detector")))
            except (OSError, ValueError) as exc:
                self.notes.append(f"detection head skipped: {exc}")
        self.qa = None
        if qa:
            try:
                from streammem.pipelines.qa import load_default_qa

                self.qa = load_default_qa(memory=memory, retention=retention)
            except (OSError, ValueError) as exc:
                self.notes.append(f"QA head skipped: {exc}")
        if self.qa is not None:
            self.memory = self.qa.memory
            for q in questions or []:
                self.qa.schedule(q["question"], q["candidates"], float(q["middle_frame_timestamp"]), id=q)
        else:
            self.encoder = PatchEncoder()
            self.memory = PyramidMemory.from_preset(memory, dim=self.encoder.dim, **overrides)

    def step(self, frame: Frame) -> StatsOutput:
        out = self.stats.step(frame)
        if self.qa is not None:
            done = self.qa.step(frame)
            out.extra["answers"] = [_answer_record(q, a) for q, a in done]
        else:
            self.memory.write(self.encoder(frame))
        if self.detector is not None:
            det = self.detector.step(frame)
            out.extra["detections"] = [
                {"box": [round(float(v), 1) for v in det.xyxy[i]], "class": str(det.data["class_name"][i]),
                 "score": round(float(det.confidence[i]), 4)} for i in range(len(det))]
            out.extra["_sv"] = det
        ms = self.memory.stats()
        out.extra.update(memory_tokens=ms["num_tokens"], memory_frames=ms["frames_per_level"],
                         memory_promotions=ms.get("promotions", 0))
        return out

    def finish(self) -> list[dict]:
        return [_answer_record(q, a) for q, a in self.qa.finish()] if self.qa is not None else []

    def reset(self) -> None:
        self.stats.reset()
        for head in (self.qa, self.detector):
            if head is not None:
                head.reset()
        if self.qa is None:
            self.memory.reset()


def _answer_record(q, a) -> dict:
    src = q.id if isinstance(q.id, dict) else {}
    rec = {"at": q.at, "question": q.question, "candidates": q.candidates, "answer": a.text, "letter": a.letter,
           "confidence": round(a.confidence, 4),
           "evidence": [{k: v for k, v in e.items() if k != "thumbnail"} for e in a.evidence]}
    if "answer" in src:
        rec["truth"] = src["answer"]
        rec["correct"] = a.text == src["answer"]
        rec["type"] = src.get("sub_answer_type")
    return rec


def default_questions(source: str, duration: float | None, n: int = 6) -> list[dict]:
    """A few questions for the main job: StreamWorld's own (one per type where possible) for a
    ``world:`` source, else "is there a <class> in view now?" at the middle and the end."""
    if source.startswith("world:"):
        from streammem.world import open_world

        qs = open_world(source).questions(every_s=5)
        picked, seen = [], set()
        for q in qs:
            if q["answer_type"] not in seen:
                picked.append(q)
                seen.add(q["answer_type"])
        return picked[:n]
    if not duration:
        return []
    out = []
    for t in (duration / 2, duration * 0.95):
        for cls in ("person", "cat"):
            out.append({"question": f"Is there a {cls} in view now?", "candidates": ["yes", "no"],
                        "middle_frame_timestamp": round(t, 2)})
    return out


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
    heads: tuple[str, ...] = ("detection", "qa"),
    retention: str = "spread",
    **source_options,
) -> MainJobResult:
    """Run the main job. A source that fails mid-stream keeps everything processed before the
    failure: the video and JSONL are finished, the summary records the error, and the error is
    returned in ``result.error``."""
    from streammem.pipelines.qa import retention_overrides

    retention_overrides(retention)  # an unknown name fails before anything is opened or written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    src = open_source(source, **source_options)
    info = src.info
    fps = info.fps or 8.0
    if source_options.get("fps"):
        fps = min(fps, source_options["fps"])
    video = VideoWriter(out / "annotated.mp4", fps=fps / max(1, source_options.get("stride", 1)))
    jsonl = JsonlWriter(out / "frames.jsonl", flush_every=16)
    det_jsonl = JsonlWriter(out / "detections.jsonl", flush_every=16) if "detection" in heads else None
    ans_jsonl = JsonlWriter(out / "answers.jsonl") if "qa" in heads else None
    questions = default_questions(source, info.duration) if "qa" in heads else []
    pipeline = MainPipeline(memory, detection="detection" in heads, qa="qa" in heads, questions=questions,
                            retention=retention)
    answers: list[dict] = []
    last_answer: list[str] = []
    box_annotator = label_annotator = None
    if pipeline.detector is not None:
        import supervision as sv

        box_annotator = sv.BoxAnnotator(thickness=1)
        label_annotator = sv.LabelAnnotator(text_scale=0.3, text_padding=2)

    def take_answers(recs: list[dict]) -> None:
        for r in recs:
            answers.append(r)
            if ans_jsonl is not None:
                ans_jsonl.write(r)
            last_answer[:] = [f"Q@{r['at']:.1f}s {r['question'][:60]}", f"A: {r['answer']} ({r['confidence']:.2f})"]

    def sink(item: StreamItem) -> None:
        f, o = item.frame, item.output
        det = o.extra.pop("_sv", None)
        take_answers(o.extra.get("answers", []))
        lines = [
            f"frame {f.index}  t={f.timestamp:7.2f}s",
            f"latency {item.latency_ms:6.2f} ms" + (f"  dropped {item.dropped}" if item.dropped else ""),
            f"motion {o.motion:5.1f}  brightness {o.brightness:5.1f}",
            f"memory {o.extra['memory_tokens']} tokens, frames/level {o.extra['memory_frames']}",
            *last_answer,
        ]
        image = f.image
        if det is not None and len(det):
            keep = det[det.confidence >= 0.3]
            image = box_annotator.annotate(image.copy(), keep)
            labels = [f"{c} {s:.2f}" for c, s in zip(keep.data["class_name"], keep.confidence)]
            image = label_annotator.annotate(image, keep, labels=labels)
        video.write(annotate_text(image, lines))
        if det_jsonl is not None:
            det_jsonl.write({"frame": f.index, "timestamp": round(f.timestamp, 6),
                             "detections": o.extra.pop("detections", [])})
        o.extra.pop("detections", None)
        o.extra["answers"] = len(o.extra.get("answers", []))
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
        if error is None:
            take_answers(pipeline.finish())
        video_path = video.close()
        jsonl_path = jsonl.close(commit=True)
        for w in (det_jsonl, ans_jsonl):
            if w is not None:
                w.close(commit=True)
    snapshot = out / "memory.safetensors"
    pipeline.memory.save(snapshot)
    summary = {
        "source": source,
        "source_info": info.to_dict(),
        "outputs": {"video": str(video_path) if video_path else None, "jsonl": str(jsonl_path), "memory": str(snapshot),
                    "detections": str(det_jsonl.path) if det_jsonl else None,
                    "answers": str(ans_jsonl.path) if ans_jsonl else None},
        **run.stats.summary(),
        "memory": pipeline.memory.stats(),
        "heads": {"detection": pipeline.detector.stats() if pipeline.detector is not None else None,
                  "qa": {"answers": answers} if pipeline.qa is not None else None},
        "notes": pipeline.notes,
    }
    summary_path = out / "summary.json"
    tmp = summary_path.with_name(summary_path.name + ".partial")
    tmp.write_text(json.dumps(to_jsonable(summary), indent=2, allow_nan=False, default=str) + "\n")
    os.replace(tmp, summary_path)
    return MainJobResult(summary, video_path, snapshot, jsonl_path, summary_path, error)
