"""QA latency benchmark: question latency against stream length, incremental memory vs rebuild.

    python benchmarks/qa.py                  # 1k, 10k, 50k frames, both presets
    python benchmarks/qa.py --quick          # 1k, 5k frames

For each stream length T, a ``PyramidMemory`` is fed T frames of 16 x 16 tokens (cycled
from a pool of encoded StreamWorld frames, so writing costs what it costs in a real stream and
nothing is generated in the timed part). Then StreamWorld questions are answered, timed three
ways in the same process:

- **incremental** (streammem, as ``StreamingQAPipeline`` runs): before each question the
  stream goes on for ``--between`` frames (untimed; default 8, one question per second of
  video at 8 fps), then read the memory kept up to date while streaming + answer with the
  stream's ``MemoryCache`` (so the timed part includes encoding the frames stored since the
  last question);
- **no cache**: the same read + answer with the memory encoded from scratch;
- **rebuild** (VideoChat-Online's released evaluation): for every question, build a fresh
  memory from the first frame up to the question's time, then read + answer.

Reported: milliseconds for one question asked alone (read + answer; what a live user waits),
with and without the cache, per question in a batch of ``--questions``, and per question with a
rebuild (medians over repeats); the incremental latency must stay flat in T and under 50 ms for
the shipped answerer.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from streammem.memory import PyramidMemory
from streammem.pipelines.qa import RETENTIONS, retention_overrides

ROOT = Path(__file__).resolve().parents[1] / "streammem" / "checkpoints"


def load_models(answerer: str | None = None):
    from streammem.models.answerer import SmallAnswerer
    from streammem.models.grid_encoder import GridEncoder
    from streammem.train.qa_data import fit_vocab

    path = Path(answerer) if answerer else ROOT / "answerer"
    if (path / "model.safetensors").exists():
        enc = GridEncoder.from_pretrained(str(ROOT / "grid_encoder")).eval()
        ans = SmallAnswerer.from_pretrained(str(path)).eval()
        return enc, ans, "shipped checkpoints" if answerer is None else f"answerer {path}"
    torch.manual_seed(0)
    enc = GridEncoder().eval()
    return enc, SmallAnswerer(vocab=fit_vocab().words, token_dim=enc.dim).eval(), "random weights (no checkpoint)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1_000, 10_000, 50_000])
    ap.add_argument("--presets", nargs="+", default=["ovbench", "offline"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--questions", type=int, default=8, help="questions per timed batch")
    ap.add_argument("--between", type=int, default=8,
                    help="frames streamed (untimed) before each timed question (default 8: one per second at 8 fps)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--answerer", default=None, help="answerer checkpoint folder (default: the shipped one)")
    ap.add_argument("--retention", default="spread", choices=sorted(RETENTIONS),
                    help="pyramid retention (default: spread, as StreamingQAPipeline)")
    args = ap.parse_args()
    if args.quick:
        args.lengths, args.repeats = [1_000, 5_000], 3
    from streammem.world import World

    enc, ans, what = load_models(args.answerer)
    mem_pool = getattr(ans, "memory_pool", "mean")  # the pyramid pooling the answerer was trained on
    world = World(seed=5, preset="medium", size=256, seconds=60, drop_frames=False)
    frames = list(World(seed=5, preset="medium", size=256, frames=64, drop_frames=False))
    with torch.no_grad():
        pool = enc.encode_images([f.image for f in frames])
    qs = [q for q in world.questions(every_s=5)][: args.questions]
    questions, cands = [q["question"] for q in qs], [q["candidates"] for q in qs]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; answerer: {what} "
          f"(pyramid pool={mem_pool!r}, retention={args.retention!r}); "
          f"{len(qs)} questions per batch, median of {args.repeats}\n")
    print("| preset | frames streamed | memory tokens | one question ms | one question, no cache ms "
          "| incremental ms/question (batch) | rebuild ms/question | rebuild / incremental |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for preset in args.presets:
        flat = []
        for T in args.lengths:
            mem = PyramidMemory.from_preset(preset, dim=enc.dim, pool=mem_pool, **retention_overrides(args.retention))
            toks = [enc.tokens(pool[i % len(pool)], i, i / 8) for i in range(len(pool))]
            fed = [0]

            def feed(m, n, start=0):
                for i in range(start, start + n):
                    t = toks[i % len(toks)]
                    t.frame_index.fill_(i)
                    t.timestamp.fill_(i / 8)
                    m.write(t)

            def more(n):  # the stream goes on (untimed)
                feed(mem, n, fed[0])
                fed[0] += n

            more(T)
            cache = ans.new_cache()
            ans.answer_many(mem.read(), questions, cands, (fed[0] - 1) / 8, cache=cache)  # the stream's cache is warm
            one, plain, inc = [], [], []
            for r in range(args.repeats):
                more(args.between)
                at = (fed[0] - 1) / 8
                q, c = questions[r % len(qs)], cands[r % len(qs)]
                t0 = time.perf_counter()
                ans.answer(mem.read(), q, c, at, cache=cache)
                one.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                ans.answer(mem.read(), q, c, at)
                plain.append(time.perf_counter() - t0)
            for _ in range(args.repeats):
                more(args.between)
                t0 = time.perf_counter()
                ans.answer_many(mem.read(), questions, cands, (fed[0] - 1) / 8, cache=cache)
                inc.append((time.perf_counter() - t0) / len(qs))
            reb = []
            at = (fed[0] - 1) / 8
            for _ in range(max(1, args.repeats // 2)):
                # the reference evaluation rebuilds the memory for every question
                t0 = time.perf_counter()
                fresh = PyramidMemory.from_preset(preset, dim=enc.dim, pool=mem_pool,
                                                  **retention_overrides(args.retention))
                feed(fresh, fed[0])
                t1 = time.perf_counter()
                ans.answer_many(fresh.read(), questions, cands, at)
                reb.append((t1 - t0) + (time.perf_counter() - t1) / len(qs))
            i_ms, r_ms = 1000 * statistics.median(inc), 1000 * statistics.median(reb)
            o_ms, p_ms = 1000 * statistics.median(one), 1000 * statistics.median(plain)
            flat.append(o_ms)
            print(f"| {preset} | {T:,} | {mem.num_tokens:,} | {o_ms:.1f} | {p_ms:.1f} | {i_ms:.1f} | {r_ms:.1f} "
                  f"| {r_ms / i_ms:.0f}x |")
        print(f"| {preset} | late / early one-question latency | | {flat[-1] / flat[0]:.2f} | | | | |")


if __name__ == "__main__":
    main()
