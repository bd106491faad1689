"""Streaming QA evaluation: OVBench scoring, memory baselines at equal token budgets, horizon plot.

Scoring follows OVBench's ``mcq_acc``: the option letter is pulled out of the answer text with
a regular expression and compared with the answer's letter; we report per-question (micro)
accuracy and the unweighted mean over (answer_type, sub_answer_type) pairs (macro, OVBench's
"Avg").

Every compared memory is a :class:`~streammem.memory.Memory` (the baselines are
:mod:`streammem.memory.baselines`). Memories compared in one run, every one fed the same encoded frames, at one token budget
(``ovbench``: 832 tokens, ``offline``: 9,984 tokens, VideoChat-Online's two presets):

- ``window``: the newest frames at the full 16 x 16 grid (budget / 256 frames);
- ``uniform``: frames spread uniformly over the whole past at 16 x 16 (budget / 256 frames;
  when full, every other kept frame is dropped and the keeping stride doubles);
- ``pyramid``: :class:`~streammem.memory.PyramidMemory` with the budget's preset;
- ``dual``: :class:`~streammem.memory.DualMemory` (a FIFO of the newest frames' moving tokens
  beside persistent static slots, the rest of the budget), routed by camera-compensated motion;
- ``full``: every frame, pooled to 4 x 4 (16 tokens), up to the stream's length: the
  reference ceiling (it has no token budget; it is run once and reported beside each budget);
- ``none``: an empty memory: what the answerer gets from the question alone (its priors);
- on request, ``pyramid-salient`` and ``full-salient``: the same with salience-weighted
  pooling (``PyramidConfig.pool="salient"``: the encoder's objectness weights each block).
- on request, ``pyramid-spread`` and ``pyramid-salient-spread``: the pyramid with the spread
  retention (:data:`~streammem.memory.PYRAMID_SPREAD`: time order, a merge penalty per second
  between frames, the frame leaving the shorter gap evicted), so old events keep frames.

Questions come from StreamWorld streams (``seconds`` long, at 8 fps) or, for real videos, from
OVBench JSON files (:func:`load_ovbench`).

Example:
    >>> mcq_letter("(B) the red star"), mcq_letter("Answer: C."), mcq_letter("none")
    ('B', 'C', None)
    >>> score([{"answer_type": "PM", "sub_answer_type": "PM-1", "correct": True},
    ...        {"answer_type": "SP", "sub_answer_type": "SP-1", "correct": False},
    ...        {"answer_type": "SP", "sub_answer_type": "SP-1", "correct": True}])["macro"]
    75.0
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from streammem.memory import PYRAMID_SPREAD, DualMemory, PyramidMemory
from streammem.memory import baselines as memory_baselines
from streammem.memory.baselines import FullConfig
from streammem.types import Tokens

__all__ = ["mcq_letter", "score", "load_ovbench", "make_memories",
           "evaluate_qa", "evaluate_ovbench", "evaluate_stream", "summarise", "format_table", "plot_horizon", "BUDGETS", "MEMORIES"]

BUDGETS = {"ovbench": 832, "offline": 9984}
MEMORIES = ("none", "window", "uniform", "pyramid", "dual", "full")
_ORDER = ("none", "window", "uniform", "pyramid", "pyramid-salient", "pyramid-spread", "pyramid-salient-spread", "dual",
          "full", "full-salient")  # table rows
_BUDGET_FREE = ("full", "full-salient", "none")  # run once, reported beside every budget
TYPES = ("PM", "SP", "TP", "STP", "HD", "FP")
_LETTER_RE = re.compile(r"(?:^|[^A-Za-z])\(?([A-E])(?:[).:,]|\s|$)")


def mcq_letter(text: str) -> str | None:
    """The first option letter in ``text`` (``"(B) ..."``, ``"B."``, ``"Answer: B"``), else None."""
    m = _LETTER_RE.search(text.strip())
    return m.group(1) if m else None


def score(records: list[dict]) -> dict:
    """``records`` with ``answer_type``, ``sub_answer_type``, ``correct`` -> micro (per question)
    and macro (mean over (type, sub-type) pairs) accuracy in percent, and per pair."""
    if not records:
        return {"micro": float("nan"), "macro": float("nan"), "pairs": {}, "n": 0}
    pairs: dict[str, list[int]] = {}
    for r in records:
        p = pairs.setdefault(f"{r['answer_type']}/{r['sub_answer_type']}", [0, 0])
        p[0] += bool(r["correct"])
        p[1] += 1
    acc = {k: 100.0 * a / n for k, (a, n) in sorted(pairs.items())}
    return {"micro": 100.0 * sum(bool(r["correct"]) for r in records) / len(records),
            "macro": float(np.mean(list(acc.values()))), "pairs": acc, "n": len(records)}


# ---------------------------------------------------------------------------- OVBench files
def load_ovbench(path: str | Path) -> list[dict]:
    """Questions from an OVBench JSON file, in our shape.

    Reads both released layouts: the lmms-eval list (``question``, ``candidates``, ``answer``
    text, ``answer_type``, ``sub_answer_type``, ``middle_frame_timestamp``, ``video``, ...) and
    the streaming evaluator's per-video records (``video_id``, ``fps``, ``questions`` with
    ``options`` ``"A. ..."`` lines and ``answer`` as a letter). Returns dicts with
    ``video``, ``question``, ``candidates``, ``answer``, ``answer_letter``, ``answer_type``,
    ``sub_answer_type``, ``middle_frame_timestamp`` (and the record's other fields).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read OVBench JSON {path}: {exc}") from exc
    if isinstance(data, dict):
        data = data.get("data") or data.get("questions") or [data]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of questions or of videos")
    out = []
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise ValueError(f"{path}: record {i} is not an object")
        if "questions" in rec:  # streaming layout: one video, many questions
            video = rec.get("video_id") or rec.get("video") or rec.get("clip")
            for j, q in enumerate(rec["questions"]):
                out.append(_from_stream_layout(q, video, rec, f"{path.name}[{i}].questions[{j}]"))
        else:
            out.append(_from_list_layout(rec, f"{path.name}[{i}]"))
    return out


def _need(rec: dict, keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in rec]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}")


def _from_list_layout(rec: dict, where: str) -> dict:
    _need(rec, ("question", "candidates", "answer"), where)
    cands = list(rec["candidates"])
    if rec["answer"] not in cands:
        raise ValueError(f"{where}: answer {rec['answer']!r} is not one of the candidates {cands!r}")
    q = dict(rec)
    q.update(candidates=cands, answer_letter="ABCDE"[cands.index(rec["answer"])],
             answer_type=rec.get("answer_type", "?"), sub_answer_type=rec.get("sub_answer_type", "?"),
             middle_frame_timestamp=float(rec.get("middle_frame_timestamp", rec.get("end", 0.0))))
    return q


def _from_stream_layout(q: dict, video, rec: dict, where: str) -> dict:
    _need(q, ("question", "options", "answer"), where)
    opts = q["options"] if isinstance(q["options"], list) else str(q["options"]).splitlines()
    cands = [re.sub(r"^\s*\(?[A-E][).:]\s*", "", o).strip() for o in opts if o.strip()]
    letter = mcq_letter(str(q["answer"]))
    if letter is None or "ABCDE".index(letter) >= len(cands):
        raise ValueError(f"{where}: answer {q['answer']!r} is not an option letter of {len(cands)} options")
    out = dict(q)
    out.update(video=video, fps=rec.get("fps"), candidates=cands, answer=cands["ABCDE".index(letter)],
               answer_letter=letter, answer_type=q.get("answer_type", q.get("type", "?")),
               sub_answer_type=q.get("sub_answer_type", q.get("sub_type", "?")),
               middle_frame_timestamp=float(q.get("middle_frame_timestamp", q.get("time", q.get("end", 0.0)))))
    return out


# ---------------------------------------------------------------------------- baseline memories
def make_memories(budget: str, dim: int, names: tuple[str, ...] = MEMORIES,
                  full_frames: int = FullConfig.frames) -> dict[str, Callable]:
    """Factories of the compared memories at ``budget`` (``"ovbench"`` or ``"offline"``), all
    :class:`~streammem.memory.Memory` classes; ``full_frames`` bounds the ``full`` memories."""
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {sorted(BUDGETS)}, got {budget!r}")
    n = BUDGETS[budget]
    fifo = 2 if budget == "ovbench" else 8
    table = {
        "window": lambda: memory_baselines.WindowMemory(dim=dim, frames=n // 256),
        "uniform": lambda: memory_baselines.UniformMemory(dim=dim, frames=n // 256),
        "pyramid": lambda: PyramidMemory.from_preset(budget, dim=dim),
        "dual": lambda: DualMemory(dim=dim, slots=n - fifo * 256, fifo_frames=fifo, max_tokens_per_frame=256),
        "full": lambda: memory_baselines.FullMemory(dim=dim, frames=full_frames),
        "pyramid-salient": lambda: PyramidMemory.from_preset(budget, dim=dim, pool="salient"),
        "pyramid-spread": lambda: PyramidMemory.from_preset(budget, dim=dim, **PYRAMID_SPREAD),
        "pyramid-salient-spread": lambda: PyramidMemory.from_preset(budget, dim=dim, pool="salient", **PYRAMID_SPREAD),
        "full-salient": lambda: memory_baselines.FullMemory(dim=dim, frames=full_frames, pool="salient"),
        "none": lambda: memory_baselines.EmptyMemory(dim=dim),
    }
    unknown = [k for k in names if k not in table]
    if unknown:
        raise ValueError(f"unknown memories {unknown}; choose from {list(table)}")
    return {k: table[k] for k in names}


# ---------------------------------------------------------------------------- the runner
def evaluate_qa(answerer, encoder, seeds=(0, 1), presets=("medium",), seconds: float = 600.0,
                budgets=("offline", "ovbench"), memories: tuple[str, ...] = MEMORIES, every_s: float = 10.0,
                size: int = 256, fps: float = 8.0, batch: int = 32, progress: bool = True) -> dict:
    """Run every memory at every budget on the same encoded StreamWorld streams; return
    per-question records and latency. Each question is answered over each memory as it was after
    the last frame at or before the question's time (causal)."""
    from streammem.world import World

    records: list[dict] = []
    latency: dict[str, list[float]] = {}
    for preset in presets:
        for seed in seeds:
            world = World(seed=seed, preset=preset, size=size, fps=fps, seconds=seconds, drop_frames=False)
            evaluate_stream(world, world.questions(every_s=every_s), answerer, encoder, budgets, memories, records,
                            latency, {"preset": preset, "seed": seed}, batch, progress, total=world.num_frames,
                            desc=f"qa eval {preset} seed {seed}")
    return {"records": records, "latency_ms": {k: 1000 * float(np.mean(v)) for k, v in latency.items()}}


def evaluate_ovbench(answerer, encoder, questions: list[dict], video_root: str | Path, budgets=("ovbench",),
                     memories: tuple[str, ...] = ("pyramid",), fps: float = 8.0, batch: int = 32,
                     progress: bool = True) -> dict:
    """OVBench questions (:func:`load_ovbench`) on their videos under ``video_root``, streamed at
    ``fps`` (8, as VideoChat-Online's OVBench runs); each question answered at its
    ``middle_frame_timestamp``. A video that cannot be read is reported in ``errors`` and the
    others go on."""
    from streammem.io import SourceError, open_source

    records: list[dict] = []
    latency: dict[str, list[float]] = {}
    errors: dict[str, str] = {}
    by_video: dict[str, list[dict]] = {}
    for q in questions:
        by_video.setdefault(str(q.get("video")), []).append(q)
    for video, qs in by_video.items():
        path = Path(video_root) / video
        try:
            src = open_source(str(path), fps=fps)
            evaluate_stream(src, qs, answerer, encoder, budgets, memories, records, latency, {"video": video}, batch,
                            progress, desc=f"ovbench {video}")
        except (SourceError, ValueError, OSError) as exc:
            errors[video] = str(exc)
    return {"records": records, "latency_ms": {k: 1000 * float(np.mean(v)) for k, v in latency.items()},
            "errors": errors}


def evaluate_stream(frames, questions: list[dict], answerer, encoder, budgets, memories, records: list[dict],
                    latency: dict, tags: dict, batch: int = 32, progress: bool = True, total: int | None = None,
                    desc: str = "qa") -> None:
    """Stream ``frames`` once through ``encoder`` into every (budget, memory); answer each
    question over each memory just before the first frame past its time (or at the end).
    With ``total`` (the stream's frame count) the ``full`` memories are sized to it."""
    from tqdm import tqdm

    from streammem.models.motion import MotionScorer
    from streammem.models.grid_encoder import grid_tokens

    by_time: dict[float, list[dict]] = {}
    for q in questions:
        by_time.setdefault(float(q["middle_frame_timestamp"]), []).append(q)
    times = sorted(by_time)
    mems = {}
    for i, b in enumerate(budgets):  # budget-free memories (_BUDGET_FREE) run once, under the first budget
        full = max(total, 1) if total is not None else FullConfig.frames
        for m, f in make_memories(b, encoder.dim, memories, full_frames=full).items():
            if i == 0 or m not in _BUDGET_FREE:
                mems[(b, m)] = f()
    # each memory's answerer cache, as StreamingQAPipeline keeps one per stream
    caches = {k: answerer.new_cache() for k in mems} if hasattr(answerer, "new_cache") else {}
    scorer = MotionScorer(grid=encoder.grid) if "dual" in memories else None
    ti, buf = 0, []

    def flush() -> None:
        if not buf:
            return
        with torch.no_grad():
            grids = encoder.encode_images([f.image for f, _ in buf])
        for (f, motion), g in zip(buf, grids):
            tok = grid_tokens(encoder, g, f.index, f.timestamp)
            for (b, name), m in mems.items():
                if name == "dual":
                    m.write(Tokens(features=tok.features, frame_index=tok.frame_index, timestamp=tok.timestamp,
                                   grid=tok.grid, level=tok.level, extras={"static": torch.from_numpy(1.0 - motion)}))
                else:
                    m.write(tok)
        buf.clear()

    for frame in tqdm(frames, total=total, desc=desc, disable=not progress):
        while ti < len(times) and times[ti] < frame.timestamp:
            flush()
            _answer_all(answerer, mems, caches, by_time[times[ti]], times[ti], records, latency, tags)
            ti += 1
        motion = np.asarray(scorer(frame.image), np.float32).reshape(-1) if scorer is not None else None
        buf.append((frame, motion))
        if len(buf) >= batch:
            flush()
    flush()
    while ti < len(times):
        _answer_all(answerer, mems, caches, by_time[times[ti]], times[ti], records, latency, tags)
        ti += 1


def _answer_all(answerer, mems, caches, questions, at, records, latency, tags) -> None:
    for (budget, name), m in mems.items():
        t0 = time.perf_counter()
        memory = m.read()
        if "part" in memory.extras:  # DualMemory: the answerer tells its parts apart by level
            memory = Tokens(features=memory.features, frame_index=memory.frame_index, timestamp=memory.timestamp,
                            grid=memory.grid, level=memory.extras["part"])
        if hasattr(answerer, "answer_many"):
            kw = {"cache": caches[(budget, name)]} if (budget, name) in caches else {}
            answers = answerer.answer_many(memory, [q["question"] for q in questions],
                                           [q["candidates"] for q in questions], at, evidence_k=0, **kw)
        else:
            answers = [answerer.answer(memory, q["question"], q["candidates"], at) for q in questions]
        latency.setdefault(f"{budget}/{name}", []).append((time.perf_counter() - t0) / len(questions))
        for q, a in zip(questions, answers):
            letter = mcq_letter(f"({a.letter}) {a.text}")
            records.append({"budget": budget, "memory": name, **tags,
                            "answer_type": q["answer_type"], "sub_answer_type": q["sub_answer_type"],
                            "horizon_s": float(q.get("horizon_s", 0.0)), "needle": bool(q.get("needle")),
                            "n_options": len(q["candidates"]), "tokens": len(memory),
                            "correct": letter == q["answer_letter"]})


def _broadcast(records: list[dict]) -> list[dict]:
    """Budget-free baselines (_BUDGET_FREE) are run once; show them beside every budget."""
    budgets = sorted({r["budget"] for r in records})
    shared = [r for r in records if r["memory"] in _BUDGET_FREE]
    out = [r for r in records if r["memory"] not in _BUDGET_FREE]
    for b in budgets:
        out += [dict(r, budget=b) for r in shared]
    return out


def summarise(records: list[dict], min_horizon: float = 60.0) -> dict:
    """``{budget: {memory: {micro, macro, per type, "PM>=60s", n}}}``."""
    records = _broadcast(records)
    budgets = sorted({r["budget"] for r in records})
    out: dict = {}
    for budget in budgets:
        names = _ORDER + tuple(sorted({r["memory"] for r in records} - set(_ORDER)))
        for mem in [m for m in names if any(r["memory"] == m and r["budget"] == budget for r in records)]:
            rs = [r for r in records if r["budget"] == budget and r["memory"] == mem]
            s = score(rs)
            row = {"micro": s["micro"], "macro": s["macro"], "n": s["n"],
                   "tokens": float(np.mean([r["tokens"] for r in rs]))}
            for t in TYPES:
                sub = [r for r in rs if r["answer_type"] == t]
                row[t] = score(sub)["micro"] if sub else float("nan")
            far = [r for r in rs if r["answer_type"] == "PM" and r["horizon_s"] >= min_horizon]
            row[f"PM>={min_horizon:g}s"] = score(far)["micro"] if far else float("nan")
            row[f"PM>={min_horizon:g}s n"] = len(far)
            out.setdefault(budget, {})[mem] = row
    return out


def format_table(summary: dict, min_horizon: float = 60.0) -> str:
    key = f"PM>={min_horizon:g}s"
    cols = ["micro", "macro", *TYPES, key]
    lines = []
    for budget, rows in summary.items():
        lines.append(f"\n**{budget}** budget ({BUDGETS.get(budget, '?')} tokens)\n")
        lines.append("| memory | mean tokens | " + " | ".join(cols) + " | questions |")
        lines.append("|---|---:|" + "---:|" * len(cols) + "---:|")
        for mem, r in rows.items():
            cells = [f"{r[c]:.1f}" if r[c] == r[c] else "-" for c in cols]
            lines.append(f"| {mem} | {r['tokens']:.0f} | " + " | ".join(cells) + f" | {r['n']} ({r[key + ' n']} far) |")
    return "\n".join(lines)


def horizon_curve(records: list[dict], edges=(0, 5, 15, 30, 60, 120, 240, 600)) -> dict:
    """Past-memory accuracy per horizon bucket: ``{(budget, memory): [(lo, hi, acc, n), ...]}``."""
    out: dict = {}
    for r in _broadcast(records):
        if r["answer_type"] != "PM":
            continue
        out.setdefault((r["budget"], r["memory"]), []).append(r)
    curves = {}
    for k, rs in out.items():
        rows = []
        for lo, hi in zip(edges[:-1], edges[1:]):
            sel = [r for r in rs if lo <= r["horizon_s"] < hi]
            rows.append((lo, hi, score(sel)["micro"] if sel else float("nan"), len(sel)))
        curves[k] = rows
    return curves


def plot_horizon(records: list[dict], path: str | Path, chance: float = 25.0) -> Path:
    """Plot past-memory accuracy against how far back the asked-about event was (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = horizon_curve(records)
    budgets = sorted({b for b, _ in curves})
    fig, axes = plt.subplots(1, len(budgets), figsize=(5.5 * len(budgets), 4), squeeze=False)
    for ax, budget in zip(axes[0], budgets):
        for (b, mem), rows in sorted(curves.items()):
            if b != budget:
                continue
            xs = [math.sqrt(max(lo, 1) * hi) for lo, hi, acc, n in rows if n]
            ys = [acc for lo, hi, acc, n in rows if n]
            ax.plot(xs, ys, marker="o", label=mem)
        ax.axhline(chance, color="grey", ls="--", lw=1, label="chance")
        ax.set_xscale("log")
        ax.set_xlabel("seconds since the asked-about event")
        ax.set_ylabel("past-memory accuracy (%)")
        ax.set_title(f"{budget} budget ({BUDGETS.get(budget, '?')} tokens)")
        ax.set_ylim(0, 100)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
