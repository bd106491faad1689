"""Decoding ahead in a daemon thread, through a bounded queue."""

from __future__ import annotations

import queue
import threading
from typing import Iterator

__all__ = ["_prefetch"]

_DONE = object()


def _prefetch(it: Iterator, size: int) -> Iterator:
    """Run ``it`` in a daemon thread, handing items through a queue of ``size``.
    Exceptions are re-raised in the consumer after every item before them; closing the
    consumer (break, garbage collection, ``close()``) stops the thread. The thread starts when
    the first item is asked for."""
    q: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()

    def work() -> None:
        try:
            for item in it:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(_DONE)
        except BaseException as exc:  # handed to the consumer
            q.put(exc)
        finally:
            close = getattr(it, "close", None)
            if close is not None and stop.is_set():
                try:
                    close()
                except Exception:
                    pass

    thread = threading.Thread(target=work, name="streammem-prefetch", daemon=True)

    def consume() -> Iterator:
        thread.start()  # on the first item asked for: an iterator closed before that starts nothing
        try:
            while True:
                item = q.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            # Unblock a producer waiting on a full queue.
            try:
                while True:
                    q.get_nowait()
            except queue.Empty:
                pass
            # Wait for the reader to release its decoder: a daemon thread killed inside native
            # decode code at interpreter exit aborts the process.
            if thread is not threading.current_thread():
                thread.join(timeout=5.0)

    return consume()
