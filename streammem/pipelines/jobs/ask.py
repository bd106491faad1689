"""The question job (``streammem ask``): stream a source into the QA head and answer one
question at given stream times, causally (each from the memory as it was at its time).

The stream stops as soon as the last question is answered, so a camera or an endless
StreamWorld source returns once its questions are due.

Refusals (see :mod:`streammem.models.answerer.refusal`): a question refused before any frame
is read (words the answerer does not know, no options for a question that is not yes/no, a
negative time) raises :class:`~streammem.models.answerer.refusal.QuestionRefused` once the
source is opened (a source that cannot be opened is reported first), before any frame is read
or anything is written; a time with no frame in memory or after the end of a
stream that ended gets a :class:`~streammem.models.answerer.refusal.Refusal` in ``answers``
(and a ``"refused": true`` line in the JSONL file).

Example:
    >>> from streammem.pipelines.jobs import run_ask
    >>> res = run_ask("world:seed=3,size=128", "Is there a cat in view now?", ["yes", "no"], at=[0.5, 1])
    >>> [t for t, a in res.answers], all(a.evidence[0]["timestamp"] <= t for t, a in res.answers)
    ([0.5, 1.0], True)
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from streammem.io import SourceError, open_source
from streammem.models.answerer.refusal import QuestionRefused, Refusal
from streammem.pipelines.jobs.base import OutputDir
from streammem.pipelines.qa import StreamingQAPipeline, load_default_qa
from streammem.types import Answer

__all__ = ["AskResult", "run_ask"]


@dataclass
class AskResult:
    """``answers``: ``(time, Answer or Refusal)`` in time order; ``jsonl``: where they were
    written (or None); ``error``: the source error that ended the stream early (answers due
    before it are kept), or None."""

    answers: list[tuple[float, Answer | Refusal]] = field(default_factory=list)
    jsonl: Path | None = None
    error: SourceError | None = None


def run_ask(source: str, question: str, candidates: Sequence[str] | None, at: Sequence[float], memory: str = "ovbench",
            retention: str = "spread", max_frames: int | None = None, out: str | Path | None = None,
            pipeline: StreamingQAPipeline | None = None, **source_options) -> AskResult:
    """Answer ``question`` (with ``candidates``; None or empty: a yes/no question) at each
    stream time in ``at`` (seconds).

    Raises QuestionRefused (a ValueError) for a refused question, ValueError on bad options and
    SourceError when the source cannot be opened or fails before its first frame, all leaving
    nothing behind. Each answer is written to ``OUT/answers.jsonl`` as soon as it is due, so a
    failure mid-stream keeps the answers given before it; a question the answerer fails on is
    answered by a ``Refusal`` of kind ``"error"`` naming the exception, and the rest go on.
    Questions due after a mid-stream
    source error are answered over the memory at the error when their time is within a frame
    of it, else refused (and the error is returned)."""
    # 1. check inputs, build the head, open the source
    if not at:
        raise ValueError("give at least one time to ask at")
    pipe = pipeline or load_default_qa(memory=memory, retention=retention, keep_thumbnails=False)
    src = open_source(source, **source_options)  # a source that cannot be opened is reported first
    options = list(candidates) if candidates else None
    for t in sorted(at):  # every time checked before any is scheduled
        refused = pipe.refusal(question, options, float(t))
        if refused is not None:
            raise QuestionRefused(refused)
    futures = [(t, pipe.schedule(question, options, at=float(t))) for t in sorted(at)]
    result = AskResult()
    with OutputDir(out) if out is not None else nullcontext() as od:
        writer = od.jsonl("answers.jsonl") if od is not None else None

        def take_due(final: bool) -> None:
            """Record (and write) the answers that are done, in time order."""
            while len(result.answers) < len(futures):
                t, fut = futures[len(result.answers)]
                if not (final or fut.done()):
                    return
                try:
                    a = fut.result()
                except Exception as exc:  # noqa: BLE001 - the answerer failed on this one: say so, go on
                    a = Refusal("error", f"the answerer failed: {type(exc).__name__}: {exc}", query_time=float(t))
                result.answers.append((float(t), a))
                if writer is not None:
                    writer.write({"question": question, "candidates": pipe.candidates_for(options), "at": float(t),
                                  **a.to_dict()})

        # 2. stream until every question is answered, writing each answer when it is due
        read = 0
        try:
            for i, frame in enumerate(src):
                if max_frames is not None and i >= max_frames:
                    break
                pipe.step(frame)
                read += 1
                if od is not None:
                    od.keep()
                take_due(final=False)
                if len(result.answers) == len(futures):
                    break
        except SourceError as exc:
            if read == 0:
                raise  # not one frame: bad input, nothing is left
            result.error = exc
        pipe.finish()
        # 3. the answers due after the end of the stream (or its error)
        take_due(final=True)
        if writer is not None:
            od.close()
            result.jsonl = writer.path
    return result
