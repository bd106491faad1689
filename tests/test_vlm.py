"""LlavaAnswerer on tiny random LLaVA / LLaVA-OneVision models built locally (no downloads)."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in these tests may reach the hub
import transformers  # noqa: E402  (the dev extra installs it; without it these tests fail, not skip)

from streammem.memory import PyramidMemory  # noqa: E402
from streammem.models.vlm import LlavaAnswerer, require_transformers  # noqa: E402
from streammem.types import Frame, Tokens  # noqa: E402

SPECIALS = ["[PAD]", "[UNK]", "<s>", "</s>", "<image>"]
WORDS = (
    "USER ASSISTANT Frame at s Answer with the option letter from given choices directly What color is ball "
    "red blue green yellow did happen first a of user assistant"
).split()
VOCAB = SPECIALS + list("ABCDEFGHIJ") + list("0123456789") + list(".:'?,\n") + WORDS
HIDDEN_V, HIDDEN_T = 24, 32
PROMPT = "USER: {video}\n{text} ASSISTANT:"


def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer over VOCAB, BOS added in front, built without any download."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(), pre_tokenizers.Digits(individual_digits=True)]
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", VOCAB.index("<s>"))])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="[UNK]", pad_token="[PAD]"
    )


def tiny_llava(seed: int = 0) -> transformers.LlavaForConditionalGeneration:
    """2-layer CLIP (32 px, 2 px patches: a 16x16 patch grid) + 2-layer Llama, random weights."""
    vision = transformers.CLIPVisionConfig(
        hidden_size=HIDDEN_V, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        image_size=32, patch_size=2, projection_dim=HIDDEN_V,
    )
    text = transformers.LlamaConfig(
        vocab_size=len(VOCAB), hidden_size=HIDDEN_T, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        bos_token_id=2, eos_token_id=3, pad_token_id=0,
    )
    cfg = transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=VOCAB.index("<image>"),
        vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=256,
    )
    torch.manual_seed(seed)
    return transformers.LlavaForConditionalGeneration(cfg).eval()


def frames(n: int, seed: int = 0, start: int = 0) -> list[Frame]:
    rng = np.random.default_rng(seed)
    return [Frame(index=start + i, timestamp=(start + i) / 8, image=rng.integers(0, 256, (36, 48, 3), dtype=np.uint8))
            for i in range(n)]


@pytest.fixture(scope="module")
def qa() -> LlavaAnswerer:
    return LlavaAnswerer(tiny_llava(), tiny_tokenizer(), grid=16, prompt_format=PROMPT, evidence_top_k=3)


@pytest.fixture(scope="module")
def memory(qa: LlavaAnswerer) -> Tokens:
    mem = PyramidMemory.from_preset("ovbench", dim=qa.dim)
    for tok in qa.encode_frames(frames(20)):
        mem.write(tok)
    return mem.read()


QUESTION = "What color is the ball ?"
CANDS = ["red", "blue", "green", "yellow"]


def test_encode_frames_grid_and_dim(qa: LlavaAnswerer) -> None:
    fr = frames(3)
    toks = qa.encode_frames(fr)
    assert len(toks) == 3 and qa.dim == HIDDEN_V
    for f, t in zip(fr, toks):
        assert t.features.shape == (16 * 16, HIDDEN_V) and t.features.dtype == torch.float32
        assert set(t.frame_index.tolist()) == {f.index} and set(t.timestamp.tolist()) == {f.timestamp}
    # batching does not change the features; encoding is deterministic
    again = LlavaAnswerer(qa.model, qa.tokenizer, batch_size=1).encode_frames(fr)
    for a, b in zip(toks, again):
        torch.testing.assert_close(a.features, b.features, rtol=1e-5, atol=1e-5)
    # pre-projector features: layer -2 of the tower without CLS, on the 16x16 patch grid
    hs = qa.model.model.vision_tower(qa.pixel_values(fr[:1]), output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(toks[0].features, hs[0, 1:], rtol=1e-5, atol=1e-5)


def test_encode_frames_pools_to_a_smaller_grid(qa: LlavaAnswerer) -> None:
    fr = frames(2)
    full = qa.encode_frames(fr)
    small = LlavaAnswerer(qa.model, qa.tokenizer, grid=4).encode_frames(fr)
    assert small[0].features.shape == (16, HIDDEN_V)
    expect = torch.nn.functional.avg_pool2d(full[0].features.reshape(16, 16, -1).permute(2, 0, 1), 4)
    torch.testing.assert_close(small[0].features, expect.permute(1, 2, 0).reshape(16, -1), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="exceeds"):
        LlavaAnswerer(qa.model, qa.tokenizer, grid=32)


def test_answer_returns_valid_probs(qa: LlavaAnswerer, memory: Tokens) -> None:
    ans = qa.answer(memory, QUESTION, CANDS, query_time=19 / 8)
    assert len(ans.probs) == len(CANDS) and abs(sum(ans.probs) - 1) < 1e-5
    assert all(0 <= p <= 1 for p in ans.probs)
    assert ans.index == int(np.argmax(ans.probs)) and ans.letter == "ABCD"[ans.index] and ans.text == CANDS[ans.index]
    assert ans.confidence == pytest.approx(max(ans.probs)) and ans.query_time == 19 / 8
    assert ans.extra["memory_tokens"] == len(memory) == 832
    two = qa.answer(memory, QUESTION, CANDS[:2])
    assert len(two.probs) == 2 and abs(sum(two.probs) - 1) < 1e-5


def test_letter_scores_are_the_next_token_logits(qa: LlavaAnswerer, memory: Tokens) -> None:
    embeds, mask, _ = qa.build_inputs(memory, QUESTION, CANDS)
    with torch.no_grad():
        logits = qa.model(inputs_embeds=embeds, attention_mask=mask).logits[0, -1]
    ids = [VOCAB.index(c) for c in "ABCD"]
    assert [qa.letter_ids(c) for c in "ABCD"] == [[i] for i in ids]
    expect = torch.softmax(logits[ids], 0)
    np.testing.assert_allclose(qa.answer(memory, QUESTION, CANDS).probs, expect.numpy(), rtol=1e-4, atol=1e-6)


def test_inputs_embeds_layout(qa: LlavaAnswerer, memory: Tokens) -> None:
    embeds, mask, layout = qa.build_inputs(memory, QUESTION, CANDS)
    emb = qa.model.get_input_embeddings()
    assert embeds.shape == (1, layout.length, HIDDEN_T) and mask.shape == (1, layout.length)
    # one LM position per memory token, grouped per stored frame in time order
    assert len(layout.memory_positions) == len(memory)
    stored = sorted({(float(t), int(f)) for t, f in zip(memory.timestamp, memory.frame_index)})
    assert [(f.timestamp, f.frame_index) for f in layout.frames] == stored
    assert [f.k for f in layout.frames] == list(range(1, len(stored) + 1))
    mem = memory.sort_by_time()
    with torch.no_grad():
        projected = qa.model.model.multi_modal_projector(mem.features)
        torch.testing.assert_close(embeds[0, layout.memory_positions], projected)
        # each group is preceded by its marker "Frame k at t s:", embedded with the LM's embeddings
        for f in layout.frames:
            assert f.marker_text == f"Frame {f.k} at {f.timestamp:.1f}s:"
            assert f.marker[1] == f.tokens[0] and f.tokens[1] - f.tokens[0] == int((mem.frame_index == f.frame_index).sum())
            ids = qa.tokenizer(f.marker_text, add_special_tokens=False)["input_ids"]
            torch.testing.assert_close(embeds[0, f.marker[0]:f.marker[1]], emb(torch.tensor(ids)))
        # prefix: BOS + "USER:"; suffix: question, options, instruction, "ASSISTANT:"
        pre = [VOCAB.index("<s>")] + qa.tokenizer("USER:", add_special_tokens=False)["input_ids"]
        torch.testing.assert_close(embeds[0, : layout.prefix[1]], emb(torch.tensor(pre)))
        suf_text = "\n" + qa.question_text(QUESTION, CANDS) + " ASSISTANT:"
        suf = qa.tokenizer(suf_text, add_special_tokens=False)["input_ids"]
        torch.testing.assert_close(embeds[0, layout.suffix[0]:], emb(torch.tensor(suf)))
    assert layout.prefix[0] == 0 and layout.frames[0].marker[0] == layout.prefix[1]
    assert layout.suffix == (layout.frames[-1].tokens[1], layout.length)
    assert "A. red\nB. blue\nC. green\nD. yellow\nAnswer with the option's letter" in layout.text
    assert layout.text.startswith(f"USER: Frame 1 at 0.0s:<1: {layout.frames[0].tokens[1] - layout.frames[0].tokens[0]} tokens>Frame 2 at")


def test_evidence_frames_are_in_memory(qa: LlavaAnswerer, memory: Tokens) -> None:
    before = qa.model.config.get_text_config()._attn_implementation
    ans = qa.answer(memory, QUESTION, CANDS)
    stored = {int(f): (float(t), int(lv)) for f, t, lv in zip(memory.frame_index, memory.timestamp, memory.level)}
    assert 1 <= len(ans.evidence) <= 3
    weights = [e["weight"] for e in ans.evidence]
    assert weights == sorted(weights, reverse=True) and 0 < sum(weights) <= 1 + 1e-6
    for e in ans.evidence:
        assert e["frame_index"] in stored and (e["timestamp"], e["level"]) == stored[e["frame_index"]]
    assert 0 < ans.extra["memory_attention"] <= 1 + 1e-6
    # hooks (last attention row only) and output_attentions (full matrices) agree
    qa2 = LlavaAnswerer(qa.model, qa.tokenizer, prompt_format=PROMPT, evidence_top_k=3, evidence_mode="output_attentions")
    ans2 = qa2.answer(memory, QUESTION, CANDS)
    assert [e["frame_index"] for e in ans2.evidence] == [e["frame_index"] for e in ans.evidence]
    np.testing.assert_allclose([e["weight"] for e in ans2.evidence], weights, rtol=1e-4)
    # the LM ran eagerly for the evidence pass and got its attention implementation back
    assert "evidence_note" not in ans.extra
    assert qa.model.config.get_text_config()._attn_implementation == before


def test_depends_only_on_the_memory_and_is_deterministic(qa: LlavaAnswerer, memory: Tokens) -> None:
    a = qa.answer(memory, QUESTION, CANDS)
    qa.encode_frames(frames(5, seed=7, start=100))  # other work in between leaves no trace
    qa.answer(memory.index(memory.frame_index != memory.frame_index[0]), QUESTION, CANDS)
    b = qa.answer(memory, QUESTION, CANDS)
    assert a.to_dict() == b.to_dict()
    # frames handed over in another order: the answerer sorts by time, same result
    starts = torch.nonzero(torch.diff(memory.frame_index, prepend=torch.tensor([-1]))).flatten().tolist()
    bounds = list(zip(starts, starts[1:] + [len(memory)]))
    shuffled = Tokens.cat([memory.index(slice(s, e)) for s, e in reversed(bounds)])
    c = qa.answer(shuffled, QUESTION, CANDS)
    np.testing.assert_allclose(c.probs, a.probs, rtol=1e-5)
    assert [e["frame_index"] for e in c.evidence] == [e["frame_index"] for e in a.evidence]
    # and a different memory gives a different answer distribution
    d = qa.answer(memory.index(slice(256, None)), QUESTION, CANDS)
    assert not np.allclose(d.probs, a.probs)


def test_empty_memory_generation_and_errors(qa: LlavaAnswerer, memory: Tokens, monkeypatch) -> None:
    empty = qa.answer(Tokens.empty(qa.dim), QUESTION, CANDS)
    assert empty.evidence == [] and abs(sum(empty.probs) - 1) < 1e-5
    gen = LlavaAnswerer(qa.model, qa.tokenizer, prompt_format=PROMPT, generate_tokens=2, evidence_top_k=0)
    ans = gen.answer(memory.index(slice(0, 256)), QUESTION, CANDS)
    assert isinstance(ans.extra["generated"], str) and ans.evidence == []
    with pytest.raises(ValueError, match="24-d"):
        qa.answer(Tokens.empty(8), QUESTION, CANDS)
    with pytest.raises(ValueError, match="candidates"):
        qa.answer(memory, QUESTION, ["red"])
    with pytest.raises(ValueError, match="evidence_mode"):
        LlavaAnswerer(qa.model, qa.tokenizer, evidence_mode="magic")
    with pytest.raises(TypeError, match="vision_tower"):
        LlavaAnswerer(torch.nn.Linear(2, 2), qa.tokenizer)
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"streammem\[hf\]"):
        require_transformers()


def test_llava_onevision_tiny() -> None:
    """OneVision (SigLIP without CLS, "full" strategy, Qwen2 LM) goes through the same adapter."""
    vision = transformers.SiglipVisionConfig(
        hidden_size=HIDDEN_V, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=36, patch_size=3,
    )
    text = transformers.Qwen2Config(
        vocab_size=len(VOCAB), hidden_size=HIDDEN_T, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
    )
    cfg = transformers.LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_index=VOCAB.index("<image>"),
        video_token_index=VOCAB.index("[UNK]"), vision_feature_layer=-1, vision_feature_select_strategy="full",
    )
    torch.manual_seed(0)
    model = transformers.LlavaOnevisionForConditionalGeneration(cfg).eval()
    qa = LlavaAnswerer(model, tiny_tokenizer(), grid=8, image_mean=(0.5,) * 3, image_std=(0.5,) * 3,
                       prompt_format=PROMPT, evidence_top_k=2)
    toks = qa.encode_frames(frames(3))  # 12x12 SigLIP patches pooled to 8x8
    assert toks[0].features.shape == (64, HIDDEN_V)
    mem = Tokens.cat(toks)
    ans = qa.answer(mem, QUESTION, CANDS[:3])
    assert len(ans.probs) == 3 and abs(sum(ans.probs) - 1) < 1e-5
    assert {e["frame_index"] for e in ans.evidence} <= {0, 1, 2} and len(ans.evidence) == 2


def test_from_pretrained_local_folder(tmp_path, memory: Tokens) -> None:
    """The real loading path, on a tiny checkpoint saved to a local folder (no hub access)."""
    tiny_llava().save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    qa = LlavaAnswerer.from_pretrained(str(tmp_path), device="cpu", evidence_top_k=2)
    assert qa.dim == HIDDEN_V and qa.grid == 16 and qa.prompt_format == PROMPT
    assert qa.image_mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))  # no processor saved: CLIP's
    assert next(qa.model.parameters()).dtype == torch.float32
    ref = LlavaAnswerer(tiny_llava(), tiny_tokenizer(), prompt_format=PROMPT, evidence_top_k=2)
    a, b = qa.answer(memory, QUESTION, CANDS), ref.answer(memory, QUESTION, CANDS)
    np.testing.assert_allclose(a.probs, b.probs, rtol=1e-5)
    transformers.LlamaForCausalLM(tiny_llava().config.text_config).save_pretrained(tmp_path / "llm")
    with pytest.raises(ValueError, match="supports"):
        LlavaAnswerer.from_pretrained(str(tmp_path / "llm"), device="cpu")


def test_bfloat16_model_stores_float32_features() -> None:
    qa = LlavaAnswerer(tiny_llava().to(torch.bfloat16), tiny_tokenizer(), prompt_format=PROMPT, evidence_top_k=1)
    toks = qa.encode_frames(frames(2))
    assert toks[0].features.dtype == torch.float32
    ans = qa.answer(Tokens.cat(toks), QUESTION, CANDS)
    assert abs(sum(ans.probs) - 1) < 1e-5 and ans.evidence[0]["frame_index"] in (0, 1)


def test_chat_template_wraps_the_prompt(qa: LlavaAnswerer, memory: Tokens) -> None:
    tok = tiny_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}USER: {{ m['content'] }}{% endfor %}{% if add_generation_prompt %} ASSISTANT:{% endif %}"
    )
    chat = LlavaAnswerer(qa.model, tok, prompt_format=None)
    e1, _, l1 = chat.build_inputs(memory, QUESTION, CANDS)
    e2, _, l2 = qa.build_inputs(memory, QUESTION, CANDS)  # the same text through prompt_format
    assert l1.text == l2.text
    torch.testing.assert_close(e1, e2)
