"""CausalVideoDiT: a small image-to-video flow-matching transformer that reads a pose-aware memory.

The model denoises one **chunk** of ``F`` frames at a time (pixel space, ``3 x H x W`` in
``[-1, 1]``, cut into ``p x p`` patches: ``(H/p) * (W/p)`` tokens per frame). The chunk's tokens
attend to each other (bidirectionally within the chunk) and to **context tokens**: clean past
frames read from a memory that lives outside the model (``PoseKVMemory``, ``DualMemory``, a
plain rolling window). Causality across chunks comes from the caller: a chunk only ever sees
what was written to the memory before it.

Context format (the interface with the memory). A memory stores, per past frame, its **patch
tokens**: ``frame_tokens(frame, pose, ...)`` returns ``Tokens`` of ``(h*w, 3*p*p)`` raw pixel
patches, row-major, with the frame's absolute pose on every token. Because patch embedding is
linear, a memory that average-pools these tokens (RELIC's schedule in ``PoseKVMemory``) holds
exactly the embedding of the pooled pixels. ``ChunkContext.from_tokens`` batches what the memory
returns (``memory.read(query_pose)``: features, pose, grid position at pooled-cell centres and
pooling level); in every layer the context tokens are projected to keys and values by that
layer's own projections (they are not updated from layer to layer: a context token's key and
value depend only on its clean pixels, grid, level and pose, so a memory of pixel patches is a
memory of each layer's KV).

Conditioning:

- **anchor**: the newest clean frame before the chunk (the start image for the first chunk, then
  the last generated frame), patch-embedded and added to every chunk frame's tokens at the same
  grid position (as image-to-video models concatenate the conditioning image with the noisy
  input). It gives a model this small a direct path for what barely moves between frames; what
  left the view comes back through the memory's context tokens;
- **pose**: every token (chunk and context) carries its frame's absolute camera pose
  (camera-to-world 4x4); Fourier features of ``pose[:3, :4]`` (translation times
  ``pose_scale``) and of the token's grid position go through an MLP to a pose code, and each
  layer adds its own linear projection of that code to the **queries and keys only**; values
  never see it (RELIC, section 4.1.2). ``use_pose=False`` at call time drops it (ablation);
- **ground-distance bias** (``world_bias``): every token's centre ray is intersected with
  the ground plane (``ground_points``: a pinhole of focal ``focal_px`` and the plane
  ``z = plane_z``, StreamWorld's ground), and each head adds ``-softplus(gamma_h) * |X_q -
  X_k|^2 / world_sigma^2`` to its attention logits, so a chunk token finds the context tokens
  that saw the same place, however long ago and from wherever in the frame. ``gamma`` is
  learned per head and layer (initialised from sharply local to nearly global). Like the pose
  code it depends on poses only and touches the logits, never the values. This is an addition
  to RELIC, which relies on the learned pose code alone;
- **re-projected anchor** (``reproject``): the anchor, seen from ``anchor_pose``, is re-rendered
  from each chunk frame's pose through the ground plane (``reproject``, a homography), embedded
  with its coverage mask, and the network predicts ``x0`` as a residual over it: where the
  camera only moved, the chunk starts from the previous view moved with the camera; what comes
  into view, what moves and what stands off the ground (StreamWorld's foliage layer) is the
  network's to fill, from the memory. This departs from RELIC (which denoises from the context
  alone) in the manner of geometry-conditioned generators (rendered caches as conditioning).
  Several anchors ``(B, K, 3, H, W)`` with poses ``(B, K, 4, 4)`` are composited in order: each
  pixel comes from the first anchor whose re-projection covers it (the pipeline puts the newest
  observed real frame ahead of the newest generated one);
- **camera action** of each new frame (13-d, ``streammem.world.scene.ACTION_LAYOUT``) is
  embedded and added to that frame's tokens **after self-attention** in every block (RELIC);
- **flow time** and **prompt** modulate every block (adaLN, as DiT): the prompt is a short
  sequence of ids in a small learned vocabulary (``vocab``; id 0 is the empty prompt, used for
  prompt dropout), averaged over non-empty ids. The default vocabulary is StreamWorld's preset
  words; any word list can be configured.

Flow matching (diffusers' ``FlowMatchEulerDiscreteScheduler`` convention): ``x_s = (1 - s) x0 +
s eps`` with ``s`` in [0, 1] (1 is pure noise), timestep ``1000 * s``. The network predicts the
clean chunk ``x0_hat`` and ``forward`` returns the velocity ``v = (x_s - x0_hat) / max(s,
min_sigma)``, trained against ``v = eps - x0`` (x-prediction with a v-loss, as JiT, arXiv
2511.13720: a patch of ``3 p^2`` pixels may be wider than the model, and a network that must
reproduce the noise through that bottleneck leaves noise in its samples; the clean image lies
on a low-dimensional manifold and passes). ``sample_chunk`` integrates with the scheduler's
Euler steps.

Shapes: ``forward(sample (B, F, 3, H, W), timestep (B,), actions (B, F, 13), poses (B, F, 4, 4),
prompt_ids (B, L), context: ChunkContext | None, anchor (B, 3, H, W) | None) -> (B, F, 3, H, W)``.

Example:
    >>> import torch
    >>> m = CausalVideoDiT(sample_size=16, patch_size=4, dim=32, num_layers=1, num_heads=2)
    >>> x = torch.randn(1, 2, 3, 16, 16)
    >>> poses = torch.eye(4).expand(1, 2, 4, 4)
    >>> m(x, torch.tensor([500.0]), torch.zeros(1, 2, 13), poses, torch.tensor([[1]])).shape
    torch.Size([1, 2, 3, 16, 16])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from streammem.types import Tokens

__all__ = ["CausalVideoDiT", "ChunkContext", "PreparedContext", "PreparedAnchor", "sample_chunk", "ground_points", "reproject", "DEFAULT_VOCAB", "ACTION_DIM"]

ACTION_DIM = 13
DEFAULT_VOCAB = ("<empty>", "<unk>", "clean", "medium", "hard")


def fourier(x: torch.Tensor, n_freq: int) -> torch.Tensor:
    """``(..., C) -> (..., C * (1 + 2 n_freq))``: x, sin and cos at ``pi * 2**k``, k < n_freq."""
    freqs = math.pi * 2.0 ** torch.arange(n_freq, dtype=x.dtype, device=x.device)
    ang = x[..., None] * freqs
    return torch.cat([x, ang.sin().flatten(-2), ang.cos().flatten(-2)], -1)


def _intrinsics(focal: float, size: int) -> torch.Tensor:
    return torch.tensor([[focal, 0.0, size / 2], [0.0, focal, size / 2], [0.0, 0.0, 1.0]])


def ground_points(pose: torch.Tensor, uv: torch.Tensor, focal: float, size: int, plane_z: float = 0.0) -> torch.Tensor:
    """Where the rays through pixels ``uv (..., 2)`` (column, row; pixel centres at integers) of
    cameras ``pose (..., 4, 4)`` (camera-to-world, pinhole looking along +z, focal length
    ``focal`` px, principal point at ``size / 2``) meet the plane ``z = plane_z``: ``(..., 2)``
    world (x, y)."""
    ki = torch.linalg.inv(_intrinsics(focal, size)).to(uv)
    ray = torch.cat([uv, torch.ones_like(uv[..., :1])], -1) @ ki.T  # (..., 3) camera frame
    d = (pose[..., :3, :3] @ ray[..., None])[..., 0]
    c = pose[..., :3, 3]
    t = (plane_z - c[..., 2:3]) / d[..., 2:3]
    return (c + t * d)[..., :2]


def reproject(image: torch.Tensor, pose_src: torch.Tensor, pose_dst: torch.Tensor, focal: float,
              plane_z: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-render ``image (B, 3, H, W)``, seen from ``pose_src (B, 4, 4)``, from ``pose_dst (B, 4, 4)``
    through the plane ``z = plane_z`` (a homography; bilinear). Returns the image and a
    ``(B, 1, H, W)`` mask of the pixels the source view covers (0 elsewhere, where the image is 0)."""
    b, _, h, w = image.shape
    v, u = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    uv = torch.stack([u, v], -1).reshape(1, -1, 2).expand(b, -1, 2)
    world = ground_points(pose_dst[:, None].float(), uv, focal, w, plane_z)  # (B, HW, 2)
    x = torch.cat([world, torch.full_like(world[..., :1], plane_z)], -1) - pose_src[:, None, :3, 3].float()
    cam = (pose_src[:, None, :3, :3].float().transpose(-1, -2) @ x[..., None])[..., 0]
    pix = cam @ _intrinsics(focal, w).T
    pix = pix[..., :2] / pix[..., 2:3]
    grid = torch.stack([pix[..., 0] / (w - 1) * 2 - 1, pix[..., 1] / (h - 1) * 2 - 1], -1).reshape(b, h, w, 2)
    out = F.grid_sample(image.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    valid = (grid.abs() <= 1 + 1e-4).all(-1)[:, None].float()
    return out * valid, valid


@dataclass
class ChunkContext:
    """Clean context tokens of a batch (what a memory returned), padded to one length.

    Attributes:
        tokens: ``(B, N, 3*p*p)`` pixel-patch features (pooled ones are means of patches).
        pose: ``(B, N, 4, 4)`` camera-to-world pose of each token's frame.
        grid: ``(B, N, 2)`` (row, col) in the full-resolution token grid (cell centres).
        level: ``(B, N)`` int64 pooling factor (1 = full resolution).
        mask: ``(B, N)`` bool, True for real tokens, False for padding.
    """

    tokens: torch.Tensor
    pose: torch.Tensor
    grid: torch.Tensor
    level: torch.Tensor
    mask: torch.Tensor

    def __post_init__(self) -> None:
        b, n = self.tokens.shape[:2]
        for name, shape in (("pose", (b, n, 4, 4)), ("grid", (b, n, 2)), ("level", (b, n)), ("mask", (b, n))):
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(f"ChunkContext.{name} must have shape {shape}, got {got}")

    def __len__(self) -> int:
        return self.tokens.shape[1]

    @classmethod
    def from_tokens(cls, items: Sequence[Tokens]) -> "ChunkContext":
        """Batch one ``Tokens`` per sample (a memory's ``read``), padding to the longest. A token's
        pooling factor is ``extras["pool"]`` where the memory gives it, else ``2 ** level``."""
        if not items:
            raise ValueError("ChunkContext.from_tokens needs at least one Tokens (one per batch sample)")
        for i, t in enumerate(items):
            if t.pose is None and len(t):
                raise ValueError(f"context Tokens {i} carry no pose; the model needs each token's camera pose")
        b, n, d = len(items), max(len(t) for t in items), items[0].features.shape[1]
        tokens, pose = torch.zeros(b, n, d), torch.eye(4).repeat(b, n, 1, 1)
        grid, level = torch.zeros(b, n, 2), torch.ones(b, n, dtype=torch.int64)
        mask = torch.zeros(b, n, dtype=torch.bool)
        for i, t in enumerate(items):
            k = len(t)
            if k == 0:
                continue
            if t.features.shape[1] != d:
                raise ValueError(f"context Tokens {i} have width {t.features.shape[1]}, expected {d}")
            tokens[i, :k], pose[i, :k], grid[i, :k] = t.features, t.pose, t.grid
            # pooling factor: PoseKVMemory names it in extras['pool']; otherwise 2 ** scale level
            level[i, :k], mask[i, :k] = t.extras.get("pool", 2 ** t.level), True
        return cls(tokens, pose, grid, level, mask)


@dataclass
class PreparedContext:
    """A chunk's context as the model reads it (:meth:`CausalVideoDiT.prepare_context`): per
    block ``(keys, values)`` ``(B, N, D)``, ``mask (B, N)``, the tokens' ground points
    ``(B, N, 2)`` (None without the ground-distance bias) and whether the pose code is in."""

    kv: list
    mask: torch.Tensor
    ground: torch.Tensor | None
    use_pose: bool


@dataclass
class PreparedAnchor:
    """A chunk's re-projected anchor (:meth:`CausalVideoDiT.prepare_anchor`): ``base (B, F, 3,
    H, W)``, the anchor seen from each frame's pose, and ``mask (B, F, h*w, p*p)``, the pixels
    it covers, per patch."""

    base: torch.Tensor
    mask: torch.Tensor


class _Attention(nn.Module):
    """Multi-head attention of chunk tokens over [context; chunk]; pose code on q and k only."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        self.pose_q = nn.Linear(dim, dim, bias=False)
        self.pose_k = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def context_kv(self, ctx, ctx_pose):
        """Keys and values ``(B, N, D)`` of normalised context tokens (pose code on keys only)."""
        kc, vc = self.to_k(ctx), self.to_v(ctx)
        if ctx_pose is not None:
            kc = kc + self.pose_k(ctx_pose)
        return kc, vc

    def forward(self, x, x_pose, ctx_kv, ctx_mask, bias=None):
        """``x (B, M, D)`` normalised chunk tokens, ``ctx_kv`` the context's ``(keys, values)``
        (:meth:`context_kv`) or None, ``x_pose`` the chunk's pose codes (or None), ``ctx_mask
        (B, N)``, ``bias (B, heads, M, N + M)`` added to the attention logits (or None)."""
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        if x_pose is not None:
            q, k = q + self.pose_q(x_pose), k + self.pose_k(x_pose)
        attn_mask = None
        if ctx_kv is not None:
            kc, vc = ctx_kv
            k, v = torch.cat([kc, k], 1), torch.cat([vc, v], 1)
            if not bool(ctx_mask.all()):
                keep = torch.cat([ctx_mask, ctx_mask.new_ones(x.shape[0], x.shape[1])], 1)
                attn_mask = keep[:, None, None, :]
        if bias is not None:
            attn_mask = bias if attn_mask is None else bias.masked_fill(~attn_mask, float("-inf"))
        out = F.scaled_dot_product_attention(self.split(q), self.split(k), self.split(v), attn_mask=attn_mask)
        return self.to_out(out.transpose(1, 2).reshape(x.shape))


class _Block(nn.Module):
    """adaLN-modulated attention + action add + MLP (DiT block with RELIC's action add)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, world_bias: bool = False):
        super().__init__()
        if world_bias:  # heads from sharply local (softplus(2) = 2.1) to nearly global (softplus(-6))
            self.world_gamma = nn.Parameter(torch.linspace(2.0, -6.0, heads))
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.norm_ctx = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, heads)
        self.action = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.ada = nn.Linear(dim, 6 * dim)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def context_kv(self, ctx, ctx_pose):
        """This block's keys and values of the context tokens (fixed for a chunk's every step)."""
        return self.attn.context_kv(self.norm_ctx(ctx), ctx_pose)

    def forward(self, x, x_pose, cond, act, ctx_kv, ctx_mask, dist=None):
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(F.silu(cond))[:, None].chunk(6, -1)
        h = self.norm1(x) * (1 + sc1) + sh1
        bias = None
        if dist is not None:  # ground-distance bias: -softplus(gamma_h) * |X_q - X_k|^2 / sigma^2
            bias = -F.softplus(self.world_gamma)[None, :, None, None] * dist[:, None]
        x = x + g1 * self.attn(h, x_pose, ctx_kv, ctx_mask, bias)
        x = x + self.action(act)  # camera action, after self-attention
        return x + g2 * self.mlp(self.norm2(x) * (1 + sc2) + sh2)


class CausalVideoDiT(ModelMixin, ConfigMixin):
    """Chunk-wise image-to-video flow-matching transformer over pixel patches (see module doc).

    Args:
        sample_size: frame side H = W in pixels.
        patch_size: p; tokens per frame ``(H/p)**2``.
        dim, num_layers, num_heads, mlp_ratio: transformer width, depth, heads, MLP expansion.
        chunk_frames: frames generated per chunk (the training chunk; any F works at call time).
        vocab: prompt words; id 0 is the empty prompt, id 1 unknown words.
        pose_scale: multiplies pose translations before the Fourier features (StreamWorld
            poses are in canvas pixels: 1/512 makes one unit the view width at zoom 0).
        pose_freqs, grid_freqs: Fourier octaves of the pose and grid-position features.
        min_sigma: the noise level below which ``v = (x_s - x0_hat) / s`` divides by it instead.
        reproject: re-render the anchor from each chunk frame's pose through the ground plane
            (needs ``anchor_pose`` at call time; see the module docstring).
        world_bias: add the ground-distance bias to every attention logit.
        focal_px, plane_z: the pinhole focal length in pixels (principal point at the image
            centre) and the ground plane ``z`` used by ``reproject`` and ``world_bias``
            (StreamWorld at 64 px: 125 px, z = 0).
        world_sigma: ground distance (world units) that scales the bias (StreamWorld: one
            8-px patch at zoom 0 spans 64 world px).
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int = 64,
        patch_size: int = 8,
        dim: int = 128,
        num_layers: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 3.0,
        chunk_frames: int = 2,
        vocab: Sequence[str] = DEFAULT_VOCAB,
        pose_scale: float = 1 / 512,
        pose_freqs: int = 6,
        grid_freqs: int = 4,
        min_sigma: float = 0.05,
        reproject: bool = False,
        world_bias: bool = False,
        focal_px: float = 125.0,
        plane_z: float = 0.0,
        world_sigma: float = 64.0,
    ):
        super().__init__()
        if sample_size % patch_size:
            raise ValueError(f"sample_size {sample_size} must be a multiple of patch_size {patch_size}")
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be a multiple of num_heads {num_heads}")
        if len(vocab) < 2:
            raise ValueError("vocab needs at least the empty and unknown words")
        self.grid_side = sample_size // patch_size
        self.patch_dim = 3 * patch_size * patch_size
        self.patch_embed = nn.Linear(self.patch_dim, dim)
        self.ctx_embed = nn.Linear(self.patch_dim, dim)
        # a re-projected anchor comes with its coverage mask (one more channel)
        self.anchor_embed = nn.Linear(self.patch_dim + (patch_size ** 2 if reproject else 0), dim)
        self.level_embed = nn.Embedding(8, dim)  # pooling factor -> log2 index (1, 2, 4, ... 128)
        gdim = 2 * (1 + 2 * grid_freqs)
        self.grid_embed = nn.Linear(gdim, dim)
        pdim = 12 * (1 + 2 * pose_freqs) + gdim
        self.pose_mlp = nn.Sequential(nn.Linear(pdim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_mlp = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.prompt_embed = nn.Embedding(len(vocab), dim)
        self.action_mlp = nn.Sequential(nn.Linear(ACTION_DIM, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(_Block(dim, num_heads, mlp_ratio, world_bias) for _ in range(num_layers))
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Linear(dim, 2 * dim)
        self.proj_out = nn.Linear(dim, self.patch_dim)
        for lin in (self.ada_out, self.proj_out):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        self.word_index = {w: i for i, w in enumerate(vocab)}

    # ------------------------------------------------------------------ pixels <-> tokens
    def patchify(self, frames: torch.Tensor) -> torch.Tensor:
        """``(..., 3, H, W) -> (..., h*w, 3*p*p)`` row-major patches."""
        p, s = self.config.patch_size, self.grid_side
        lead = frames.shape[:-3]
        x = frames.reshape(-1, 3, s, p, s, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(*lead, s * s, self.patch_dim)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(..., h*w, 3*p*p) -> (..., 3, H, W)``."""
        p, s = self.config.patch_size, self.grid_side
        lead = tokens.shape[:-2]
        x = tokens.reshape(-1, s, s, 3, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(*lead, 3, s * p, s * p)

    def frame_tokens(self, frame: torch.Tensor, pose, frame_index: int, timestamp: float) -> Tokens:
        """Memory tokens of one clean frame ``(3, H, W)`` in [-1, 1]: ``(h*w, 3*p*p)`` patches, row-major."""
        s = self.grid_side
        patches = self.patchify(frame.detach().float().cpu())
        return Tokens.from_grid(patches.reshape(s, s, -1), frame_index=frame_index, timestamp=timestamp,
                                pose=torch.as_tensor(np.asarray(pose), dtype=torch.float32))

    def prompt_ids(self, prompt: str | Sequence[str], length: int = 4) -> torch.Tensor:
        """Word ids ``(length,)`` of a prompt (split on spaces; unknown words -> 1; 0 pads)."""
        words = prompt.split() if isinstance(prompt, str) else list(prompt)
        ids = [self.word_index.get(w.lower(), 1) for w in words][:length]
        return torch.tensor(ids + [0] * (length - len(ids)), dtype=torch.int64)

    # ------------------------------------------------------------------ embeddings
    def _grid_features(self, grid: torch.Tensor) -> torch.Tensor:
        return fourier(grid / self.grid_side * 2 - 1, self.config.grid_freqs)

    def pose_code(self, pose: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """``pose (..., 4, 4)``, ``grid (..., 2)`` -> pose code ``(..., dim)`` (added to q, k)."""
        p = pose[..., :3, :].clone()
        p[..., 3] = p[..., 3] * self.config.pose_scale
        feats = torch.cat([fourier(p.flatten(-2), self.config.pose_freqs), self._grid_features(grid)], -1)
        return self.pose_mlp(feats)

    def _time_embed(self, timestep: torch.Tensor) -> torch.Tensor:
        half = 128
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        ang = timestep.float()[:, None] * freqs
        return self.time_mlp(torch.cat([ang.cos(), ang.sin()], -1))

    def _prompt_embed(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        e = self.prompt_embed(prompt_ids)
        keep = (prompt_ids > 0).float()[..., None]
        n = keep.sum(1)
        mean = (e * keep).sum(1) / n.clamp_min(1)
        return torch.where(n > 0, mean, self.prompt_embed.weight[0].expand_as(mean))

    def _token_ground(self, pose: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """Ground point ``(..., 2)`` under the centre of each token (``grid`` in full-resolution
        token units, pooled cells at their centres)."""
        p = self.config.patch_size
        uv = grid.flip(-1).float() * p + (p - 1) / 2  # (row, col) -> pixel (u, v)
        return ground_points(pose.float(), uv, self.config.focal_px, self.config.sample_size, self.config.plane_z)

    def _ground_distance(self, poses: torch.Tensor, grid: torch.Tensor, ctx_ground: torch.Tensor | None) -> torch.Tensor:
        """Squared ground distance / world_sigma^2 from each chunk token to each key
        (``[context; chunk]``; ``ctx_ground (B, N, 2)`` the context tokens' ground points):
        ``(B, F*hw, N + F*hw)``."""
        b, f = poses.shape[:2]
        hw = grid.shape[0]
        q = self._token_ground(poses[:, :, None].expand(b, f, hw, 4, 4), grid.expand(b, f, hw, 2)).reshape(b, f * hw, 2)
        keys = q if ctx_ground is None else torch.cat([ctx_ground, q], 1)
        return torch.cdist(q, keys).square() / self.config.world_sigma ** 2

    def prepare_context(self, context: ChunkContext | None, use_pose: bool = True) -> "PreparedContext | None":
        """What every denoising step of a chunk reads from its context, computed once: each
        block's keys and values of the context tokens, their mask and ground points. ``forward``
        takes it in place of the :class:`ChunkContext` (same result); None for no context."""
        if context is None or len(context) == 0:
            return None
        lvl = torch.log2(context.level.float().clamp_min(1)).round().long().clamp(0, 7)
        ctx = self.ctx_embed(context.tokens) + self.grid_embed(self._grid_features(context.grid)) + self.level_embed(lvl)
        ctx_pose = self.pose_code(context.pose, context.grid) if use_pose else None
        ground = self._token_ground(context.pose, context.grid) if self.config.world_bias and use_pose else None
        return PreparedContext([blk.context_kv(ctx, ctx_pose) for blk in self.blocks], context.mask, ground, use_pose)

    def prepare_anchor(self, anchor: torch.Tensor, anchor_pose: torch.Tensor | None,
                       poses: torch.Tensor) -> "PreparedAnchor":
        """The anchor re-projected to each frame's pose ``poses (B, F, 4, 4)`` with its coverage
        mask, what every denoising step of a chunk reads: ``anchor (B, 3, H, W)`` at
        ``anchor_pose (B, 4, 4)``, or ``K`` anchors ``(B, K, 3, H, W)`` at ``(B, K, 4, 4)``
        composited first-covering-first (see the module docstring). ``forward`` takes it in
        place of the anchor (same result)."""
        if not self.config.reproject:
            raise ValueError("this model does not re-project its anchor: pass the anchor itself")
        b, f = poses.shape[:2]
        size = self.config.sample_size
        several = anchor.ndim == 5
        if tuple(anchor.shape[-3:]) != (3, size, size) or anchor.shape[0] != b or anchor.ndim not in (4, 5):
            raise ValueError(f"anchor must be {(b, 3, size, size)} (or {(b, 'K', 3, size, size)}), "
                             f"got {tuple(anchor.shape)}")
        anchors = anchor if several else anchor[:, None]
        k = anchors.shape[1]
        if anchor_pose is None or tuple(anchor_pose.shape) != ((b, k, 4, 4) if several else (b, 4, 4)):
            raise ValueError(f"this model re-projects its anchor: pass anchor_pose of shape {(b, 4, 4)}"
                             f" (or {(b, k, 4, 4)} for {k} anchors)")
        apose = anchor_pose if several else anchor_pose[:, None]
        warped = valid = None
        for i in reversed(range(k)):  # the first anchor that covers a pixel gives it
            w_i, v_i = reproject(anchors[:, i].repeat_interleave(f, 0), apose[:, i].repeat_interleave(f, 0),
                                 poses.reshape(b * f, 4, 4), self.config.focal_px, self.config.plane_z)
            warped = w_i if warped is None else torch.where(v_i > 0, w_i, warped)
            valid = v_i if valid is None else torch.maximum(valid, v_i)
        p, s = self.config.patch_size, self.grid_side
        mask = valid.reshape(b, f, 1, s, p, s, p).permute(0, 1, 3, 5, 2, 4, 6).reshape(b, f, s * s, p * p)
        return PreparedAnchor(warped.reshape(b, f, 3, size, size), mask)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        actions: torch.Tensor,
        poses: torch.Tensor,
        prompt_ids: torch.Tensor,
        context: "ChunkContext | PreparedContext | None" = None,
        anchor: torch.Tensor | None = None,
        use_pose: bool = True,
        anchor_pose: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Velocity ``v`` (estimate of ``eps - x0``) for a noisy chunk at ``timestep = 1000 s``
        (see the module docstring for shapes): ``(sample - x0_hat) / max(s, min_sigma)``.
        ``anchor_pose (B, 4, 4)`` is the anchor's camera pose (needed when ``reproject``); a
        re-projecting model also takes ``K`` anchors ``(B, K, 3, H, W)`` with poses
        ``(B, K, 4, 4)``, composited first-covering-first (see the module docstring)."""
        b, f = sample.shape[:2]
        s, d = self.grid_side, self.config.dim
        if tuple(sample.shape[2:]) != (3, s * self.config.patch_size, s * self.config.patch_size):
            raise ValueError(f"sample must be (B, F, 3, {self.config.sample_size}, {self.config.sample_size}), "
                             f"got {tuple(sample.shape)}")
        if tuple(actions.shape) != (b, f, ACTION_DIM) or tuple(poses.shape) != (b, f, 4, 4):
            raise ValueError(f"actions must be {(b, f, ACTION_DIM)} and poses {(b, f, 4, 4)}, "
                             f"got {tuple(actions.shape)} and {tuple(poses.shape)}")
        hw = s * s
        ys, xs = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
        grid = torch.stack([ys.reshape(-1), xs.reshape(-1)], 1).float()  # (hw, 2)
        x = self.patch_embed(self.patchify(sample)) + self.grid_embed(self._grid_features(grid))  # (B, F, hw, D)
        base = None  # the re-projected anchor: x0_hat is predicted as a residual over it
        if anchor is not None:
            if self.config.reproject:
                if not isinstance(anchor, PreparedAnchor):
                    anchor = self.prepare_anchor(anchor, anchor_pose, poses)
                if tuple(anchor.base.shape) != tuple(sample.shape):
                    raise ValueError(f"the prepared anchor is for {tuple(anchor.base.shape)}, the sample is "
                                     f"{tuple(sample.shape)}")
                base = anchor.base
                x = x + self.anchor_embed(torch.cat([self.patchify(base), anchor.mask], -1))
            else:
                if tuple(anchor.shape) != (b, *sample.shape[2:]):
                    raise ValueError(f"anchor must be {(b, *sample.shape[2:])}, got {tuple(anchor.shape)}")
                x = x + self.anchor_embed(self.patchify(anchor))[:, None]
        x = x.reshape(b, f * hw, d)
        x_pose = None
        if use_pose:
            x_pose = self.pose_code(poses[:, :, None].expand(b, f, hw, 4, 4), grid.expand(b, f, hw, 2))
            x_pose = x_pose.reshape(b, f * hw, d)
        act = self.action_mlp(actions)[:, :, None].expand(b, f, hw, d).reshape(b, f * hw, d)
        timestep = timestep.expand(b) if timestep.ndim == 0 else timestep
        cond = self._time_embed(timestep) + self._prompt_embed(prompt_ids)
        if isinstance(context, ChunkContext):
            context = self.prepare_context(context, use_pose)
        if context is not None and context.use_pose != use_pose:
            raise ValueError(f"the prepared context was made with use_pose={context.use_pose}, called with {use_pose}")
        kv = [None] * len(self.blocks) if context is None else context.kv
        ctx_mask = None if context is None else context.mask
        dist = None
        if self.config.world_bias and use_pose:
            dist = self._ground_distance(poses, grid, None if context is None else context.ground)
        for blk, ctx_kv in zip(self.blocks, kv):
            x = blk(x, x_pose, cond, act, ctx_kv, ctx_mask, dist)
        sh, sc = self.ada_out(F.silu(cond))[:, None].chunk(2, -1)
        out = self.proj_out(self.norm_out(x) * (1 + sc) + sh)
        x0_hat = self.unpatchify(out.reshape(b, f, hw, self.patch_dim))
        if base is not None:
            x0_hat = x0_hat + base
        sigma = (timestep.float() / 1000).clamp_min(self.config.min_sigma).view(b, 1, 1, 1, 1)
        return (sample - x0_hat) / sigma


@torch.no_grad()
def sample_chunk(
    model: CausalVideoDiT,
    actions: torch.Tensor,
    poses: torch.Tensor,
    prompt_ids: torch.Tensor,
    context: "ChunkContext | PreparedContext | None",
    anchor: torch.Tensor | None = None,
    num_inference_steps: int = 8,
    generator: torch.Generator | None = None,
    scheduler: FlowMatchEulerDiscreteScheduler | None = None,
    use_pose: bool = True,
    callback: Callable[[int, torch.Tensor], None] | None = None,
    anchor_pose: torch.Tensor | None = None,
) -> torch.Tensor:
    """Generate one chunk ``(B, F, 3, H, W)`` in [-1, 1] with Euler flow-matching steps.

    ``actions (B, F, 13)`` and ``poses (B, F, 4, 4)`` are the new frames' camera actions and
    absolute poses; ``context`` the clean past (``ChunkContext.from_tokens(memory reads)``);
    ``anchor (B, 3, H, W)`` the newest clean frame (start image, then the last generated one),
    ``anchor_pose (B, 4, 4)`` its camera pose (for a model that re-projects its anchor, which
    also takes several anchors ``(B, K, 3, H, W)`` and poses ``(B, K, 4, 4)``).
    ``scheduler`` defaults to ``FlowMatchEulerDiscreteScheduler(shift=1.0)``.
    """
    b, f = actions.shape[:2]
    size = model.config.sample_size
    sched = scheduler or FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    sched.set_timesteps(num_inference_steps)
    x = torch.randn(b, f, 3, size, size, generator=generator)
    if isinstance(context, ChunkContext):  # the context's keys and values are the same at every step
        context = model.prepare_context(context, use_pose)
    if anchor is not None and model.config.reproject and not isinstance(anchor, PreparedAnchor):
        anchor = model.prepare_anchor(anchor, anchor_pose, poses)  # and so is the re-projected anchor
    for i, t in enumerate(sched.timesteps):
        v = model(x, t.expand(b), actions, poses, prompt_ids, context, anchor, use_pose=use_pose, anchor_pose=anchor_pose)
        x = sched.step(v, t, x).prev_sample
        if callback is not None:
            callback(i, x)
    return x.clamp(-1, 1)
