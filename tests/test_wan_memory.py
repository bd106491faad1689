"""diffusers' Wan transformer with a PoseKVMemory as its KV cache (streammem.models.wan_memory),
on the tiny random Wan configuration diffusers' own tests use; nothing is downloaded."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanAttnProcessor
from transformers import DynamicCache

from streammem.memory.posekv import sinusoidal_pose_embedding
from streammem.memory.posekv_cache import PoseKVCache
from streammem.models.wan_memory import WanMemoryRollout, cache_for, pose_kv_attention, wan_rope

HW = 8 * 8  # tokens per latent frame: 16 x 16 latents, patch 2 x 2


def tiny_wan() -> WanTransformer3DModel:
    torch.manual_seed(0)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                                 out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2,
                                 cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32).eval()


@pytest.fixture(scope="module")
def wan() -> WanTransformer3DModel:
    return tiny_wan()


def seeded(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def poses(n: int, start: float) -> torch.Tensor:
    p = torch.eye(4).repeat(n, 1, 1)
    p[:, 0, 3] = start + torch.arange(n, dtype=torch.float32)
    return p


TEXT = seeded(1, 12, 16, seed=99)


def run(wan: WanTransformer3DModel, x: torch.Tensor, t: float | torch.Tensor, cache: PoseKVCache | None = None,
        write: bool = False) -> torch.Tensor:
    timestep = t if isinstance(t, torch.Tensor) else torch.tensor([t])
    kwargs = {} if cache is None else {"attention_kwargs": {"kv_cache": cache}}
    with torch.no_grad():
        if write:
            with cache.writing():
                return wan(x, timestep=timestep, encoder_hidden_states=TEXT, **kwargs).sample
        return wan(x, timestep=timestep, encoder_hidden_states=TEXT, **kwargs).sample


class MaskedStock:
    """diffusers' stock WanAttnProcessor with a fixed self-attention mask (the reference)."""

    def __init__(self, mask: torch.Tensor) -> None:
        self.stock, self.mask = WanAttnProcessor(), mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return self.stock(attn, hidden_states, encoder_hidden_states, self.mask, rotary_emb)


def test_rope_at_whole_positions_is_the_models_table(wan):
    pos = torch.arange(32, dtype=torch.float64)[:, None].expand(32, 3)
    cos, sin = wan_rope(wan.rope, pos)
    assert torch.equal(cos[0, :, 0], wan.rope.freqs_cos) and torch.equal(sin[0, :, 0], wan.rope.freqs_sin)


def test_empty_cache_reproduces_the_stock_processor_and_the_stock_processors_come_back(wan):
    x = seeded(1, 4, 2, 16, 16, seed=1)
    stock = run(wan, x, 500.0)
    with pose_kv_attention(wan):
        no_cache = run(wan, x, 500.0)
        empty = run(wan, x, 500.0, cache_for(wan, 16, 16, window=2, history_frames=18, pose_embed="none"))
        posed = cache_for(wan, 16, 16, window=2, history_frames=18, pose_embed="sinusoidal")
        posed.set_chunk(poses(2, 3.0))
        with_pose = run(wan, x, 500.0, posed)
    assert torch.equal(empty, stock) and torch.equal(no_cache, stock)
    assert (with_pose - stock).abs().max() > 1e-3  # the pose embedding reaches queries and keys
    assert all(type(b.attn1.processor) is WanAttnProcessor for b in wan.blocks)


def test_chunk2_over_cached_chunk1_equals_the_stock_model_on_both_chunks_with_a_causal_chunk_mask(wan):
    """Exact reference: the stock model on [chunk 1 ; chunk 2] (per-token timesteps: chunk 1 at
    its clean-pass timestep, chunk 2 at its denoising timestep), chunk 1 attending to itself,
    chunk 2 to both; RoPE at absolute frames 0..3 there, relative to chunk 2 here."""
    c1, c2 = seeded(1, 4, 2, 16, 16, seed=2), seeded(1, 4, 2, 16, 16, seed=3)
    t1, t2 = 0.0, 700.0
    cache = cache_for(wan, 16, 16, window=4, history_frames=18, pose_embed="none")
    with pose_kv_attention(wan):
        o1 = run(wan, c1, t1, cache, write=True)
        assert cache.get_seq_length(0) == cache.get_seq_length(1) == 2 * HW
        o2 = run(wan, c2, t2, cache)
        assert cache.get_seq_length(0) == 2 * HW  # reading does not write
        memoryless = run(wan, c2, t2, cache_for(wan, 16, 16, window=4, history_frames=18, pose_embed="none"))
    chunk = torch.arange(4 * HW) // (2 * HW)
    mask = chunk[None, :] <= chunk[:, None]
    timestep = torch.cat([torch.full((2 * HW,), t1), torch.full((2 * HW,), t2)])[None]
    for block in wan.blocks:
        block.attn1.set_processor(MaskedStock(mask))
    try:
        ref = run(wan, torch.cat([c1, c2], 2), timestep)
    finally:
        for block in wan.blocks:
            block.attn1.set_processor(WanAttnProcessor())
    torch.testing.assert_close(o1, ref[:, :, :2], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(o2, ref[:, :, 2:], atol=2e-5, rtol=1e-4)
    assert (o2 - memoryless).abs().max() > 1e-2  # chunk 2 really reads chunk 1


def test_pose_embedding_goes_to_queries_and_keys_never_values(wan, monkeypatch):
    import diffusers.models.attention_dispatch as dispatch

    seen = []
    real = dispatch.dispatch_attention_fn

    def spy(q, k, v, **kw):
        seen.append((q.clone(), k.clone(), v.clone()))
        return real(q, k, v, **kw)

    monkeypatch.setattr(dispatch, "dispatch_attention_fn", spy)
    cache = cache_for(wan, 16, 16, window=4, history_frames=18, pose_embed="none")
    held, now = poses(2, 0.0), poses(2, 5.0)
    x = seeded(1, 4, 2, 16, 16, seed=4)
    with pose_kv_attention(wan):
        cache.set_chunk(held)
        run(wan, seeded(1, 4, 2, 16, 16, seed=5), 0.0, cache, write=True)
        cache.set_chunk(now)
        seen.clear()
        run(wan, x, 300.0, cache)
        plain = seen[0]
        cache.pose_embed_fn = lambda p: sinusoidal_pose_embedding(p, 12)  # the same held tokens, now with poses
        cache.set_chunk(now)
        seen.clear()
        run(wan, x, 300.0, cache)
        posed = seen[0]
    (q0, k0, v0), (q1, k1, v1) = plain, posed
    e_now = cache.embed_pose(now).repeat_interleave(HW, 0)[None, :, None, :]
    e_held = cache.embed_pose(held).repeat_interleave(HW, 0)[None, :, None, :]
    assert torch.equal(v1, v0)
    torch.testing.assert_close(q1 - q0, e_now.expand_as(q0), atol=1e-6, rtol=0)
    torch.testing.assert_close(k1 - k0, torch.cat([e_held, e_now], 1).expand_as(k0), atol=1e-6, rtol=0)
    assert e_now.abs().sum() > 0 and not torch.equal(e_now, e_held)


def test_cache_stays_bounded_over_many_chunks(wan):
    cache = cache_for(wan, 16, 16, window=2, history_frames=18, pose_embed="sinusoidal")
    nbytes, held = cache.nbytes, []
    with pose_kv_attention(wan):
        for i in range(24):
            cache.set_chunk(poses(1, float(i)))
            run(wan, seeded(1, 4, 1, 16, 16, seed=10 + i), 0.0, cache, write=True)
            held.append((cache.get_seq_length(0), cache.get_seq_length(1), cache.num_tokens))
            assert cache.nbytes == nbytes
    full = 20  # window + history frames
    assert held[full - 1] == (cache.capacity,) * 3 and all(h == held[full - 1] for h in held[full - 1:])
    assert cache.capacity < full * HW / 2  # the pooled history holds far fewer tokens than 20 frames
    stats = cache.stats()
    assert stats["frames_held"] == full and stats["frames_seen"] == 24 and stats["token_ratio"] > 2


def test_snapshot_restore_mid_rollout_continues_exactly(wan, tmp_path):
    def chunk(r: WanMemoryRollout, i: int) -> torch.Tensor:
        return r.generate_chunk(TEXT, poses(1, float(i)), num_frames=1, height=16, width=16,
                                generator=torch.Generator().manual_seed(i))

    fields = {"window": 2, "history_frames": 18}
    a = WanMemoryRollout(wan, num_inference_steps=2, **fields)
    for i in range(3):
        chunk(a, i)
    a.cache.save(tmp_path / "cache.safetensors")
    straight = [chunk(a, i) for i in (3, 4)]
    b = WanMemoryRollout(wan, FlowMatchEulerDiscreteScheduler(shift=3.0), PoseKVCache.load(tmp_path / "cache.safetensors"),
                         num_inference_steps=2)
    restored = [chunk(b, i) for i in (3, 4)]
    fresh = chunk(WanMemoryRollout(wan, num_inference_steps=2, **fields), 3)
    assert all(torch.equal(x, y) for x, y in zip(straight, restored))
    assert not torch.allclose(fresh, straight[0], atol=1e-4)
    with pytest.raises(ValueError, match="another configuration"):
        PoseKVCache(a.cache.config.__class__(**{**a.cache.config.__dict__, "window": 3})).load_state_dict(
            a.cache.state_dict())


def test_update_get_reset_per_layer_behave_like_dynamic_cache():
    ours = PoseKVCache(num_layers=2, heads=2, head_dim=4, height=2, width=3, window=8, history_frames=0,
                       pose_embed="none")
    ref = DynamicCache()
    chunks = [seeded(1, 2, 2 * 6, 4, seed=20 + i) for i in range(3)]
    with ours.writing():
        for k in chunks:
            got, want = ours.update(k, 2 * k, 0), ref.update(k, 2 * k, 0)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
            assert ours.get_seq_length(0) == ref.get_seq_length(0)
    assert ours.get_seq_length(1) == 0  # layers are independent
    held_k, held_v = ours[0].get()
    assert torch.equal(held_k, want[0]) and torch.equal(held_v, want[1])
    k = seeded(1, 2, 6, 4, seed=30)
    keys, _ = ours.update(k, k, 0)  # outside writing(): read, do not store
    assert torch.equal(keys, torch.cat([want[0], k], 2)) and ours.get_seq_length(0) == 36
    assert ours[0].positions()[:, 0].tolist() == [float(f) for f in range(6) for _ in range(6)]
    ours.reset()
    ref.reset()
    assert ours.get_seq_length(0) == 0 and len(ours) == 2
    with ours.writing():
        assert torch.equal(ours.update(k, k, 0)[0], ref.update(k, k, 0)[0])
    with pytest.raises(ValueError, match="whole latent frames"):
        with ours.writing():
            ours.update(k[:, :, :5], k[:, :, :5], 1)
    with pytest.raises(ValueError, match=r"batch=1, heads=2"):
        ours.update(torch.zeros(1, 3, 6, 4), torch.zeros(1, 3, 6, 4), 0)


def test_from_pretrained_loads_a_local_folder_and_refuses_other_specs(wan, tmp_path):
    wan.save_pretrained(tmp_path / "transformer")
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(tmp_path / "scheduler")
    loaded = WanMemoryRollout.from_pretrained(f"hf:{tmp_path}", device="cpu", num_inference_steps=1, window=2,
                                              history_frames=18)
    mine = WanMemoryRollout(wan, num_inference_steps=1, window=2, history_frames=18)
    out = [r.generate_chunk(TEXT, num_frames=1, height=16, width=16, generator=torch.Generator().manual_seed(0))
           for r in (loaded, mine)]
    assert torch.equal(out[0], out[1])
    with pytest.raises(ValueError, match="hf:"):
        WanMemoryRollout.from_pretrained("Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
