"""PoseKVMemory: RELIC's compressed, pose-aware KV memory (after FramePack's context packing).

The rule (RELIC, arXiv 2512.04040, sections 4.1.2, 4.3 and 5.1; no code released):

- keys and values per latent frame on an ``h x w`` token grid;
- a rolling window of the last ``w`` latent frames at full resolution;
- the whole history before the window kept as spatially downsampled KV: latent frame ``i`` is
  pooled by ``S[i % 18]`` with ``S = [1,4,2,4,4,4,2,4,4,2,4,4,4,2,4,4,2,4]``; per axis (the
  paper's "about 4x fewer tokens, 120K -> 30K" only works out per axis: 1, 1/4 or 1/16 of a
  frame's tokens, 1/6 on average); token positions at the pooled cells' centres;
- every token keeps its frame's absolute camera pose; a pose embedding is added to queries and
  keys only, never to values (RELIC's retrieval cue);
- optional retrieval of history frames by camera overlap, as WorldMem selects frames: sample
  points in a sphere of radius 30 around the query camera, keep those in its 105 x 75 degree
  field of view, then greedily pick frames covering the most not-yet-covered points minus
  ``0.2 x`` normalised age; or by pose distance.

RELIC defaults: Wan-2.1 latents (480x832 -> 30x52 = 1560 tokens per latent frame), schedule
``S`` above, 4 denoising steps, FP8 KV. The paper states neither the window ``w`` nor the
pooling operator.

Departures (ours): ``window=7`` (the value that makes the paper's 30K figure add up); average
pooling (adaptive when a side does not divide); RELIC never evicts, here the compressed history
holds ``history_frames`` frames (a multiple of ``len(schedule)``, default 72, i.e. with the
window the ~20 s / 80 latent frames RELIC trains on) and the oldest is dropped beyond that; the
schedule index ``i`` is this memory's count of written latent frames; the default pose
embedding is a fixed sinusoidal code of the 3x4 pose (RELIC's is learned; pass
``pose_embed_fn`` to plug in a module; it is not saved with snapshots); WorldMem samples 10,000
points, we default to 1,024 fixed points drawn from the seed; retrieval stops when no frame
covers a new point or the token budget is spent.

Shapes: ``write(tokens, values=None)`` takes one latent frame, ``h*w`` keys ``(h*w, dim)``
row-major with ``pose (h*w, 4, 4)`` (camera-to-world; identity if absent) and values
``(h*w, value_dim)`` when ``value_dim`` is set. ``read()`` returns the raw keys (no pose
embedding) with ``extras["pool"]`` = the per-axis pooling factor, ``level`` = its rank among
this memory's factors (0 = full resolution, the window), ``pose`` and ``grid``;
``read(PoseQuery(pose))`` retrieves history for a camera; ``kv(PoseQuery(pose))`` returns
``(keys + pose_embedding (N, dim), values (N, value_dim or dim), tokens)``.

Example:
    >>> import torch
    >>> from streammem.types import Tokens
    >>> mem = PoseKVMemory(dim=8, height=8, width=8, window=2, history_frames=18)
    >>> for i in range(30):
    ...     pose = torch.eye(4); pose[0, 3] = float(i)
    ...     mem.write(Tokens.from_grid(torch.randn(8, 8, 8), frame_index=i, timestamp=i / 4, pose=pose))
    >>> s = mem.stats(); s["frames_held"], s["tokens_held"] < s["full_history_tokens"]
    (20, True)
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from streammem.memory.base import Memory, MemoryConfig, check_field, pool_grid
from streammem.memory.protocols import PoseQuery
from streammem.types import Tokens

__all__ = ["PoseKVMemory", "PoseKVConfig", "RELIC_SCHEDULE", "sinusoidal_pose_embedding"]

RELIC_SCHEDULE = (1, 4, 2, 4, 4, 4, 2, 4, 4, 2, 4, 4, 4, 2, 4, 4, 2, 4)


def sinusoidal_pose_embedding(pose: torch.Tensor, dim: int) -> torch.Tensor:
    """Fixed code of a camera pose: sin/cos of the 12 entries of ``pose[:3, :4]`` at octave
    frequencies, ``(N, 4, 4) -> (N, dim)`` (zero-padded or truncated to ``dim``)."""
    x = pose[:, :3, :].reshape(pose.shape[0], 12).float()
    n_freq = max(1, dim // 24)
    ang = x[:, :, None] * (2.0 ** torch.arange(n_freq, dtype=torch.float32))
    emb = torch.cat([ang.sin(), ang.cos()], dim=2).reshape(pose.shape[0], -1)
    if emb.shape[1] >= dim:
        return emb[:, :dim]
    return torch.cat([emb, torch.zeros(pose.shape[0], dim - emb.shape[1])], 1)


def _cells(n: int, out: int) -> torch.Tensor:
    """Centres of adaptive-pooling bins of ``n`` cells into ``out`` bins."""
    i = torch.arange(out)
    start = torch.div(i * n, out, rounding_mode="floor")
    end = torch.div((i + 1) * n + out - 1, out, rounding_mode="floor")
    return (start + end - 1).float() / 2


@dataclass
class PoseKVConfig(MemoryConfig):
    """Attributes:
    dim: key width; value_dim: value width, or None to keep keys only (values = keys).
    height, width: latent token grid (RELIC / Wan-2.1 480x832: 30 x 52).
    window: full-resolution recent frames (ours: 7; the paper does not say).
    schedule: per-axis pooling factor of history frame i is ``schedule[i % len(schedule)]``.
    history_frames: compressed history frames kept (multiple of ``len(schedule)``; ours).
    retrieval: ``"fov"`` (WorldMem overlap), ``"distance"`` or ``"all"`` for ``read(query)``.
    token_budget: most history tokens a query retrieves (None: no limit).
    fov_deg: horizontal, vertical field of view for ``"fov"`` (WorldMem 105 x 75).
    radius: radius of the sampled point sphere (WorldMem 30).
    n_points: sampled points (WorldMem 10,000; ours 1,024).
    age_weight: weight of normalised age in the greedy pick (WorldMem 0.2).
    rotation_weight: metres per radian in ``"distance"`` retrieval.
    pose_embed: ``"sinusoidal"`` or ``"none"`` (a module can be passed as ``pose_embed_fn``).
    """

    dim: int = 128
    value_dim: int | None = None
    height: int = 30
    width: int = 52
    window: int = 7
    schedule: tuple = RELIC_SCHEDULE
    history_frames: int = 72
    retrieval: str = "fov"
    token_budget: int | None = None
    fov_deg: tuple = (105.0, 75.0)
    radius: float = 30.0
    n_points: int = 1024
    age_weight: float = 0.2
    rotation_weight: float = 1.0
    pose_embed: str = "sinusoidal"

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        self.schedule, self.fov_deg = tuple(self.schedule), tuple(float(f) for f in self.fov_deg)
        check_field(self.value_dim is None or (isinstance(self.value_dim, int) and self.value_dim >= 1), name,
                    "value_dim", "None or an int >= 1", self.value_dim)
        for f in ("height", "width", "window", "n_points"):
            v = getattr(self, f)
            check_field(isinstance(v, int) and v >= 1, name, f, "an int >= 1", v)
        check_field(len(self.schedule) >= 1 and all(isinstance(s, int) and s >= 1 for s in self.schedule), name,
                    "schedule", "a non-empty tuple of ints >= 1", self.schedule)
        check_field(isinstance(self.history_frames, int) and self.history_frames >= 0
                    and self.history_frames % len(self.schedule) == 0, name, "history_frames",
                    f"an int >= 0, a multiple of len(schedule)={len(self.schedule)}", self.history_frames)
        check_field(self.retrieval in ("fov", "distance", "all"), name, "retrieval", "'fov', 'distance' or 'all'",
                    self.retrieval)
        check_field(self.token_budget is None or (isinstance(self.token_budget, int) and self.token_budget >= 0),
                    name, "token_budget", "None or an int >= 0", self.token_budget)
        check_field(len(self.fov_deg) == 2 and all(0 < f < 180 for f in self.fov_deg), name, "fov_deg",
                    "two angles in (0, 180) degrees", self.fov_deg)
        check_field(isinstance(self.radius, (int, float)) and self.radius > 0, name, "radius", "a number > 0",
                    self.radius)
        check_field(isinstance(self.age_weight, (int, float)) and self.age_weight >= 0, name, "age_weight",
                    "a number >= 0", self.age_weight)
        check_field(isinstance(self.rotation_weight, (int, float)) and self.rotation_weight >= 0, name,
                    "rotation_weight", "a number >= 0", self.rotation_weight)
        check_field(self.pose_embed in ("sinusoidal", "none"), name, "pose_embed", "'sinusoidal' or 'none'",
                    self.pose_embed)


class PoseKVMemory(Memory):
    """Rolling full-resolution window + schedule-pooled history, poses on every token."""

    kind = "posekv"
    Config = PoseKVConfig
    QUERIES = (PoseQuery,)
    COUNTERS = ("writes", "compressions", "evictions")

    def __init__(self, config: Any = None, pose_embed_fn: Callable | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.pose_embed_fn = pose_embed_fn

    def _allocate(self) -> None:
        c = self.config
        hw, vd = c.height * c.width, c.value_dim or 0
        b = self.buffer
        self.win_k = b("window.keys", torch.zeros(c.window, hw, c.dim))
        self.win_v = b("window.values", torch.zeros(c.window, hw, vd))
        self.win_meta = b("window.frame", torch.full((c.window,), -1, dtype=torch.int64))
        self.win_time = b("window.timestamp", torch.zeros(c.window, dtype=torch.float64))
        self.win_pose = b("window.pose", torch.zeros(c.window, 4, 4))
        # history slot j holds frames i with i % history_frames == j, all pooled by schedule[j % L]
        self.sizes, grids = [], []
        for j in range(c.history_frames):
            f = c.schedule[j % len(c.schedule)]
            oh, ow = math.ceil(c.height / f), math.ceil(c.width / f)
            self.sizes.append((f, oh, ow))
            ys, xs = torch.meshgrid(_cells(c.height, oh), _cells(c.width, ow), indexing="ij")
            grids.append(torch.stack([ys.reshape(-1), xs.reshape(-1)], 1))
        counts = [oh * ow for _, oh, ow in self.sizes]
        self._rank = {f: r for r, f in enumerate(sorted({1, *c.schedule}))}  # pooling factor -> level
        self.offsets = [0] + list(itertools.accumulate(counts))
        total = self.offsets[-1]
        self.hist_grid = torch.cat(grids) if grids else torch.zeros(0, 2)
        self.hist_k = b("history.keys", torch.zeros(total, c.dim))
        self.hist_v = b("history.values", torch.zeros(total, vd))
        self.hist_meta = b("history.frame", torch.full((c.history_frames,), -1, dtype=torch.int64))
        self.hist_time = b("history.timestamp", torch.zeros(c.history_frames, dtype=torch.float64))
        self.hist_pose = b("history.pose", torch.zeros(c.history_frames, 4, 4))
        self.frames_written = b("meta.frames", torch.zeros(1, dtype=torch.int64))
        g = torch.Generator().manual_seed(c.seed + 1)
        u = torch.randn(c.n_points, 3, generator=g)
        u = u / u.norm(dim=1, keepdim=True) * torch.rand(c.n_points, 1, generator=g) ** (1 / 3)
        self.points = u * c.radius  # fixed sample of the ball, derived from the seed (not state)
        ys, xs = torch.meshgrid(torch.arange(c.height), torch.arange(c.width), indexing="ij")
        self.full_grid = torch.stack([ys.reshape(-1), xs.reshape(-1)], 1).float()

    def _on_state(self, event: str) -> None:
        """All state lives in buffers; a reset marks every window and history slot empty (-1)."""
        if event == "reset":
            self.win_meta.fill_(-1)
            self.hist_meta.fill_(-1)

    @property
    def num_tokens(self) -> int:
        c = self.config
        n = int((self.win_meta >= 0).sum()) * c.height * c.width
        for j in (self.hist_meta >= 0).nonzero().flatten().tolist():
            n += self.offsets[j + 1] - self.offsets[j]
        return n

    @property
    def capacity(self) -> int:
        return self.config.window * self.config.height * self.config.width + int(self.offsets[-1])

    # ------------------------------------------------------------------ writing
    def write(self, tokens: Tokens, values: torch.Tensor | None = None) -> None:
        """Add one latent frame (``h*w`` tokens, row-major) and its values."""
        self._check_dim(tokens)
        c = self.config
        hw = c.height * c.width
        if len(tokens) != hw:
            raise ValueError(f"PoseKVMemory.write takes one latent frame of height*width={hw} tokens, "
                             f"got {len(tokens)}")
        if c.value_dim is not None:
            if values is None or tuple(values.shape) != (hw, c.value_dim):
                raise ValueError(f"PoseKVMemory.write needs values of shape {(hw, c.value_dim)} "
                                 f"(value_dim={c.value_dim}), got {None if values is None else tuple(values.shape)}")
        elif values is not None:
            raise ValueError("PoseKVMemory was built without value_dim; pass no values or set value_dim")
        i = int(self.frames_written[0])
        ws = i % c.window
        if i >= c.window:
            self._compress(ws, i - c.window)
        self.win_k[ws] = tokens.features
        if c.value_dim is not None:
            self.win_v[ws] = values
        self.win_meta[ws] = int(tokens.frame_index[0])
        self.win_time[ws] = float(tokens.timestamp[0])
        self.win_pose[ws] = torch.eye(4) if tokens.pose is None else tokens.pose[0]
        self.frames_written[0] = i + 1
        self.counters["writes"] += 1

    def _compress(self, ws: int, i: int) -> None:
        """Move window slot ``ws`` (latent frame number ``i``) into the pooled history."""
        c = self.config
        if c.history_frames == 0:
            self.counters["evictions"] += c.height * c.width
            return
        j = i % c.history_frames
        f, oh, ow = self.sizes[j]
        a, b = self.offsets[j], self.offsets[j + 1]
        if self.hist_meta[j] >= 0:
            self.counters["evictions"] += b - a
        self.hist_k[a:b] = pool_grid(self.win_k[ws].reshape(c.height, c.width, -1), oh, ow).reshape(b - a, -1)
        if c.value_dim is not None:
            self.hist_v[a:b] = pool_grid(self.win_v[ws].reshape(c.height, c.width, -1), oh, ow).reshape(b - a, -1)
        self.hist_meta[j] = self.win_meta[ws]
        self.hist_time[j] = self.win_time[ws]
        self.hist_pose[j] = self.win_pose[ws]
        self.counters["compressions"] += 1

    # ------------------------------------------------------------------ reading
    def _history_order(self) -> list[int]:
        """Live history slots, oldest first."""
        live = (self.hist_meta >= 0).nonzero().flatten().tolist()
        return sorted(live, key=lambda j: (float(self.hist_time[j]), int(self.hist_meta[j])))

    def _window_order(self) -> list[int]:
        live = (self.win_meta >= 0).nonzero().flatten().tolist()
        return sorted(live, key=lambda s: (float(self.win_time[s]), int(self.win_meta[s])))

    def _gather(self, hist: list[int]) -> tuple[Tokens, torch.Tensor]:
        c = self.config
        hw = c.height * c.width
        parts, vals = [], []
        for j in hist:
            a, b = self.offsets[j], self.offsets[j + 1]
            n = b - a
            parts.append(Tokens(self.hist_k[a:b], torch.full((n,), int(self.hist_meta[j])),
                                torch.full((n,), float(self.hist_time[j]), dtype=torch.float64),
                                self.hist_grid[a:b], torch.full((n,), self._rank[self.sizes[j][0]]),
                                self.hist_pose[j].expand(n, 4, 4), extras={"pool": torch.full((n,), self.sizes[j][0])}))
            vals.append(self.hist_v[a:b])
        for s in self._window_order():
            parts.append(Tokens(self.win_k[s], torch.full((hw,), int(self.win_meta[s])),
                                torch.full((hw,), float(self.win_time[s]), dtype=torch.float64),
                                self.full_grid, torch.full((hw,), self._rank[1]), self.win_pose[s].expand(hw, 4, 4),
                                extras={"pool": torch.ones(hw, dtype=torch.int64)}))
            vals.append(self.win_v[s])
        if not parts:
            out = Tokens.empty(c.dim, with_pose=True)
            out.extras = {"pool": torch.zeros(0, dtype=torch.int64)}
            return out, torch.zeros(0, c.value_dim or 0)
        return Tokens.cat(parts), torch.cat(vals)

    def select_history(self, query_pose: torch.Tensor | np.ndarray) -> list[int]:
        """History slots retrieved for a camera at ``query_pose`` (4x4, camera-to-world)."""
        c = self.config
        hist = self._history_order()
        if c.retrieval == "all" or not hist:
            chosen = hist
            return self._under_budget(chosen) if c.token_budget is not None else chosen
        q = torch.as_tensor(np.asarray(query_pose), dtype=torch.float32).reshape(4, 4)
        poses = self.hist_pose[hist]
        budget = c.token_budget if c.token_budget is not None else math.inf
        size = [self.offsets[j + 1] - self.offsets[j] for j in hist]
        ages = torch.tensor([float(self.win_time.max() - self.hist_time[j]) for j in hist])
        age = ages / ages.max().clamp_min(1e-9)
        chosen: list[int] = []
        if c.retrieval == "distance":
            dist = (poses[:, :3, 3] - q[:3, 3]).norm(dim=1)
            rel = torch.einsum("nij,ik->njk", poses[:, :3, :3], q[:3, :3])
            trace = rel.diagonal(dim1=1, dim2=2).sum(1)
            angle = torch.arccos(((trace - 1) / 2).clamp(-1, 1))
            for k in torch.argsort(dist + c.rotation_weight * angle, stable=True).tolist():
                if size[k] <= budget:
                    chosen.append(hist[k])
                    budget -= size[k]
            return sorted(chosen, key=hist.index)
        pts = q[:3, 3] + self.points
        seen_q = self._in_view(q[None], pts)[0]
        seen = self._in_view(poses, pts) & seen_q
        total = max(int(seen_q.sum()), 1)
        uncovered = seen_q.clone()
        taken = torch.zeros(len(hist), dtype=torch.bool)
        while True:
            new = (seen & uncovered).sum(1).float()
            gain = new / total - c.age_weight * age
            ok = (~taken) & (new > 0) & (torch.tensor(size) <= budget)
            if not bool(ok.any()):
                break
            k = int(torch.where(ok, gain, torch.tensor(-math.inf)).argmax())
            taken[k] = True
            chosen.append(hist[k])
            budget -= size[k]
            uncovered &= ~seen[k]
        return sorted(chosen, key=hist.index)

    def _under_budget(self, hist: list[int]) -> list[int]:
        """Newest history frames that fit the token budget."""
        budget, out = self.config.token_budget, []
        for j in reversed(hist):
            n = self.offsets[j + 1] - self.offsets[j]
            if n <= budget:
                out.append(j)
                budget -= n
        return sorted(out, key=hist.index)

    def _in_view(self, poses: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
        """``(F, P)`` whether each point is inside each camera's field of view (+z forward)."""
        cam = torch.einsum("fpk,fkj->fpj", pts[None] - poses[:, None, :3, 3], poses[:, :3, :3])
        z = cam[..., 2]
        th, tv = (math.tan(math.radians(a / 2)) for a in self.config.fov_deg)
        zc = z.clamp_min(1e-6)
        return (z > 1e-6) & ((cam[..., 0] / zc).abs() < th) & ((cam[..., 1] / zc).abs() < tv)

    def _query_pose(self, query: PoseQuery | None) -> torch.Tensor | None:
        self._check_query(query)
        return None if query is None else query.pose

    def read(self, query: PoseQuery | None = None) -> Tokens:
        """Raw keys (no pose embedding) of the history then the window, oldest first.

        ``query``: None for everything, or a :class:`PoseQuery` (4x4 camera-to-world): the
        window plus the history frames retrieved for that pose under the budget.
        """
        pose = self._query_pose(query)
        hist = self._history_order() if pose is None else self.select_history(pose)
        return self._gather(hist)[0]

    def embed_pose(self, pose: torch.Tensor) -> torch.Tensor:
        """Pose embedding ``(N, 4, 4) -> (N, dim)`` added to queries and keys (never values)."""
        if self.pose_embed_fn is not None:
            return self.pose_embed_fn(pose)
        if self.config.pose_embed == "none":
            return torch.zeros(pose.shape[0], self.config.dim)
        return sinusoidal_pose_embedding(pose, self.config.dim)

    def embed_query(self, q: torch.Tensor, pose: torch.Tensor | np.ndarray) -> torch.Tensor:
        """``q (M, dim)`` plus the embedding of the query camera's pose (4x4)."""
        p = torch.as_tensor(np.asarray(pose), dtype=torch.float32).reshape(1, 4, 4)
        return q + self.embed_pose(p)

    def kv(self, query: PoseQuery | None = None) -> tuple[torch.Tensor, torch.Tensor, Tokens]:
        """``(keys + pose embedding (N, dim), values (N, value_dim or dim), tokens)`` for attention."""
        pose = self._query_pose(query)
        tokens, values = self._gather(self._history_order() if pose is None else self.select_history(pose))
        if self.config.value_dim is None:
            values = tokens.features
        if len(tokens) == 0:
            return tokens.features, values, tokens
        # embed each frame's pose once, then expand to its tokens
        frames, inverse = torch.unique_consecutive(tokens.frame_index, return_inverse=True)
        first = torch.zeros(len(frames), dtype=torch.int64).scatter_reduce_(
            0, inverse, torch.arange(len(tokens)), "amin", include_self=False)
        keys = tokens.features + self.embed_pose(tokens.pose[first])[inverse]
        return keys, values, tokens

    def stats(self) -> dict:
        out = super().stats()
        c = self.config
        held_frames = int((self.win_meta >= 0).sum() + (self.hist_meta >= 0).sum())
        out["frames_held"] = held_frames
        out["tokens_held"] = self.num_tokens
        out["full_history_tokens"] = held_frames * c.height * c.width
        out["token_ratio"] = out["full_history_tokens"] / max(self.num_tokens, 1)
        out["frames_seen"] = int(self.frames_written[0])
        return out
