"""ErrorBank: Stable Video Infinity's replay memory of the model's own errors.

The rule (Stable Video Infinity, error-recycling fine-tuning; reference code
``vita-epfl/Stable-Video-Infinity`` ``train_svi.py``):

- errors come from one-step bidirectional integration of the predicted velocity ``v_hat``
  against the target ``v``: ``e_noise = (1 - s) (v_hat - v)`` and ``e_clean = -s (v_hat - v)``
  (computed by the training loop, not here);
- two banks, noise-side and clean-side, each with one bin per inference timestep: 50 bins,
  the timesteps of a flow-matching schedule with shift 5 over 1000 training steps; an error
  goes to the bin whose timestep is nearest its own;
- at most ``K = 500`` errors per bin per bank; when a bin is full the new error replaces the
  stored one nearest to it in L2 (random and FIFO replacement are the alternatives);
- sampling is uniform, from one bin (same timestep) or from all bins, optionally scaled by
  ``U(1 - m, 1 + m)`` (reference ``m = 0``); no normalisation.

Reference defaults: 50 bins, shift 5, ``K=500``, L2 replacement, ``m=0``, full-size float32
errors kept on the CPU (~4.2 MB each at 480p, which is why a byte cap is needed).

Departures: the bin timesteps come from diffusers' ``FlowMatchEulerDiscreteScheduler(shift=5)``
(``set_timesteps(num_bins)``), our stand-in for the reference's own scheduler with
``sigma_min=0``; ``max_bytes`` caps the whole bank by lowering the per-bin capacity uniformly
(buffers are preallocated, so ``nbytes <= max_bytes`` always); ``dtype="float16"`` halves the
bytes per error (distances and samples are computed in float32); errors are flat vectors of
width ``dim`` (reshape latents before and after).

``write(tokens)`` takes one error per token: ``features (N, dim)``, ``extras["timestep"] (N,)``
the diffusion timestep in ``[0, num_train_timesteps]``, ``extras["bank"] (N,)`` the bank (0
noise-side, 1 clean-side). ``add(errors, timesteps, side)`` is the same with plain tensors. A
read returns stored errors with ``extras["bank"]``, ``extras["timestep"]``, ``frame_index`` =
the frame (or, through ``add``, the write count) that produced them, ``grid`` = (bin, slot),
``level`` 0 and no ``score``; ``read(TimestepQuery(timesteps, banks))`` only the bins nearest
those timesteps.

Example:
    >>> import torch
    >>> bank = ErrorBank(dim=32, per_bin=4)
    >>> bank.add(torch.randn(10, 32), timesteps=torch.full((10,), 999.0), side="clean")
    >>> bank.stats()["fill_clean"][0], bank.sample(3, side="clean", timestep=999.0).shape
    (4, torch.Size([3, 32]))
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from streammem.memory.base import Memory, MemoryConfig, check_field
from streammem.memory.protocols import TimestepQuery
from streammem.types import Tokens

__all__ = ["ErrorBank", "ErrorBankConfig", "flow_match_timesteps"]

SIDES = {"noise": 0, "clean": 1}


@functools.lru_cache(maxsize=8)
def flow_match_timesteps(num_bins: int, shift: float, num_train_timesteps: int) -> tuple[float, ...]:
    """Inference timesteps of diffusers' ``FlowMatchEulerDiscreteScheduler`` (descending)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=shift)
    sched.set_timesteps(num_bins)
    return tuple(float(t) for t in sched.timesteps)


def _per_bin(c: "ErrorBankConfig") -> int:
    """Errors per bin after the byte cap: error bytes plus a float32 timestep and an int64
    frame index per slot, plus
    two int64 counters per bin and bank."""
    if c.max_bytes is None:
        return c.per_bin
    elsize = 2 if c.dtype == "float16" else 4
    fixed = 2 * c.num_bins * 8 * 2
    return min(c.per_bin, (c.max_bytes - fixed) // (2 * c.num_bins * (c.dim * elsize + 12)))


@dataclass
class ErrorBankConfig(MemoryConfig):
    """Attributes:
    dim: number of values in one (flattened) error.
    num_bins: bins per bank = inference timesteps (reference 50).
    shift: flow-matching schedule shift (reference 5).
    num_train_timesteps: training timesteps of the schedule (reference 1000).
    per_bin: most errors per bin per bank, K (reference 500).
    replace: ``"l2"`` (reference), ``"random"`` or ``"fifo"`` when a bin is full.
    max_bytes: cap on the bank's bytes, or None for ``2 * num_bins * per_bin`` errors.
    dtype: ``"float32"`` or ``"float16"`` storage.
    scale_margin: m of the sampling scale ``U(1 - m, 1 + m)``, in [0, 1) (reference 0).
    """

    dim: int = 256
    num_bins: int = 50
    shift: float = 5.0
    num_train_timesteps: int = 1000
    per_bin: int = 500
    replace: str = "l2"
    max_bytes: int | None = None
    dtype: str = "float32"
    scale_margin: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        check_field(isinstance(self.num_bins, int) and self.num_bins >= 1, name, "num_bins", "an int >= 1",
                    self.num_bins)
        check_field(isinstance(self.shift, (int, float)) and self.shift > 0, name, "shift", "a number > 0",
                    self.shift)
        check_field(isinstance(self.num_train_timesteps, int) and self.num_train_timesteps >= self.num_bins,
                    name, "num_train_timesteps", f"an int >= num_bins={self.num_bins}", self.num_train_timesteps)
        check_field(isinstance(self.per_bin, int) and self.per_bin >= 1, name, "per_bin", "an int >= 1", self.per_bin)
        check_field(self.replace in ("l2", "random", "fifo"), name, "replace", "'l2', 'random' or 'fifo'",
                    self.replace)
        check_field(self.dtype in ("float32", "float16"), name, "dtype", "'float32' or 'float16'", self.dtype)
        check_field(isinstance(self.scale_margin, (int, float)) and 0 <= self.scale_margin < 1, name,
                    "scale_margin", "a number in [0, 1)", self.scale_margin)
        check_field(self.max_bytes is None or (isinstance(self.max_bytes, int) and _per_bin(self) >= 1), name,
                    "max_bytes", "None or an int large enough for one error per bin and bank "
                    f"(>= {2 * self.num_bins * (self.dim * (2 if self.dtype == 'float16' else 4) + 12 + 16)})",
                    self.max_bytes)


class ErrorBank(Memory):
    """Two banks (noise-side, clean-side) of timestep-binned errors (see the module docstring)."""

    kind = "error_bank"
    Config = ErrorBankConfig
    COUNTERS = ("writes", "replacements")
    QUERIES = (TimestepQuery,)

    def _allocate(self) -> None:
        c = self.config
        self.per_bin = _per_bin(c)
        dtype = torch.float16 if c.dtype == "float16" else torch.float32
        self.errors = self.buffer("errors", torch.zeros(2, c.num_bins, self.per_bin, c.dim, dtype=dtype))
        self.timesteps = self.buffer("timesteps", torch.zeros(2, c.num_bins, self.per_bin))
        self.frame_ids = self.buffer("frame_index", torch.zeros(2, c.num_bins, self.per_bin, dtype=torch.int64))
        self.count = self.buffer("count", torch.zeros(2, c.num_bins, dtype=torch.int64))
        self.next = self.buffer("next", torch.zeros(2, c.num_bins, dtype=torch.int64))
        with torch.device("cpu"):  # also when Memory.buffer_shapes probes on the meta device
            self.bin_timesteps = torch.tensor(flow_match_timesteps(c.num_bins, float(c.shift), c.num_train_timesteps))

    def _on_state(self, event: str) -> None:
        """Python-side: the fill of each bin (``count`` in snapshots)."""
        if event == "save":
            self.count.copy_(torch.tensor(self._count, dtype=torch.int64))
        else:
            self._count = self.count.tolist()

    @property
    def num_tokens(self) -> int:
        return sum(map(sum, self._count))

    @property
    def capacity(self) -> int:
        return 2 * self.config.num_bins * self.per_bin

    def bin_of(self, timesteps: torch.Tensor | float) -> torch.Tensor:
        """Index of the nearest bin for each timestep."""
        t = torch.as_tensor(timesteps, dtype=torch.float32).reshape(-1, 1)
        return torch.argmin((t - self.bin_timesteps).abs(), dim=1)

    def add(self, errors: torch.Tensor, timesteps: torch.Tensor | float, side: str) -> None:
        """Bank ``errors`` ``(N, dim)`` (or ``(dim,)``) made at ``timesteps`` on ``side``."""
        if side not in SIDES:
            raise ValueError(f"ErrorBank side must be 'noise' or 'clean', got {side!r}")
        errors = errors.reshape(-1, self.config.dim).float()
        t = torch.as_tensor(timesteps, dtype=torch.float32).reshape(-1).expand(errors.shape[0])
        n = errors.shape[0]
        self._add(errors, t, torch.full((n,), SIDES[side]), torch.full((n,), self.counters["writes"]))

    def write(self, tokens: Tokens) -> None:
        """One error per token: ``extras["timestep"]``, ``extras["bank"]`` (0 noise, 1 clean)."""
        self._check_dim(tokens)
        timesteps, banks = tokens.extras.get("timestep"), tokens.extras.get("bank")
        if timesteps is None or banks is None:
            raise ValueError("ErrorBank.write needs Tokens.extras['timestep'] (the timestep of each error) and "
                             "Tokens.extras['bank'] (0 noise-side, 1 clean-side)")
        banks = banks.long()
        if len(tokens) and not bool(((banks == 0) | (banks == 1)).all()):
            raise ValueError("ErrorBank.write needs Tokens.extras['bank'] 0 (noise-side) or 1 (clean-side)")
        self._add(tokens.features.float(), timesteps.float(), banks, tokens.frame_index)

    def _add(self, errors: torch.Tensor, timesteps: torch.Tensor, sides: torch.Tensor, frames: torch.Tensor) -> None:
        bins = self.bin_of(timesteps).tolist()
        for e, t, b, s, f in zip(errors, timesteps.tolist(), bins, sides.tolist(), frames.tolist()):
            n = self._count[s][b]
            if n < self.per_bin:
                slot = n
                self._count[s][b] = n + 1
            else:
                if self.config.replace == "l2":
                    stored = self.errors[s, b].float()
                    slot = int(torch.argmin(((stored - e) ** 2).sum(1)))
                elif self.config.replace == "random":
                    slot = int(torch.randint(0, self.per_bin, (1,), generator=self.generator))
                else:
                    slot = int(self.next[s, b])
                    self.next[s, b] = (slot + 1) % self.per_bin
                self.counters["replacements"] += 1
            self.errors[s, b, slot] = e
            self.timesteps[s, b, slot] = t
            self.frame_ids[s, b, slot] = f
        self.counters["writes"] += 1

    def sample(self, n: int = 1, side: str = "clean", timestep: float | None = None,
               between: tuple[float, float] | None = None) -> torch.Tensor:
        """``(k, dim)`` float32 errors drawn uniformly with replacement from the bin nearest
        ``timestep``, or (``timestep`` None) from every bin whose timestep lies in ``between =
        (lo, hi)`` (all bins when None), each scaled by ``U(1 - m, 1 + m)``; ``k = 0`` when
        there is nothing to draw from."""
        s = SIDES[side]
        if timestep is None:
            counts = torch.tensor(self._count[s])
            if between is not None:
                lo, hi = between
                counts[(self.bin_timesteps < lo) | (self.bin_timesteps > hi)] = 0
        else:
            counts = torch.zeros(self.config.num_bins, dtype=torch.int64)
            b = int(self.bin_of(timestep)[0])
            counts[b] = self._count[s][b]
        total = int(counts.sum())
        if total == 0 or n <= 0:
            return torch.zeros(0, self.config.dim)
        flat = torch.randint(0, total, (n,), generator=self.generator)
        ends = counts.cumsum(0)
        bins = torch.searchsorted(ends, flat, right=True)
        slots = flat - (ends[bins] - counts[bins])
        out = self.errors[s, bins, slots].float()
        m = self.config.scale_margin
        if m > 0:
            out = out * (1 - m + 2 * m * torch.rand(n, 1, generator=self.generator))
        return out

    def read(self, query: TimestepQuery | None = None) -> Tokens:
        """All stored errors, or (a :class:`TimestepQuery`) those in the bins nearest each
        query timestep, in the query's banks, bank by bank."""
        self._check_query(query)
        wanted = None
        if query is not None:
            wanted = set(zip(query.banks.tolist(), self.bin_of(query.timesteps).tolist()))
        parts = []
        for s in (0, 1):
            for b in range(self.config.num_bins):
                n = self._count[s][b]
                if n == 0 or (wanted is not None and (s, b) not in wanted):
                    continue
                parts.append(Tokens(
                    features=self.errors[s, b, :n].float(),
                    frame_index=self.frame_ids[s, b, :n].clone(),
                    timestamp=torch.zeros(n, dtype=torch.float64),
                    grid=torch.stack([torch.full((n,), float(b)), torch.arange(n, dtype=torch.float32)], 1),
                    level=torch.zeros(n, dtype=torch.int64),
                    extras={"bank": torch.full((n,), s), "timestep": self.timesteps[s, b, :n].clone()},
                ))
        if not parts:
            out = Tokens.empty(self.config.dim)
            out.extras = {"bank": torch.zeros(0, dtype=torch.int64), "timestep": torch.zeros(0)}
            return out
        return Tokens.cat(parts)

    def stats(self) -> dict:
        out = super().stats()
        out["per_bin_capacity"] = self.per_bin
        out["fill_noise"] = list(self._count[0])
        out["fill_clean"] = list(self._count[1])
        return out
