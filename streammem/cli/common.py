"""The ``streammem`` Typer apps and what the command modules share.

Options that set a config dataclass field take their default from the dataclass
(:func:`default`), so a default lives in one place; ``tests/test_cli.py`` checks every such
option against its field.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, NoReturn

import typer

from streammem.io import SourceWarning

__all__ = ["app", "train_app", "eval_app", "default", "fail", "source_options"]

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


def _show_source_warning(message, category, filename, lineno, file=None, line=None):
    """A source's warning (a repaired timestamp, a header count) as one plain line on stderr."""
    if issubclass(category, SourceWarning):
        typer.secho(f"warning: {message}", fg=typer.colors.YELLOW, err=True)
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


def source_options(stride: int = 1, start: float = 0.0, end: float | None = None, fps: float | None = None,
                   max_side: int | None = None, backend: str = "auto") -> dict:
    """``open_source`` keyword options from the CLI's source flags (unset ones left out)."""
    opts: dict = {"stride": stride, "start": start, "backend": backend}
    for key, value in (("end", end), ("fps", fps), ("max_side", max_side)):
        if value is not None:
            opts[key] = value
    return opts
