"""Configurations of the generator's training (:class:`TrainConfig`, ``streammem train
generator``) and of error recycling (:class:`ErrorRecyclingConfig`, the step;
:class:`RecycleTrainConfig`, ``streammem train recycle``): what the command line needs without
loading the model code (see :mod:`streammem.train.generator` and
:mod:`streammem.train.error_recycling`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from streammem.memory import ErrorBank
from streammem.types import field_checker

__all__ = ["TrainConfig", "ErrorRecyclingConfig", "RecycleTrainConfig", "MODES"]

MODES = ("recycle", "plain")


@dataclass
class TrainConfig:
    """Training hyper-parameters of ``streammem train generator`` (see :mod:`streammem.train.generator`)."""

    out: str = "outputs/checkpoints/generator"
    minutes: float = 60.0
    threads: int = 1
    seed: int = 0
    batch_size: int = 8
    lr: float = 3e-4
    warmup: int = 100
    clip_frames: int = 48
    chunk_frames: int = 2
    window: int = 4
    size: int = 64
    fps: float = 4.0
    presets: tuple = ("clean", "medium")
    loop_prob: float = 0.6
    pan_speed: float = 80.0
    n_seeds: int = 48
    seed_base: int = 10_000
    stream_frames: int = 192
    reverse_prob: float = 0.5
    prompt_drop: float = 0.1
    revisit_prob: float = 0.5
    save_every_s: float = 300.0
    log_every: int = 20
    val_every: int = 200
    max_steps: int | None = None
    cache_dir: str = "~/.cache/streammem/generator"
    model: dict = field(default_factory=lambda: dict(sample_size=64, patch_size=8, dim=128, num_layers=4,
                                                      num_heads=4, mlp_ratio=3.0, chunk_frames=2, reproject=True,
                                                      world_bias=True))

    def __post_init__(self) -> None:
        self.presets = tuple(self.presets)
        if self.chunk_frames + 1 > self.clip_frames:
            raise ValueError(f"clip_frames={self.clip_frames} must exceed chunk_frames={self.chunk_frames}")
        if self.clip_frames > self.stream_frames:
            raise ValueError(f"clip_frames={self.clip_frames} must be <= stream_frames={self.stream_frames}")
        if self.minutes <= 0 or self.threads < 1 or self.batch_size < 1:
            raise ValueError("minutes must be > 0, threads and batch_size >= 1")


@dataclass
class ErrorRecyclingConfig:
    """The step's configuration (SVI's defaults).

    Attributes:
        cond_prob: chance of a banked clean-side error in the conditioning frames (all bins).
        cond_timesteps: ``(lo, hi)``: draw the conditioning errors only from the bins whose
            timestep lies in this range (None: every bin, SVI). Conditioning frames are
            finished frames, whose error is the one made at the sampler's last steps: the
            small generator's fine-tune can draw them from those bins.
        latent_prob: chance of a banked clean-side error in the clean latent (same bin).
        noise_prob: chance of a banked noise-side error in the noise (same bin).
        clean_prob: chance that nothing at all is injected.
        clean_bank_prob: chance that a sample into which nothing was injected is banked.
        timestep_sampling: ``"shifted"`` (SVI: shifted uniform with a bump weight) or
            ``"logit_normal"`` (``sigmoid(N(0, 1))``, unweighted).
        shift: the shift of ``"shifted"`` sampling.
        num_bins, bank_shift, num_train_timesteps: the bank's bins, the inference timesteps of a
            flow-matching schedule with that shift (SVI: 50, 5, 1000).
        per_bin: errors per bin and side (SVI: 500); ``bank_max_bytes`` caps the whole bank
            (default 4 GiB, which lowers ``per_bin`` for errors over 10 MB: SVI keeps 500
            full-size errors per bin, 100 bins, about 420 GB at 480p; None lifts the cap).
        replace: ``"l2"`` (SVI), ``"random"`` or ``"fifo"`` when a bin is full.
        bank_dtype: ``"float32"`` or ``"float16"`` storage.
        gather_steps: steps whose errors are gathered from every process (multi-process runs).
    """

    cond_prob: float = 0.9
    cond_timesteps: tuple[float, float] | None = None
    latent_prob: float = 0.9
    noise_prob: float = 0.01
    clean_prob: float = 0.2
    clean_bank_prob: float = 0.1
    timestep_sampling: str = "shifted"
    shift: float = 5.0
    num_bins: int = 50
    bank_shift: float = 5.0
    num_train_timesteps: int = 1000
    per_bin: int = 500
    bank_max_bytes: int | None = 4 * 2 ** 30
    replace: str = "l2"
    bank_dtype: str = "float32"
    gather_steps: int = 50

    def __post_init__(self) -> None:
        need = field_checker(self)
        for name in ("cond_prob", "latent_prob", "noise_prob", "clean_prob", "clean_bank_prob"):
            v = getattr(self, name)
            need(isinstance(v, (int, float)) and 0 <= v <= 1, name, "a probability in [0, 1]")
        need(self.timestep_sampling in ("shifted", "logit_normal"), "timestep_sampling",
             "'shifted' or 'logit_normal'")
        need(self.shift > 0, "shift", "> 0")
        if self.cond_timesteps is not None:
            self.cond_timesteps = tuple(float(v) for v in self.cond_timesteps)
            need(len(self.cond_timesteps) == 2 and 0 <= self.cond_timesteps[0] <= self.cond_timesteps[1],
                 "cond_timesteps", "None or (lo, hi) with 0 <= lo <= hi")
            from streammem.memory.error_bank import flow_match_timesteps

            lo, hi = self.cond_timesteps
            bins = flow_match_timesteps(self.num_bins, self.bank_shift, self.num_train_timesteps)
            need(any(lo <= t <= hi for t in bins), "cond_timesteps",
                 f"a range holding at least one bin timestep (0-{self.num_train_timesteps} units; the bins run "
                 f"from {min(bins):g} to {max(bins):g})")
        need(isinstance(self.gather_steps, int) and self.gather_steps >= 0, "gather_steps", "an int >= 0")

    def make_bank(self, dim: int, seed: int = 0) -> ErrorBank:
        """An empty :class:`ErrorBank` for errors of ``dim`` values with this configuration."""
        return ErrorBank(dim=dim, num_bins=self.num_bins, shift=self.bank_shift,
                         num_train_timesteps=self.num_train_timesteps, per_bin=self.per_bin,
                         replace=self.replace, max_bytes=self.bank_max_bytes, dtype=self.bank_dtype, seed=seed)


@dataclass
class RecycleTrainConfig:
    """Fine-tuning the small generator from a checkpoint (``streammem train recycle``).

    Attributes:
        base: the base checkpoint folder ("" = the shipped generator); its ``training.json``
            gives the data setup (worlds, clip length, window), so the fine-tune sees the
            base's training distribution.
        out: the output folder (an existing one is resumed).
        mode: ``"recycle"`` (error recycling) or ``"plain"`` (the same steps with nothing
            injected or banked: the equal-compute baseline).
        max_steps: steps to run (both modes the same: equal compute).
        minutes: a wall-clock cap (a resumed run counts the time already spent).
        threads, batch_size, seed: torch threads, clips per step, data / noise seed (keep it the
            same for both modes: they then see the same clips, noise levels and noise).
        lr, warmup: AdamW peak learning rate (cosine decay over ``max_steps`` to 0.1 of it).
        base_optimizer: start AdamW from the base's moments (its ``training_state.safetensors``,
            when the base folder has one for the same parameters), so that a fine-tune at the
            base's last learning rate continues its training smoothly; False starts them at 0.
        bank_mb: cap on the error bank (MiB; 512 holds 54 errors per bin and side of the shipped
            generator's 2-frame 64 px chunks); ``bank_dtype`` its storage (float16 halves the
            bytes but makes every write several times slower on a CPU).
        bank_shift: the bins' schedule shift (1: the small generator's own sampler).
        timestep_sampling: ``"logit_normal"`` (the base's training) or ``"shifted"`` (SVI).
        mixed_precision: accelerate's ``"no"``, ``"fp16"``, ``"bf16"``.
        save_every_s, log_every: checkpoint period (seconds), log period (steps).
        cache_dir: rendered StreamWorld streams (shared with ``streammem train generator``).
        recycling: the other :class:`ErrorRecyclingConfig` fields, by name.
        clean_first: the oldest context frames of each clip that never get a conditioning error
            (0: every frame, SVI; 1: the clip's first frame stays real, as the observed start
            image does at inference).
    """

    base: str = ""
    out: str = "outputs/checkpoints/generator-recycled"
    mode: str = "recycle"
    max_steps: int = 1500
    minutes: float = 60.0
    threads: int = 1
    batch_size: int = 8
    seed: int = 0
    lr: float = 1e-4
    warmup: int = 20
    base_optimizer: bool = True
    bank_mb: int = 512
    bank_dtype: str = "float32"
    bank_shift: float = 1.0
    timestep_sampling: str = "logit_normal"
    mixed_precision: str = "no"
    save_every_s: float = 300.0
    log_every: int = 20
    cache_dir: str = "~/.cache/streammem/generator"
    recycling: dict = field(default_factory=dict)
    clean_first: int = 0

    def __post_init__(self) -> None:
        need = field_checker(self)
        need(isinstance(self.clean_first, int) and self.clean_first >= 0, "clean_first", "an int >= 0")
        need(self.mode in MODES, "mode", f"one of {MODES}")
        need(isinstance(self.max_steps, int) and self.max_steps >= 1, "max_steps", "an int >= 1")
        need(self.minutes > 0, "minutes", "> 0")
        need(isinstance(self.threads, int) and self.threads >= 1, "threads", "an int >= 1")
        need(isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size", "an int >= 1")
        need(self.lr > 0, "lr", "> 0")
        need(isinstance(self.bank_mb, int) and self.bank_mb >= 1, "bank_mb", "an int >= 1 (MiB)")
        need(self.mixed_precision in ("no", "fp16", "bf16"), "mixed_precision", "'no', 'fp16' or 'bf16'")
        known = {f.name for f in dataclasses.fields(ErrorRecyclingConfig)}
        need(set(self.recycling) <= known, "recycling", f"names among {sorted(known)}")
        self.recycling_config()  # checks the values

    def recycling_config(self) -> ErrorRecyclingConfig:
        """The step's configuration: plain mode sets every probability to 0."""
        kw: dict[str, Any] = dict(timestep_sampling=self.timestep_sampling, bank_shift=self.bank_shift,
                                  bank_max_bytes=self.bank_mb * 2 ** 20, bank_dtype=self.bank_dtype)
        kw.update(self.recycling)
        if self.mode == "plain":
            kw.update(cond_prob=0.0, latent_prob=0.0, noise_prob=0.0, clean_prob=1.0, clean_bank_prob=0.0)
        return ErrorRecyclingConfig(**kw)
