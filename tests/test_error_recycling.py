"""Error recycling (Stable Video Infinity): each injection site at its probability, the residual
formulas, what the step banks and where, the clean path, LoRA steps on diffusers' tiny Wan,
clip chaining's overlap handling, and the drift evaluation on a tiny model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import typer.main

from streammem.memory import ErrorBank
from streammem.models.video_dit import CausalVideoDiT
from streammem.pipelines.generation import GenerationConfig, StreamingGenerationPipeline
from streammem.train.error_recycling import (
    ErrorRecycler,
    ErrorRecyclingConfig,
    RecycleTrainConfig,
    draw_injections,
    make_accelerator,
    residual_errors,
    train_step,
)

N = 2000  # draws for the statistical checks
DIM = 3


def tol(p: float, n: int = N) -> float:
    """Five binomial standard deviations of a fraction (a seeded draw; generous but not vacuous)."""
    return 5 * (p * (1 - p) / n) ** 0.5 + 1e-9


class Probe:
    """A toy adapter: x0 from the batch, the model a constant velocity; it records what reached
    the conditioning and the model's input."""

    def __init__(self, velocity: float = 0.0, cond_draws: int = 1):
        self.model = torch.nn.Linear(1, 1)
        self.velocity, self.cond_draws = velocity, cond_draws
        self.cond_mask = self.cond_errors = self.x_t = None

    def clean(self, batch):
        return batch["x0"]

    def condition_draws(self, batch):
        return self.cond_draws

    def inject_condition(self, batch, errors, mask):
        self.cond_mask, self.cond_errors = mask.clone(), errors.clone()
        return batch

    def predict(self, batch, x_t, timestep):
        self.x_t = x_t.detach().clone()
        return torch.full_like(x_t, self.velocity) + 0 * self.model.weight.sum()


def filled_bank() -> ErrorBank:
    """Clean-side errors of bin b are all ``b + 1``; noise-side ones all ``1000``."""
    bank = ErrorBank(dim=DIM, num_bins=50, per_bin=2)
    t = bank.bin_timesteps
    for b in range(50):
        bank.add(torch.full((2, DIM), float(b + 1)), torch.full((2,), float(t[b])), side="clean")
        bank.add(torch.full((2, DIM), 1000.0), torch.full((2,), float(t[b])), side="noise")
    return bank


def test_draws_are_independent_at_the_configured_probabilities():
    cfg = ErrorRecyclingConfig()
    d = draw_injections(cfg, N, torch.Generator().manual_seed(0))
    frac = {k: v.float().mean().item() for k, v in d.items()}
    assert abs(frac["clean"] - 0.2) < tol(0.2)
    for site, p in (("cond", 0.9), ("latent", 0.9), ("noise", 0.01)):
        assert abs(frac[site] - 0.8 * p) < tol(0.8 * p), (site, frac[site])
        assert not bool((d[site] & d["clean"]).any())
    both = (d["cond"] & d["latent"]).float().mean().item()
    assert abs(both - 0.8 * 0.81) < tol(0.648)  # independent draws


def test_each_site_gets_its_error_at_its_rate_from_the_right_bins():
    """Through the step itself: x0 = 0, noise = 0, s fixed per sample, so the model's input is
    ``(1 - s) e_clean + s e_noise``: which sites were hit (and from which bin) is read off it."""
    probe = Probe()
    bank = filled_bank()
    rec = ErrorRecycler(probe, ErrorRecyclingConfig(), bank, seed=1)
    sigma = torch.rand(N, generator=torch.Generator().manual_seed(2)) * 0.9 + 0.05
    out = rec.loss({"x0": torch.zeros(N, DIM)}, sigma=sigma, noise=torch.zeros(N, DIM))
    s = sigma[:, None]
    noise_hit = (probe.x_t >= 500 * s).all(1)
    latent_part = (probe.x_t - noise_hit[:, None] * 1000 * s) / (1 - s)
    latent_hit = (latent_part > 0.5).all(1)
    frac = {"cond": probe.cond_mask.float().mean().item(), "latent": latent_hit.float().mean().item(),
            "noise": noise_hit.float().mean().item()}
    assert abs(frac["cond"] - 0.72) < tol(0.72) and abs(frac["latent"] - 0.72) < tol(0.72)
    assert abs(frac["noise"] - 0.008) < tol(0.008)
    nothing = ~(probe.cond_mask | latent_hit | noise_hit)
    assert abs(nothing.float().mean().item() - (0.2 + 0.8 * 0.1 * 0.1 * 0.99)) < tol(0.208)
    assert torch.equal(out.injected, ~nothing)
    # (b) the clean-latent error comes from the bin of the sample's own timestep
    want = bank.bin_of(sigma * 1000).float() + 1
    assert torch.allclose(latent_part[latent_hit, 0], want[latent_hit], atol=1e-3)
    # (a) the conditioning errors come from every bin
    drawn = probe.cond_errors[probe.cond_mask][:, 0, 0]
    assert len(torch.unique(drawn)) > 40
    # the target is the velocity toward the clean latent: eps' - x0, with the noise error in eps'
    assert torch.allclose(out.v[noise_hit], torch.full((int(noise_hit.sum()), DIM), 1000.0))
    assert torch.equal(out.v[~noise_hit], torch.zeros(int((~noise_hit).sum()), DIM))


def test_conditioning_errors_can_come_from_a_timestep_range():
    probe = Probe()
    bank = filled_bank()
    lo, hi = float(bank.bin_timesteps[45]), float(bank.bin_timesteps[40])
    rec = ErrorRecycler(probe, ErrorRecyclingConfig(cond_timesteps=(lo, hi)), bank, seed=1)
    rec.loss({"x0": torch.zeros(N, DIM)}, sigma=torch.full((N,), 0.5), noise=torch.zeros(N, DIM))
    drawn = torch.unique(probe.cond_errors[probe.cond_mask][:, 0, 0])
    assert drawn.tolist() == [float(b + 1) for b in range(40, 46)]
    with pytest.raises(ValueError, match="cond_timesteps"):
        ErrorRecyclingConfig(cond_timesteps=(500, 100))
    with pytest.raises(ValueError, match="at least one bin timestep"):
        ErrorRecyclingConfig(cond_timesteps=(0, 0.5))


def test_residuals_match_a_hand_computation():
    v_hat, v, s = torch.tensor([[3.0, -1.0]]), torch.tensor([[1.0, 1.0]]), torch.tensor([0.25])
    e_noise, e_clean = residual_errors(v_hat, v, s)
    assert torch.allclose(e_noise, torch.tensor([[1.5, -1.5]]))  # (1 - 0.25) * (2, -2)
    assert torch.allclose(e_clean, torch.tensor([[-0.5, 0.5]]))  # -0.25 * (2, -2)
    # they are the errors of one Euler step from x_t to either end
    x0, eps = torch.tensor([[0.2, -0.4]]), torch.tensor([[1.2, 0.6]])
    x_t = 0.75 * x0 + 0.25 * eps
    assert torch.allclose(x_t + 0.75 * v_hat - eps, e_noise)
    assert torch.allclose(x_t - 0.25 * v_hat - x0, e_clean)


def test_the_step_banks_its_errors_in_the_nearest_bin():
    probe = Probe(velocity=2.0, cond_draws=0)
    cfg = ErrorRecyclingConfig(clean_bank_prob=1.0)
    rec = ErrorRecycler(probe, cfg, ErrorBank(dim=DIM, per_bin=4), seed=0)
    sigma = torch.tensor([0.1, 0.3, 0.6, 0.9])
    x0, noise = torch.randn(4, DIM), torch.randn(4, DIM)
    out = rec.loss({"x0": x0}, sigma=sigma, noise=noise)
    assert not bool(out.injected.any())  # an empty bank has nothing to inject
    assert rec.bank(out) == 4
    bank = rec.error_bank
    d = 2.0 - (noise - x0)
    for i, s in enumerate(sigma.tolist()):
        b = int(bank.bin_of(1000 * s))
        assert bank.stats()["fill_noise"][b] == 1 and bank.stats()["fill_clean"][b] == 1
        assert torch.allclose(bank.errors[0, b, 0], (1 - s) * d[i], atol=1e-6)
        assert torch.allclose(bank.errors[1, b, 0], -s * d[i], atol=1e-6)
        assert bank.timesteps[1, b, 0].item() == pytest.approx(1000 * s)


def test_clean_input_is_banked_at_its_probability_and_injected_input_always():
    rec = ErrorRecycler(Probe(1.0, cond_draws=0), ErrorRecyclingConfig(clean_prob=1.0), ErrorBank(dim=DIM, per_bin=500),
                        seed=3)
    out = rec.loss({"x0": torch.zeros(N, DIM)})
    assert abs(rec.bank(out) / N - 0.1) < tol(0.1)
    cfg = ErrorRecyclingConfig(clean_prob=0.0, latent_prob=1.0, clean_bank_prob=0.0)
    rec = ErrorRecycler(Probe(1.0, cond_draws=0), cfg, filled_bank(), seed=3)
    out = rec.loss({"x0": torch.zeros(64, DIM)})
    assert bool(out.injected.all()) and rec.bank(out) == 64


def test_the_clean_path_injects_nothing_and_is_the_plain_loss():
    cfg = ErrorRecyclingConfig(clean_prob=1.0, cond_prob=1.0, latent_prob=1.0, noise_prob=1.0)
    probe = Probe(velocity=0.5)
    rec = ErrorRecycler(probe, cfg, filled_bank(), seed=0)
    x0, noise, sigma = torch.randn(32, DIM), torch.randn(32, DIM), torch.rand(32)
    out = rec.loss({"x0": x0}, sigma=sigma, noise=noise)
    assert probe.cond_mask is None and not bool(out.injected.any())
    assert torch.allclose(probe.x_t, (1 - sigma[:, None]) * x0 + sigma[:, None] * noise)
    assert out.loss.item() == pytest.approx(((0.5 - (noise - x0)) ** 2).mean().item(), rel=1e-5)
    plain = RecycleTrainConfig(mode="plain").recycling_config()
    assert (plain.cond_prob, plain.latent_prob, plain.noise_prob, plain.clean_prob, plain.clean_bank_prob) == \
        (0, 0, 0, 1, 0)


def test_lora_steps_on_the_tiny_wan_change_only_the_lora():
    from streammem.train.wan_lora import WanI2VAdapter, WanLoRAConfig, add_lora, tiny_wan_components

    parts = tiny_wan_components()
    tr = parts["transformer"]
    params = add_lora(tr, WanLoRAConfig(rank=4, alpha=4))
    lora = {n for n, p in tr.named_parameters() if "lora_" in n}
    assert lora and {n for n, p in tr.named_parameters() if p.requires_grad} == lora
    assert any(".attn1.to_q.lora_A" in n for n in lora) and any("ffn.net.2.lora_B" in n for n in lora)
    before = {n: p.detach().clone() for n, p in tr.named_parameters()}
    ad = WanI2VAdapter(tr, parts["vae"])
    g = torch.Generator().manual_seed(0)
    batch = ad.prepare(torch.rand(2, 3, 5, 16, 16, generator=g) * 2 - 1, torch.randn(2, 8, 32, generator=g))
    cfg = ErrorRecyclingConfig(clean_prob=0.0, cond_prob=1.0, clean_bank_prob=1.0)
    rec = ErrorRecycler(ad, cfg, seed=0)
    acc = make_accelerator()
    opt = torch.optim.AdamW(params, lr=1e-2)
    logs = [train_step(rec, batch, opt, acc, params) for _ in range(3)]
    assert all(np.isfinite(r["loss"]) for r in logs)
    assert logs[0]["injected"] == 0 and logs[1]["injected"] == 2  # step 1 fills the bank, step 2 replays it
    assert rec.error_bank.config.dim == batch["latents"][0].numel()
    changed = {n for n, p in tr.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= lora


def tiny_dit(seed: int = 0, size: int = 16, patch: int = 4) -> CausalVideoDiT:
    torch.manual_seed(seed)
    m = CausalVideoDiT(sample_size=size, patch_size=patch, dim=16, num_layers=1, num_heads=2,
                       vocab=("<empty>", "<unk>", "clean", "medium", "hard"))
    with torch.no_grad():
        for p in m.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return m.eval()


def test_clip_chaining_drops_the_overlap_and_conditions_on_the_last_frames():
    cfg = GenerationConfig(num_inference_steps=1, window=4, history_frames=0, chain_clip_frames=3, chain_frames=2,
                           chain_ref_pad=True)
    pipe = StreamingGenerationPipeline(tiny_dit(), cfg)
    reads = []
    read = pipe.memory.read

    def spy(query=None):
        out = read(query)
        reads.append(sorted(set(out.frame_index.tolist())))
        return out

    pipe.memory.read = spy
    img = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    out = pipe(img, actions="R" * 8, prompt=["clean", "medium", "hard"], progress=False)
    idx = [f.index for f in out.frames]
    assert idx == list(range(1, 9))  # no frame twice, none missing
    assert [f.timestamp for f in out.frames] == [i / cfg.fps for i in idx]
    assert [f.info["clip"] for f in out.frames] == [0, 0, 0, 1, 1, 1, 2, 2]
    assert [f.info["prompt"] for f in out.frames] == ["clean"] * 3 + ["medium"] * 3 + ["hard"] * 2
    assert len({f.info["seed"] for f in out.frames}) == out.chunks == 5  # clips of 3, 3, 2: chunks 2+1, 2+1, 2
    # chunk reads: clip 0 sees its own past; clips 1 and 2 start from the reference + the last 2 frames of
    # the clip before (then the window of 4 rolls on within the clip)
    assert reads == [[0], [0, 1, 2], [0, 2, 3], [2, 3, 4, 5], [0, 5, 6]]
    # a snapshot taken mid-clip (the last frames and the reference with it) continues exactly
    a = StreamingGenerationPipeline(tiny_dit(), cfg)
    a.start(img)
    list(a.stream("R" * 5, progress=False))
    b = StreamingGenerationPipeline(tiny_dit(), cfg)
    b.load_state_dict(a.state_dict())
    rest_a, rest_b = list(a.stream("R" * 5, progress=False)), list(b.stream("R" * 5, progress=False))
    assert [f.info["clip"] for f in rest_a] == [1, 2, 2, 2, 3]
    assert all(np.array_equal(x.image, y.image) and x.index == y.index for x, y in zip(rest_a, rest_b))
    # chaining off: the prompt stream is per chunk, as before
    plain = StreamingGenerationPipeline(tiny_dit(), GenerationConfig(num_inference_steps=1))
    out = plain(img, actions="R" * 4, prompt=["clean", "hard"], progress=False)
    assert [f.info["prompt"] for f in out.frames] == ["clean", "clean", "hard", "hard"]
    assert "clip" not in out.frames[0].info


def test_drift_eval_on_a_tiny_model_writes_metrics_and_plots(tmp_path):
    from streammem.eval.drift import METRICS, colour_drift, consistency, evaluate_drift, write_results

    a = np.random.default_rng(0).integers(0, 240, (8, 8, 3), dtype=np.uint8)
    assert colour_drift(a, a) == 0 and consistency(a, a) == pytest.approx(1.0)
    assert colour_drift(a + 10, a) == pytest.approx(10.0)  # means shift by 10, stds unchanged
    import cv2

    from streammem.eval.drift import detail

    t = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert detail(t, t) == pytest.approx(1.0) and detail([t, t], [t, t]) == pytest.approx(1.0)
    assert detail(cv2.GaussianBlur(t, (5, 5), 1.5), t) < 0.3  # blur loses detail
    soft = cv2.GaussianBlur(t, (5, 5), 1.5)
    noisy = np.clip(soft.astype(int) + np.random.default_rng(2).integers(-60, 60, t.shape), 0, 255).astype(np.uint8)
    assert detail(noisy, soft) > 2  # noise: more high-frequency energy than the truth
    res = evaluate_drift({"plain": tiny_dit(0, 32, 8), "recycled": tiny_dit(1, 32, 8)}, seeds=(20_000,), chunks=3,
                         steps=1, progress=False)
    for label in ("plain", "recycled"):
        for key in METRICS:
            assert len(res["curves"][label][key]) == 3 and np.isfinite(res["curves"][label][key]).all()
        r = res["summary"][label]
        assert r["psnr_degradation"] == pytest.approx(r["psnr_first"] - r["psnr_last"])
        assert r["colour_drift_degradation"] == pytest.approx(r["colour_drift_last"] - r["colour_drift_first"])
        assert r["seconds_per_chunk"] > 0
        for key in METRICS:  # one seed: its degradation is the degradation
            assert r[f"{key}_degradation_seeds"] == [pytest.approx(r[f"{key}_degradation"])]
    assert len(res["chunks"]) == 2 * 3
    with pytest.raises(ValueError, match="pan_speed"):
        evaluate_drift({"plain": tiny_dit(0, 32, 8)}, seeds=(20_000,), chunks=3, steps=1, progress=False, pan_speed=0)
    paths = write_results(res, tmp_path)
    for key in METRICS:
        assert paths[key].stat().st_size > 1000 and paths[key].read_bytes()[:4] == b"\x89PNG"
    text = paths["results"].read_text()
    assert "| plain |" in text and "time per chunk, recycled / plain" in text


def test_summarize_per_seed_with_edges_and_rows_without_detail(tmp_path):
    from streammem.eval.drift import loss, summarize, write_results

    # two seeds, 4 chunks, edge 2: seed 1 loses 1 dB per chunk, seed 2 gains 0.5 dB per chunk
    rows = []
    for seed, slope in ((1, -1.0), (2, 0.5)):
        for c in range(4):
            rows.append({"model": "plain", "seed": seed, "chunk": c, "seconds": 0.1, "psnr": 20 + slope * c,
                         "colour_drift": 1.0 + c, "consistency": 0.9, "gt_colour_drift": 1.0,
                         "gt_consistency": 0.9, "detail": 1.0 if seed == 1 else 2.0 ** (c - 1)})
    rows += [{**r, "model": "recycled", "psnr": r["psnr"] + 1} for r in rows]
    curves, summary = summarize(rows, ["plain", "recycled"], [1, 2], 4, 2)
    p = summary["plain"]
    # seed 1: first (20 + 19) / 2 = 19.5, last (18 + 17) / 2 = 17.5 -> +2; seed 2: 20.25 -> 21.25 -> -1
    assert p["psnr_degradation_seeds"] == pytest.approx([2.0, -1.0])
    assert p["psnr_degradation"] == pytest.approx(0.5)  # the mean of the per-seed values
    assert p["colour_drift_degradation_seeds"] == pytest.approx([2.0, 2.0])  # last - first: worse
    # detail: seed 2 goes 0.5, 1 -> 2, 4 (geometric ends 0.71, 2.83): distance from 1 grows either way
    assert p["detail_degradation_seeds"][0] == 0.0
    assert p["detail_degradation_seeds"][1] == pytest.approx(abs(np.log(3.0)) - abs(np.log(0.75)))
    assert loss("detail", 1.0, 2.0) == pytest.approx(np.log(2)) == pytest.approx(loss("detail", 1.0, 0.5))
    assert summary["recycled"]["psnr_degradation"] == pytest.approx(0.5)
    # rows written before the detail metric: summarized and written without it
    old = [{k: v for k, v in r.items() if k != "detail"} for r in rows]
    curves, summary = summarize(old, ["plain", "recycled"], [1, 2], 4, 2)
    assert "detail" not in curves["plain"] and "detail_degradation" not in summary["plain"]
    res = {"curves": curves, "summary": summary, "chunks": old,
           "setup": {"seeds": [1, 2], "chunks": 4, "chunk_frames": 2, "steps": 8, "edge": 2, "size": 64,
                     "memory": "posekv", "chain_clip_frames": None, "chain_frames": 4, "chain_ref_pad": False}}
    paths = write_results(res, tmp_path)
    assert "detail" not in paths and "| - | - |" in paths["results"].read_text()


def test_seed_bootstrap_ratio_interval():
    from streammem.eval.drift import seed_bootstrap_ratio

    assert seed_bootstrap_ratio([2.0, 1.0, 4.0], [1.0, 0.5, 2.0]) == pytest.approx((0.5, 0.5))  # every seed halves
    lo, hi = seed_bootstrap_ratio([1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 4.0])
    assert lo < 7 / 10 < hi and hi <= 1.0 and lo >= 0.25  # the point ratio inside; bounds of any resample
    assert seed_bootstrap_ratio([1.0], [0.5]) is None  # one seed: no interval
    assert seed_bootstrap_ratio([-1.0, -2.0], [1.0, 1.0]) is None  # the plain one never degrades: no ratio
    with pytest.raises(ValueError, match="same length"):
        seed_bootstrap_ratio([1.0, 2.0], [1.0])


def test_recycle_command_options_default_to_the_config():
    from streammem.cli import app

    cmd = typer.main.get_command(app).commands["train"].commands["recycle"]
    fields = {k: v for k, v in vars(RecycleTrainConfig()).items()}
    checked = [p.name for p in cmd.params if p.name in fields]
    assert len(checked) >= 10
    assert all(p.default == fields[p.name] for p in cmd.params if p.name in fields)


def test_recycle_command_passes_the_injection_probabilities(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    import streammem.train.error_recycling as er
    from streammem.cli import app

    seen = []
    monkeypatch.setattr(er, "finetune", lambda cfg, progress=False: seen.append(cfg))
    res = CliRunner().invoke(app, ["train", "recycle", "--out", str(tmp_path / "o"), "--latent-prob", "0",
                                   "--noise-prob", "0", "--cond-max-timestep", "150"])
    assert res.exit_code == 0, res.output
    rcfg = seen[0].recycling_config()
    assert (rcfg.cond_prob, rcfg.latent_prob, rcfg.noise_prob, rcfg.clean_prob) == (0.9, 0.0, 0.0, 0.2)
    assert rcfg.cond_timesteps == (0.0, 150.0)
    assert seen[0].recycling == {"latent_prob": 0.0, "noise_prob": 0.0, "cond_timesteps": (0.0, 150.0)}
    card = er.model_card(seen[0], tmp_path, 1, 1.0, {"injected": 1, "samples": 8, "loss": 0.1})
    assert "--latent-prob 0 --noise-prob 0 --cond-max-timestep 150" in card
    assert "replayed into its conditioning frames)" in card
    # the card's command line gives the same configuration back
    res = CliRunner().invoke(app, ["train", "recycle", "--out", str(tmp_path / "o"), "--clean-first", "1",
                                   "--noise-prob", "0.5", "--lr", "3e-5"])
    assert res.exit_code == 0, res.output
    card = er.model_card(seen[1], tmp_path, 1, 1.0, {"injected": 1, "samples": 8, "loss": 0.1})
    line = next(ln for ln in card.splitlines() if ln.startswith("`streammem train recycle"))
    args = line.strip("`:").split()[3:]
    args = [a for a in args if a != "(shipped)" and a != "--base"]
    res = CliRunner().invoke(app, ["train", "recycle", "--out", str(tmp_path / "o"), *args])
    assert res.exit_code == 0, res.output
    assert seen[2] == seen[1] and seen[2].clean_first == 1 and seen[2].recycling == {"noise_prob": 0.5}
    res = CliRunner().invoke(app, ["train", "recycle", "--out", str(tmp_path / "o"), "--clean-prob", "1.5"])
    assert res.exit_code != 0 and "clean_prob" in res.output


def test_clean_first_keeps_the_oldest_context_frames_real():
    from streammem.train.error_recycling import DiTAdapter

    g = torch.Generator().manual_seed(0)
    frames = torch.rand(3, 5, 3, 8, 8, generator=g) - 0.5
    batch = {"context_frames": frames, "x0": torch.zeros(3, 2, 3, 8, 8)}
    errors = torch.full((3, 3, 2, 3, 8, 8), 0.1)  # ceil(5 / 2) = 3 chunk-sized errors per sample
    mask = torch.tensor([True, False, True])
    for first in (0, 1, 2):
        out = DiTAdapter(None, None, clean_first=first).inject_condition(batch, errors, mask)
        diff = (out["context_frames"] - frames).abs().flatten(2).amax(2)  # (B, k)
        assert torch.equal(diff[1], torch.zeros(5))  # not drawn: untouched
        for b in (0, 2):
            assert torch.equal(diff[b, :first], torch.zeros(first))  # the oldest frames stay real
            assert torch.allclose(diff[b, first:], torch.full((5 - first,), 0.1))
        assert torch.equal(out["anchor"], out["context_frames"][:, -1])
    with pytest.raises(ValueError, match="clean_first"):
        DiTAdapter(None, None, clean_first=-1)
    # every context frame kept real: no draws, so nothing counts as injected
    assert DiTAdapter(None, None, clean_first=5).condition_draws(batch) == 0
    assert DiTAdapter(None, None, clean_first=4).condition_draws(batch) == 3


def test_the_batched_context_is_the_samplers_context():
    from streammem.train.error_recycling import batch_context
    from streammem.train.generator import ClipSampler, TrainConfig

    m = tiny_dit(0, 32, 8)
    sampler = ClipSampler(TrainConfig(batch_size=2), {}, m, np.random.default_rng(0))
    g = torch.Generator().manual_seed(0)
    for k in (1, 5, 23):
        frames, poses = torch.rand(2, k, 3, 32, 32, generator=g), torch.randn(2, k, 4, 4, generator=g)
        a, b = sampler.context(frames, poses), batch_context(m, frames, poses, 4)
        for name in ("tokens", "pose", "grid", "level", "mask"):
            assert torch.equal(getattr(a, name), getattr(b, name)), (k, name)


def test_a_resumed_fine_tune_continues_exactly(tmp_path):
    """Stopped after 3 steps and resumed to 6 (model, optimiser, generators and error bank
    restored) equals 6 steps in one go; the folder gets a model card."""
    import json

    from safetensors.torch import load_file

    from streammem.train.error_recycling import finetune

    base = tmp_path / "base"
    tiny_dit(0, 32, 8).save_pretrained(base)
    (base / "training.json").write_text(json.dumps({"config": {"size": 32, "n_seeds": 1, "stream_frames": 12,
                                                               "clip_frames": 8, "window": 2, "seed_base": 30_000}}))
    kw = dict(base=str(base), batch_size=2, cache_dir=str(tmp_path / "cache"), bank_mb=8, log_every=2,
              recycling={"clean_bank_prob": 1.0})
    finetune(RecycleTrainConfig(out=str(tmp_path / "a"), max_steps=6, **kw))
    finetune(RecycleTrainConfig(out=str(tmp_path / "b"), max_steps=3, **kw))
    finetune(RecycleTrainConfig(out=str(tmp_path / "b"), max_steps=6, **kw))
    a, b = CausalVideoDiT.from_pretrained(tmp_path / "a"), CausalVideoDiT.from_pretrained(tmp_path / "b")
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    ba, bb = load_file(tmp_path / "a" / "error_bank.safetensors"), load_file(tmp_path / "b" / "error_bank.safetensors")
    assert ba["count"].sum() > 0 and all(torch.equal(ba[k], bb[k]) for k in ba)
    assert "6 steps" in (tmp_path / "b" / "README.md").read_text()
    # a fine-tune of a base that kept its training state starts from its AdamW moments
    # (the step count goes on from the base's), unless told not to
    import shutil

    shutil.copytree(tmp_path / "a", tmp_path / "base2")
    shutil.copy(base / "training.json", tmp_path / "base2" / "training.json")
    kw2 = {**kw, "base": str(tmp_path / "base2")}
    finetune(RecycleTrainConfig(out=str(tmp_path / "c"), max_steps=1, **kw2))
    finetune(RecycleTrainConfig(out=str(tmp_path / "d"), max_steps=1, base_optimizer=False, **kw2))
    sc, sd = (load_file(tmp_path / n / "training_state.safetensors") for n in ("c", "d"))
    assert float(sc["opt.0.step"]) == 7 and float(sd["opt.0.step"]) == 1
    assert not torch.equal(sc["opt.0.exp_avg_sq"], sd["opt.0.exp_avg_sq"])


def test_optimizer_moments_load_only_for_matching_parameters():
    from streammem.train.error_recycling import _load_moments

    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters())
    net(torch.ones(1, 3)).sum().backward()
    opt.step()
    params = list(net.parameters())
    state = {f"opt.{i}.{k}": v.clone() for i, p in enumerate(params) for k, v in opt.state[p].items()}
    fresh = torch.optim.AdamW(params)
    assert _load_moments(fresh, params, state)
    assert torch.equal(fresh.state[params[0]]["exp_avg"], opt.state[params[0]]["exp_avg"])
    other = torch.nn.Linear(4, 2)
    assert not _load_moments(torch.optim.AdamW(other.parameters()), list(other.parameters()), state)
    assert not _load_moments(fresh, params, Path("/nonexistent/training_state.safetensors"))
