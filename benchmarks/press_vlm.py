"""KV-cache presses over a VLM's memory prefix: memory tokens kept against the change in the answer.

    python benchmarks/press_vlm.py [--seeds 3 --questions 6 --out docs/results/press_vlm.md]

Builds tiny random SmolVLM models (SigLIP-style vision model 1 layer / 32 px / 2 px patches,
pixel shuffle 2, Llama LM hidden 64 / 4 layers / 4 heads / 2 KV heads; seeded, no download),
saves each to a folder and loads it through ``hf:<folder>`` as a hub model would be. For each
model it streams a StreamWorld clip (8 fps) into the ovbench Pyramid Memory Bank (832 tokens)
and asks multiple-choice questions (4 options) at several times, once uncompressed and once per
press and ratio (``CachePress``: prefill the memory prefix, compress each layer's cache, decode
the question). Reported per press and ratio: memory tokens kept (exact; ``mikv`` keeps the rest
quantized to 4 bits), cache entries, the total variation and KL(uncompressed || compressed) of
the option probabilities (mean and max over questions), how often the chosen option stays the
same, and CPU ms per question (process time, one thread: stable on a shared machine).

The models are random: the figures measure how much each press perturbs a model's read of its
memory, not accuracy; a trained VLM's numbers will differ.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from streammem.memory import PyramidMemory  # noqa: E402
from streammem.models.vlm import CachePress, load_answerer  # noqa: E402
from streammem.models.vlm_press import PRESS_NAMES  # noqa: E402
from streammem.world import World  # noqa: E402

VOCAB = (["[PAD]", "[UNK]", "<|im_start|>", "<end_of_utterance>", "<image>"] + list("ABCDEFGHIJ")
         + list("0123456789") + list(".:'?,\n")
         + ("User Assistant Frame at s Answer with the option's letter from given choices directly What Which colour "
            "is was object appeared first last left right moving vanished red blue green yellow cat car ball "
            "person").split())
QUESTIONS = [("What colour is the moving object ?", ["red", "blue", "green", "yellow"]),
             ("Which object appeared first ?", ["cat", "car", "ball", "person"]),
             ("Which object vanished ?", ["ball", "person", "cat", "car"])]
RATIOS = (1.0, 0.5, 0.25, 0.1)


def save_tiny_model(folder: Path, seed: int) -> None:
    """A tiny random SmolVLM, its word-level tokenizer and image processor, in ``folder``."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(), pre_tokenizers.Digits(individual_digits=True)])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<end_of_utterance>",
                                         unk_token="[UNK]", pad_token="[PAD]").save_pretrained(folder)
    cfg = transformers.SmolVLMConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           image_size=32, patch_size=2),
        text_config=dict(model_type="llama", vocab_size=len(VOCAB), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, bos_token_id=2, eos_token_id=3, pad_token_id=0),
        scale_factor=2, image_token_id=VOCAB.index("<image>"))
    torch.manual_seed(seed)
    transformers.SmolVLMForConditionalGeneration(cfg).save_pretrained(folder)
    transformers.SmolVLMImageProcessorPil(image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(folder)


def tv_kl(p: np.ndarray, q: np.ndarray) -> tuple[float, float]:
    return 0.5 * float(np.abs(p - q).sum()), float(np.sum(p * (np.log(p) - np.log(q))))


def run(seeds: int, n_questions: int) -> list[dict]:
    rows: dict[tuple[str, float], dict] = {}
    for seed in range(seeds):
        with tempfile.TemporaryDirectory() as d:
            save_tiny_model(Path(d), seed)
            qa = load_answerer(f"hf:{d}", device="cpu", evidence_top_k=0)
        times = np.linspace(3.0, 8.0, n_questions)
        frames = list(World(seed=100 + seed, preset="medium", size=128, frames=int(8 * times[-1]) + 1))
        mem = PyramidMemory.from_preset("ovbench", dim=qa.dim)
        feats = qa.encode_frames(frames)
        i = 0
        for qi, t in enumerate(times):
            while i < len(frames) and frames[i].timestamp <= t:
                mem.write(feats[i])
                i += 1
            memory = mem.read()
            question, cands = QUESTIONS[qi % len(QUESTIONS)]
            qa.press = None
            t0 = time.process_time()
            base = qa.answer(memory, question, cands)
            rows.setdefault(("none", 1.0), {"ms": [], "tv": [], "kl": [], "same": [], "kept": [], "cache": [],
                                            "n": []})["ms"].append(1e3 * (time.process_time() - t0))
            p = np.asarray(base.probs)
            for name in PRESS_NAMES:
                for ratio in RATIOS:
                    qa.press = CachePress(name, ratio)
                    t0 = time.process_time()
                    a = qa.answer(memory, question, cands)
                    ms = 1e3 * (time.process_time() - t0)
                    tv, kl = tv_kl(p, np.asarray(a.probs))
                    r = rows.setdefault((name, ratio), {"ms": [], "tv": [], "kl": [], "same": [], "kept": [],
                                                        "cache": [], "n": []})
                    for k, v in (("ms", ms), ("tv", tv), ("kl", kl), ("same", a.index == base.index),
                                 ("kept", a.extra["memory_tokens_kept"]), ("cache", a.extra["cache_tokens"]),
                                 ("n", len(memory))):
                        r[k].append(v)
    return [{"press": k[0], "ratio": k[1], **v} for k, v in rows.items()]


def table(rows: list[dict]) -> str:
    lines = ["| press | ratio | memory tokens kept (of) | cache entries | TV mean | TV max | KL mean | same choice | CPU ms / question |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["press"] == "none":
            lines.append(f"| none | - | all | - | 0 | 0 | 0 | 100% | {np.median(r['ms']):.0f} |")
            continue
        lines.append(f"| {r['press']} | {r['ratio']:g} | {np.mean(r['kept']):.0f} ({np.mean(r['n']):.0f}) | "
                     f"{np.mean(r['cache']):.0f} | {np.mean(r['tv']):.2e} | {np.max(r['tv']):.2e} | "
                     f"{np.mean(r['kl']):.2e} | {100 * np.mean(r['same']):.0f}% | {np.median(r['ms']):.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3, help="tiny random models")
    ap.add_argument("--questions", type=int, default=6, help="questions per model")
    ap.add_argument("--out", type=Path, default=Path("docs/results/press_vlm.md"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = run(args.seeds, args.questions)
    text = table(rows)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        "# KV-cache presses over a VLM's memory prefix (tiny random SmolVLM)\n\n"
        f"`python benchmarks/press_vlm.py --seeds {args.seeds} --questions {args.questions}`: {args.seeds} tiny random "
        "SmolVLM models (vision 1 layer 32 px, LM hidden 64, 4 layers, 2 KV heads) loaded through `hf:<folder>`, "
        f"{args.questions} four-option questions each over the ovbench Pyramid Memory Bank of a StreamWorld clip "
        "(8 fps, asked at 3 to 8 s). Each press compresses the key-value cache of the memory prefix to `ratio` of "
        "its memory tokens (the frame markers and prompt text are kept) before the question is decoded; TV and KL "
        "compare the option probabilities with the uncompressed answer. `mikv` keeps every entry, the ones outside "
        "its H2O choice quantized to 4 bits, so its cache does not shrink. CPU, one thread.\n\n"
        + text + "\n\nRandom weights: this measures how far each press moves a model's answer, not accuracy; a "
        "random LM's option probabilities are close to uniform, so absolute changes are small, the chosen "
        "option flips easily, and a trained VLM's figures will differ. Ratio 1 keeps the cache as it is: its TV "
        "(below 1e-7) is float rounding between one pass and prefill + question. h2o, kvmerger and mikv read "
        "the attention each memory entry received during the prefill, so that pass runs with eager attention "
        "and costs more; sink_window needs no scores.\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
