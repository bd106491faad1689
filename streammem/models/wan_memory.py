"""diffusers' Wan transformer reading and writing a PoseKVMemory, chunk by chunk.

Three parts, after the convention diffusers' maintainers settled on for rolling KV caches
(diffusers issue 12600, pull requests 12773 and 13681: a cache object with per-layer
``update`` / ``get`` / ``reset`` in the manner of transformers' ``DynamicCache``, handed to the
transformer through ``attention_kwargs`` and read by an attention processor, not a model hook):

- :class:`~streammem.memory.posekv_cache.PoseKVCache` (re-exported here): per transformer block,
  a :class:`~streammem.memory.PoseKVMemory` holding past chunks' keys and values (RELIC: a
  full-resolution window, older frames pooled by the schedule, every token tagged with its
  absolute camera pose); constant size however long it runs; ``save`` / ``load`` as safetensors.
- :class:`PoseKVAttnProcessor`: the self-attention processor of one ``WanTransformerBlock``.
  Given ``kv_cache=`` it attends the chunk's queries over ``[held K, V ; current K, V]`` via
  ``cache.update(key, value, layer_idx)`` (the chunk attends to itself bidirectionally and to
  the past causally); with no cache it is diffusers' ``WanAttnProcessor``, untouched.
  :func:`pose_kv_attention` installs one per block for the span of a ``with``.
- :class:`WanMemoryRollout`: generates chunk after chunk with the transformer's scheduler
  (``FlowMatchEulerDiscreteScheduler`` by default; a checkpoint's own, UniPC for Wan, when
  loaded with :meth:`WanMemoryRollout.from_pretrained`), reading the cache at every denoising
  step and writing it once per chunk.

What the processor does, precisely:

- Keys are cached after Wan's ``norm_k`` and **before** RoPE; RoPE is applied when they are
  read, at each token's stored (latent frame, row, col). Time positions are counted from the
  current chunk's first latent frame: the chunk's queries and keys sit at frames
  ``0 .. F-1`` exactly as in the stock model, held tokens at negative frames (``frame -
  next_frame``). RoPE depends only on position differences, so this is the rotation of absolute
  frame positions, and the positions never leave Wan's table however long the stream runs
  (angles are computed by diffusers' ``get_1d_rotary_pos_embed`` at any real position). Pooled
  history tokens are rotated at their cells' centres (fractional rows and columns). Departure
  from Self-Forcing, which caches keys after RoPE at absolute positions: pooling rotated keys
  would average mismatched phases.
- Pose embedding (``cache.uses_pose``): a ``head_dim``-wide vector of each token's frame pose,
  the same for every head, added **after** RoPE to the queries (their frame's pose from
  ``cache.set_chunk``), to the current keys and to the held keys (their stored poses); values
  never get it. Stock Wan checkpoints were not trained with a pose embedding: use
  ``pose_embed="none"`` with them, or train one (RELIC learns it).
- Writing (``with cache.writing():``) stores the current chunk's pre-RoPE keys and values after
  the chunk has read the cache. :class:`WanMemoryRollout` writes in a dedicated clean pass by
  default (one more forward on the denoised latents at ``context_timestep=0``, as Self-Forcing);
  ``write="last_step"`` writes during the last denoising step instead (one forward fewer; the
  keys are then those of the last step's, still slightly noisy, input).
- Not handled: a self-attention mask from the caller (Wan passes none) and context
  parallelism; fused QKV projections (``attn.fuse_projections()``) are.

Needs diffusers >= 0.35 (``WanAttnProcessor``, ``dispatch_attention_fn``); written against 0.42.

Plumbing departure: diffusers 0.42's ``WanTransformer3DModel.forward`` takes
``attention_kwargs`` but does not pass them on to its blocks (pull request 13681 is the change
that threads a cache through). :func:`pose_kv_attention` therefore adds one forward pre-hook
that only hands ``attention_kwargs["kv_cache"]`` to the processors it installed, and clears it
after the forward; the processors also accept ``kv_cache=`` directly, so a diffusers that
forwards ``attention_kwargs`` needs no hook. Everything the cache does happens in the processor.

Example (the tiny random configuration diffusers' own Wan tests use; nothing is downloaded):
    >>> import torch
    >>> from diffusers import WanTransformer3DModel
    >>> _ = torch.manual_seed(0)
    >>> wan = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
    ...     in_channels=4, out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2,
    ...     cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32).eval()
    >>> rollout = WanMemoryRollout(wan, num_inference_steps=2, window=2, history_frames=18)
    >>> text = torch.randn(1, 12, 16)
    >>> chunks = [rollout.generate_chunk(text, num_frames=2, height=16, width=16,
    ...           generator=torch.Generator().manual_seed(i)) for i in range(3)]
    >>> chunks[0].shape, rollout.cache.stats()["frames_held"]
    (torch.Size([1, 4, 2, 16, 16]), 6)
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator

import torch

from streammem.memory.posekv_cache import PoseKVCache, PoseKVCacheConfig, PoseKVLayer
from streammem.models.hf import load_hf, parse_spec, pick_device, pick_dtype

__all__ = ["PoseKVCache", "PoseKVCacheConfig", "PoseKVLayer", "PoseKVAttnProcessor", "pose_kv_attention",
           "wan_rope", "WanMemoryRollout", "cache_for"]

#: RoPE base of ``WanRotaryPosEmbed`` (diffusers' default; checked against the model's table).
WAN_ROPE_THETA = 10000.0


def _freqs_dtype() -> torch.dtype:
    """The precision ``WanRotaryPosEmbed`` computes its angles in (float32 only where MPS is)."""
    return torch.float32 if torch.backends.mps.is_available() else torch.float64


def wan_rope(rope: torch.nn.Module, positions: torch.Tensor,
             theta: float = WAN_ROPE_THETA) -> tuple[torch.Tensor, torch.Tensor]:
    """Wan's rotary ``(cos, sin)``, each ``(1, N, 1, head_dim)`` float32, at real positions
    ``(N, 3)`` = (latent frame, row, col); at whole positions the same numbers as the rows of
    ``rope.freqs_cos`` / ``rope.freqs_sin`` (the model's table), at any other (negative frames,
    pooled cells' centres) the same formula."""
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    cos, sin = [], []
    for dim, pos in zip((rope.t_dim, rope.h_dim, rope.w_dim), positions.double().unbind(1)):
        c, s = get_1d_rotary_pos_embed(dim, pos, theta, use_real=True, repeat_interleave_real=True,
                                       freqs_dtype=_freqs_dtype())
        cos.append(c)
        sin.append(s)
    n, d = positions.shape[0], rope.t_dim + rope.h_dim + rope.w_dim
    return torch.cat(cos, 1).reshape(1, n, 1, d), torch.cat(sin, 1).reshape(1, n, 1, d)


def _check_rope(rope: torch.nn.Module) -> None:
    """Refuse a model whose RoPE table is not what :func:`wan_rope` computes (another theta)."""
    n = min(8, rope.freqs_cos.shape[0])
    pos = torch.arange(n, dtype=torch.float64)[:, None].expand(n, 3)
    cos, sin = wan_rope(rope, pos)
    if not (torch.equal(cos[0, :, 0].to(rope.freqs_cos.device), rope.freqs_cos[:n])
            and torch.equal(sin[0, :, 0].to(rope.freqs_sin.device), rope.freqs_sin[:n])):
        raise ValueError(f"this Wan model's RoPE table is not diffusers' default (theta={WAN_ROPE_THETA}); "
                         "PoseKVAttnProcessor cannot re-rotate cached keys for it")


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved rotary embedding of ``x (B, S, H, D)`` by ``cos, sin (1, S, 1, D)`` (pairs
    ``(x[2i], x[2i+1])`` rotated by angle i), in the precision of ``cos``, cast back to ``x``'s."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * c - x2 * s
    out[..., 1::2] = x1 * s + x2 * c
    return out.type_as(x)


class _Route:
    """The cache of the forward in flight, handed from the transformer's ``attention_kwargs``
    to the processors by :func:`pose_kv_attention`'s pre-hook."""

    cache: PoseKVCache | None = None


class PoseKVAttnProcessor:
    """Self-attention processor of block ``layer_idx`` of a ``WanTransformer3DModel`` that
    reads and writes a :class:`PoseKVCache` (see the module docstring for the exact rule).

    Without a cache it calls ``fallback`` (the block's stock ``WanAttnProcessor``), so its
    output is the stock model's."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, layer_idx: int, rope: torch.nn.Module, fallback: Any = None, route: _Route | None = None) -> None:
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor

        self.layer_idx, self.rope = layer_idx, rope
        self.fallback = fallback if fallback is not None else WanAttnProcessor()
        self.route = route

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
                 kv_cache: PoseKVCache | None = None, **kwargs: Any) -> torch.Tensor:
        cache = kv_cache if kv_cache is not None else (self.route.cache if self.route is not None else None)
        if cache is None:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kwargs)
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        if encoder_hidden_states is not None or attn.add_k_proj is not None:
            raise ValueError("PoseKVAttnProcessor serves self-attention (a block's attn1) only")
        if attention_mask is not None:
            raise ValueError("PoseKVAttnProcessor takes no attention mask: the chunk attends to all it holds")
        if rotary_emb is None:
            raise ValueError("PoseKVAttnProcessor needs Wan's rotary embedding of the current chunk")
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        seq = query.shape[1]

        layer = cache[self.layer_idx]
        layer.get(key.device, key.dtype)  # the held tokens, on this device, before this chunk is written
        held_rope = layer.memo("rope", lambda: self._held_rope(layer, query.device))
        held_pose = layer.memo("pose_embedding", lambda: cache.embed_pose(layer.poses()).to(query.device))
        keys, values = cache.update(key.transpose(1, 2), value.transpose(1, 2), self.layer_idx)  # (B, H, N+S, D)
        keys, values = keys.transpose(1, 2), values.transpose(1, 2)
        n = keys.shape[1] - seq

        query = _rotate(query, *rotary_emb)
        current = _rotate(keys[:, n:], *rotary_emb)
        keys = torch.cat([_rotate(keys[:, :n], *held_rope), current], 1) if n else current
        if cache.uses_pose:
            hw = cache.config.height * cache.config.width
            frames = seq // hw
            poses = cache.chunk_poses if cache.chunk_poses is not None else torch.eye(4).expand(frames, 4, 4)
            e_cur = cache.embed_pose(poses).to(query.device).repeat_interleave(hw, 0)  # (S, D)
            e_all = torch.cat([held_pose, e_cur]) if n else e_cur
            query = query + e_cur.to(query)[None, :, None, :]
            keys = keys + e_all.to(keys)[None, :, None, :]

        out = dispatch_attention_fn(query, keys, values, attn_mask=None, dropout_p=0.0, is_causal=False,
                                    backend=self._attention_backend, parallel_config=None)
        out = out.flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)

    def _held_rope(self, layer: PoseKVLayer, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE ``(cos, sin)`` of the held tokens, time counted from the next frame to be written."""
        pos = layer.positions() - torch.tensor([layer.next_frame, 0.0, 0.0], dtype=torch.float64)
        cos, sin = wan_rope(self.rope, pos)
        return cos.to(device), sin.to(device)


@contextlib.contextmanager
def pose_kv_attention(transformer: Any) -> Iterator[Any]:
    """Within the ``with``, every block's self-attention of ``transformer`` (a
    ``WanTransformer3DModel``) runs :class:`PoseKVAttnProcessor`, which uses the cache passed
    as ``transformer(..., attention_kwargs={"kv_cache": cache})`` (and is the stock processor
    when none is passed). The stock processors are put back on exit, whatever happens."""
    blocks = getattr(transformer, "blocks", None)
    if blocks is None or not hasattr(transformer, "rope"):
        raise TypeError(f"pose_kv_attention needs a diffusers WanTransformer3DModel, got {type(transformer).__name__}")
    _check_rope(transformer.rope)
    route = _Route()
    old = [block.attn1.processor for block in blocks]

    def take(module: Any, args: tuple, kwargs: dict) -> None:
        extra = kwargs.get("attention_kwargs", args[5] if len(args) > 5 else None) or {}
        route.cache = extra.get("kv_cache")

    def clear(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        route.cache = None

    for i, block in enumerate(blocks):
        block.attn1.set_processor(PoseKVAttnProcessor(i, transformer.rope, fallback=old[i], route=route))
    handles = [transformer.register_forward_pre_hook(take, with_kwargs=True),
               transformer.register_forward_hook(clear, with_kwargs=True, always_call=True)]
    try:
        yield transformer
    finally:
        for h in handles:
            h.remove()
        for block, proc in zip(blocks, old):
            block.attn1.set_processor(proc)
        route.cache = None


def cache_for(transformer: Any, height: int, width: int, batch_size: int = 1, **fields: Any) -> PoseKVCache:
    """A :class:`PoseKVCache` shaped for ``transformer`` generating latents of ``height x width``
    (latent pixels, before patching) at ``batch_size``; ``fields`` are further
    :class:`PoseKVCacheConfig` fields (window, history_frames, pose_embed, ...)."""
    c = transformer.config
    _, ph, pw = c.patch_size
    if height % ph or width % pw:
        raise ValueError(f"latent height x width {height} x {width} must be divisible by the patch size {ph} x {pw}")
    pose_embed_fn = fields.pop("pose_embed_fn", None)
    return PoseKVCache(PoseKVCacheConfig(num_layers=c.num_layers, heads=c.num_attention_heads,
                                         head_dim=c.attention_head_dim, height=height // ph, width=width // pw,
                                         batch_size=batch_size, **fields), pose_embed_fn=pose_embed_fn)


class WanMemoryRollout:
    """Chunk-wise generation with a Wan transformer and a :class:`PoseKVCache`.

    Each :meth:`generate_chunk` draws fresh noise ``(batch, in_channels, num_frames, height,
    width)`` (latent frames and pixels), sets the scheduler's ``num_inference_steps``
    timesteps, denoises reading the cache at every step, then writes the chunk (a clean pass at
    ``context_timestep``, or the last step with ``write="last_step"``) and returns the latents.
    ``guidance_scale > 1`` runs classifier-free guidance (batch ``[uncond, cond]``; the cache is
    built for twice the batch). The cache is built on the first chunk from its shape and
    ``cache_fields`` (PoseKVCacheConfig fields), unless one is given.

    Args:
        transformer: a diffusers ``WanTransformer3DModel`` (any size; the tiny random one in tests).
        scheduler: a diffusers flow-matching scheduler; default ``FlowMatchEulerDiscreteScheduler(shift=3.0)``
            (Wan 2.1's shift at 480p).
        cache: a :class:`PoseKVCache`, or None to build one on the first chunk.
        num_inference_steps: denoising steps per chunk (RELIC and Self-Forcing: 4, distilled).
        guidance_scale: classifier-free guidance (1: none).
        write: ``"clean"`` (dedicated pass on the denoised chunk) or ``"last_step"``.
        context_timestep: timestep of the clean pass (0 = clean; Self-Forcing's default).
    """

    def __init__(self, transformer: Any, scheduler: Any = None, cache: PoseKVCache | None = None, *,
                 num_inference_steps: int = 4, guidance_scale: float = 1.0, write: str = "clean",
                 context_timestep: float = 0.0, **cache_fields: Any) -> None:
        if write not in ("clean", "last_step"):
            raise ValueError(f"WanMemoryRollout.write must be 'clean' or 'last_step', got {write!r}")
        if not (isinstance(num_inference_steps, int) and num_inference_steps >= 1):
            raise ValueError(f"WanMemoryRollout.num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
        if scheduler is None:
            from diffusers import FlowMatchEulerDiscreteScheduler

            scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        self.transformer, self.scheduler, self.cache = transformer, scheduler, cache
        self.num_inference_steps, self.guidance_scale = num_inference_steps, float(guidance_scale)
        self.write, self.context_timestep, self.cache_fields = write, float(context_timestep), cache_fields

    @classmethod
    def from_pretrained(cls, spec: str, device: str | None = None, dtype: str | torch.dtype | None = None,
                        **kwargs: Any) -> "WanMemoryRollout":
        """Load the ``transformer`` and ``scheduler`` of a diffusers Wan checkpoint named by
        ``hf:<hub id or local folder>`` (e.g. ``hf:Wan-AI/Wan2.1-T2V-1.3B-Diffusers``) through
        :func:`streammem.models.hf.load_hf` (a folder never touches the network; a failed fetch
        is one line). Text encoding and VAE decoding stay with diffusers' ``WanPipeline``."""
        import diffusers
        from diffusers import WanTransformer3DModel

        name = parse_spec(spec)
        if name is None:
            raise ValueError(f"WanMemoryRollout.from_pretrained takes hf:<model id or folder>, got {spec!r}")
        dev = pick_device(device)
        dt = pick_dtype(dev, dtype)
        transformer = load_hf(name, WanTransformer3DModel.from_pretrained, subfolder="transformer", torch_dtype=dt)
        # any scheduler class reads scheduler_config.json; the class it names is then built from it
        config = load_hf(name, diffusers.FlowMatchEulerDiscreteScheduler.load_config, subfolder="scheduler")
        scheduler_cls = getattr(diffusers, str(config.get("_class_name")), None)
        if scheduler_cls is None:
            raise ValueError(f"{name}/scheduler names an unknown diffusers scheduler {config.get('_class_name')!r}")
        scheduler = scheduler_cls.from_config(config)
        return cls(transformer.to(dev).eval(), scheduler, **kwargs)

    def _call(self, latents: torch.Tensor, t: torch.Tensor, text: torch.Tensor, writing: bool) -> torch.Tensor:
        batch = latents.shape[0]
        x = torch.cat([latents, latents]) if text.shape[0] != batch else latents
        ctx = self.cache.writing() if writing else contextlib.nullcontext()
        with ctx:
            out = self.transformer(x.to(self.transformer.dtype), timestep=t.expand(x.shape[0]),
                                   encoder_hidden_states=text, attention_kwargs={"kv_cache": self.cache},
                                   return_dict=False)[0]
        if x.shape[0] != batch:
            uncond, cond = out.chunk(2)
            out = uncond + self.guidance_scale * (cond - uncond)
        return out.float()

    @torch.no_grad()
    def generate_chunk(self, prompt_embeds: torch.Tensor, poses: torch.Tensor | None = None, *,
                       negative_prompt_embeds: torch.Tensor | None = None, num_frames: int = 3, height: int = 60,
                       width: int = 104, generator: torch.Generator | None = None,
                       latents: torch.Tensor | None = None) -> torch.Tensor:
        """One chunk of ``num_frames`` latent frames ``(batch, C, num_frames, height, width)``.

        ``prompt_embeds (batch, seq, text_dim)`` (the prompt may change from chunk to chunk);
        ``poses (num_frames, 4, 4)`` camera-to-world per latent frame, or None (identity);
        ``generator`` seeds this chunk's noise (or pass ``latents``)."""
        from diffusers.utils.torch_utils import randn_tensor

        device = prompt_embeds.device
        batch = prompt_embeds.shape[0]
        cfg = self.guidance_scale > 1.0
        if cfg and negative_prompt_embeds is None:
            raise ValueError("guidance_scale > 1 needs negative_prompt_embeds")
        text = torch.cat([negative_prompt_embeds, prompt_embeds]) if cfg else prompt_embeds
        text = text.to(self.transformer.dtype)
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1 latent frame, got {num_frames}")
        if self.cache is None:
            self.cache = cache_for(self.transformer, height, width, batch_size=text.shape[0], **self.cache_fields)
        if self.cache.config.batch_size != text.shape[0]:
            raise ValueError(f"the cache was built for batch {self.cache.config.batch_size}, this chunk runs at "
                             f"{text.shape[0]} (guidance doubles the batch)")
        shape = (batch, self.transformer.config.in_channels, num_frames, height, width)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must be {shape}, got {tuple(latents.shape)}")
        self.cache.set_chunk(poses)
        self.scheduler.set_timesteps(self.num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        with pose_kv_attention(self.transformer):
            for i, t in enumerate(timesteps):
                last = i == len(timesteps) - 1
                pred = self._call(latents, t, text, writing=last and self.write == "last_step")
                latents = self.scheduler.step(pred, t, latents, return_dict=False)[0]
            if self.write == "clean":
                t0 = torch.tensor(self.context_timestep, device=device)
                self._call(latents, t0, text, writing=True)
        return latents

    def rollout(self, chunks: Iterable[dict], **shared: Any) -> Iterator[torch.Tensor]:
        """Yield one chunk of latents per item of ``chunks`` (each a dict of
        :meth:`generate_chunk`'s arguments: ``prompt_embeds``, ``poses``, ``generator``, ...;
        ``shared`` fills what an item leaves out). Runs as long as ``chunks`` does, at
        constant memory."""
        for item in chunks:
            yield self.generate_chunk(**{**shared, **item})

    def __repr__(self) -> str:
        return (f"WanMemoryRollout(steps={self.num_inference_steps}, guidance={self.guidance_scale}, "
                f"write={self.write!r}, cache={None if self.cache is None else self.cache.stats()})")
