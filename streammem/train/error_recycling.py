"""Error-recycling fine-tuning (Stable Video Infinity) for any flow-matching video model.

A model trained on clean conditioning and then fed its own imperfect frames drifts. SVI trains
it on its own errors: it banks the errors it makes and replays them into its inputs. One step
(:meth:`ErrorRecycler.loss`, then :meth:`ErrorRecycler.bank`), per sample:

1. draw, independently, whether to inject a banked **clean-side** error into (a) the
   conditioning frames (``cond_prob`` 0.9, errors drawn from all timestep bins) and (b) the
   clean latent before noising (``latent_prob`` 0.9, drawn from the bin of the sample's own
   timestep), and a banked **noise-side** error into (c) the noise (``noise_prob`` 0.01, same
   bin); with probability ``clean_prob`` (0.2) nothing is injected at all;
2. noise: ``x_s = (1 - s) x0' + s eps'`` (primes: after injection), timestep ``1000 s``;
3. the target is always the velocity toward the **clean** latent, ``v = eps' - x0``;
4. after the prediction ``v_hat``, without gradients, one-step integration to either end gives
   the errors ``e_noise = (1 - s)(v_hat - v)`` and ``e_clean = -s (v_hat - v)``, banked in
   :class:`~streammem.memory.ErrorBank` (nearest of the inference timesteps, L2-nearest
   replacement when a bin is full); a sample into which nothing was injected is banked only
   with probability ``clean_bank_prob`` (0.1).

Draws are per sample: SVI trains with one sample per GPU, so its per-step draws are per-sample
draws. Timesteps follow SVI by default: ``u ~ U(0, 1)`` shifted, ``s = shift u / (1 + (shift
- 1) u)`` with ``shift`` 5, the loss weighted by a Gaussian bump over ``u`` centred at 0.5
(``exp(-2 (u - 0.5)^2)`` minus its minimum, mean 1); ``"logit_normal"`` (``s = sigmoid(n)``,
unweighted) is the alternative the small generator was trained with. In a multi-process run
(accelerate), the errors of the first ``gather_steps`` (50) steps are gathered from every
process before banking, as SVI does. Mixed precision and devices come from accelerate's
``Accelerator`` (on a CPU it adds nothing).

Model-specific parts live in an adapter (:class:`FlowAdapter`): what the clean latent is, how
errors enter the conditioning, how the model is called. :class:`DiTAdapter` serves
:class:`~streammem.models.video_dit.CausalVideoDiT` (conditioning = the memory's context frames
and the anchor); ``streammem.train.wan_lora.WanI2VAdapter`` serves diffusers' Wan
image-to-video transformer with a LoRA.

Departures from SVI's released code: errors are drawn, and banked, per sample of a batch (see
above); a bin without errors yet injects nothing (the sample counts as clean input); the bank
is :class:`~streammem.memory.ErrorBank` with a byte cap (4 GiB by default; the small
generator's fine-tune uses 512 MiB, 54 errors per bin and side), which lowers the per-bin
capacity below SVI's 500 for large errors.

Fine-tuning the small generator from a checkpoint (:func:`finetune`, ``streammem train
recycle``), with error recycling or with the same steps plain (every probability 0, nothing
banked: the equal-compute baseline)::

    streammem train recycle --mode recycle --max-steps 1500 --out outputs/checkpoints/generator-recycled
    streammem train recycle --mode plain   --max-steps 1500 --out outputs/checkpoints/generator-plain

Example (one step of a toy model):
    >>> import torch
    >>> from streammem.memory import ErrorBank
    >>> class Toy:
    ...     def __init__(self): self.model = torch.nn.Linear(4, 4)
    ...     def clean(self, batch): return batch["x0"]
    ...     def condition_draws(self, batch): return 0
    ...     def inject_condition(self, batch, errors, mask): return batch
    ...     def predict(self, batch, x_t, timestep): return self.model(x_t)
    >>> rec = ErrorRecycler(Toy(), ErrorRecyclingConfig(), ErrorBank(dim=4, per_bin=8), seed=0)
    >>> out = rec.loss({"x0": torch.randn(16, 4)})
    >>> banked = rec.bank(out)
    >>> out.loss.ndim, rec.error_bank.num_tokens > 0
    (0, True)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from streammem.memory import ErrorBank
from streammem.models.video_dit import CausalVideoDiT
from streammem.train.generation_config import MODES, ErrorRecyclingConfig, RecycleTrainConfig
from streammem.train.generator import batch_context

__all__ = ["ErrorRecyclingConfig", "ErrorRecycler", "RecycleOutput", "FlowAdapter", "DiTAdapter",
           "RecyclingClipSampler", "RecycleTrainConfig", "finetune", "draw_injections", "residual_errors",
           "make_accelerator", "train_step", "batch_context", "sample_sigma", "model_card", "MODES"]

class FlowAdapter(Protocol):
    """What :class:`ErrorRecycler` needs of a model. ``batch`` is whatever the adapter's data
    gives; ``x0`` is ``(B, ...)``, one error has the shape of one sample of it.

    - ``model``: the trained module;
    - ``clean(batch) -> x0``: the clean latent (the prediction's target side);
    - ``condition_draws(batch) -> n``: banked errors per sample for the conditioning (0: none);
    - ``inject_condition(batch, errors (B, n, *x0.shape[1:]), mask (B,) bool) -> batch``: the
      batch with ``errors`` added to the conditioning of the samples in ``mask``;
    - ``predict(batch, x_t, timestep (B,)) -> v_hat``: the velocity, shaped like ``x_t``.
    """

    model: torch.nn.Module

    def clean(self, batch: Any) -> torch.Tensor: ...

    def condition_draws(self, batch: Any) -> int: ...

    def inject_condition(self, batch: Any, errors: torch.Tensor, mask: torch.Tensor) -> Any: ...

    def predict(self, batch: Any, x_t: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor: ...


def draw_injections(cfg: ErrorRecyclingConfig, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Independent per-sample draws ``(n,)`` bool: ``clean`` (nothing injected) and, outside
    it, ``cond``, ``latent``, ``noise``."""
    u = torch.rand(4, n, generator=generator)
    clean = u[0] < cfg.clean_prob
    return {"clean": clean, "cond": ~clean & (u[1] < cfg.cond_prob), "latent": ~clean & (u[2] < cfg.latent_prob),
            "noise": ~clean & (u[3] < cfg.noise_prob)}


def residual_errors(v_hat: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One-step bidirectional integration: ``e_noise = (1 - s)(v_hat - v)``, ``e_clean =
    -s (v_hat - v)``; ``sigma (B,)`` broadcast over each sample."""
    s = sigma.reshape(-1, *([1] * (v.ndim - 1))).to(v.dtype)
    d = v_hat - v
    return (1 - s) * d, -s * d


def sample_sigma(cfg: ErrorRecyclingConfig, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise levels ``s (n,)`` in [0, 1] and loss weights ``(n,)`` (see the module docstring)."""
    if cfg.timestep_sampling == "logit_normal":
        return torch.sigmoid(torch.randn(n, generator=generator)), torch.ones(n)
    u = torch.rand(n, generator=generator)
    s = cfg.shift * u / (1 + (cfg.shift - 1) * u)
    bump = torch.exp(-2 * (u - 0.5) ** 2) - math.exp(-0.5)
    # mean of the bump over U(0, 1): int_0^1 exp(-2 (u - 1/2)^2) du = sqrt(pi/2) erf(1/sqrt2)
    mean = math.sqrt(math.pi / 2) * math.erf(1 / math.sqrt(2)) - math.exp(-0.5)
    return s, bump / mean


@dataclass
class RecycleOutput:
    """One step's forward: ``loss`` (scalar, with gradients) and, detached, what
    :meth:`ErrorRecycler.bank` needs: ``sigma (B,)``, ``v_hat``, ``v``, and per-sample bool
    flags ``injected`` (anything entered the input) and ``cond`` / ``latent`` / ``noise``
    (which errors did)."""

    loss: torch.Tensor
    sigma: torch.Tensor
    v_hat: torch.Tensor
    v: torch.Tensor
    injected: torch.Tensor
    sites: dict[str, torch.Tensor]


class ErrorRecycler:
    """The error-recycling step over a :class:`FlowAdapter` (see the module docstring).

    Args:
        adapter: the model adapter.
        config: an :class:`ErrorRecyclingConfig`.
        bank: the :class:`ErrorBank` (default: ``config.make_bank(dim of one sample)`` on the
            first step).
        seed: seeds two generators: ``generator`` (noise levels and noise, the same sequence
            whatever the probabilities) and ``draw_generator`` (injection draws, banking coins).
        accelerator: an ``accelerate.Accelerator`` for multi-process gathering (optional).
    """

    def __init__(self, adapter: FlowAdapter, config: ErrorRecyclingConfig | None = None,
                 bank: ErrorBank | None = None, seed: int = 0, accelerator: Any = None) -> None:
        self.adapter, self.config, self.error_bank = adapter, config or ErrorRecyclingConfig(), bank
        self.accelerator = accelerator
        self.generator = torch.Generator().manual_seed(seed)
        self.draw_generator = torch.Generator().manual_seed(seed + 1)
        self.steps = 0

    def _bank_for(self, x0: torch.Tensor) -> ErrorBank:
        dim = x0[0].numel()
        if self.error_bank is None:
            self.error_bank = self.config.make_bank(dim)
        if self.error_bank.config.dim != dim:
            raise ValueError(f"the error bank holds errors of {self.error_bank.config.dim} values, but one sample of "
                             f"the clean latent has {dim} ({tuple(x0.shape[1:])})")
        return self.error_bank

    def _draw(self, side: str, n: int, timestep: float | None, like: torch.Tensor,
              between: tuple[float, float] | None = None) -> torch.Tensor | None:
        e = self.error_bank.sample(n, side=side, timestep=timestep, between=between)
        if e.shape[0] < n:
            return None
        return e.reshape(n, *like.shape).to(like.device, like.dtype)

    def loss(self, batch: Any, sigma: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> RecycleOutput:
        """Inject, noise, predict; the loss is the weighted MSE against ``v = eps' - x0``.
        ``sigma (B,)`` and ``noise`` (like ``x0``) override the drawn ones (then the loss is
        unweighted)."""
        cfg, ad = self.config, self.adapter
        x0 = ad.clean(batch)
        b = x0.shape[0]
        self._bank_for(x0)
        weight = torch.ones(b)
        if sigma is None:
            sigma, weight = sample_sigma(cfg, b, self.generator)
        if noise is None:
            noise = torch.randn(x0.shape, generator=self.generator).to(x0.device, x0.dtype)
        sigma = sigma.to(x0.device, torch.float32)
        sites = draw_injections(cfg, b, self.draw_generator)
        done = {k: torch.zeros(b, dtype=torch.bool) for k in ("cond", "latent", "noise")}
        # (a) the conditioning: errors from every bin (or the bins of cond_timesteps)
        n_cond = ad.condition_draws(batch)
        if n_cond > 0 and bool(sites["cond"].any()):
            idx = sites["cond"].nonzero().flatten()
            e = self._draw("clean", len(idx) * n_cond, None, x0[0], between=cfg.cond_timesteps)
            if e is not None:
                errors = torch.zeros(b, n_cond, *x0.shape[1:], dtype=x0.dtype, device=x0.device)
                errors[idx] = e.reshape(len(idx), n_cond, *x0.shape[1:])
                batch = ad.inject_condition(batch, errors, sites["cond"].to(x0.device))
                done["cond"][idx] = True
        # (b) the clean latent, (c) the noise: errors from the sample's own bin
        x_in, eps = x0.clone(), noise.clone()
        t = (sigma * cfg.num_train_timesteps).detach().cpu()
        for i in range(b):
            for site, side, target in (("latent", "clean", x_in), ("noise", "noise", eps)):
                if sites[site][i]:
                    e = self._draw(side, 1, float(t[i]), x0[0])
                    if e is not None:
                        target[i] += e[0]
                        done[site][i] = True
        s = sigma.view(b, *([1] * (x0.ndim - 1))).to(x0.dtype)
        x_t = (1 - s) * x_in + s * eps
        v = eps - x0
        v_hat = ad.predict(batch, x_t, sigma * cfg.num_train_timesteps)
        per = (v_hat.float() - v.float()).square().flatten(1).mean(1)
        loss = (per * weight.to(per.device)).mean()
        injected = done["cond"] | done["latent"] | done["noise"]
        return RecycleOutput(loss, sigma.detach(), v_hat.detach(), v.detach(), injected, done)

    @torch.no_grad()
    def bank(self, out: RecycleOutput) -> int:
        """Bank the step's errors (see the module docstring); returns the samples banked."""
        self.steps += 1
        e_noise, e_clean = residual_errors(out.v_hat.float(), out.v.float(), out.sigma.float())
        keep = out.injected | (torch.rand(len(out.injected), generator=self.draw_generator) < self.config.clean_bank_prob)
        t = out.sigma.float() * self.config.num_train_timesteps
        keep = keep.to(e_noise.device)
        e_noise, e_clean, t = e_noise[keep], e_clean[keep], t[keep]
        acc = self.accelerator
        if acc is not None and acc.num_processes > 1 and self.steps <= self.config.gather_steps:
            # every process banks every process's errors (SVI's start-up all-gather)
            from accelerate.utils import gather_object

            parts = gather_object([(e_noise.cpu(), e_clean.cpu(), t.cpu())])
            e_noise, e_clean, t = (torch.cat([p[j] for p in parts]) for j in range(3))
        if t.numel():
            bank = self.error_bank
            bank.add(e_noise.flatten(1).cpu(), t.cpu(), side="noise")
            bank.add(e_clean.flatten(1).cpu(), t.cpu(), side="clean")
        return int(t.numel())


def make_accelerator(mixed_precision: str = "no", cpu: bool | None = None):
    """accelerate's ``Accelerator`` (``mixed_precision`` "no", "fp16" or "bf16"; on a machine
    without an accelerator it runs on the CPU and changes nothing)."""
    from accelerate import Accelerator

    if cpu is None:
        cpu = not torch.cuda.is_available()
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu)


def train_step(recycler: ErrorRecycler, batch: Any, optimizer: torch.optim.Optimizer, accelerator,
               params: list[torch.nn.Parameter], clip: float = 1.0, recycle: bool = True) -> dict:
    """One optimisation step: the recycler's loss under ``accelerator.autocast()``, backward,
    gradient clipping, the optimiser step, then (``recycle``) banking. Returns ``loss``,
    ``grad_norm``, ``injected`` (samples) and ``banked`` (samples)."""
    with accelerator.autocast():
        out = recycler.loss(batch)
    optimizer.zero_grad(set_to_none=True)
    accelerator.backward(out.loss)
    gn = accelerator.clip_grad_norm_(params, clip)
    optimizer.step()
    banked = recycler.bank(out) if recycle else 0
    return {"loss": float(out.loss.detach()), "grad_norm": float(gn), "injected": int(out.injected.sum()),
            "banked": banked}


# ---------------------------------------------------------------------------- the small generator


class RecyclingClipSampler:
    """Batches of :class:`streammem.train.generator.ClipSampler` plus the raw conditioning:
    ``context_frames (B, k, 3, H, W)`` and ``context_poses (B, k, 4, 4)`` (frames ``0 .. k-1``
    of each clip; the anchor is the last of them), so that errors can be added to them and the
    memory context rebuilt (``context(frames, poses)``: :func:`batch_context`, the sampler's
    context computed a pooling factor at a time)."""

    def __init__(self, cfg, data: dict, model: CausalVideoDiT, rng: np.random.Generator) -> None:
        from streammem.train.generator import ClipSampler

        self.sampler = ClipSampler(cfg, data, model, rng)
        self.context = lambda frames, poses: batch_context(model, frames, poses, cfg.window)

    def batch(self, **kw) -> dict:
        """A batch whose ``context`` is None until :meth:`with_context` (or the adapter, after
        errors entered the frames) builds it: one context per step, in either mode."""
        return self.sampler.batch(build_context=False, **kw)

    def with_context(self, batch: dict) -> dict:
        """``batch`` with its memory context built from its context frames."""
        return {**batch, "context": self.context(batch["context_frames"], batch["context_poses"])}


class DiTAdapter:
    """:class:`FlowAdapter` for :class:`CausalVideoDiT` on :class:`RecyclingClipSampler`
    batches. The clean latent is the chunk ``x0 (B, F, 3, H, W)`` in pixels; the conditioning is
    the context frames and the anchor: ``ceil(k / F)`` clean-side errors per sample, laid end to
    end, are added to the ``k`` context frames (the newest frame, the anchor, gets the last
    error frame), clamped to [-1, 1] as generated frames are; the memory context is built from
    the frames as they reach the model (``context_fn``, the sampler's) where the batch has none.
    ``clean_first``: the oldest context frames that never get an error (0: every frame, SVI; 1:
    the clip's first frame stays real, as the observed start image does at inference, so that
    a lone real frame is never taught to be distrusted)."""

    def __init__(self, model: CausalVideoDiT, context_fn, clean_first: int = 0) -> None:
        if not (isinstance(clean_first, int) and clean_first >= 0):
            raise ValueError(f"clean_first must be an int >= 0, got {clean_first!r}")
        self.model, self.context_fn, self.clean_first = model, context_fn, clean_first

    def clean(self, batch: dict) -> torch.Tensor:
        return batch["x0"]

    def condition_draws(self, batch: dict) -> int:
        k = batch["context_frames"].shape[1]  # shared by the batch
        if k <= self.clean_first:
            return 0  # every context frame stays real: nothing to inject (nor to count as injected)
        return math.ceil(k / batch["x0"].shape[1])

    def inject_condition(self, batch: dict, errors: torch.Tensor, mask: torch.Tensor) -> dict:
        frames = batch["context_frames"]
        b, k = frames.shape[:2]
        idx = mask.nonzero().flatten()
        noisy = frames.clone()
        e = errors[idx].reshape(len(idx), -1, *frames.shape[2:])[:, -k:].clone()
        e[:, :self.clean_first] = 0
        noisy[idx] = (frames[idx] + e).clamp_(-1, 1)
        return {**batch, "context_frames": noisy, "anchor": noisy[:, -1], "context": None}

    def predict(self, batch: dict, x_t: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        ctx = batch.get("context")
        if ctx is None:
            ctx = self.context_fn(batch["context_frames"], batch["context_poses"])
        return self.model(x_t, timestep, batch["actions"], batch["poses"], batch["prompt_ids"], ctx, batch["anchor"],
                          anchor_pose=batch.get("anchor_pose"))


def _base_folder(base: str) -> Path:
    if base:
        folder = Path(base)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"no generator checkpoint at {folder} (config.json + weights)")
        return folder
    from streammem.checkpoints import path

    return path("generator")


def _save(out: Path, model, opt, recycler: ErrorRecycler, step: int, elapsed: float, cfg: RecycleTrainConfig,
          rng: np.random.Generator, extra: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    params = list(model.parameters())
    index = {id(p): i for i, p in enumerate(params)}
    tensors = {"rng.torch": torch.get_rng_state(), "rng.noise": recycler.generator.get_state(),
               "rng.draw": recycler.draw_generator.get_state()}
    for p, st in opt.state.items():
        for name, val in st.items():
            tensors[f"opt.{index[id(p)]}.{name}"] = val.detach().clone().contiguous()
    save_file(tensors, str(out / "training_state.tmp.safetensors"))
    os.replace(out / "training_state.tmp.safetensors", out / "training_state.safetensors")
    if recycler.error_bank is not None and cfg.mode == "recycle":
        recycler.error_bank.save(out / "error_bank.tmp.safetensors")
        os.replace(out / "error_bank.tmp.safetensors", out / "error_bank.safetensors")
    meta = {"step": step, "elapsed_s": elapsed, "recycle_config": dataclasses.asdict(cfg),
            "numpy_rng": rng.bit_generator.state, "recycler_steps": recycler.steps, **extra}
    (out / "training.tmp.json").write_text(json.dumps(meta, indent=1))
    os.replace(out / "training.tmp.json", out / "training.json")


def _load_moments(opt: torch.optim.Optimizer, params: list, state: "dict | Path") -> bool:
    """Put the ``opt.<param index>.<name>`` tensors of a training state (a dict, or a
    safetensors file) into ``opt``'s state; False (nothing loaded) when the file is missing
    or its moments do not match ``params``' shapes."""
    if not isinstance(state, dict):
        if not Path(state).is_file():
            return False
        state = load_file(str(state))
    moments: dict[int, dict] = {}
    for key, val in state.items():
        if key.startswith("opt."):
            _, i, name = key.split(".", 2)
            moments.setdefault(int(i), {})[name] = val
    if not moments or any(i >= len(params) or ("exp_avg" in m and m["exp_avg"].shape != params[i].shape)
                          for i, m in moments.items()):
        return False
    for i, m in moments.items():  # the moments on the parameter's device; the step count stays where Adam keeps it
        opt.state[params[i]].update({k: v if k == "step" else v.to(params[i].device) for k, v in m.items()})
    return True


def _lr(cfg: RecycleTrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = min(step / cfg.max_steps, 1.0)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def finetune(cfg: RecycleTrainConfig, progress: bool = False) -> Path:
    """Fine-tune (or resume) the generator in ``cfg.base`` into ``cfg.out`` for
    ``cfg.max_steps`` steps (or until ``cfg.minutes``), then write the model card."""
    from streammem.train.generator import TrainConfig, _cached_streams

    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    base = _base_folder(cfg.base)
    resume = (out / "training.json").exists() and (out / "training_state.safetensors").exists()
    base_meta = json.loads((base / "training.json").read_text()) if (base / "training.json").is_file() else {}
    data_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    data_cfg = TrainConfig(**{k: v for k, v in base_meta.get("config", {}).items()
                              if k in data_fields and k not in ("out", "max_steps", "minutes")})
    data_cfg = dataclasses.replace(data_cfg, batch_size=cfg.batch_size, cache_dir=cfg.cache_dir, out=str(out))
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = CausalVideoDiT.from_pretrained(str(out if resume else base))
    model.train()
    accelerator = make_accelerator(cfg.mixed_precision)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.01)
    model, opt = accelerator.prepare(model, opt)
    data = _cached_streams(data_cfg, list(range(data_cfg.seed_base, data_cfg.seed_base + data_cfg.n_seeds)), "train")
    sampler = RecyclingClipSampler(data_cfg, data, accelerator.unwrap_model(model), rng)
    rcfg = cfg.recycling_config()
    bank = rcfg.make_bank(data_cfg.chunk_frames * 3 * data_cfg.size ** 2, seed=cfg.seed)
    adapter = DiTAdapter(model, sampler.context, clean_first=cfg.clean_first)
    recycler = ErrorRecycler(adapter, rcfg, bank, seed=cfg.seed, accelerator=accelerator)
    step, elapsed = 0, 0.0
    from_base = (not resume and cfg.base_optimizer
                 and _load_moments(opt, list(model.parameters()), base / "training_state.safetensors"))
    stats = {"injected": 0, "banked": 0, "samples": 0, "loss": None, "base_moments": bool(from_base)}
    if resume:
        meta = json.loads((out / "training.json").read_text())
        tensors = load_file(str(out / "training_state.safetensors"))
        if not _load_moments(opt, list(model.parameters()), tensors) and any(k.startswith("opt.") for k in tensors):
            raise ValueError(f"{out}: its optimiser state does not match the model (another checkpoint's folder?)")
        torch.set_rng_state(tensors["rng.torch"])
        recycler.generator.set_state(tensors["rng.noise"])
        recycler.draw_generator.set_state(tensors["rng.draw"])
        rng.bit_generator.state = meta["numpy_rng"]
        recycler.steps = int(meta["recycler_steps"])
        if (out / "error_bank.safetensors").is_file():
            bank.load_state_dict(load_file(str(out / "error_bank.safetensors")))
        step, elapsed = int(meta["step"]), float(meta["elapsed_s"])
        stats = meta["stats"]
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "train_log.jsonl", "a")

    def write(rec: dict) -> None:
        log.write(json.dumps(rec) + "\n")
        log.flush()

    write({"event": "resume" if resume else "start", "step": step, "elapsed_s": elapsed, "mode": cfg.mode,
           "base": str(base)})
    params = [p for p in model.parameters() if p.requires_grad]
    start_wall = time.time() - elapsed
    last_save, window = time.time(), []
    while step < cfg.max_steps and time.time() - start_wall < cfg.minutes * 60:
        ts = time.time()
        batch = sampler.batch()
        for g in opt.param_groups:
            g["lr"] = _lr(cfg, step)
        rec = train_step(recycler, batch, opt, accelerator, params, recycle=cfg.mode == "recycle")
        step += 1
        window.append(rec["loss"])
        for k in ("injected", "banked"):
            stats[k] += rec[k]
        stats["samples"] += cfg.batch_size
        if step % cfg.log_every == 0:
            stats["loss"] = float(np.mean(window))
            write({"step": step, "elapsed_s": round(time.time() - start_wall, 1), "grad_norm": round(rec["grad_norm"], 3),
                   "lr": opt.param_groups[0]["lr"], "step_s": round(time.time() - ts, 3), **stats,
                   "bank_errors": bank.num_tokens})
            if progress:
                print(f"step {step}/{cfg.max_steps} loss {np.mean(window):.4f} bank {bank.num_tokens}", flush=True)
            window = []
        if time.time() - last_save >= cfg.save_every_s:
            _save(out, accelerator.unwrap_model(model), opt, recycler, step, time.time() - start_wall, cfg, rng,
                  {"stats": stats})
            write({"event": "save", "step": step, "elapsed_s": round(time.time() - start_wall, 1)})
            last_save = time.time()
    if window:
        stats["loss"] = float(np.mean(window))
    elapsed = time.time() - start_wall
    stats["bank_errors"] = bank.num_tokens
    _save(out, accelerator.unwrap_model(model), opt, recycler, step, elapsed, cfg, rng, {"stats": stats})
    write({"event": "done", "step": step, "elapsed_s": round(elapsed, 1)})
    log.close()
    (out / "README.md").write_text(model_card(cfg, base, step, elapsed, stats))
    return out


def model_card(cfg: RecycleTrainConfig, base: Path, step: int, elapsed: float, stats: dict) -> str:
    """The fine-tuned checkpoint's card: base, mode, steps, wall time, step configuration, the
    last loss (mean over the last logged steps) and the bank's fill."""
    rcfg = cfg.recycling_config()
    sites = [name for name, p in (("conditioning frames", rcfg.cond_prob), ("clean chunk", rcfg.latent_prob),
                                  ("noise", rcfg.noise_prob)) if p > 0]
    listed = ", ".join(sites[:-1]) + " and " + sites[-1] if len(sites) > 1 else "".join(sites)
    into = f"replayed into its {listed}" if sites else "never replayed (every injection probability is 0)"
    what = ("error-recycling fine-tune (Stable Video Infinity): banked errors of the model's own predictions "
            + into if cfg.mode == "recycle" else
            "plain fine-tune: the same steps, data, noise levels and noise as the error-recycling fine-tune, "
            "nothing injected (the equal-compute baseline)")
    bank = (f"- Error bank: {rcfg.num_bins} bins (inference timesteps, shift {rcfg.bank_shift}), "
            f"{cfg.bank_mb} MiB cap ({cfg.bank_dtype}), {rcfg.replace} replacement; {stats.get('bank_errors', 0)} "
            f"errors held at the end (both sides); {stats['injected']} of {stats['samples']} samples had an error "
            "injected.\n" if cfg.mode == "recycle" else "")
    kept = f"; the first {cfg.clean_first} context frame(s) kept real" if cfg.clean_first else ""
    moments = "from the base's training state" if stats.get("base_moments") else "from zero"
    bins = ("every bin" if rcfg.cond_timesteps is None else
            f"the bins at timesteps {rcfg.cond_timesteps[0]:g}-{rcfg.cond_timesteps[1]:g}")
    flags = f" --lr {cfg.lr:g}" if cfg.lr != RecycleTrainConfig.lr else ""
    flags += "" if cfg.base_optimizer else " --no-base-optimizer"
    if cfg.mode == "recycle":
        svi = ErrorRecyclingConfig()
        for name in ("cond_prob", "latent_prob", "noise_prob", "clean_prob"):
            if getattr(rcfg, name) != getattr(svi, name):
                flags += f" --{name.replace('_', '-')} {getattr(rcfg, name):g}"
        if cfg.clean_first:
            flags += f" --clean-first {cfg.clean_first}"
    if rcfg.cond_timesteps is not None and cfg.mode == "recycle":
        flags += (f" --cond-max-timestep {rcfg.cond_timesteps[1]:g}" if rcfg.cond_timesteps[0] == 0
                  else f" (recycling cond_timesteps {rcfg.cond_timesteps[0]:g}-{rcfg.cond_timesteps[1]:g})")
    return f"""---
tags:
- streammem
- video-generation
- flow-matching
- error-recycling
---

# streammem small causal video model, {cfg.mode} fine-tune

`streammem.models.video_dit.CausalVideoDiT` fine-tuned from `{base}` ({what}). Load it with
`CausalVideoDiT.from_pretrained(path)` or `streammem generate --checkpoint path`; the model, its
inputs and its cost per chunk are the base's (see the base's card).

## How it was trained

`streammem train recycle --mode {cfg.mode} --max-steps {cfg.max_steps} --base {cfg.base or '(shipped)'}{flags}`:
{step} steps in {elapsed / 60:.1f} minutes ({elapsed / max(step, 1):.3f} s per step) on {cfg.threads} CPU
thread(s), batch {cfg.batch_size}, AdamW {cfg.lr:g} ({cfg.warmup} warm-up steps, cosine to 0.1x over
{cfg.max_steps} steps; moments {moments}), gradient clipping 1.0, noise levels {cfg.timestep_sampling}, seed {cfg.seed};
data: the base's StreamWorld training worlds and clips.

- Step: conditioning-frame error p={rcfg.cond_prob} (from {bins}{kept}), clean-latent error p={rcfg.latent_prob}, noise error
  p={rcfg.noise_prob}, nothing injected p={rcfg.clean_prob}, clean-input samples banked p={rcfg.clean_bank_prob};
  target v = eps' - x0.
{bank}- Loss over the last logged steps: {stats['loss'] if stats['loss'] is not None else float('nan'):.4f}.

`training.json` has the configuration; `train_log.jsonl` the losses.
"""
