"""The main job (``streammem run`` / ``make run``): stream a source through a list of heads and
write an annotated mp4, JSONL files, head snapshots and a summary into an output folder.

Per frame: statistics (brightness, contrast, motion, memory occupancy) into ``frames.jsonl``;
then every head's ``step``; each head's ``records`` go to its own JSONL file
(``head.records_file``) and its ``annotate`` draws on the frame of ``annotated.mp4``. The
default heads are the **detection head** (the shipped small detector with MAMBA-style
FeatureBank aggregation) and the **QA head** (the shipped GridEncoder into a Pyramid Memory
Bank, read by the shipped answerer), which answers a few questions scheduled during the stream
(StreamWorld's own questions for a ``world:`` source, "is there a <class> in view now?"
otherwise). A default head whose checkpoint is missing is skipped with a note. Any list of
objects keeping the :class:`~streammem.pipelines.base.Head` contract can be run instead:
``run_main_job(source, out, heads=[my_head, ...])``.

Outputs: ``annotated.mp4``, ``frames.jsonl``, one JSONL per head, ``summary.json``,
``report.html`` (self-contained: the answers with their evidence thumbnails, the detection table,
every memory's occupancy over time; :mod:`streammem.pipelines.jobs.report`),
``memory.safetensors`` (the main memory: the QA head's pyramid, or a PatchEncoder pyramid
when no head has one) and, with ``save_heads``, ``heads.safetensors`` (every head's
``state_dict``, each under ``"<name>."``; tens of MB with the default detection banks).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Sequence

from safetensors.torch import save_file

from streammem.io import open_source
from streammem.io.sinks import atomic_path
from streammem.memory import Memory, PyramidMemory
from streammem.models.encoder import PatchEncoder
from streammem.pipelines.base import Head, StatsOutput, StatsPipeline, annotate_text
from streammem.pipelines.jobs.base import JobResult, OutputDir, drain, fit_to, output_fps, write_summary
from streammem.pipelines.jobs.report import ReportCollector, write_report
from streammem.pipelines.stream import StreamItem, run_stream
from streammem.types import Frame

__all__ = ["DEFAULT_SOURCE", "DEFAULT_HEADS", "MainOutput", "MainPipeline", "default_heads", "default_questions",
           "run_main_job"]

DEFAULT_SOURCE = "world:seed=0,preset=medium,seconds=20,fps=8,size=256"
DEFAULT_HEADS = ("detection", "qa")


@dataclass
class MainOutput:
    """One frame of the main job: statistics (with the main memory's occupancy in ``extra``)
    and each head's output by head name."""

    stats: StatsOutput
    heads: dict[str, Any] = field(default_factory=dict)


class MainPipeline:
    """Statistics plus any list of heads on one stream.

    Args:
        heads: objects keeping the :class:`~streammem.pipelines.base.Head` contract, with
            distinct ``name``s.
        memory: the memory whose occupancy is reported per frame and saved at the end; default:
            the first head's ``memory`` attribute that is a :class:`~streammem.memory.Memory`,
            else a Pyramid Memory Bank (``preset``) fed by a :class:`PatchEncoder` here.
    """

    def __init__(self, heads: Sequence[Head] = (), memory: Memory | None = None, preset: str = "ovbench",
                 notes: Sequence[str] = ()) -> None:
        self.heads = list(heads)
        for h in self.heads:
            if not isinstance(h, Head):
                raise TypeError(f"{type(h).__name__} does not keep the Head contract (streammem.pipelines.base.Head)")
        names = [h.name for h in self.heads]
        if len(set(names)) != len(names):
            raise ValueError(f"heads must have distinct names, got {names}")
        self.stats = StatsPipeline()
        self.notes = list(notes)
        self.encoder = None
        if memory is None:
            memory = next((h.memory for h in self.heads if isinstance(getattr(h, "memory", None), Memory)), None)
        if memory is None:
            self.encoder = PatchEncoder()
            memory = PyramidMemory.from_preset(preset, dim=self.encoder.dim)
        self.memory = memory

    def step(self, frame: Frame) -> MainOutput:
        stats = self.stats.step(frame)
        outputs = {h.name: h.step(frame) for h in self.heads}
        if self.encoder is not None:
            self.memory.write(self.encoder(frame))
        ms = self.memory.stats()
        stats.extra.update(memory_tokens=ms["num_tokens"], memory_frames=ms.get("frames_per_level"),
                           memory_promotions=ms.get("promotions", 0))
        return MainOutput(stats, outputs)

    def finish(self) -> dict[str, Any]:
        """Each head's end-of-stream output."""
        return {h.name: h.finish() for h in self.heads}

    def reset(self) -> None:
        self.stats.reset()
        for h in self.heads:
            h.reset()
        if self.encoder is not None:
            self.memory.reset()

    def state_dict(self) -> dict:
        """Every head's state, each under ``"<name>."``."""
        return {f"{h.name}.{k}": v for h in self.heads for k, v in h.state_dict().items()}

    def load_state_dict(self, state: dict) -> None:
        """Restore every head from :meth:`state_dict` (e.g. ``heads.safetensors``); a head the
        snapshot lacks is an error naming it."""
        for h in self.heads:
            prefix = f"{h.name}."
            part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if not part:
                raise ValueError(f"the snapshot has no state for head {h.name!r}")
            h.load_state_dict(part)


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


def default_heads(names: Sequence[str] = DEFAULT_HEADS, memory: str = "ovbench", retention: str = "spread",
                  questions: Sequence[dict] = ()) -> tuple[list, list[str]]:
    """The shipped heads by name (``"detection"``, ``"qa"``) and notes on those skipped because
    their checkpoint is missing. ``questions`` are scheduled on the QA head."""
    from streammem.pipelines.qa import retention_overrides

    retention_overrides(retention)  # an unknown name fails before anything is built
    unknown = sorted(set(names) - set(DEFAULT_HEADS))
    if unknown:
        raise ValueError(f"unknown heads {unknown}; known: {list(DEFAULT_HEADS)}")
    heads, notes = [], []
    if "detection" in names:
        try:
            from streammem.pipelines.jobs.detect import build_detection_head

            heads.append(build_detection_head("small"))
        except (OSError, ValueError) as exc:
            notes.append(f"detection head skipped: {exc}")
    if "qa" in names:
        try:
            from streammem.pipelines.qa import load_default_qa

            qa = load_default_qa(memory=memory, retention=retention, keep_thumbnails=True)  # the report's evidence
            for q in questions:
                qa.schedule(q["question"], q["candidates"], float(q["middle_frame_timestamp"]), id=q)
            heads.append(qa)
        except (OSError, ValueError) as exc:
            notes.append(f"QA head skipped: {exc}")
    return heads, notes


def run_main_job(
    source: str = DEFAULT_SOURCE,
    out: str | os.PathLike = "outputs",
    realtime: bool = False,
    max_frames: int | None = None,
    progress: bool = True,
    memory: str = "ovbench",
    heads: Sequence[str] | Sequence[Head] = DEFAULT_HEADS,
    retention: str = "spread",
    save_heads: bool = False,
    report: bool | ReportCollector = True,
    **source_options,
) -> JobResult:
    """Run the main job over ``heads`` (names of the shipped heads, or head objects); with
    ``save_heads`` also write every head's state to ``heads.safetensors``; with ``report``
    (True, or a :class:`~streammem.pipelines.jobs.report.ReportCollector` to choose its plotter
    and sizes), ``report.html`` (its path in ``summary["outputs"]["report"]``; evidence
    thumbnails appear for a QA head built with ``keep_thumbnails=True``, as the shipped one is here).

    Raises ValueError (bad options) and SourceError (the source cannot be opened, or fails
    before its first frame) leaving nothing behind (:class:`~streammem.pipelines.jobs.base.OutputDir`).
    A source that fails mid-stream keeps everything processed before the failure: the video
    and JSONL files are finished, the summary records the error, and the error is returned in
    ``result.error``."""
    # 1. check inputs and build the heads
    names = [h for h in heads if isinstance(h, str)]
    if names and len(names) != len(heads):
        raise ValueError("heads must be all names or all head objects")
    src = open_source(source, **source_options)
    info = src.info
    if names:
        questions = default_questions(source, info.duration) if "qa" in names else []
        head_objs, notes = default_heads(names, memory=memory, retention=retention, questions=questions)
    else:
        head_objs, notes = list(heads), []
    pipeline = MainPipeline(head_objs, preset=memory, notes=notes)
    # 2. open the outputs (removed again if the run fails before its first frame)
    with OutputDir(out) as od:
        out = od.path
        video = od.video("annotated.mp4", fps=output_fps(info, source_options))
        jsonl = od.jsonl("frames.jsonl", flush_every=16)
        head_jsonl = {h.name: od.jsonl(h.records_file, flush_every=16) for h in pipeline.heads}
        # heads whose records are few (QA's answers) also list them in the summary
        collected: dict[str, list[dict]] = {h.name: [] for h in pipeline.heads if getattr(h, "summary_records", False)}
        collector = report if isinstance(report, ReportCollector) else ReportCollector()
        memories = {f"{h.name}.{role}": m for h in pipeline.heads for role, m in getattr(h, "memories", dict)().items()}
        if all(m is not pipeline.memory for m in memories.values()):
            memories["main.pyramid"] = pipeline.memory

        def take(head, frame, output) -> None:
            recs = head.records(frame, output)
            for r in recs:
                head_jsonl[head.name].write(r)
                if head.name in collected:
                    collected[head.name].append(r)
            collector.take(head, output, recs)

        def sink(item: StreamItem) -> None:
            f, o = item.frame, item.output
            image = f.image
            for h in pipeline.heads:
                take(h, f, o.heads[h.name])
                image = h.annotate(image, o.heads[h.name])
            s = o.stats
            lines = [f"frame {f.index}  t={f.timestamp:7.2f}s",
                     f"latency {item.latency_ms:6.2f} ms" + (f"  dropped {item.dropped}" if item.dropped else ""),
                     f"motion {s.motion:5.1f}  brightness {s.brightness:5.1f}",
                     f"memory {s.extra['memory_tokens']} tokens, frames/level {s.extra['memory_frames']}"]
            video.write(fit_to(annotate_text(image, lines, corner="bottom"), video.size), timestamp=f.timestamp)
            record = {"frame": f.index, "timestamp": round(f.timestamp, 6), "latency_ms": round(item.latency_ms, 3),
                      "dropped_before": item.dropped, **s.to_dict()}
            if item.lag_ms is not None:
                record["lag_ms"] = round(item.lag_ms, 3)
            jsonl.write(record)
            collector.sample(f.timestamp, memories)
            od.keep()

        # 3. stream, writing as we go
        run = run_stream(src, pipeline, sink=sink, realtime=realtime, max_frames=max_frames, progress=progress)
        error = drain(run)
        if error is not None and not od.kept:
            raise error  # not one frame: bad input, nothing is left
        for h in pipeline.heads:  # what is still pending, also after a mid-stream source error
            take(h, None, h.finish())
        od.close()
        video_path = video.path if video.count else None
        jsonl_path = jsonl.path
        # 4. snapshots and summary
        snapshot = out / "memory.safetensors"
        with atomic_path(snapshot) as tmp:
            pipeline.memory.save(tmp)
        if save_heads and pipeline.heads:
            with atomic_path(out / "heads.safetensors") as tmp:
                save_file({k: v.contiguous() for k, v in pipeline.state_dict().items()}, str(tmp))
        head_summary = {}
        for h in pipeline.heads:
            head_summary[h.name] = {**h.stats(), **({"records": collected[h.name]} if h.name in collected else {})}
        summary = {
            "source": source,
            "source_info": info.to_dict(),
            "outputs": {"video": str(video_path) if video_path else None, "jsonl": str(jsonl_path),
                        "memory": str(snapshot), **{h.name: str(out / h.records_file) for h in pipeline.heads},
                        "report": str(out / "report.html") if report is not False else None},
            **run.stats.summary(),
            "memory": pipeline.memory.stats(),
            "heads": head_summary,
            "notes": pipeline.notes,
        }
        summary_path = write_summary(out / "summary.json", summary)
        if report is not False:
            write_report(out / "report.html", summary, collector, title=f"streammem run: {source}")
    return JobResult(summary, video_path, jsonl_path, summary_path, error, memory=snapshot)

