"""The contract every memory keeps, and the plumbing they share.

A memory is storage plus a policy. It takes and gives :class:`~streammem.types.Tokens`:

- ``write(tokens)`` adds what one step of the stream produced;
- ``read(query=None) -> Tokens`` returns what the memory holds, or the part a typed query
  selects (``FeatureQuery``, ``PoseQuery``, ``TimestepQuery``: each memory lists the ones it
  takes in ``QUERIES``; any other raises ``TypeError``); capabilities beyond ``read`` are
  the protocols of :mod:`streammem.memory.protocols` (``SupportsRows``, ``SupportsKV``, ...);
- ``reset()`` forgets everything and reseeds its random generator;
- ``stats() -> dict`` reports occupancy, evictions, merges, promotions, bytes, ...;
- ``state_dict()`` / ``load_state_dict()`` hold tensors only; the kind and the JSON config
  travel as ``uint8`` text tensors ``meta.kind`` / ``meta.config`` (their one place), so
  ``save(path)`` writes the state dict as one safetensors file and ``Memory.load(path)`` never
  runs code, and checks the file (its config against its tensors' shapes, read from the header,
  and the bytes it asks for against ``max_bytes``) before allocating anything;
- ``num_tokens``, ``capacity`` and ``nbytes`` properties.

Every memory preallocates fixed-size buffers at construction, so ``nbytes`` (the bytes of all
its state tensors) is the same before the first write and after the millionth, and a write
costs the same at any stream position. Randomness comes only from ``self.generator``, a
``torch.Generator`` owned by the memory and seeded from ``config.seed``; its state is part of
``state_dict``, so save -> load -> continue gives exactly the uninterrupted stream.

Example:
    >>> import torch
    >>> from streammem.memory import FeatureBank
    >>> bank = FeatureBank(dim=8, max_size=100, key_size=10)
    >>> bank.write(Tokens.from_grid(torch.randn(2, 3, 8), frame_index=0, timestamp=0.0))
    >>> len(bank.read()), bank.num_tokens <= bank.capacity
    (6, True)
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from streammem.types import Tokens, check_field

__all__ = ["Memory", "MemoryConfig", "TokenSlots", "check_field", "pool_grid", "pool_grid_salient", "MEMORY_KINDS"]

#: default ``max_bytes`` of :meth:`Memory.load` (1 GiB).
DEFAULT_MAX_BYTES = 2 ** 30
#: ``format`` entry of a snapshot file's safetensors header.
SNAPSHOT_FORMAT = "streammem.memory"

#: kind name -> memory class; filled by ``Memory.__init_subclass__``.
MEMORY_KINDS: dict[str, type["Memory"]] = {}


@dataclass
class MemoryConfig:
    """Fields every memory has.

    Attributes:
        dim: feature width D of the tokens it stores (buffers are preallocated at this width).
        seed: seed of the memory's own ``torch.Generator``.
    """

    dim: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_field(isinstance(self.dim, int) and self.dim >= 1, name, "dim", "an int >= 1", self.dim)
        check_field(isinstance(self.seed, int) and self.seed >= 0, name, "seed", "an int >= 0", self.seed)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def _bytes_tensor(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8)


def _tensor_text(t: torch.Tensor) -> str:
    return bytes(t.tolist()).decode("utf-8")


def pool_grid(x: torch.Tensor, oh: int, ow: int) -> torch.Tensor:
    """Adaptive average pooling of an ``(h, w, D)`` token grid to ``(oh, ow, D)``.

    Same result as ``F.adaptive_avg_pool2d`` on ``(D, h, w)``. When the sides divide, it sums
    strided views (large grids) or takes one reshaped mean (small grids) instead: torch's
    adaptive pooling always forks threads, which costs far more than the pooling on small
    grids, and is single-pass slow on wide ones.
    """
    h, w, d = x.shape
    if (h, w) == (oh, ow):
        return x
    if h % oh or w % ow:
        return F.adaptive_avg_pool2d(x.permute(2, 0, 1), (oh, ow)).permute(1, 2, 0)
    kh, kw = h // oh, w // ow
    v = x.reshape(oh, kh, ow, kw, d)
    if x.numel() < 65536 or kh * kw > 16:
        return v.mean((1, 3))
    acc = v[:, 0, :, 0].clone()
    for i in range(kh):
        for j in range(kw):
            if i or j:
                acc += v[:, i, :, j]
    return acc.div_(kh * kw)



def pool_grid_salient(x: torch.Tensor, sal: torch.Tensor, oh: int, ow: int,
                      temperature: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Salience-weighted pooling of an ``(h, w, D)`` grid with per-token salience ``(h, w)``.

    Each output cell is the mean of its block's tokens weighted by ``softmax(salience /
    temperature)`` over the block, so an object that covers one token of a 4 x 4 block keeps
    its features instead of being averaged into the background. The pooled salience is the
    same weighted mean of the block's salience (close to its maximum), so a cell that holds an
    object stays salient when pooled again. ``temperature -> inf`` is average pooling,
    ``-> 0`` keeps the most salient token of each block. Sides must divide.

    Returns ``(oh, ow, D)`` features and ``(oh, ow)`` salience.
    """
    h, w, d = x.shape
    if sal.shape != (h, w):
        raise ValueError(f"salience must be ({h}, {w}) for a {h} x {w} grid, got {tuple(sal.shape)}")
    if (h, w) == (oh, ow):
        return x, sal
    if h % oh or w % ow:
        raise ValueError(f"salient pooling needs sides that divide: {h} x {w} -> {oh} x {ow}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    kh, kw = h // oh, w // ow
    v = x.reshape(oh, kh, ow, kw, d).permute(0, 2, 1, 3, 4).reshape(oh, ow, kh * kw, d)
    s = sal.float().reshape(oh, kh, ow, kw).permute(0, 2, 1, 3).reshape(oh, ow, kh * kw)
    wgt = torch.softmax(s / temperature, -1)
    return torch.einsum("abk,abkd->abd", wgt.to(x.dtype), v), (wgt * s).sum(-1)

class Memory:
    """Base class: buffers, counters, generator, snapshots. Subclasses set ``kind``,
    ``Config`` (and ``QUERIES``, the query types their ``read`` takes) and implement
    ``_allocate``, ``write``, ``read``, ``num_tokens``, ``capacity``.

    One state hook, :meth:`_on_state`, keeps Python-side bookkeeping (kept for speed) and the
    buffers in step; a memory with no such bookkeeping does not override it.
    """

    kind: ClassVar[str] = "memory"
    Config: ClassVar[type] = MemoryConfig
    #: names of the integer event counters kept in ``stats()`` and in snapshots.
    COUNTERS: ClassVar[tuple[str, ...]] = ("writes",)
    #: query types ``read`` takes besides None (see :mod:`streammem.memory.protocols`).
    QUERIES: ClassVar[tuple[type, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind != "memory":
            MEMORY_KINDS[cls.kind] = cls

    def __init__(self, config: Any = None, **kwargs: Any) -> None:
        if config is None:
            config = self.Config(**kwargs)
        elif kwargs:
            raise TypeError(f"{type(self).__name__}: pass either a config or keyword fields, not both")
        if not isinstance(config, self.Config):
            raise TypeError(f"{type(self).__name__} needs a {self.Config.__name__}, got {type(config).__name__}")
        self.config = config
        self.generator = torch.Generator()
        self._buffers: dict[str, torch.Tensor] = {}
        self._allocate()
        self.reset()

    # ------------------------------------------------------------------ to implement
    def _allocate(self) -> None:
        raise NotImplementedError

    def write(self, tokens: Tokens) -> None:
        raise NotImplementedError

    def read(self, query: Any = None) -> Tokens:
        raise NotImplementedError

    @property
    def num_tokens(self) -> int:
        raise NotImplementedError

    @property
    def capacity(self) -> int:
        raise NotImplementedError

    def _on_state(self, event: str) -> None:
        """The one state hook, called with:

        - ``"reset"``: every buffer was just zeroed (at construction and by :meth:`reset`):
          set non-zero initial values (e.g. ``-1`` sentinels), then rebuild bookkeeping;
        - ``"load"``: buffers were just filled from a snapshot: rebuild bookkeeping from them;
        - ``"save"``: a snapshot is about to be taken: copy bookkeeping into the buffers.
        """

    # ------------------------------------------------------------------ shared
    def buffer(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Register a preallocated state tensor (part of ``nbytes`` and of snapshots)."""
        self._buffers[name] = tensor
        return tensor

    @property
    def nbytes(self) -> int:
        """Bytes of every state tensor; constant over the stream (buffers are preallocated)."""
        return sum(t.numel() * t.element_size() for t in self._buffers.values())

    def reset(self) -> None:
        """Forget everything: zero the buffers and counters, reseed the generator."""
        for t in self._buffers.values():
            t.zero_()
        self.counters = {name: 0 for name in self.COUNTERS}
        self.generator.manual_seed(self.config.seed)
        self._on_state("reset")

    def stats(self) -> dict:
        return {
            "kind": self.kind,
            "num_tokens": self.num_tokens,
            "capacity": self.capacity,
            "occupancy": self.num_tokens / max(self.capacity, 1),
            "bytes": self.nbytes,
            **self.counters,
        }

    def _check_dim(self, tokens: Tokens) -> None:
        if not isinstance(tokens, Tokens):
            raise TypeError(f"{type(self).__name__}.write takes Tokens, got {type(tokens).__name__}")
        if tokens.dim != self.config.dim:
            raise ValueError(
                f"{type(self).__name__} holds tokens of width dim={self.config.dim}, got width {tokens.dim}"
            )

    def _check_query(self, query: Any) -> None:
        """Raise ``TypeError`` unless ``query`` is None or one of ``QUERIES``."""
        if query is None or isinstance(query, self.QUERIES):
            return
        me = type(self).__name__
        if not self.QUERIES:
            raise TypeError(f"{me}.read takes no query (None only), got a {type(query).__name__}")
        names = " or ".join(q.__name__ for q in self.QUERIES)
        raise TypeError(f"{me}.read takes None or a {names}, got a {type(query).__name__}")

    # ------------------------------------------------------------------ snapshots
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only: buffers, counters, generator state, and the kind and JSON config as
        ``uint8`` text (``meta.kind``, ``meta.config``: the one place a snapshot keeps them)."""
        self._on_state("save")
        state = {name: t.clone() for name, t in self._buffers.items()}
        state["meta.counters"] = torch.tensor([self.counters[n] for n in self.COUNTERS], dtype=torch.int64)
        state["meta.rng"] = self.generator.get_state().clone()
        state["meta.kind"] = _bytes_tensor(self.kind)
        state["meta.config"] = _bytes_tensor(self.config.to_json())
        return state

    @classmethod
    def _config_from(cls, text: str, where: str) -> Any:
        """The config a snapshot's JSON describes; a field it lacks reads as its default (files
        saved before the field existed still load)."""
        try:
            fields = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: the snapshot's config is not JSON ({err})") from None
        if not isinstance(fields, dict):
            raise ValueError(f"{where}: the snapshot's config is not a JSON object")
        known = {f.name for f in dataclasses.fields(cls.Config)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"{where}: the snapshot's config has fields {unknown} that {cls.Config.__name__} lacks")
        try:
            return cls.Config(**fields)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: the snapshot's config is invalid: {err}") from None

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore a snapshot of a memory of the same kind and configuration.

        Raises ``ValueError`` naming what differs: the kind, the config fields, or a tensor's
        shape or dtype.
        """
        me = type(self).__name__
        if "meta.kind" not in state or "meta.config" not in state:
            raise ValueError(f"{me}.load_state_dict: not a streammem memory snapshot (no 'meta.kind' / 'meta.config')")
        kind = _tensor_text(state["meta.kind"])
        if kind != self.kind:
            raise ValueError(f"{me}.load_state_dict: snapshot is of kind '{kind}', this memory is '{self.kind}'")
        theirs = json.loads(self._config_from(_tensor_text(state["meta.config"]), f"{me}.load_state_dict").to_json())
        mine = json.loads(self.config.to_json())
        diff = sorted(k for k in set(theirs) | set(mine) if theirs.get(k) != mine.get(k))
        if diff:
            detail = ", ".join(f"{k}: snapshot {theirs.get(k)!r} vs this {mine.get(k)!r}" for k in diff)
            raise ValueError(f"{me}.load_state_dict: snapshot has another configuration ({detail})")
        missing = sorted(set(self._buffers) - set(state))
        if missing:
            raise ValueError(f"{me}.load_state_dict: snapshot lacks tensors {missing}")
        for name, t in self._buffers.items():
            src = state[name]
            if src.shape != t.shape or src.dtype != t.dtype:
                raise ValueError(
                    f"{me}.load_state_dict: tensor '{name}' is {tuple(src.shape)} {src.dtype} in the "
                    f"snapshot, {tuple(t.shape)} {t.dtype} here"
                )
        values = state["meta.counters"].tolist()
        if len(values) != len(self.COUNTERS):
            raise ValueError(f"{me}.load_state_dict: counters have {len(values)} entries, expected {len(self.COUNTERS)}")
        for name, t in self._buffers.items():
            t.copy_(state[name])
        self.counters = dict(zip(self.COUNTERS, (int(v) for v in values)))
        self.generator.set_state(state["meta.rng"].clone())
        self._on_state("load")

    def save(self, path: str | Path) -> None:
        """Write :meth:`state_dict` as one safetensors file (kind and config in its
        ``meta.kind`` / ``meta.config`` tensors; the header names only the format)."""
        state = {k: v.contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(path), metadata={"format": SNAPSHOT_FORMAT})

    @classmethod
    def buffer_shapes(cls, config: Any) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """``{name: (shape, dtype)}`` of the buffers a memory of this ``config`` allocates,
        worked out on the meta device (nothing is allocated)."""
        probe = cls.__new__(cls)
        probe.config, probe._buffers = config, {}
        with torch.device("meta"):
            probe._allocate()
        return {k: (tuple(v.shape), v.dtype) for k, v in probe._buffers.items()}

    @classmethod
    def load(cls, path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES) -> "Memory":
        """Build a memory from a file written by :meth:`save`, checking it before allocating.

        Called on :class:`Memory` it builds whatever kind the file holds; called on a subclass
        it refuses a file of another kind. Raises ``ValueError`` naming the file when it is not
        a safetensors file (random bytes, a renamed pickle), not a memory snapshot, of another
        kind, when its config is invalid or disagrees with its tensors' shapes (read from the
        header, nothing loaded), or when the memory it describes would take more than
        ``max_bytes`` (default 1 GiB).
        """
        where = str(path)
        try:
            with safe_open(where, framework="pt") as f:
                keys = set(f.keys())
                header = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in keys}
                meta = {k: f.get_tensor(k) for k in ("meta.kind", "meta.config") if k in keys}
        except FileNotFoundError:
            raise
        except Exception as err:  # the safetensors library raises its own error types
            raise ValueError(f"{where}: not a safetensors file ({type(err).__name__}: {err})") from None
        if "meta.kind" not in meta or "meta.config" not in meta:
            raise ValueError(f"{where}: not a streammem memory snapshot (no 'meta.kind' / 'meta.config' tensor)")
        kind = _tensor_text(meta["meta.kind"])
        if kind not in MEMORY_KINDS:
            raise ValueError(f"{where}: not a streammem memory snapshot (kind {kind!r})")
        if cls is not Memory and kind != cls.kind:
            raise ValueError(f"{where}: snapshot is of kind '{kind}', cannot load it as {cls.__name__} ('{cls.kind}')")
        target = MEMORY_KINDS[kind]
        config = target._config_from(_tensor_text(meta["meta.config"]), where)
        shapes = target.buffer_shapes(config)
        need = sum(math.prod(shape) * dtype.itemsize for shape, dtype in shapes.values())
        if need > max_bytes:
            raise ValueError(f"{where}: the {kind} memory this snapshot describes takes {need:,} bytes, more than "
                             f"max_bytes={max_bytes:,}; pass a larger max_bytes to load it")
        for name, (shape, _) in shapes.items():
            if name not in header:
                raise ValueError(f"{where}: snapshot lacks tensor '{name}'")
            if header[name][0] != shape:
                raise ValueError(f"{where}: tensor '{name}' is {header[name][0]} in the file but its config "
                                 f"({kind}) makes it {shape}")
        meta_bytes = {k: math.prod(v[0]) for k, v in header.items() if k.startswith("meta.")}
        if any(n > 2 ** 20 for n in meta_bytes.values()):
            raise ValueError(f"{where}: snapshot has oversized meta tensors {meta_bytes}")
        memory = target(config)
        wanted = {k for k in keys if k in shapes or k.startswith("meta.")}
        with safe_open(where, framework="pt") as f:
            state = {k: f.get_tensor(k) for k in wanted}
        memory.load_state_dict(state)
        return memory

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


def _rows(t: torch.Tensor, rows: torch.Tensor | slice) -> torch.Tensor:
    """``t[rows]`` for a slice or a boolean mask; ``index_select`` for row indices (~3-6x faster
    than ``t[idx]`` on CPU). Only the slice gives a view."""
    if isinstance(rows, slice) or rows.dtype == torch.bool:
        return t[rows]
    return torch.index_select(t, 0, rows)


class TokenSlots:
    """Fixed-capacity slot storage for token features and provenance, owned by a memory.

    Registers ``{prefix}.features`` ``(C, D)`` and per-slot ``frame_index`` ``(C,)``,
    ``timestamp`` ``(C,)``, ``grid`` ``(C, 2)``, ``level`` ``(C,)``, ``score`` ``(C,)``,
    optionally ``pose`` ``(C, 4, 4)``, and one ``(C,)`` float32 buffer ``{prefix}.{name}`` per
    name in ``extras`` (a ``Tokens.extras`` entry kept per slot), as buffers of ``memory``.
    Which slots are live is the owner's business.
    """

    def __init__(self, memory: Memory, prefix: str, capacity: int, dim: int, with_pose: bool = False,
                 dtype: torch.dtype = torch.float32, extras: tuple[str, ...] = ()) -> None:
        b = memory.buffer
        self.features = b(f"{prefix}.features", torch.zeros(capacity, dim, dtype=dtype))
        self.frame_index = b(f"{prefix}.frame_index", torch.zeros(capacity, dtype=torch.int64))
        self.timestamp = b(f"{prefix}.timestamp", torch.zeros(capacity, dtype=torch.float64))
        self.grid = b(f"{prefix}.grid", torch.zeros(capacity, 2))
        self.level = b(f"{prefix}.level", torch.zeros(capacity, dtype=torch.int64))
        self.score = b(f"{prefix}.score", torch.zeros(capacity))
        self.pose = b(f"{prefix}.pose", torch.zeros(capacity, 4, 4)) if with_pose else None
        self.extras = {name: b(f"{prefix}.{name}", torch.zeros(capacity)) for name in extras}

    def put(self, slots: torch.Tensor | slice, tokens: Tokens, src: torch.Tensor | slice | None = None) -> None:
        """Copy ``tokens`` (or the rows ``src`` of them: a slice, a mask or row indices) into
        ``slots``; a missing score or extra is stored as 0 and a missing pose as the identity."""
        pick = (lambda t: t) if src is None else (lambda t: _rows(t, src))  # noqa: E731
        self.features[slots] = pick(tokens.features)
        self.frame_index[slots] = pick(tokens.frame_index)
        self.timestamp[slots] = pick(tokens.timestamp)
        self.grid[slots] = pick(tokens.grid)
        self.level[slots] = pick(tokens.level)
        self.score[slots] = 0.0 if tokens.score is None else pick(tokens.score)
        if self.pose is not None:
            self.pose[slots] = torch.eye(4) if tokens.pose is None else pick(tokens.pose)
        for name, buf in self.extras.items():
            value = tokens.extras.get(name)
            buf[slots] = 0.0 if value is None else pick(value).float()

    def get(self, slots: torch.Tensor | slice) -> Tokens:
        """Copies of the slots' contents (never views: later writes must not change a read)."""
        view = isinstance(slots, slice)  # basic indexing gives views: copy them; the others copy already
        take = (lambda t: _rows(t, slots).clone()) if view else (lambda t: _rows(t, slots))  # noqa: E731
        feats = take(self.features)
        return Tokens(
            features=feats.float(),  # a copy already; .float() is a no-op for float32 slots
            frame_index=take(self.frame_index),
            timestamp=take(self.timestamp),
            grid=take(self.grid),
            level=take(self.level),
            pose=None if self.pose is None else take(self.pose),
            score=take(self.score),
            extras={name: take(buf) for name, buf in self.extras.items()},
        )
