"""Typed queries for ``Memory.read(query)`` and the protocols of capabilities beyond it.

A memory declares the query types its ``read`` understands in ``Memory.QUERIES``; any other
query raises ``TypeError`` naming the memory, the query's type and the types it takes.

=====================  ==================================  ==================================
query                  what it carries                     read by
=====================  ==================================  ==================================
:class:`FeatureQuery`  ``features (M, D)``, optional ``k``  ``DualMemory`` (best k by cosine)
:class:`PoseQuery`     ``pose (4, 4)`` camera-to-world      ``PoseKVMemory`` (history retrieval)
:class:`TimestepQuery` ``timesteps (N,)``, ``banks (N,)``   ``ErrorBank`` (those bins only)
=====================  ==================================  ==================================

Capabilities outside ``write`` / ``read`` are small ``runtime_checkable`` protocols, so a head
asks ``isinstance(memory, SupportsRows)`` instead of ``hasattr(memory, "read_rows")``:
:class:`SupportsRows` (``read_rows``), :class:`SupportsQuery` (``query``), :class:`SupportsKV`
(``kv``), :class:`SupportsSample` (``sample``), :class:`SupportsFrames` (``frames``).

Example:
    >>> import torch
    >>> from streammem.memory import DualMemory, PyramidMemory
    >>> isinstance(DualMemory(dim=4, slots=4), SupportsRows), isinstance(PyramidMemory(dim=4), SupportsRows)
    (True, False)
    >>> PyramidMemory(dim=4).read(PoseQuery(torch.eye(4)))
    Traceback (most recent call last):
    ...
    TypeError: PyramidMemory.read takes no query (None only), got a PoseQuery
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from streammem.types import Tokens

__all__ = ["FeatureQuery", "PoseQuery", "TimestepQuery", "SupportsRows", "SupportsQuery", "SupportsKV",
           "SupportsSample", "SupportsFrames"]


@dataclass(frozen=True)
class FeatureQuery:
    """Retrieval by content: ``features (M, D)`` (a ``(D,)`` vector is one row); ``k`` tokens
    to return, or None for the memory's configured default."""

    features: torch.Tensor
    k: int | None = None

    def __post_init__(self) -> None:
        f = torch.as_tensor(self.features)
        if f.ndim == 1:
            f = f.reshape(1, -1)
        if f.ndim != 2:
            raise ValueError(f"FeatureQuery.features must be (M, D) or (D,), got shape {tuple(f.shape)}")
        if self.k is not None and (not isinstance(self.k, int) or self.k < 1):
            raise ValueError(f"FeatureQuery.k must be None or an int >= 1, got {self.k!r}")
        object.__setattr__(self, "features", f.float())


@dataclass(frozen=True)
class PoseQuery:
    """Retrieval by camera: ``pose (4, 4)``, camera-to-world, of the camera that will look."""

    pose: torch.Tensor

    def __post_init__(self) -> None:
        p = torch.as_tensor(self.pose, dtype=torch.float32)
        if tuple(p.shape) != (4, 4):
            raise ValueError(f"PoseQuery.pose must be 4x4, got shape {tuple(p.shape)}")
        object.__setattr__(self, "pose", p)


@dataclass(frozen=True)
class TimestepQuery:
    """Errors near given diffusion timesteps: ``timesteps (N,)`` and their ``banks (N,)``
    (0 noise-side, 1 clean-side; one int for all)."""

    timesteps: torch.Tensor
    banks: torch.Tensor | int = 1

    def __post_init__(self) -> None:
        t = torch.as_tensor(self.timesteps, dtype=torch.float32).reshape(-1)
        b = torch.as_tensor(self.banks, dtype=torch.int64).reshape(-1).expand(t.shape[0]).clone()
        if len(b) and not bool(((b == 0) | (b == 1)).all()):
            raise ValueError(f"TimestepQuery.banks must be 0 (noise-side) or 1 (clean-side), got {b.tolist()}")
        object.__setattr__(self, "timesteps", t)
        object.__setattr__(self, "banks", b)


@runtime_checkable
class SupportsRows(Protocol):
    """``read_rows(rows) == read().index(rows)`` without building the whole read."""

    def read_rows(self, rows: torch.Tensor) -> Tokens: ...


@runtime_checkable
class SupportsQuery(Protocol):
    """``query(q, k)``: the ``k`` stored tokens most similar to ``q (M, D)``, best first."""

    def query(self, q: torch.Tensor | Tokens, k: int) -> Tokens: ...


@runtime_checkable
class SupportsKV(Protocol):
    """``kv(query)``: ``(keys (N, D), values (N, Dv), tokens)`` ready for attention."""

    def kv(self, query: PoseQuery | None = None) -> tuple[torch.Tensor, torch.Tensor, Tokens]: ...


@runtime_checkable
class SupportsSample(Protocol):
    """``sample(n, side, timestep)``: ``(k <= n, D)`` stored entries drawn at random."""

    def sample(self, n: int = 1, side: str = "clean", timestep: float | None = None) -> torch.Tensor: ...


@runtime_checkable
class SupportsFrames(Protocol):
    """``frames()``: ``(level, frame_index, timestamp)`` of each frame kept."""

    def frames(self) -> list[tuple[int, int, float]]: ...
