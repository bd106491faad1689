"""URI schemes that :func:`~streammem.io.open_source` hands to an opener registered for them.

``register_scheme("world", opener)`` makes ``open_source("world:seed=3")`` call
``opener("seed=3")``, which returns ``(frames, info)``: ``frames`` an iterable of
:class:`~streammem.types.Frame` (iterated again, it starts again from the first frame) and
``info`` a dict with ``width``, ``height``, ``fps`` and ``num_frames`` (None for an endless
source), optionally ``backend`` and ``codec`` (names for :class:`~streammem.io.SourceInfo`). An
opener raises ``ValueError`` or ``TypeError`` for a spec it cannot read; ``open_source`` turns
that into a :class:`~streammem.io.errors.SourceOpenError` naming the URI.

``io`` knows no scheme itself besides ``camera:`` and the network prefixes: the package root
(``streammem/__init__.py``) registers ``world:``, so that io never imports a layer above it.

Example:
    >>> from streammem.io.schemes import register_scheme, unregister_scheme, known_schemes
    >>> register_scheme("blank", lambda spec: ([], {"width": 8, "height": 8, "fps": 1.0, "num_frames": 0}))
    >>> "blank" in known_schemes()
    True
    >>> unregister_scheme("blank")
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable

from streammem.types import Frame

__all__ = ["SchemeOpener", "register_scheme", "unregister_scheme", "scheme_opener", "known_schemes"]

SchemeOpener = Callable[[str], "tuple[Iterable[Frame], dict[str, Any]]"]
_NAME_RE = re.compile(r"^[a-z][a-z0-9+.-]+$")
_OPENERS: dict[str, SchemeOpener] = {}


def register_scheme(name: str, opener: SchemeOpener, replace: bool = False) -> None:
    """Open ``name:spec`` URIs with ``opener(spec)``. ``name``: lower case, at least two
    characters (so a Windows drive letter is never a scheme). Registering a name that already
    has another opener raises unless ``replace``."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"a scheme name is lower case, starts with a letter and has at least two characters "
                         f"(letters, digits, + . -); got {name!r}")
    if name == "camera":
        raise ValueError("the camera: scheme is built in")
    if not callable(opener):
        raise TypeError(f"the opener of scheme {name!r} must be callable, got {opener!r}")
    old = _OPENERS.get(name)
    if old is not None and old is not opener and not replace:
        raise ValueError(f"scheme {name!r} already has an opener ({old!r}); pass replace=True to replace it")
    _OPENERS[name] = opener


def unregister_scheme(name: str) -> None:
    """Forget ``name``'s opener (a ``KeyError`` names an unknown scheme)."""
    if name not in _OPENERS:
        raise KeyError(f"no scheme {name!r} is registered; known: {', '.join(known_schemes())}")
    del _OPENERS[name]


def scheme_opener(name: str) -> SchemeOpener | None:
    """The opener registered for ``name``, or None."""
    return _OPENERS.get(name)


def known_schemes() -> list[str]:
    """The registered scheme names, sorted (``camera`` and the network prefixes not included)."""
    return sorted(_OPENERS)
