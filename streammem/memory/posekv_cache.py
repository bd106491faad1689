"""PoseKVCache: a per-layer key-value cache for a video transformer, each layer a PoseKVMemory.

The interface follows the one diffusers' maintainers settled on for rolling KV caches
(diffusers issue 12600, pull requests 12773 and 13681), itself after transformers'
``DynamicCache``: a container indexed by layer (``cache[i]``, ``len(cache)``) whose layer caches
have ``update`` / ``get`` / ``reset``; the model receives the container through
``attention_kwargs={"kv_cache": cache}`` and an attention processor calls
``cache.update(key_states, value_states, layer_idx)``. This file is storage only: no model, no
RoPE; :mod:`streammem.models.wan_memory` holds the processor that serves diffusers' Wan.

The rule of each layer is :class:`~streammem.memory.posekv.PoseKVMemory` (RELIC), unchanged: a
rolling window of the last ``window`` latent frames at full resolution, older frames average-pooled
per axis by ``schedule[i % len(schedule)]`` into ``history_frames`` slots (the oldest evicted past
that), every token tagged with its frame's absolute camera pose and its grid position (pooled
tokens at their cells' centres). So a layer holds at most ``window * h * w`` plus the pooled
history's tokens, however long the stream runs.

Write-after-chunk semantics: ``update`` returns ``[held ; current]`` and stores the current chunk
only inside ``with cache.writing():`` (the rollout's dedicated clean pass, or its last denoising
step); the many denoising steps of a chunk read without writing. With nothing evicted or pooled
(a window of at least every frame written) a writing ``update`` returns exactly what
``DynamicCache.update`` returns.

What a layer stores: keys as the processor hands them (for Wan: after ``norm_k``, before RoPE
and before any pose embedding) and values, float32 on the CPU (the memory's buffers; a snapshot
is these). ``get(device, dtype)`` keeps one copy on the compute device until the next write, so
the denoising steps of a chunk move nothing. The pose embedding is not stored: ``embed_pose``
computes it (width ``head_dim``, the same vector for every head) for the processor to add to
queries and keys, never to values. Batch and heads are folded into a token's feature:
``dim = batch_size * heads * head_dim`` (classifier-free guidance's two halves are kept apart).

Shapes: ``update(key_states, value_states, layer_idx)`` with ``(batch, heads, seq, head_dim)``,
``seq`` a whole number of ``height * width`` latent frames (row-major, as Wan flattens them);
returns ``(batch, heads, held + seq, head_dim)``; ``cache[i].positions()`` ``(held, 3)``
float64 absolute (latent frame, row, col); ``cache[i].poses()`` ``(held, 4, 4)``.

Example:
    >>> import torch
    >>> cache = PoseKVCache(num_layers=2, heads=2, head_dim=4, height=2, width=2, window=1, history_frames=18)
    >>> k = torch.randn(1, 2, 4, 4)
    >>> with cache.writing():
    ...     for _ in range(3):
    ...         keys, values = cache.update(k, k, layer_idx=0)
    >>> keys.shape[2], cache.get_seq_length(0), cache.get_seq_length(1)
    (12, 9, 0)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from streammem.memory.base import DEFAULT_MAX_BYTES, check_field
from streammem.memory.posekv import RELIC_SCHEDULE, PoseKVConfig, PoseKVMemory, sinusoidal_pose_embedding
from streammem.memory.protocols import PoseQuery
from streammem.types import Tokens

__all__ = ["PoseKVCache", "PoseKVCacheConfig", "PoseKVLayer"]

#: ``format`` entry of a cache snapshot's safetensors header.
CACHE_FORMAT = "streammem.posekv_cache"


@dataclass
class PoseKVCacheConfig:
    """Attributes:
    num_layers: transformer blocks, one PoseKVMemory each.
    heads, head_dim: attention heads and their width.
    height, width: the latent token grid of one frame after patching (Wan-2.1 480x832: 30 x 52).
    batch_size: batch the model runs at (2 with classifier-free guidance).
    window: full-resolution latent frames (PoseKVMemory's; ours 7, RELIC does not say).
    history_frames: pooled history frames kept (a multiple of ``len(schedule)``).
    schedule: per-axis pooling factor of history frame ``i`` is ``schedule[i % len(schedule)]``.
    retrieval: ``"all"`` attends to every held token; ``"fov"`` / ``"distance"`` attend to the
        window plus the history frames PoseKVMemory retrieves for the chunk's first camera pose.
    token_budget: most history tokens a retrieval takes (None: no limit).
    pose_embed: ``"sinusoidal"`` (fixed code of the 3x4 pose, RELIC's is learned) or ``"none"``;
        a module can be passed to :class:`PoseKVCache` as ``pose_embed_fn`` (not saved).
    seed: seed of the layers' memories.
    """

    num_layers: int = 30
    heads: int = 12
    head_dim: int = 128
    height: int = 30
    width: int = 52
    batch_size: int = 1
    window: int = 7
    history_frames: int = 72
    schedule: tuple = RELIC_SCHEDULE
    retrieval: str = "all"
    token_budget: int | None = None
    pose_embed: str = "sinusoidal"
    seed: int = 0

    def __post_init__(self) -> None:
        name = type(self).__name__
        self.schedule = tuple(self.schedule)
        for f in ("num_layers", "heads", "head_dim", "height", "width", "batch_size", "window"):
            v = getattr(self, f)
            check_field(isinstance(v, int) and not isinstance(v, bool) and v >= 1, name, f, "an int >= 1", v)
        check_field(self.pose_embed in ("sinusoidal", "none"), name, "pose_embed", "'sinusoidal' or 'none'",
                    self.pose_embed)
        self.memory_config()  # history_frames, schedule, retrieval, token_budget, seed: PoseKVConfig checks them

    def memory_config(self) -> PoseKVConfig:
        """The PoseKVMemory config of one layer (keys and values ``batch * heads * head_dim`` wide)."""
        dim = self.batch_size * self.heads * self.head_dim
        try:
            return PoseKVConfig(dim=dim, value_dim=dim, height=self.height, width=self.width, window=self.window,
                                schedule=self.schedule, history_frames=self.history_frames, retrieval=self.retrieval,
                                token_budget=self.token_budget, pose_embed="none", seed=self.seed)
        except ValueError as err:
            raise ValueError(str(err).replace("PoseKVConfig.", f"{type(self).__name__}.")) from None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


class PoseKVLayer:
    """The cache of one transformer block: a :class:`PoseKVMemory` plus a device-side copy of
    what it holds (rebuilt after each write)."""

    def __init__(self, memory: PoseKVMemory, owner: "PoseKVCache") -> None:
        self.memory, self._owner, self._view = memory, owner, None

    # ------------------------------------------------------------------ reading
    def _held(self) -> tuple[torch.Tensor, torch.Tensor, Tokens]:
        pose = self._owner.query_pose
        query = PoseQuery(pose) if pose is not None and self._owner.config.retrieval != "all" else None
        return self.memory.kv(query)

    def _fetch(self, device: torch.device | str | None, dtype: torch.dtype | None) -> dict:
        device = torch.device("cpu") if device is None else torch.device(device)
        dtype = torch.float32 if dtype is None else dtype
        if self._view is None or self._view["key"] != (device, dtype, self._owner._query_version):
            keys, values, tokens = self._held()
            c = self._owner.config
            shape = (len(tokens), c.batch_size, c.heads, c.head_dim)

            def heads_first(x: torch.Tensor) -> torch.Tensor:
                return x.reshape(shape).permute(1, 2, 0, 3).to(device=device, dtype=dtype).contiguous()

            positions = torch.cat([tokens.frame_index[:, None].double(), tokens.grid.double()], 1)
            pose = tokens.pose if tokens.pose is not None else torch.zeros(0, 4, 4)
            self._view = {"key": (device, dtype, self._owner._query_version), "keys": heads_first(keys),
                          "values": heads_first(values), "positions": positions, "poses": pose}
        return self._view

    def get(self, device: torch.device | str | None = None,
            dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Held ``(keys, values)``, each ``(batch, heads, held, head_dim)``, oldest first (pooled
        history, then the window), on ``device`` in ``dtype`` (default: CPU float32)."""
        v = self._fetch(device, dtype)
        return v["keys"], v["values"]

    def positions(self) -> torch.Tensor:
        """``(held, 3)`` float64 absolute (latent frame, row, col) of the held tokens, in
        :meth:`get`'s order; pooled tokens sit at their cells' centres."""
        return self._fetch(*self._view["key"][:2] if self._view else (None, None))["positions"]

    def poses(self) -> torch.Tensor:
        """``(held, 4, 4)`` camera-to-world pose of each held token's frame."""
        return self._fetch(*self._view["key"][:2] if self._view else (None, None))["poses"]

    def memo(self, name: str, make: Callable[[], Any]) -> Any:
        """``make()``, kept with the held tokens until the next write, reset or chunk (a
        processor's per-layer derived tensors: rotary tables, pose embeddings)."""
        view = self._fetch(*self._view["key"][:2] if self._view else (None, None))
        if name not in view:
            view[name] = make()
        return view[name]

    def get_seq_length(self) -> int:
        """Tokens :meth:`get` returns (all held tokens, or the retrieved ones)."""
        return int(self._fetch(*self._view["key"][:2] if self._view else (None, None))["keys"].shape[2])

    @property
    def next_frame(self) -> int:
        """Absolute index of the next latent frame this layer will store (= frames stored so far)."""
        return int(self.memory.frames_written[0])

    # ------------------------------------------------------------------ writing
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor,
               cache_kwargs: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``([held ; key_states], [held ; value_states])`` along the sequence (dim 2); inside
        ``with cache.writing():`` the current chunk is then stored."""
        c = self._owner.config
        want = (c.batch_size, c.heads)
        if key_states.ndim != 4 or tuple(key_states.shape[:2]) != want or key_states.shape[3] != c.head_dim:
            raise ValueError(f"PoseKVCache.update takes (batch={c.batch_size}, heads={c.heads}, seq, "
                             f"head_dim={c.head_dim}) keys, got {tuple(key_states.shape)}")
        if value_states.shape != key_states.shape:
            raise ValueError(f"PoseKVCache.update: values {tuple(value_states.shape)} and keys "
                             f"{tuple(key_states.shape)} differ in shape")
        held_k, held_v = self.get(key_states.device, key_states.dtype)
        keys, values = torch.cat([held_k, key_states], 2), torch.cat([held_v, value_states], 2)
        if self._owner.is_writing:
            self.write(key_states, value_states)
        return keys, values

    def write(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Store a chunk ``(batch, heads, frames * height * width, head_dim)``, frame by frame,
        each frame tagged with the owner's chunk pose (identity when none was set)."""
        c = self._owner.config
        hw = c.height * c.width
        seq = key_states.shape[2]
        if seq % hw:
            raise ValueError(f"PoseKVCache stores whole latent frames of height*width={c.height}*{c.width}={hw} "
                             f"tokens; got a sequence of {seq}")
        frames = seq // hw
        poses = self._owner.chunk_poses
        if poses is not None and len(poses) != frames:
            raise ValueError(f"PoseKVCache.set_chunk gave {len(poses)} poses for a chunk of {frames} latent frames")
        k = key_states.detach().permute(2, 0, 1, 3).reshape(seq, -1).to("cpu", torch.float32)
        v = value_states.detach().permute(2, 0, 1, 3).reshape(seq, -1).to("cpu", torch.float32)
        for f in range(frames):
            i = self.next_frame
            pose = None if poses is None else poses[f]
            grid = k[f * hw:(f + 1) * hw].reshape(c.height, c.width, -1)
            self.memory.write(Tokens.from_grid(grid, frame_index=i, timestamp=float(i), pose=pose),
                              values=v[f * hw:(f + 1) * hw])
        self._view = None

    def reset(self) -> None:
        """Forget everything this layer holds."""
        self.memory.reset()
        self._view = None


class PoseKVCache:
    """Per-layer PoseKVMemory cache of a video transformer (see the module docstring)."""

    Config = PoseKVCacheConfig

    def __init__(self, config: PoseKVCacheConfig | None = None, pose_embed_fn: Callable | None = None,
                 **kwargs: Any) -> None:
        if config is None:
            config = PoseKVCacheConfig(**kwargs)
        elif kwargs:
            raise TypeError("PoseKVCache: pass either a config or keyword fields, not both")
        if not isinstance(config, PoseKVCacheConfig):
            raise TypeError(f"PoseKVCache needs a PoseKVCacheConfig, got {type(config).__name__}")
        self.config, self.pose_embed_fn = config, pose_embed_fn
        mc = config.memory_config()
        self.layers = [PoseKVLayer(PoseKVMemory(mc), self) for _ in range(config.num_layers)]
        self.is_writing = False
        self.chunk_poses: torch.Tensor | None = None
        self._query_version = 0

    # ------------------------------------------------------------------ the DynamicCache-like surface
    def __getitem__(self, layer_idx: int) -> PoseKVLayer:
        return self.layers[layer_idx]

    def __len__(self) -> int:
        return len(self.layers)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``cache[layer_idx].update(key_states, value_states)``."""
        return self.layers[layer_idx].update(key_states, value_states, cache_kwargs)

    def get(self, layer_idx: int, device: torch.device | str | None = None,
            dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``cache[layer_idx].get(device, dtype)``."""
        return self.layers[layer_idx].get(device, dtype)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].get_seq_length()

    def reset(self) -> None:
        """Forget every layer's tokens; keeps the objects (as ``DynamicCache.reset``)."""
        for layer in self.layers:
            layer.reset()
        self.chunk_poses, self.is_writing = None, False

    # ------------------------------------------------------------------ the chunk being generated
    def set_chunk(self, poses: torch.Tensor | None) -> None:
        """Camera-to-world poses ``(frames, 4, 4)`` of the latent frames about to be generated
        (None: identity). They tag what the next write stores, give the queries' and current
        keys' pose embedding, and the first one is the retrieval query."""
        if poses is not None:
            poses = torch.as_tensor(poses, dtype=torch.float32)
            if poses.ndim != 3 or poses.shape[1:] != (4, 4):
                raise ValueError(f"PoseKVCache.set_chunk takes (frames, 4, 4) poses, got {tuple(poses.shape)}")
        self.chunk_poses = poses
        self._query_version += 1

    @property
    def query_pose(self) -> torch.Tensor | None:
        return None if self.chunk_poses is None else self.chunk_poses[0]

    @contextlib.contextmanager
    def writing(self) -> Iterator["PoseKVCache"]:
        """Inside, every ``update`` stores its layer's current chunk after reading."""
        self.is_writing = True
        try:
            yield self
        finally:
            self.is_writing = False

    def embed_pose(self, pose: torch.Tensor) -> torch.Tensor:
        """``(N, 4, 4) -> (N, head_dim)`` pose embedding, added to queries and keys only; zeros
        when ``pose_embed="none"`` and no module is plugged in (a plugged-in module gets the
        poses on its parameters' device and dtype)."""
        if self.pose_embed_fn is not None:
            param = next(iter(self.pose_embed_fn.parameters()), None) if isinstance(self.pose_embed_fn,
                                                                                    torch.nn.Module) else None
            return self.pose_embed_fn(pose if param is None else pose.to(param.device, param.dtype))
        if self.config.pose_embed == "none" or pose.shape[0] == 0:
            return torch.zeros(pose.shape[0], self.config.head_dim)
        return sinusoidal_pose_embedding(pose, self.config.head_dim)

    @property
    def uses_pose(self) -> bool:
        return self.pose_embed_fn is not None or self.config.pose_embed != "none"

    # ------------------------------------------------------------------ size
    @property
    def num_tokens(self) -> int:
        """Tokens held per layer (every layer holds the same frames)."""
        return self.layers[0].memory.num_tokens

    @property
    def capacity(self) -> int:
        """Most tokens a layer can hold: window plus pooled history."""
        return self.layers[0].memory.capacity

    @property
    def nbytes(self) -> int:
        """Bytes of every layer's buffers; constant over the stream."""
        return sum(layer.memory.nbytes for layer in self.layers)

    def stats(self) -> dict:
        s = self.layers[0].memory.stats()
        return {"layers": len(self), "tokens_held": s["tokens_held"], "capacity": self.capacity,
                "frames_held": s["frames_held"], "frames_seen": s["frames_seen"],
                "full_history_tokens": s["full_history_tokens"], "token_ratio": s["token_ratio"],
                "bytes": self.nbytes}

    # ------------------------------------------------------------------ snapshots
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only: each layer's memory state under ``layers.<i>.`` and this cache's JSON
        config as ``uint8`` text under ``meta.cache_config``."""
        state = {f"layers.{i}.{k}": v for i, layer in enumerate(self.layers) for k, v in layer.memory.state_dict().items()}
        state["meta.cache_config"] = torch.tensor(list(self.config.to_json().encode()), dtype=torch.uint8)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore a snapshot of a cache with the same configuration; ``ValueError`` names what
        differs. The chunk poses are not state (``set_chunk`` starts every chunk)."""
        if "meta.cache_config" not in state:
            raise ValueError("PoseKVCache.load_state_dict: not a PoseKVCache snapshot (no 'meta.cache_config')")
        theirs = self._config_from(bytes(state["meta.cache_config"].tolist()).decode(), "PoseKVCache.load_state_dict")
        mine = json.loads(self.config.to_json())
        theirs = json.loads(theirs.to_json())
        diff = sorted(k for k in mine if theirs.get(k) != mine.get(k))
        if diff:
            detail = ", ".join(f"{k}: snapshot {theirs.get(k)!r} vs this {mine.get(k)!r}" for k in diff)
            raise ValueError(f"PoseKVCache.load_state_dict: snapshot has another configuration ({detail})")
        for i, layer in enumerate(self.layers):
            prefix = f"layers.{i}."
            layer.memory.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
            layer._view = None

    @staticmethod
    def _config_from(text: str, where: str) -> PoseKVCacheConfig:
        try:
            fields = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: the snapshot's config is not JSON ({err})") from None
        known = {f.name for f in dataclasses.fields(PoseKVCacheConfig)}
        if not isinstance(fields, dict) or set(fields) - known:
            raise ValueError(f"{where}: the snapshot's config is not a PoseKVCacheConfig ({text[:200]})")
        try:
            return PoseKVCacheConfig(**fields)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: the snapshot's config is invalid: {err}") from None

    def save(self, path: str | Path) -> None:
        """Write :meth:`state_dict` as one safetensors file."""
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path), metadata={"format": CACHE_FORMAT})

    @classmethod
    def load(cls, path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES,
             pose_embed_fn: Callable | None = None) -> "PoseKVCache":
        """Build a cache from a file written by :meth:`save`; the config is read and the size it
        implies checked against ``max_bytes`` (default 1 GiB) before anything is allocated."""
        where = str(path)
        try:
            with safe_open(where, framework="pt") as f:
                if "meta.cache_config" not in set(f.keys()):
                    raise ValueError(f"{where}: not a PoseKVCache snapshot (no 'meta.cache_config' tensor)")
                config = cls._config_from(bytes(f.get_tensor("meta.cache_config").tolist()).decode(), where)
        except (FileNotFoundError, ValueError):
            raise
        except Exception as err:  # the safetensors library raises its own error types
            raise ValueError(f"{where}: not a safetensors file ({type(err).__name__}: {err})") from None
        shapes = PoseKVMemory.buffer_shapes(config.memory_config())
        need = config.num_layers * sum(math.prod(s) * d.itemsize for s, d in shapes.values())
        if need > max_bytes:
            raise ValueError(f"{where}: the cache this snapshot describes takes {need:,} bytes, more than "
                             f"max_bytes={max_bytes:,}; pass a larger max_bytes to load it")
        cache = cls(config, pose_embed_fn=pose_embed_fn)
        with safe_open(where, framework="pt") as f:
            cache.load_state_dict({k: f.get_tensor(k) for k in f.keys()})
        return cache

    def __repr__(self) -> str:
        return f"PoseKVCache({self.config})"
