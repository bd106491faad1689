"""QA commands: ``streammem ask``, ``streammem train encoder|answerer``, ``streammem eval qa``.

    streammem ask world:seed=3,preset=medium,seconds=60 --at 20 --at 40 \\
        "Is there a cat in view now?" -c yes -c no
    streammem ask VIDEO --interactive          # type: question | option | option ...
    streammem eval qa --seconds 600 --out outputs/qa_eval

``ask`` and refusals: the shipped answerer was trained only on StreamWorld, and says so on the
first line of its output. A question it cannot answer is refused with the reason, never forced
(:mod:`streammem.models.answerer.refusal`): refused before any frame is read (words it does
not know, a question without options that is not yes/no, a negative ``--at``), ``ask`` prints
``refused: <reason>`` on stderr, writes nothing and exits 2; refused once the stream ran (no
frame in memory at that time, a time after the end of a stream that ended), the refusal is
printed in place of the answer (``-> refused: <reason>``), written to answers.jsonl with
``"refused": true``, and ``ask`` exits 0, as it does when every question is answered.

``ask --answerer hf:<model id or folder>`` answers with a vision-language model from
``transformers`` instead (:func:`~streammem.pipelines.qa.load_hf_qa`: LLaVA, LLaVA-OneVision,
SmolVLM2, Idefics3): multiple choice with options, a generated free-form answer without, each
with the stored frames it attended to; ``--press NAME --press-ratio R`` compresses its
key-value cache over the memory before the question is decoded. A model the hub cannot
deliver is one line, ``error: could not fetch ...``, and exit 2.

    streammem ask street.mp4 --at 12 --answerer hf:HuggingFaceTB/SmolVLM2-256M-Video-Instruct \\
        --press h2o --press-ratio 0.25 "What is the person in the red coat doing?"
"""

from __future__ import annotations

import json
import re
import sys
import threading
from pathlib import Path
from typing import List, Optional

import typer

from streammem.cli.common import app, default, eval_app, fail, train_app
from streammem.models.answerer.refusal import QuestionRefused, Refusal
from streammem.pipelines.qa import QAConfig
from streammem.train.answerer import AnswererTrainConfig
from streammem.train.grid_encoder import EncoderTrainConfig
from streammem.train.qa_data import SHIPPED_ENCODER

_OPT_RE = re.compile(r"\(?([A-E])[).:]\s*")


#: the first line of ``ask``'s output (and part of its --help)
SHIPPED_NOTE = ("the shipped answerer was trained only on StreamWorld (its 11 object classes, its colours and the "
                "wording of its questions) and refuses other questions; for real footage use a vision-language "
                "model: --answerer hf:<model id or folder> (e.g. hf:HuggingFaceTB/SmolVLM2-256M-Video-Instruct)")
_OPTIONS_HINT = " (options: -c OPTION, repeated, or '(A) x (B) y' in the question)"


def split_options(question: str, choices: list[str]) -> tuple[str, list[str]]:
    """Options from ``-c`` flags, or written into the question as ``A. x B. y`` / ``(A) x (B) y``;
    a question with neither gets no options (``[]``): the pipeline answers it yes or no if it is
    a yes/no question and refuses it otherwise (:func:`~streammem.models.answerer.refusal.is_yes_no`).

    >>> split_options("Where is it? (A) left (B) right", [])
    ('Where is it?', ['left', 'right'])
    >>> split_options("Is it red?", [])
    ('Is it red?', [])
    """
    if choices:
        return question.strip(), [c.strip() for c in choices]
    parts = _OPT_RE.split(question)
    if len(parts) >= 5 and [parts[i] for i in range(1, len(parts), 2)] == list("ABCDE"[: len(parts) // 2]):
        return parts[0].strip(), [parts[i].strip() for i in range(2, len(parts), 2)]
    return question.strip(), []


def _refusal_text(r: Refusal) -> str:
    return f"refused: {r.reason}" + (_OPTIONS_HINT if r.kind == "options" else "")


def _print_answer(q: str, at: float, a) -> None:
    if isinstance(a, Refusal):
        typer.echo(f"[{at:7.2f}s] {q}\n           -> {_refusal_text(a)}")
        return
    ev = ", ".join(f"frame {e['frame_index']} @ {e['timestamp']:.1f}s ({e['weight']:.2f})" for e in a.evidence[:3])
    said = f'"{a.text}"' if a.extra.get("free_form") else f"({a.letter}) {a.text}"
    press = (f"; {a.extra['press']} press kept {a.extra['memory_tokens_kept']} of {a.extra['memory_tokens']} memory "
             "tokens" if "press" in a.extra else "")
    typer.echo(f"[{at:7.2f}s] {q}\n           -> {said}  confidence {a.confidence:.2f}; evidence: {ev}{press}")


def _refuse(r: Refusal) -> None:
    """A question refused before any frame is read: bad input, exit 2."""
    typer.secho(_refusal_text(r), fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _check_pool(pool: str) -> None:
    if pool not in ("mean", "salient"):
        raise typer.BadParameter(f"{pool!r}: choose mean (the reference) or salient", param_hint="--pool")


@app.command("ask")
def ask(
    source: str = typer.Argument(..., help="video file, folder, camera:N, URL or world:..."),
    question: Optional[str] = typer.Argument(None, help="the question (options with -c, or 'A. x B. y' inside)"),
    at: List[float] = typer.Option([], "--at", help="stream time (s) to ask at; repeat for several"),
    choice: List[str] = typer.Option([], "--choice", "-c", help="an answer option; repeat"),
    interactive: bool = typer.Option(False, "--interactive", "-i",
                                     help="stream the source and answer questions typed on stdin"),
    memory: str = typer.Option(default(QAConfig, "memory"), help="PyramidMemory preset: ovbench (832 tokens) or offline (9,984)"),
    retention: str = typer.Option(default(QAConfig, "retention"), help="pyramid retention: reference (VideoChat-Online) or spread "
                                  "(kept frames spread over the whole stream)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="write answers.jsonl here"),
    max_frames: Optional[int] = typer.Option(None, help="stop after this many frames"),
    fps: Optional[float] = typer.Option(8.0, help="resample the source to this frame rate (8 as VideoChat-Online)"),
    answerer: Optional[str] = typer.Option(None, help="hf:<model id or folder>: a vision-language model from "
                                           "transformers (LLaVA, LLaVA-OneVision, SmolVLM2, Idefics3) instead of "
                                           "the shipped answerer; answers free-form questions too (downloads the "
                                           "model unless it is a local folder)"),
    press: Optional[str] = typer.Option(None, help="with --answerer hf:...: compress the model's key-value cache "
                                        "over the memory with sink_window, h2o, kvmerger or mikv"),
    press_ratio: float = typer.Option(0.5, help="fraction of memory tokens the press keeps (mikv: keeps exact)"),
    device: Optional[str] = typer.Option(None, help="with --answerer hf:...: cuda, mps, cpu or auto "
                                         "(default: accelerate's choice)"),
    max_new_tokens: int = typer.Option(48, help="with --answerer hf:...: longest free-form answer, in tokens"),
) -> None:
    """Stream SOURCE into the Pyramid Memory Bank and answer questions at given times.

    With --answerer hf:<model id or folder> a vision-language model from transformers reads the
    memory (LLaVA, LLaVA-OneVision, SmolVLM2, Idefics3; e.g.
    hf:HuggingFaceTB/SmolVLM2-256M-Video-Instruct, downloaded on first use, or a folder holding
    it): options give a multiple-choice answer, no options a generated free-form answer, both
    with the frames it attended to. --press sink_window|h2o|kvmerger|mikv --press-ratio R
    compresses its key-value cache over the memory to R of the memory tokens before the
    question is decoded. Without hub access: one-line error, exit 2.

    The shipped answerer was trained only on StreamWorld (its 11 object classes, its colours and
    the wording of its questions, e.g. "Is there a cat in view now?"); it is not meant for real
    footage. For real footage use a vision-language model from transformers:
    --answerer hf:<model id or folder> (SmolVLM2, LLaVA, LLaVA-OneVision).

    A question without options is answered yes or no only if it starts with is, are, was, were,
    has, have, had, do, does, did, can, could, will or would and has no "or"; any other needs
    options (-c, or '(A) x (B) y' in the question).

    Refusals, never forced answers: a question with words the answerer does not know, one that
    needs options and has none, or a negative --at is refused before any frame is read (exit
    2, nothing written); a time with no frame in memory or after the end of a stream that ended
    is answered "refused: <reason>" (in answers.jsonl: "refused": true) and the command exits 0.
    """
    from streammem.io import JsonlWriter, SourceError, open_source
    from streammem.pipelines.jobs import run_ask
    from streammem.pipelines.qa import load_default_qa

    if not interactive and (question is None or not at):
        raise typer.BadParameter("give a QUESTION and at least one --at, or use --interactive")
    if answerer is None:
        if press is not None:
            raise typer.BadParameter("--press compresses a vision-language model's cache: give --answerer hf:...",
                                     param_hint="--press")
        try:
            pipe = load_default_qa(memory=memory, keep_thumbnails=False, retention=retention)
        except (FileNotFoundError, ValueError) as exc:
            fail(str(exc))
        typer.echo(f"streammem ask: {SHIPPED_NOTE}")
    else:
        pipe = _load_hf(answerer, memory, retention, press, press_ratio, device, max_new_tokens)
    opts = {"fps": fps} if fps and not source.startswith("world:") else {}
    if interactive:
        try:
            src = open_source(source, **opts)
        except (SourceError, ValueError) as exc:
            fail(str(exc))
        writers: list = []  # answers.jsonl, opened at the first answer (no empty file)

        def writer() -> JsonlWriter:
            if not writers:
                writers.append(JsonlWriter(out / "answers.jsonl"))
            return writers[0]

        n = 0
        try:
            n = _interactive(pipe, src, max_frames, writer if out is not None else None)
        except (SourceError, ValueError) as exc:
            for w in writers:
                w.close()
            fail(f"{exc} (the answers given before it are kept)", code=1)
        for w in writers:
            typer.echo(f"{n} answers -> {w.close()}")
        return
    q, cands = split_options(question, choice)
    try:
        res = run_ask(source, q, cands, at, max_frames=max_frames, out=out, pipeline=pipe, **opts)
    except QuestionRefused as exc:  # before any frame is read: a bad question
        _refuse(exc.refusal)
    except (SourceError, ValueError) as exc:  # before the stream started: bad input or options
        fail(str(exc))
    for t, a in res.answers:
        _print_answer(q, t, a)
    refused = sum(isinstance(a, Refusal) for _, a in res.answers)
    if res.jsonl is not None:
        typer.echo(f"{len(res.answers)} answers{f' ({refused} refused)' if refused else ''} -> {res.jsonl}")
    if res.error is not None:
        fail(f"{res.error} (the answers due before it are kept)", code=1)


def _load_hf(spec: str, memory: str, retention: str, press: str | None, press_ratio: float, device: str | None,
             max_new_tokens: int):
    """The ``hf:`` answerer's pipeline; a model that cannot be fetched or loaded, a bad press:
    one line, exit 2."""
    from streammem.models.hf import HubUnavailable, parse_spec
    from streammem.pipelines.qa import load_hf_qa

    try:
        name = parse_spec(spec)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--answerer") from None
    if name is None:
        raise typer.BadParameter(f"{spec!r}: give hf:<model id or local folder>", param_hint="--answerer")
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # transformers' "Loading weights" bars and the hub's stay off the terminal
    try:
        pipe = load_hf_qa(spec, memory=memory, retention=retention, keep_thumbnails=False, press=press,
                          press_ratio=press_ratio, device=device, answerer_options={"max_new_tokens": max_new_tokens})
    except (HubUnavailable, FileNotFoundError, ValueError, OSError) as exc:
        fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    how = f", {press} press keeping {press_ratio:g} of the memory's cache" if press else ""
    typer.echo(f"streammem ask: answering with {name} ({type(pipe.answerer).__name__}, transformers){how}")
    return pipe


def _interactive(pipe, src, max_frames, writer) -> int:
    """Stream in a thread while answering questions typed on stdin; ``writer()`` (or None)
    gives the JSONL writer, opened on first use."""
    stop = threading.Event()
    err: list[BaseException] = []

    def stream():
        try:
            for i, frame in enumerate(src):
                if stop.is_set() or (max_frames is not None and i >= max_frames):
                    break
                pipe.step(frame)
        except BaseException as exc:  # noqa: BLE001 - reported to the user below
            err.append(exc)

    th = threading.Thread(target=stream, daemon=True)
    th.start()
    typer.echo("streaming; type a question ('question | option | option ...'), empty line or Ctrl-D to stop")
    n = 0
    for line in sys.stdin:
        line = line.strip()
        if not line:
            break
        parts = [p.strip() for p in line.split("|")]
        q, cands = split_options(parts[0], parts[1:])
        try:
            a = pipe.ask(q, cands)
        except QuestionRefused as exc:
            typer.echo(f"  {_refusal_text(exc.refusal)}")
            continue
        except ValueError as exc:
            typer.echo(f"  ! {exc}")
            continue
        t = pipe.time or 0.0
        _print_answer(q, t, a)
        if writer is not None:
            writer().write({"question": q, "candidates": pipe.candidates_for(cands), "at": t, **a.to_dict()})
        n += 1
    stop.set()
    th.join(timeout=5)
    if err:
        raise ValueError(f"the stream stopped: {err[0]}")
    return n

@train_app.command("encoder")
def train_encoder_cmd(
    minutes: float = typer.Option(default(EncoderTrainConfig, "minutes"), help="wall-clock budget"),
    out: str = typer.Option(default(EncoderTrainConfig, "out"), help="checkpoint folder"),
    threads: int = typer.Option(2, help="torch threads"),
) -> None:
    """Pretrain the QA frame encoder (GridEncoder) on StreamWorld cell targets."""
    import torch

    from streammem.train.grid_encoder import EncoderTrainConfig, train_encoder

    torch.set_num_threads(threads)
    train_encoder(EncoderTrainConfig(minutes=minutes, out=out))

@train_app.command("answerer")
def train_answerer_cmd(
    minutes: float = typer.Option(default(AnswererTrainConfig, "minutes"), help="wall-clock training budget (data building excluded)"),
    worlds: int = typer.Option(default(AnswererTrainConfig, "worlds"), help="training worlds (without --data)"),
    seconds: float = typer.Option(default(AnswererTrainConfig, "seconds"), help="length of each world (without --data)"),
    out: str = typer.Option(default(AnswererTrainConfig, "out"), help="checkpoint folder"),
    encoder: str = typer.Option(default(AnswererTrainConfig, "encoder"), help="frozen encoder checkpoint"),
    data: Optional[Path] = typer.Option(None, help="folder of snapshot shards (`streammem train qa-snapshots`)"),
    only_budget: List[str] = typer.Option([], "--only-budget", help="train on these budgets' snapshots only"),
    init: Optional[Path] = typer.Option(None, help="start from this answerer checkpoint"),
    threads: int = typer.Option(default(AnswererTrainConfig, "threads"), help="torch threads"),
    lr: float = typer.Option(default(AnswererTrainConfig, "lr"), help="peak learning rate (lower it for a phase started with --init)"),
    snapshots_per_step: int = typer.Option(default(AnswererTrainConfig, "snapshots_per_step"), help="snapshots (each with all its questions) per step"),
    d: int = typer.Option(128, help="model width (a fresh model)"),
    layers: int = typer.Option(2, help="blocks (a fresh model)"),
    heads: int = typer.Option(4, help="attention heads (a fresh model)"),
    log: Optional[str] = typer.Option(None, help="JSONL training log"),
    signed_time: bool = typer.Option(False, help="add the signed-time grounded read-out (before / after a time)"),
    event_head: bool = typer.Option(False, help="with --signed-time: add the signed evidence to candidate logits"),
    pool: str = typer.Option(default(AnswererTrainConfig, "pool"), help="the pyramids' pooling: mean (the reference) or salient"),
) -> None:
    """Train the QA answerer on StreamWorld questions over Pyramid Memory Bank snapshots."""
    from streammem.train.answerer import train

    _check_pool(pool)
    model = {"d": d, "heads": heads, "layers": layers, **({"signed_time": True} if signed_time else {}),
             **({"event_head": True} if event_head else {})}
    if data is not None and not (data / "train").is_dir():
        raise typer.BadParameter(f"{data} has no train/ folder of snapshot shards", param_hint="--data")
    train(AnswererTrainConfig(minutes=minutes, worlds=worlds, seconds=seconds, out=out, encoder=encoder, log=log,
                              data=str(data) if data else None, threads=threads, lr=lr,
                              snapshots_per_step=snapshots_per_step, model=model,
                              only_budgets=tuple(only_budget) or None, init=str(init) if init else None,
                              pool=pool))

@train_app.command("event-gate")
def train_event_gate_cmd(
    data: Path = typer.Argument(..., help="folder of snapshot shards (train/, optional val/) of worlds the "
                                          "answerer was not trained on (`streammem train qa-snapshots`)"),
    init: Path = typer.Option(..., help="answerer checkpoint with the event head"),
    out: str = typer.Option(..., help="checkpoint folder for the result"),
    weight_decay: float = typer.Option(0.1, help="L2 pull of every fitted weight towards where it started "
                                                 "(0.1: chosen by cross-validation over 12 unseen worlds)"),
    iters: int = typer.Option(300, help="L-BFGS iterations"),
    threads: int = typer.Option(2, help="torch threads"),
    calibrate: bool = typer.Option(True, help="also fit a per-question scale of the blocks' logits and the "
                                              "gate's term for the memory's support around the stated time"),
) -> None:
    """Re-fit only the answerer's event gate and the scale of its blocks' logits (1,179
    weights; everything else frozen) on worlds it was not trained on, so the signed before /
    after evidence gets the weight it earns on new worlds."""
    from streammem.train.event_gate import refit_event_gate
    from streammem.train.qa_data import PoolMismatch

    if not (data / "train").is_dir():
        raise typer.BadParameter(f"{data} has no train/ folder of snapshot shards", param_hint="DATA")
    if not (init / "config.json").is_file():
        raise typer.BadParameter(f"no checkpoint (config.json) in {init}", param_hint="--init")
    try:
        report = refit_event_gate(init, data, out, weight_decay=weight_decay, iters=iters, threads=threads,
                                  calibrate=calibrate)
    except (ValueError, PoolMismatch) as exc:  # no shards, no event head, another pooling, already calibrated
        fail(str(exc))
    for when, r in report.items():
        print(when, "  ".join(f"{split}: loss {la[0]:.4f} accuracy {100 * la[1]:.1f}%" for split, la in r.items()))

@train_app.command("qa-snapshots")
def qa_snapshots_cmd(
    out_dir: Path = typer.Argument(..., help="folder for train/ and val/ shards"),
    worlds: int = typer.Option(60, help="training worlds"),
    seconds: float = typer.Option(480.0, help="length of each world"),
    every: float = typer.Option(1.0, help="seconds between question times"),
    encoder: str = typer.Option(SHIPPED_ENCODER, help="frozen encoder checkpoint (default: the shipped one)"),
    threads: int = typer.Option(1, help="torch threads"),
    pool: str = typer.Option("mean", help="the pyramids' pooling: mean (the reference) or salient"),
    retention: str = typer.Option("reference", help="the pyramids' retention: reference or spread"),
    val_worlds: int = typer.Option(2, help="validation worlds (written first, to val/)"),
    seed: int = typer.Option(0, help="world seeds start at 20,000,000 + 1,000 x seed (validation: 30,000,000 + ...); "
                                     "another seed gives worlds an answerer trained on seed 0's has not seen"),
) -> None:
    """Render StreamWorld worlds through the encoder into PyramidMemory snapshots with their
    questions, one safetensors shard per world (resumable; a trainer may follow the folder)."""
    from streammem.train.qa_data import produce

    _check_pool(pool)
    from streammem.pipelines.qa import RETENTIONS

    if retention not in RETENTIONS:
        raise typer.BadParameter(f"{retention!r}: choose {' or '.join(sorted(RETENTIONS))}", param_hint="--retention")
    produce(out_dir, encoder, worlds=worlds, seconds=seconds, every_s=every, threads=threads, pool=pool,
            retention=retention, val_worlds=val_worlds, seed=seed)

@eval_app.command("qa")
def eval_qa(
    seconds: float = typer.Option(600.0, help="length of each StreamWorld stream (8 fps)"),
    seeds: List[int] = typer.Option([0, 1], "--seed", help="world seeds"),
    presets: List[str] = typer.Option(["medium"], "--preset", help="world presets"),
    budgets: List[str] = typer.Option(["offline", "ovbench"], "--budget", help="token budgets"),
    memories: List[str] = typer.Option(["none", "window", "uniform", "pyramid", "dual", "full"], "--memory"),
    out: Path = typer.Option(Path("outputs/qa_eval"), "--out", "-o", help="results folder"),
    ovbench: Optional[Path] = typer.Option(None, help="an OVBench JSON file: evaluate on its videos instead"),
    video_root: Optional[Path] = typer.Option(None, help="folder holding the OVBench videos"),
    answerer: Optional[Path] = typer.Option(None, help="answerer checkpoint folder (default: the shipped one)"),
    encoder: Optional[Path] = typer.Option(None, help="encoder checkpoint folder (default: the shipped one)"),
) -> None:
    """Score memories at equal token budgets (OVBench's mcq_acc), with the horizon plot."""
    from streammem.checkpoints import ROOT as root
    from streammem.eval import qa as E
    from streammem.models.answerer import SmallAnswerer
    from streammem.models.grid_encoder import GridEncoder

    for name, p in (("--answerer", answerer), ("--encoder", encoder)):
        if p is not None and not (p / "config.json").is_file():
            raise typer.BadParameter(f"no checkpoint (config.json) in {p}", param_hint=name)
    enc = GridEncoder.from_pretrained(str(encoder or root / "grid_encoder")).eval()
    ans = SmallAnswerer.from_pretrained(str(answerer or root / "answerer")).eval()
    typer.echo(f"answerer trained on PyramidMemory(pool={ans.memory_pool!r}) reads", err=True)
    out.mkdir(parents=True, exist_ok=True)
    if ovbench is not None:
        res = E.evaluate_ovbench(ans, enc, E.load_ovbench(ovbench), video_root or ovbench.parent,
                                 budgets=tuple(budgets), memories=tuple(memories))
    else:
        res = E.evaluate_qa(ans, enc, seeds=tuple(seeds), presets=tuple(presets), seconds=seconds,
                            budgets=tuple(budgets), memories=tuple(memories))
    summary = E.summarise(res["records"])
    table = E.format_table(summary)
    (out / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in res["records"]))
    (out / "summary.json").write_text(json.dumps({"summary": summary, "latency_ms": res["latency_ms"]}, indent=2))
    (out / "table.md").write_text(table + "\n")
    png = E.plot_horizon(res["records"], out / "horizon.png")
    typer.echo(table)
    typer.echo("\nms per question (read + answer): " +
               ", ".join(f"{k} {v:.1f}" for k, v in res["latency_ms"].items()))
    typer.echo(f"-> {out / 'table.md'}, {png}")
