"""The streaming loop, the head contract, and one pipeline per head.

- :mod:`~streammem.pipelines.base`: :class:`Pipeline` and :class:`Head` (what every head
  has), :class:`HeadBase` (the shared plumbing), :class:`StatsPipeline`;
- :mod:`~streammem.pipelines.stream`: :func:`run_stream`, the loop (offline or real-time);
- heads: :mod:`~streammem.pipelines.qa` (questions), :mod:`~streammem.pipelines.detection`
  (detectors with memory aggregation); a new head (generation) is a module here keeping the
  :class:`Head` contract;
- :mod:`~streammem.pipelines.jobs`: ``run``, ``detect`` and ``ask`` over files and streams.
"""

from streammem.pipelines.base import Head, HeadBase, Pipeline, StatsOutput, StatsPipeline, annotate_text
from streammem.pipelines.stream import StreamItem, StreamRun, StreamStats, run_stream

__all__ = [
    "Head",
    "HeadBase",
    "Pipeline",
    "StatsOutput",
    "StatsPipeline",
    "StreamItem",
    "StreamRun",
    "StreamStats",
    "annotate_text",
    "run_stream",
]
