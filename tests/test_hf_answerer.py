"""``hf:`` VLM answerers (SmolVLM2 family) on a tiny random model saved to a local folder and loaded
through the same path a hub id takes: multiple choice, free-form answers, KV-cache presses over
the memory prefix, the CLI, and the one-line error without the hub (no downloads)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in these tests may reach the hub
import transformers  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from streammem.cli import app  # noqa: E402
from streammem.io import VideoWriter  # noqa: E402
from streammem.memory import PyramidMemory  # noqa: E402
from streammem.models.hf import HubUnavailable  # noqa: E402
from streammem.models.smolvlm import SmolVLMAnswerer  # noqa: E402
from streammem.models.vlm import CachePress, load_answerer  # noqa: E402
from streammem.models.vlm_press import PRESS_NAMES  # noqa: E402
from streammem.pipelines.qa import load_hf_qa  # noqa: E402
from streammem.types import Frame, Tokens  # noqa: E402

SPECIALS = ["[PAD]", "[UNK]", "<|im_start|>", "<end_of_utterance>", "<image>"]
WORDS = ("User Assistant Frame at s Answer the question briefly with option's letter from given choices directly "
         "What color is ball red blue green yellow happened a").split()
VOCAB = SPECIALS + list("ABCDEFGHIJ") + list("0123456789") + list(".:'?,\n") + WORDS
MEAN, STD = (0.4, 0.45, 0.5), (0.3, 0.25, 0.2)
QUESTION, CANDS = "What color is the ball ?", ["red", "blue", "green", "yellow"]


def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer over VOCAB with SmolVLM's turn markers, built without any download."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(), pre_tokenizers.Digits(individual_digits=True)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>",
                                                eos_token="<end_of_utterance>", unk_token="[UNK]", pad_token="[PAD]")


def tiny_smolvlm() -> transformers.SmolVLMForConditionalGeneration:
    """1-layer SigLIP-style vision model (32 px, 2 px patches: a 16x16 grid), pixel shuffle 2,
    2-layer Llama (hidden 32, 2 KV heads), random weights."""
    cfg = transformers.SmolVLMConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           image_size=32, patch_size=2),
        text_config=dict(model_type="llama", vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, bos_token_id=2, eos_token_id=3, pad_token_id=0),
        scale_factor=2, image_token_id=VOCAB.index("<image>"))
    torch.manual_seed(0)
    return transformers.SmolVLMForConditionalGeneration(cfg).eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    """The tiny model, its tokenizer and image processor, saved as a hub checkpoint would be."""
    d = tmp_path_factory.mktemp("smolvlm")
    tiny_smolvlm().save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    transformers.SmolVLMImageProcessorPil(image_mean=list(MEAN), image_std=list(STD)).save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def qa(folder) -> SmolVLMAnswerer:
    return load_answerer(f"hf:{folder}", device="cpu", evidence_top_k=3, max_new_tokens=4)


def frames(n: int, seed: int = 0) -> list[Frame]:
    rng = np.random.default_rng(seed)
    return [Frame(index=i, timestamp=i / 8, image=rng.integers(0, 256, (36, 48, 3), dtype=np.uint8)) for i in range(n)]


@pytest.fixture(scope="module")
def memory(qa) -> Tokens:
    mem = PyramidMemory.from_preset("ovbench", dim=qa.dim)
    for tok in qa.encode_frames(frames(20)):
        mem.write(tok)
    return mem.read()


@pytest.fixture(autouse=True)
def _no_press(qa):
    qa.press = None
    yield
    qa.press = None


def stored(memory: Tokens) -> dict[int, float]:
    return {int(f): float(t) for f, t in zip(memory.frame_index, memory.timestamp)}


def test_hf_folder_loads_the_smolvlm_answerer_with_its_processor(qa, folder, tmp_path):
    assert isinstance(qa, SmolVLMAnswerer) and qa.dim == 32 and qa.grid == 16 and qa.scale_factor == 2
    assert qa.image_mean == pytest.approx(MEAN) and qa.image_std == pytest.approx(STD)  # read from the folder
    assert qa.prompt_format.startswith("<|im_start|>User:")
    # a model of another family is named, with what is supported
    transformers.LlamaConfig(vocab_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=1).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'llama' model.*smolvlm"):
        load_answerer(f"hf:{tmp_path}")


def test_memory_tokens_go_through_the_connector_as_uniform_blocks(qa, memory):
    fr = frames(2)
    toks = qa.encode_frames(fr)
    hs = qa.model.model.vision_model(pixel_values=qa.pixel_values(fr[:1])).last_hidden_state[0]
    assert toks[0].features.shape == (256, 32)
    torch.testing.assert_close(toks[0].features, hs, rtol=1e-5, atol=1e-5)
    # one memory token -> one LM position: the connector's output for an s x s block of that feature
    x = memory.features[:3]
    block = x[:, None, :].expand(3, 4, 32).contiguous()
    with torch.no_grad():
        torch.testing.assert_close(qa.project(x), qa.model.model.connector(block)[:, 0], rtol=1e-5, atol=1e-6)


def test_multiple_choice_probs_sum_to_one_with_evidence_in_memory(qa, memory):
    a = qa.answer(memory, QUESTION, CANDS, query_time=19 / 8)
    assert len(a.probs) == 4 and abs(sum(a.probs) - 1) < 1e-5 and a.index == int(np.argmax(a.probs))
    assert a.letter == "ABCD"[a.index] and a.text == CANDS[a.index] and a.extra["memory_tokens"] == len(memory) == 832
    held = stored(memory)
    assert 1 <= len(a.evidence) <= 3
    assert all(held[e["frame_index"]] == e["timestamp"] for e in a.evidence)


def test_free_form_answer_is_the_greedy_generation(qa, memory):
    a = qa.answer(memory, QUESTION, None, query_time=2.0)
    assert a.index == -1 and a.letter == "" and a.probs == [] and a.extra["free_form"]
    assert 1 <= a.extra["generated_tokens"] <= 4 and a.text
    tp = a.extra["token_probs"]
    assert all(0 < p <= 1 for p in tp) and a.confidence == pytest.approx(float(np.exp(np.mean(np.log(tp)))), rel=1e-4)
    # the decoding loop over the cache gives what transformers' own generate gives
    embeds, mask, _ = qa.build_inputs(memory, QUESTION, [])
    with torch.no_grad():
        gen = qa.model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert a.text == qa.tokenizer.decode(gen[0], skip_special_tokens=True).strip()
    held = stored(memory)
    assert a.evidence and all(held[e["frame_index"]] == e["timestamp"] for e in a.evidence)


@pytest.fixture(scope="module")
def base(qa, memory):
    qa.press = None
    return qa.answer(memory, QUESTION, CANDS)


@pytest.mark.parametrize("name", PRESS_NAMES)
def test_press_keeps_its_ratio_and_changes_the_answer_by_a_measured_amount(qa, memory, base, name):
    _, _, layout = qa.build_inputs(memory, QUESTION, CANDS)
    text_before_question = layout.suffix[0] - len(memory)
    qa.press = CachePress(name, ratio=1.0)
    same = qa.answer(memory, QUESTION, CANDS)  # ratio 1: the cache is not changed
    np.testing.assert_allclose(same.extra["letter_logits"], base.extra["letter_logits"], atol=1e-5)
    qa.press = CachePress(name, ratio=0.25)
    a = qa.answer(memory, QUESTION, CANDS)
    assert a.extra["memory_tokens_kept"] == 208 and abs(sum(a.probs) - 1) < 1e-5
    assert a.extra["cache_tokens"] == text_before_question + (832 if name == "mikv" else 208)
    tv = 0.5 * np.abs(np.subtract(a.probs, base.probs)).sum()
    assert 1e-7 < tv < 0.5, tv
    held = stored(memory)
    assert a.evidence and all(held[e["frame_index"]] == e["timestamp"] for e in a.evidence)


def test_press_layer_compression_keeps_text_and_the_press_choice():
    torch.manual_seed(0)
    keys, values = torch.randn(1, 2, 30, 4), torch.randn(1, 2, 30, 4)
    mem = torch.arange(5, 25)  # 20 memory entries between 5 text entries each side
    score = torch.rand(30)
    k, v, pos = CachePress("sink_window", ratio=0.3, n_sink=2).compress_layer(keys, values, mem, None)
    kept = [5, 6, 21, 22, 23, 24]  # 2 sinks + the 4 newest memory entries
    assert pos.tolist() == list(range(5)) + kept + list(range(25, 30))
    torch.testing.assert_close(k, keys[:, :, pos]) and torch.testing.assert_close(v, values[:, :, pos])
    _, _, pos = CachePress("h2o", ratio=0.3).compress_layer(keys, values, mem, score)
    heavy = (torch.argsort(-score[5:22], stable=True)[:3] + 5).sort().values.tolist()  # 3 heavy + 3 recent
    assert pos.tolist() == list(range(5)) + heavy + [22, 23, 24] + list(range(25, 30))
    with pytest.raises(ValueError, match="observed attention"):
        CachePress("kvmerger").compress_layer(keys, values, mem, None)
    with pytest.raises(ValueError, match="unknown press 'nope'"):
        CachePress("nope")
    with pytest.raises(ValueError, match="ratio"):
        CachePress("h2o", ratio=0)


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    rng = np.random.default_rng(0)
    with VideoWriter(path, fps=8) as w:
        for i in range(16):
            img = rng.integers(0, 80, (48, 64, 3), dtype=np.uint8)
            img[10:30, 4 + 2 * i: 20 + 2 * i] = (220, 30, 30)
            w.write(img)
    return str(path)


def invoke(*args):
    return CliRunner().invoke(app, ["ask", *map(str, args)])


def test_cli_answers_free_form_and_multiple_choice_with_a_press(folder, video, tmp_path):
    res = invoke(video, "--at", 1.0, "--answerer", f"hf:{folder}", "--max-new-tokens", 3, "--press", "h2o",
                 "--press-ratio", 0.25, "-o", tmp_path, "What happened ?")
    assert res.exit_code == 0, res.output
    assert "answering with" in res.output and "trained only on StreamWorld" not in res.output
    assert "Loading weights" not in res.output and "Traceback" not in res.output
    rec = json.loads((tmp_path / "answers.jsonl").read_text().splitlines()[0])
    assert rec["candidates"] == [] and rec["text"] and rec["extra"]["free_form"]
    n, kept = rec["extra"]["memory_tokens"], rec["extra"]["memory_tokens_kept"]
    assert kept == round(0.25 * n) and 0 < n <= 832
    assert f'-> "{rec["text"]}"' in res.output and f"h2o press kept {kept} of {n} memory tokens" in res.output
    assert rec["evidence"] and all(e["timestamp"] <= 1.0 for e in rec["evidence"])
    res = invoke(video, "--at", 0.5, "--answerer", f"hf:{folder}", QUESTION, "-c", "red", "-c", "blue")
    assert res.exit_code == 0, res.output
    assert "-> (A) red" in res.output or "-> (B) blue" in res.output


def test_cli_without_the_hub_is_one_line_and_exit_2(video, monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    res = invoke(video, "--at", 1.0, "--answerer", "hf:no-such-org/no-such-vlm", "What happened ?")
    assert res.exit_code == 2 and "Traceback" not in res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: could not fetch 'no-such-org/no-such-vlm'")
    assert "hf:DIR" in lines[0]
    with pytest.raises(HubUnavailable):
        load_hf_qa("hf:no-such-org/no-such-vlm")
    res = invoke(video, "--at", 1.0, "--press", "h2o", "Is it red ?")
    assert res.exit_code == 2 and "--answerer" in res.output
    res = invoke(video, "--at", 1.0, "--answerer", "hf:no-such-org/no-such-vlm", "--press", "nope", "Is it red ?")
    assert res.exit_code == 2 and "unknown press 'nope'" in res.output
