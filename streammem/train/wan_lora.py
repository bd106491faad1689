"""Error-recycling LoRA fine-tuning of diffusers' Wan image-to-video transformer (GPU machines).

Stable Video Infinity fine-tunes Wan2.1-I2V-14B with a LoRA of rank 128 (alpha 128) on every
attention projection (q, k, v, o: self- and cross-attention) and the two feed-forward layers,
AdamW 1e-4, bf16. Here the model is assembled from diffusers' Wan components:
``WanTransformer3DModel`` (image-to-video: 36 input channels = 16 noisy latent + 4 mask + 16
conditioning latent), ``AutoencoderKLWan`` and ``FlowMatchEulerDiscreteScheduler``, and the
LoRA is added through peft (diffusers' ``add_adapter``). :func:`tiny_wan_components` builds
them on the tiny random configuration diffusers' own tests use (no download);
:func:`load_wan_components` loads a hub checkpoint id or local folder (``hf:`` loading rules of
``streammem.models.hf``) on a GPU machine.

:class:`WanI2VAdapter` is the :class:`~streammem.train.error_recycling.FlowAdapter` of the error
recycling step. A batch (:meth:`WanI2VAdapter.prepare`) holds, from a pixel video ``(B, 3, T,
H, W)`` in [-1, 1] (``T = 4 n + 1``), the normalised VAE latents ``(B, 16, T', h, w)``, the
conditioning latents (the first ``cond_frames`` pixel frames, the rest zeros, or the reference
image with ``ref_pad``, encoded: SVI's ``ref_pad``), the diffusers mask ``(B, 4, T', h, w)``
(1 where a pixel frame conditions) and the prompt (and optional CLIP image) embeddings.
Banked clean-side errors (latent-shaped) enter the conditioning latent's frames that carry a
conditioning pixel frame (SVI: the first latent frames of ``y``).

Example (tiny, CPU):
    >>> import torch
    >>> parts = tiny_wan_components()
    >>> params = add_lora(parts["transformer"], WanLoRAConfig(rank=4, alpha=4))
    >>> ad = WanI2VAdapter(parts["transformer"], parts["vae"])
    >>> batch = ad.prepare(torch.rand(1, 3, 5, 16, 16) * 2 - 1, torch.randn(1, 8, 32))
    >>> batch["latents"].shape, batch["mask"].shape
    (torch.Size([1, 16, 2, 2, 2]), torch.Size([1, 4, 2, 2, 2]))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from streammem.types import field_checker

__all__ = ["WanLoRAConfig", "SVI_TARGET_MODULES", "tiny_wan_components", "load_wan_components", "add_lora",
           "WanI2VAdapter"]

#: SVI's q, k, v, o and ffn.0 / ffn.2, in diffusers' Wan module names
SVI_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")


@dataclass
class WanLoRAConfig:
    """Attributes:
    rank, alpha: LoRA rank and scale numerator (SVI: 128, 128).
    target_modules: module name suffixes that get a LoRA (SVI's: :data:`SVI_TARGET_MODULES`).
    dropout: LoRA dropout (SVI: 0).
    """

    rank: int = 128
    alpha: float = 128.0
    target_modules: tuple[str, ...] = SVI_TARGET_MODULES
    dropout: float = 0.0

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)
        need = field_checker(self)
        need(isinstance(self.rank, int) and self.rank >= 1, "rank", "an int >= 1")
        need(self.alpha > 0, "alpha", "> 0")
        need(len(self.target_modules) > 0, "target_modules", "at least one module name")
        need(0 <= self.dropout < 1, "dropout", "in [0, 1)")


def tiny_wan_components(seed: int = 0) -> dict[str, Any]:
    """Wan image-to-video parts on diffusers' tiny random test configuration: ``transformer``
    (2 layers, 2 heads of 12, text width 32, CLIP image width 4, 36 input channels), ``vae``
    (base width 3, 16 latent channels, 4x temporal and 8x spatial compression) and
    ``scheduler`` (flow matching, shift 5)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                        in_channels=36, out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32,
                                        num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        rope_max_seq_len=32, image_dim=4)
    return {"transformer": transformer, "vae": vae,
            "scheduler": FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=5.0)}


def load_wan_components(spec: str, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """The transformer, VAE and scheduler of a diffusers Wan image-to-video checkpoint
    (``hf:<hub id or folder>``, e.g. ``hf:Wan-AI/Wan2.1-I2V-14B-480P-Diffusers``)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

    from streammem.models.hf import load_hf, parse_spec, pick_device, pick_dtype

    name = parse_spec(spec)
    if name is None:
        raise ValueError(f"a Wan checkpoint is named hf:<hub id or folder>, got {spec!r}")
    dtype = dtype or pick_dtype(pick_device())
    return {"transformer": load_hf(name, WanTransformer3DModel.from_pretrained, subfolder="transformer",
                                   torch_dtype=dtype),
            "vae": load_hf(name, AutoencoderKLWan.from_pretrained, subfolder="vae", torch_dtype=torch.float32),
            "scheduler": load_hf(name, FlowMatchEulerDiscreteScheduler.from_pretrained, subfolder="scheduler")}


def add_lora(transformer: torch.nn.Module, config: WanLoRAConfig | None = None) -> list[torch.nn.Parameter]:
    """Freeze ``transformer`` and add a peft LoRA (``config``) to the target modules; returns
    the trainable (LoRA) parameters. ValueError when no module matches a target name."""
    from peft import LoraConfig

    config = config or WanLoRAConfig()
    names = [n for n, _ in transformer.named_modules()]
    missing = [t for t in config.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ValueError(f"LoRA target modules {missing} match no module of {type(transformer).__name__}")
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                                       target_modules=list(config.target_modules), init_lora_weights=True))
    params = [p for n, p in transformer.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params


class WanI2VAdapter:
    """:class:`~streammem.train.error_recycling.FlowAdapter` for diffusers' Wan image-to-video
    transformer (see the module docstring).

    Args:
        transformer: a ``WanTransformer3DModel`` with 36 input channels (usually with a LoRA).
        vae: its ``AutoencoderKLWan`` (used under ``no_grad`` in :meth:`prepare` only).
        cond_frames: pixel frames at the start of a clip that condition it (1: image-to-video;
            SVI chains clips on the last 1 or 5 frames).
        ref_pad: pad the conditioning video with the reference (first) frame instead of zeros.
    """

    def __init__(self, transformer: torch.nn.Module, vae: torch.nn.Module, cond_frames: int = 1,
                 ref_pad: bool = False) -> None:
        if cond_frames < 1:
            raise ValueError(f"cond_frames must be >= 1, got {cond_frames}")
        self.model, self.vae, self.cond_frames, self.ref_pad = transformer, vae, cond_frames, ref_pad
        self.t_scale = 2 ** sum(vae.config.temperal_downsample)

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """``(B, 3, T, H, W)`` in [-1, 1] -> normalised latents ``(B, z, T', h, w)`` (posterior mode)."""
        cfg = self.vae.config
        p = next(self.vae.parameters())
        z = self.vae.encode(video.to(p.device, p.dtype)).latent_dist.mode()
        mean = torch.tensor(cfg.latents_mean, dtype=z.dtype, device=z.device).view(1, -1, 1, 1, 1)
        std = torch.tensor(cfg.latents_std, dtype=z.dtype, device=z.device).view(1, -1, 1, 1, 1)
        return (z - mean) / std

    def mask(self, b: int, t: int, lat_shape: tuple[int, ...]) -> torch.Tensor:
        """diffusers' image-to-video mask ``(B, 4, T', h, w)``: 1 at conditioning pixel frames,
        the first frame repeated ``t_scale`` times, grouped ``t_scale`` frames per latent frame."""
        s = self.t_scale
        m = torch.zeros(t)
        m[: self.cond_frames] = 1
        m = torch.cat([m[:1].repeat(s), m[1:]])
        m = m.view(-1, s).T  # (s, T')
        return m.view(1, s, -1, 1, 1).expand(b, s, lat_shape[0], *lat_shape[1:]).clone()

    def cond_latent_frames(self) -> int:
        """Latent frames that hold a conditioning pixel frame."""
        return 1 + -(-(self.cond_frames - 1) // self.t_scale)

    def prepare(self, video: torch.Tensor, prompt_embeds: torch.Tensor,
                image_embeds: torch.Tensor | None = None) -> dict:
        """A training batch from ``video (B, 3, T, H, W)`` in [-1, 1] and ``prompt_embeds (B, L,
        text_dim)`` (``image_embeds (B, N, image_dim)`` where the transformer has an image
        embedder)."""
        b, _, t = video.shape[:3]
        if (t - 1) % self.t_scale or t <= self.cond_frames:
            raise ValueError(f"a Wan clip has T = {self.t_scale} n + 1 frames, more than cond_frames="
                             f"{self.cond_frames}; got T = {t}")
        cond = video.clone()
        pad = video[:, :, :1] if self.ref_pad else torch.zeros_like(video[:, :, :1])
        cond[:, :, self.cond_frames:] = pad
        latents, cond_lat = self.encode(video), self.encode(cond)
        dev = latents.device
        return {"latents": latents, "cond_latents": cond_lat,
                "mask": self.mask(b, t, tuple(latents.shape[2:])).to(dev, latents.dtype),
                "prompt_embeds": prompt_embeds.to(dev),
                "image_embeds": None if image_embeds is None else image_embeds.to(dev)}

    # ------------------------------------------------------------------ FlowAdapter
    def clean(self, batch: dict) -> torch.Tensor:
        return batch["latents"]

    def condition_draws(self, batch: dict) -> int:
        return 1

    def inject_condition(self, batch: dict, errors: torch.Tensor, mask: torch.Tensor) -> dict:
        n = self.cond_latent_frames()
        cond = batch["cond_latents"].clone()
        m = mask.view(-1, 1, 1, 1, 1).to(cond.dtype)
        cond[:, :, :n] += m * errors[:, 0, :, :n].to(cond.dtype)
        return {**batch, "cond_latents": cond}

    def predict(self, batch: dict, x_t: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        x = torch.cat([x_t, batch["mask"].to(x_t.dtype), batch["cond_latents"].to(x_t.dtype)], 1)
        img = batch.get("image_embeds")
        out = self.model(x.to(dtype), timestep, batch["prompt_embeds"].to(dtype),
                         encoder_hidden_states_image=None if img is None else img.to(dtype), return_dict=False)[0]
        return out.to(x_t.dtype)
