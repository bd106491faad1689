"""The streaming loop and one pipeline per head."""

from streammem.pipelines.base import Pipeline, StatsOutput, StatsPipeline, annotate_text
from streammem.pipelines.stream import StreamItem, StreamRun, StreamStats, run_stream

__all__ = [
    "Pipeline",
    "StatsOutput",
    "StatsPipeline",
    "StreamItem",
    "StreamRun",
    "StreamStats",
    "annotate_text",
    "run_stream",
]
