"""Jobs: a source streamed through heads into files (the CLI's, demos' and batch's workhorses).

=====================  ====================================================================
:func:`run_main_job`   ``streammem run``: statistics + any list of heads -> annotated mp4,
                       JSONL per head, snapshots, summary
:func:`run_detect`     ``streammem detect``: one detection head -> annotated mp4, JSONL, summary
:func:`run_ask`        ``streammem ask``: one question at given stream times
:func:`run_generate`   ``streammem generate``: frames generated from a first frame and actions
=====================  ====================================================================
"""

from streammem.pipelines.jobs.ask import AskResult, run_ask
from streammem.pipelines.jobs.base import JobResult
from streammem.pipelines.jobs.detect import (
    DEFAULT_CHECKPOINT,
    build_detection_head,
    run_detect,
)
from streammem.pipelines.jobs.main import (
    DEFAULT_HEADS,
    DEFAULT_SOURCE,
    MainOutput,
    MainPipeline,
    default_heads,
    default_questions,
    run_main_job,
)

__all__ = ["AskResult", "run_ask", "JobResult", "DEFAULT_CHECKPOINT", "build_detection_head", "run_detect",
           "DEFAULT_HEADS", "DEFAULT_SOURCE", "MainOutput", "MainPipeline", "default_heads", "default_questions",
           "run_main_job", "load_default_generator", "run_generate"]


def __getattr__(name: str):
    """The generation job loads on first use (it imports diffusers, which the other jobs do not need)."""
    if name in ("load_default_generator", "run_generate"):
        from streammem.pipelines.jobs import generate

        return getattr(generate, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
