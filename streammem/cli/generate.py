"""Generation commands:

    streammem generate --scene 3 --actions RRRRUUUULLLLDDDD --prompt clean --out DIR
    streammem generate --image photo.png --actions FFFFBBBB --frames 16 --out DIR
    streammem train generator --minutes 60
    streammem eval generation --out outputs/eval_generation
    streammem train recycle --mode recycle --max-steps 1500 --out outputs/checkpoints/generator-recycled
    streammem eval drift --plain DIR --recycled DIR --out outputs/eval_drift

``generate`` writes ``DIR/generated.mp4`` (the start frame, then the generated ones),
``DIR/generation.jsonl`` (per generated frame: action, absolute pose, chunk, seed, prompt) and
``DIR/summary.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from streammem.cli.common import app, default, eval_app, fail, job_errors, train_app
from streammem.eval.generation import MEMORIES, TRAINING_PAN_SPEED
from streammem.pipelines.generation_config import GENERATION_MEMORIES, GenerationConfig
from streammem.train.generation_config import ErrorRecyclingConfig, RecycleTrainConfig, TrainConfig


@app.command("generate")
def generate(
    scene: Optional[int] = typer.Option(None, help="start from this StreamWorld scene (a world seed)"),
    image: Optional[Path] = typer.Option(None, help="start from this image file (PNG, JPEG, ...)"),
    actions: str = typer.Option("RRRRUUUULLLLDDDD", help="one letter per frame: F/B forward/back (zoom in/out; also "
                                "I/O), L/R/U/D pan, S stay"),
    prompt: List[str] = typer.Option([], "--prompt", "-p", help="prompt; repeat for one per chunk (the last holds)"),
    frames: Optional[int] = typer.Option(None, help="frames to generate (default: one per action)"),
    out: Path = typer.Option(Path("outputs/generate"), "--out", "-o", help="output folder"),
    checkpoint: Optional[Path] = typer.Option(None, help="generator folder (default: the shipped one)"),
    memory: str = typer.Option(default(GenerationConfig, "memory"), help=f"one of {', '.join(GENERATION_MEMORIES)}"),
    steps: int = typer.Option(default(GenerationConfig, "num_inference_steps"), help="denoising steps per chunk"),
    seed: int = typer.Option(default(GenerationConfig, "seed"), help="chunk k is sampled with seed + k"),
    reference_anchor: bool = typer.Option(default(GenerationConfig, "reference_anchor"),
                                          help="re-project the start image as the first anchor of every chunk"),
    progress: bool = typer.Option(True, help="show a progress bar"),
) -> None:
    """Generate a video from a first frame, steered by camera actions and prompts."""
    from streammem.pipelines.jobs import run_generate

    with job_errors():
        res = run_generate(out, scene=scene, image=image, actions=actions, prompts=prompt or [""], num_frames=frames,
                           checkpoint=checkpoint, memory=memory, steps=steps, seed=seed,
                           reference_anchor=reference_anchor, progress=progress)
    s = res.summary
    typer.echo(f"streammem generate: {s['frames_generated']} frames in {s['chunks']} chunks "
               f"({s['seconds_per_chunk']:.2f} s per chunk), memory {memory} {s['memory_tokens']} tokens")
    typer.echo(f"  video:   {res.video}")
    typer.echo(f"  jsonl:   {res.jsonl}")
    typer.echo(f"  summary: {res.summary_path}")
    if res.error is not None:
        fail(f"generation stopped: {res.summary['error']} (the frames made before it were written)", code=1)


@train_app.command("generator")
def train_generator(
    minutes: float = typer.Option(default(TrainConfig, "minutes"), help="wall-clock budget (a resumed run counts "
                                  "the time already spent)"),
    out: str = typer.Option(default(TrainConfig, "out"), "--out", "-o", help="checkpoint folder; an existing one "
                            "is resumed"),
    threads: int = typer.Option(default(TrainConfig, "threads"), help="torch threads"),
    batch_size: int = typer.Option(default(TrainConfig, "batch_size"), help="clips per step"),
    lr: float = typer.Option(default(TrainConfig, "lr"), help="peak learning rate"),
    n_seeds: int = typer.Option(default(TrainConfig, "n_seeds"), help="StreamWorld streams rendered for training"),
    seed: int = typer.Option(default(TrainConfig, "seed"), help="data and init seed"),
    save_every_s: float = typer.Option(default(TrainConfig, "save_every_s"), help="checkpoint period (seconds)"),
    max_steps: Optional[int] = typer.Option(None, help="stop after this many steps"),
    cache_dir: str = typer.Option(default(TrainConfig, "cache_dir"), help="where rendered streams are cached"),
) -> None:
    """Train the small generator (CausalVideoDiT) on StreamWorld clips with loops that come back;
    resumable, checkpoints as it goes."""
    from streammem.train.generator import train

    try:
        cfg = TrainConfig(out=out, minutes=minutes, threads=threads, batch_size=batch_size, lr=lr, n_seeds=n_seeds,
                          seed=seed, save_every_s=save_every_s, max_steps=max_steps, cache_dir=cache_dir)
    except ValueError as exc:
        fail(str(exc))
    train(cfg)
    typer.echo(f"streammem train generator: saved to {out}")


@eval_app.command("generation")
def eval_generation(
    checkpoint: Optional[Path] = typer.Option(None, help="generator folder (default: the shipped one)"),
    seeds: List[int] = typer.Option([20_000, 20_001, 20_002, 20_003], "--seed", help="held-out world seeds"),
    frames: int = typer.Option(96, help="frames per rollout (4 fps)"),
    memory: List[str] = typer.Option(list(MEMORIES), "--memory", help="memories to compare"),
    steps: int = typer.Option(default(GenerationConfig, "num_inference_steps"), help="denoising steps per chunk"),
    reference_anchor: bool = typer.Option(default(GenerationConfig, "reference_anchor"),
                                          help="re-project the start frame as the first anchor of every chunk"),
    out: Path = typer.Option(Path("outputs/eval_generation"), "--out", "-o", help="results folder"),
    progress: bool = typer.Option(True, help="show a progress bar"),
) -> None:
    """Revisit PSNR / SSIM (within and beyond the window), novel-view quality and cost per chunk
    for each memory, on held-out StreamWorld loops."""
    import json

    from streammem.eval.generation import evaluate_generation, format_table
    from streammem.pipelines.jobs import load_default_generator
    from streammem.pipelines.jobs.base import write_summary

    bad = [m for m in memory if m not in MEMORIES]
    if bad or frames < 2:
        fail(f"--memory must be among {', '.join(MEMORIES)} and --frames >= 2; got {bad or frames}")
    try:
        model = load_default_generator(checkpoint).model
    except FileNotFoundError as exc:
        fail(str(exc))
    res = evaluate_generation(model, seeds=tuple(seeds), frames=frames, memories=tuple(memory), steps=steps,
                              reference_anchor=reference_anchor, progress=progress)
    table = format_table(res["summary"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in res["records"] + res["chunks"]))
    write_summary(out / "summary.json", {"summary": res["summary"], "setup": res["setup"]})
    (out / "table.md").write_text(table + "\n")
    import cv2

    from streammem.eval.generation import classify, frame_strip, render_path

    gt = render_path(seeds[0], frames, model.config.sample_size)
    kinds = classify([f.info["gt"]["camera"]["state"] for f in gt], window=res["setup"]["window"])
    strip = frame_strip(res["frames"], kinds)
    cv2.imwrite(str(out / "strip.png"), cv2.cvtColor(strip, cv2.COLOR_RGB2BGR))
    typer.echo(table)
    typer.echo(f"-> {out / 'table.md'}, {out / 'strip.png'} (seed {seeds[0]}: truth and each memory)")


@train_app.command("recycle")
def train_recycle(
    mode: str = typer.Option(default(RecycleTrainConfig, "mode"), help="recycle (error recycling) or plain (the "
                             "same steps, nothing injected: the equal-compute baseline)"),
    base: str = typer.Option(default(RecycleTrainConfig, "base"), help="base generator folder (default: the "
                             "shipped one)"),
    out: str = typer.Option(default(RecycleTrainConfig, "out"), "--out", "-o", help="checkpoint folder; an existing "
                            "one is resumed"),
    max_steps: int = typer.Option(default(RecycleTrainConfig, "max_steps"), help="steps (the same for both modes)"),
    minutes: float = typer.Option(default(RecycleTrainConfig, "minutes"), help="wall-clock cap (a resumed run "
                                  "counts the time already spent)"),
    threads: int = typer.Option(default(RecycleTrainConfig, "threads"), help="torch threads"),
    batch_size: int = typer.Option(default(RecycleTrainConfig, "batch_size"), help="clips per step"),
    lr: float = typer.Option(default(RecycleTrainConfig, "lr"), help="peak learning rate"),
    seed: int = typer.Option(default(RecycleTrainConfig, "seed"), help="data and noise seed (keep it equal "
                             "across modes)"),
    base_optimizer: bool = typer.Option(default(RecycleTrainConfig, "base_optimizer"),
                                        help="start AdamW from the base's moments when its folder has them"),
    bank_mb: int = typer.Option(default(RecycleTrainConfig, "bank_mb"), help="error bank cap (MiB)"),
    timestep_sampling: str = typer.Option(default(RecycleTrainConfig, "timestep_sampling"),
                                          help="logit_normal (the base's) or shifted (SVI's)"),
    mixed_precision: str = typer.Option(default(RecycleTrainConfig, "mixed_precision"), help="no, fp16 or bf16 "
                                        "(accelerate)"),
    save_every_s: float = typer.Option(default(RecycleTrainConfig, "save_every_s"), help="checkpoint period (s)"),
    cache_dir: str = typer.Option(default(RecycleTrainConfig, "cache_dir"), help="where rendered streams are cached"),
    cond_max_timestep: Optional[float] = typer.Option(None, help="draw the conditioning frames' errors only from "
                                                      "the bins at or below this timestep (0-1000 units; default: "
                                                      "every bin, SVI)"),
    cond_prob: float = typer.Option(default(ErrorRecyclingConfig, "cond_prob"), help="chance of a banked error "
                                    "in the conditioning frames"),
    latent_prob: float = typer.Option(default(ErrorRecyclingConfig, "latent_prob"), help="chance of a banked error "
                                      "in the clean chunk before noising"),
    noise_prob: float = typer.Option(default(ErrorRecyclingConfig, "noise_prob"), help="chance of a banked error "
                                     "in the noise"),
    clean_prob: float = typer.Option(default(ErrorRecyclingConfig, "clean_prob"), help="chance that nothing is "
                                     "injected"),
    clean_first: int = typer.Option(default(RecycleTrainConfig, "clean_first"), help="oldest context frames "
                                    "never given an error (1: the clip's first frame stays real, like the start "
                                    "image at inference)"),
    progress: bool = typer.Option(False, help="print a line per logged step"),
) -> None:
    """Fine-tune a generator checkpoint with Stable Video Infinity's error recycling (or the same
    steps plain); resumable; writes a model card."""
    from streammem.train.error_recycling import finetune

    recycling: dict = {}  # only what differs from SVI's defaults, so the model card names it
    for name, value in (("cond_prob", cond_prob), ("latent_prob", latent_prob), ("noise_prob", noise_prob),
                        ("clean_prob", clean_prob)):
        if value != default(ErrorRecyclingConfig, name):
            recycling[name] = value
    if cond_max_timestep is not None:
        recycling["cond_timesteps"] = (0.0, cond_max_timestep)
    try:
        cfg = RecycleTrainConfig(mode=mode, base=base, out=out, max_steps=max_steps, minutes=minutes, threads=threads,
                                 batch_size=batch_size, lr=lr, seed=seed, bank_mb=bank_mb, base_optimizer=base_optimizer,
                                 timestep_sampling=timestep_sampling, mixed_precision=mixed_precision,
                                 save_every_s=save_every_s, cache_dir=cache_dir,
                                 recycling=recycling, clean_first=clean_first)
    except ValueError as exc:
        fail(str(exc))
    try:
        finetune(cfg, progress=progress)
    except FileNotFoundError as exc:
        fail(str(exc))
    typer.echo(f"streammem train recycle ({mode}): saved to {out}")


@eval_app.command("drift")
def eval_drift(
    plain: Path = typer.Option(..., help="the plain fine-tune's folder"),
    recycled: Path = typer.Option(..., help="the error-recycled fine-tune's folder"),
    base: Optional[Path] = typer.Option(None, help="also roll out this checkpoint (e.g. the base)"),
    seeds: List[int] = typer.Option([20_000, 20_001], "--seed", help="held-out world seeds"),
    chunks: int = typer.Option(50, help="chunks per rollout"),
    steps: int = typer.Option(default(GenerationConfig, "num_inference_steps"), help="denoising steps per chunk"),
    edge: int = typer.Option(1, help="chunks averaged at each end for the degradation"),
    chain_clip_frames: Optional[int] = typer.Option(None, help="chain clips of this many frames (SVI) instead of "
                                                    "the memory"),
    chain_frames: int = typer.Option(default(GenerationConfig, "chain_frames"), help="frames that condition the "
                                     "next clip"),
    chain_ref_pad: bool = typer.Option(default(GenerationConfig, "chain_ref_pad"), help="the first image "
                                       "conditions every clip"),
    reference_anchor: bool = typer.Option(default(GenerationConfig, "reference_anchor"),
                                          help="re-project the start frame as the first anchor of every chunk"),
    pan_speed: float = typer.Option(TRAINING_PAN_SPEED, help="the camera's typical pan (world px/s; 80 = the "
                                    "training's, over ground the start image shows only in part; 8 keeps most of "
                                    "it in view)"),
    threads: int = typer.Option(1, help="torch threads"),
    out: Path = typer.Option(Path("outputs/eval_drift"), "--out", "-o", help="results folder"),
    progress: bool = typer.Option(True, help="show a progress bar"),
) -> None:
    """Drift of a plain against an error-recycled fine-tune over long rollouts on held-out worlds:
    per-chunk PSNR, colour drift, consistency with the first frame and detail, plots,
    degradation (with per-seed values and a seed-bootstrap interval of the ratio), cost."""
    import torch

    from streammem.eval.drift import evaluate_drift, write_results
    from streammem.models.video_dit import CausalVideoDiT

    folders = {"plain": plain, "recycled": recycled, **({"base": base} if base is not None else {})}
    missing = [f"{k}: {p}" for k, p in folders.items() if not (p / "config.json").is_file()]
    if missing:
        fail(f"no generator checkpoint (config.json + weights) at {'; '.join(missing)}")
    try:
        cfg = GenerationConfig(num_inference_steps=steps, chain_clip_frames=chain_clip_frames,
                               chain_frames=chain_frames, chain_ref_pad=chain_ref_pad,
                               reference_anchor=reference_anchor)
    except ValueError as exc:
        fail(str(exc))
    torch.set_num_threads(threads)
    models = {k: CausalVideoDiT.from_pretrained(str(p)).eval() for k, p in folders.items()}
    try:
        res = evaluate_drift(models, seeds=tuple(seeds), chunks=chunks, edge=edge, config=cfg, progress=progress,
                             pan_speed=pan_speed)
    except ValueError as exc:
        fail(str(exc))
    paths = write_results(res, out)
    typer.echo(paths["results"].read_text())
    typer.echo(f"-> {paths['results']}")
