"""The ``streammem`` Typer apps and what the command modules share.

Options that set a config dataclass field take their default from the dataclass
(:func:`default`), so a default lives in one place; ``tests/test_cli.py`` checks every such
option against its field.

Exit codes, one rule for every command (:func:`job_errors`): 0 done; 2 bad input or options,
found before anything is written (nothing is left behind); 1 a failure while running (what
was done before it is kept). Third-party log noise (transformers, diffusers, huggingface_hub
progress and deprecation notices) goes to Python's ``logging``, not the terminal.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from contextlib import contextmanager
from typing import Any, Iterator, NoReturn

import typer

from streammem.io import SinkError, SourceError, SourceWarning

__all__ = ["app", "train_app", "eval_app", "default", "fail", "job_errors", "source_options"]

# The libraries' own switches, read when they are first imported (a user's setting wins).
for _var in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY", "HF_HUB_VERBOSITY"):
    os.environ.setdefault(_var, "error")

app = typer.Typer(
    help="streammem: bounded streaming video memories for QA, detection and generation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
train_app = typer.Typer(help="Train the shipped small models on StreamWorld.", no_args_is_help=True)
eval_app = typer.Typer(help="Evaluate heads and memories on StreamWorld (and real benchmarks where given).",
                       no_args_is_help=True)
app.add_typer(train_app, name="train")
app.add_typer(eval_app, name="eval")


_show = warnings.showwarning


_NOISE = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)  # libraries' notices to developers


def _show_source_warning(message, category, filename, lineno, file=None, line=None):
    """A source's warning (a repaired timestamp, a header count) as one plain line on stderr;
    deprecation notices to the ``py.warnings`` log; any other warning as Python shows it."""
    if issubclass(category, SourceWarning):
        typer.secho(f"warning: {message}", fg=typer.colors.YELLOW, err=True)
    elif issubclass(category, _NOISE):
        logging.getLogger("py.warnings").debug("%s:%s: %s: %s", filename, lineno, category.__name__, message)
    else:
        _show(message, category, filename, lineno, file, line)


warnings.showwarning = _show_source_warning


def default(config_cls: type, name: str) -> Any:
    """The default of field ``name`` of the dataclass ``config_cls``."""
    for f in dataclasses.fields(config_cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            raise ValueError(f"{config_cls.__name__}.{name} has no default")
    raise AttributeError(f"{config_cls.__name__} has no field {name!r}")


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: message`` in red on stderr and exit with ``code``."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@contextmanager
def job_errors() -> Iterator[None]:
    """Run a job under the exit-code rule: bad input or options found before anything is
    written (``ValueError``, ``SourceError``, a missing file, an ``hf:`` model the hub cannot
    give) exit 2 with ``error: <message>``;
    a failure to write the outputs (:class:`SinkError`, ``OSError``) exits 1. Any other error is
    a bug and is raised (exit 1, with its traceback). Jobs leave nothing behind on the first
    kind (:class:`~streammem.pipelines.jobs.base.OutputDir`); a job's mid-stream error comes
    back in its result, for :func:`fail` with code 1."""
    from streammem.models.hf import HubUnavailable

    try:
        yield
    except (SourceError, ValueError, FileNotFoundError, HubUnavailable) as exc:
        fail(str(exc), code=2)
    except (SinkError, OSError) as exc:
        fail(str(exc), code=1)


def source_options(stride: int = 1, start: float = 0.0, end: float | None = None, fps: float | None = None,
                   max_side: int | None = None, backend: str = "auto") -> dict:
    """``open_source`` keyword options from the CLI's source flags (unset ones left out)."""
    opts: dict = {"stride": stride, "start": start, "backend": backend}
    for key, value in (("end", end), ("fps", fps), ("max_side", max_side)):
        if value is not None:
            opts[key] = value
    return opts
