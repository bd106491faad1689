"""Errors raised by sources and sinks. Every message names the input and what failed."""

from __future__ import annotations


class SourceError(RuntimeError):
    """A source could not be opened or read. The message names the input and the problem."""

    def __init__(self, uri: str, problem: str) -> None:
        self.uri = str(uri)
        self.problem = problem
        super().__init__(f"{self.uri}: {problem}")


class SourceNotFoundError(SourceError, FileNotFoundError):
    """The file or folder does not exist."""


class SourceOpenError(SourceError):
    """The input exists but cannot be opened as video: empty, not a video, unknown codec,
    camera index that does not exist, unreachable URL."""


class SourceReadError(SourceError):
    """Reading stopped before the end: a truncated or corrupt file, a camera or stream that
    disappeared. Every frame before the failure has already been yielded.

    Attributes:
        frame_index: index of the first frame that could not be read.
        timestamp: time (seconds) at which reading stopped, or None when unknown.
        frames_read: how many frames were decoded before the failure.
    """

    def __init__(
        self,
        uri: str,
        problem: str,
        frame_index: int,
        timestamp: float | None,
        frames_read: int,
    ) -> None:
        self.frame_index = int(frame_index)
        self.timestamp = None if timestamp is None else float(timestamp)
        self.frames_read = int(frames_read)
        at = f"frame {self.frame_index}"
        if self.timestamp is not None:
            at += f" (t={self.timestamp:.3f}s)"
        super().__init__(uri, f"{problem}; stopped at {at} after {self.frames_read} frames read")
        self.problem = problem


class SinkError(RuntimeError):
    """A sink could not write its output."""


class SourceWarning(UserWarning):
    """A source was read with a repair the caller should know about: frame times that went
    backwards and were set from the frame rate, a header frame count that disagrees with the
    frames that decode, or a backend that disagreed with OpenCV and was replaced by it. Issued
    through :func:`warnings.warn`, once per problem and read; the message names the input."""
