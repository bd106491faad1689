"""LlavaAnswerer: LLaVA-family vision-language models from ``transformers`` as QA answerers.

The adapter does what VideoChat-Online does with its backbone (InternVL2) for LLaVA models
(``LlavaForConditionalGeneration``; ``LlavaOnevisionForConditionalGeneration`` and
``LlavaNext*`` share the parts it uses: ``vision_tower``, ``multi_modal_projector``,
``language_model`` and the config's ``vision_feature_layer`` / ``vision_feature_select_strategy``):

1. **Write time** (:meth:`LlavaAnswerer.encode_frames`): each frame is resized to the vision
   tower's ``image_size`` (the whole frame, no centre crop, so nothing at the edges is lost),
   normalised with the image processor's mean/std, and run through the vision tower. The
   hidden states of ``vision_feature_layer`` (concatenated when it is a list) are taken with
   the config's select strategy (``"default"`` drops the CLS token, ``"full"`` keeps every
   token), *before* the multimodal projector, laid out on the patch grid (24x24 for
   LLaVA-1.5 at 336 px, 27x27 for LLaVA-OneVision at 384 px) and pooled to ``grid x grid``
   with adaptive average pooling. Those ``(grid, grid, D)`` features are what the memory
   stores (``D`` = vision hidden size x number of feature layers).
2. **Read time** (:meth:`LlavaAnswerer.answer`): the projector runs on the memory tokens
   (one LM position per memory token) and the prompt is assembled as ``inputs_embeds``::

       <prompt prefix>                          (BOS if the tokenizer adds one, chat header)
       "Frame 1 at 0.0s:" <n_1 projected memory tokens of the oldest stored frame>
       "Frame 2 at 1.5s:" <n_2 projected memory tokens>
       ...
       "\\n{question}\\nA. {candidate 0}\\nB. {candidate 1}...\\n{instruction}" <prompt suffix>

   Frames are grouped by ``frame_index`` in time order; ``k`` is the 1-based position of the
   frame among the stored frames (as in VideoChat-Online's ``Frame{k} at {sec}s``) and ``t``
   its timestamp. Markers and text are embedded with the LM's input embeddings. The prompt
   wrapper is ``prompt_format`` (with ``{video}`` and ``{text}`` fields), or the tokenizer's
   chat template when ``prompt_format`` is ``None`` and the tokenizer has one, or else
   LLaVA-1.5's ``"USER: {video}\\n{text} ASSISTANT:"``. :meth:`LlavaAnswerer.build_inputs`
   returns the embeddings and a :class:`PromptLayout` saying where every part sits.
3. **Scoring**: one forward pass; the next-token logits of each option letter (every
   single-token spelling the tokenizer has for it, e.g. ``"A"`` and ``" A"``, merged with
   logsumexp) are softmaxed over the candidates -> ``probs``; ``confidence`` is the chosen
   option's probability. With ``generate_tokens > 0`` the model also decodes greedily and the
   text goes into ``Answer.extra["generated"]``.
   **Free form**: a question asked without candidates (``"{question}\\n{free_form_instruction}"``)
   is answered by greedy decoding over the prompt's key-value cache (at most
   ``max_new_tokens``, up to an end-of-sequence token): ``text`` is the generated answer,
   ``confidence`` the geometric mean of its tokens' probabilities, ``index`` -1, ``letter`` and
   ``probs`` empty, ``extra["token_probs"]`` per token.
   **Press**: with ``press`` (a :class:`~streammem.models.vlm_press.CachePress`) the prompt up to
   the question is prefilled, each layer's cache is compressed over the memory tokens' entries,
   and the question (and a free-form answer) is decoded over the compressed cache;
   ``extra["memory_tokens_kept"]`` and ``extra["cache_tokens"]`` say how much was kept. These
   passes read evidence with hooks (``evidence_mode`` applies to the one-pass scoring only).
4. **Evidence**: the attention of the last position over the memory positions, averaged over
   heads and layers, summed per stored frame and normalised over the memory (weights of all
   stored frames sum to 1); the ``evidence_top_k`` heaviest frames are reported.
   ``Answer.extra["memory_attention"]`` is the share of the last position's attention that
   went to memory tokens at all. The LM runs with eager attention during that pass (switched
   with ``set_attn_implementation`` and restored afterwards). By default the weights are
   read with forward hooks on the LM's ``self_attn`` modules, keeping only the last query row
   of each layer: ``output_attentions=True`` (``evidence_mode="output_attentions"``, same
   result) keeps every layer's full ``(heads, S, S)`` matrix, which for a 9,984-token memory is
   tens of GB.

:func:`load_answerer` builds the answerer for ``hf:<model id or folder>`` from the checkpoint's
``config.model_type`` (this class for the LLaVA family, :class:`~streammem.models.smolvlm.SmolVLMAnswerer`
for SmolVLM / SmolVLM2 / Idefics3), loading through :func:`~streammem.models.hf.load_hf`.

The answer depends only on the memory passed in, the question and the candidates: the adapter
keeps no state between calls (causality is the pipeline's business).

Departures and limits (named, not hidden):

- LLaVA-OneVision's own video path pools each frame's *projected* features to 14x14 bilinearly
  and appends one ``image_newline`` after the video; here the pre-projector features are
  pooled (as the memory requires) and no ``image_newline`` is inserted.
- With ``vision_feature_select_strategy="full"`` on a tower that has a CLS token (CLIP), the
  CLS token is dropped: the memory needs a square grid.
- Letters are scored from the logits of the first answer token; a model that starts its answer
  with something else (``"The answer is"``) is scored on a distribution it did not intend.
- Evidence needs an LM whose attention modules return their weights under eager attention
  (transformers >= 4.48 for the hook mode); otherwise ``evidence`` is empty and
  ``extra["evidence_note"]`` says why. With transformers < 4.48 load the model with
  ``attn_implementation="eager"`` and use ``evidence_mode="output_attentions"``.

Example (needs a machine that can download ~2 GB; nothing is downloaded in this project's tests)::

    import numpy as np
    from streammem.memory import PyramidMemory
    from streammem.models.vlm import LlavaAnswerer
    from streammem.types import Frame

    qa = LlavaAnswerer.from_pretrained("llava-hf/llava-onevision-qwen2-0.5b-ov-hf", device="cuda")
    mem = PyramidMemory.from_preset("ovbench", dim=qa.dim)
    frames = [Frame(index=i, timestamp=i / 8, image=np.full((240, 320, 3), 20 * i, np.uint8))
              for i in range(12)]
    for tok in qa.encode_frames(frames):
        mem.write(tok)
    ans = qa.answer(mem.read(), "How does the brightness change?",
                    ["it gets brighter", "it gets darker"], query_time=frames[-1].timestamp)
    print(ans.letter, ans.probs, ans.evidence[:2])
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from streammem.models.hf import load_hf, parse_spec, pick_device, pick_dtype
from streammem.models.vlm_press import CachePress
from streammem.types import Answer, Frame, Tokens

__all__ = ["LlavaAnswerer", "PromptLayout", "FrameSpan", "VLMFrameEncoder", "load_answerer", "require_transformers",
           "CachePress"]

#: OpenAI CLIP normalisation (LLaVA-1.5's image processor).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: Prompt wrappers used by :meth:`LlavaAnswerer.from_pretrained` per ``config.model_type``
#: (the llava-hf processors' chat templates for one user turn, the video where ``<image>`` goes).
PROMPT_FORMATS = {
    "llava": "USER: {video}\n{text} ASSISTANT:",
    "llava_next": "USER: {video}\n{text} ASSISTANT:",
    # as the chat template of llava-hf/llava-onevision-*-hf renders one user turn
    "llava_onevision": "<|im_start|>user {video}\n{text}<|im_end|><|im_start|>assistant\n",
    "llava_next_video": "USER: {video}\n{text} ASSISTANT:",
}
DEFAULT_PROMPT_FORMAT = PROMPT_FORMATS["llava"]
DEFAULT_INSTRUCTION = "Answer with the option's letter from the given choices directly."

_SENTINEL = "\x00VIDEO\x00"


def require_transformers() -> Any:
    """Import ``transformers`` or raise an ImportError that says how to install it."""
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "streammem.models.vlm needs transformers>=4.45: pip install 'streammem[hf]'"
        ) from exc
    return transformers


def _part(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """``model.<name>`` or ``model.model.<name>`` (transformers moved the parts in 4.52)."""
    for owner in (model, getattr(model, "model", None)):
        part = getattr(owner, name, None) if owner is not None else None
        if isinstance(part, torch.nn.Module):
            return part
    raise TypeError(
        f"{type(model).__name__} has no '{name}' (looked at model.{name} and model.model.{name}); "
        "LlavaAnswerer needs a LLaVA-family model (vision_tower, multi_modal_projector, language_model)"
    )


@dataclass
class FrameSpan:
    """Where one stored frame sits in the prompt: ``marker`` and ``tokens`` are [start, end)."""

    k: int
    frame_index: int
    timestamp: float
    level: int
    marker: tuple[int, int]
    tokens: tuple[int, int]
    marker_text: str


@dataclass
class PromptLayout:
    """The layout of ``inputs_embeds`` built by :meth:`LlavaAnswerer.build_inputs`.

    Attributes:
        length: sequence length S.
        prefix: [start, end) of the text before the first frame (BOS, chat header).
        frames: one :class:`FrameSpan` per stored frame, in time order.
        suffix: [start, end) of the question, options, instruction and chat footer.
        text: the prompt as text, each frame's tokens shown as ``<k: n tokens>``.
    """

    length: int
    prefix: tuple[int, int]
    frames: list[FrameSpan]
    suffix: tuple[int, int]
    text: str

    @property
    def memory_positions(self) -> torch.Tensor:
        """``(M,)`` int64 positions of the memory tokens, in memory (time) order."""
        if not self.frames:
            return torch.zeros(0, dtype=torch.int64)
        return torch.cat([torch.arange(*f.tokens) for f in self.frames])


@dataclass(eq=False)
class LlavaAnswerer:
    """A LLaVA-family model behind the streammem answerer contract (see the module docstring).

    Attributes:
        model: a ``LlavaForConditionalGeneration`` (or OneVision / Next), in eval mode.
        tokenizer: its tokenizer.
        grid: side of the token grid :meth:`encode_frames` produces (16 for the pyramid);
            must not exceed the vision tower's patch grid.
        image_mean, image_std: per-channel normalisation of [0, 1] RGB pixels.
        prompt_format: wrapper with ``{video}`` and ``{text}`` fields; ``None`` uses the
            tokenizer's chat template if it has one, else :data:`DEFAULT_PROMPT_FORMAT`.
        frame_label: marker before each stored frame's tokens, fields ``k`` and ``t``.
        instruction: the line after the options.
        letters: option letters; at most ``len(letters)`` candidates.
        evidence_top_k: how many frames ``Answer.evidence`` lists (0 skips the attention pass
            bookkeeping and leaves evidence empty).
        evidence_mode: ``"hooks"`` (last attention row per layer, little memory) or
            ``"output_attentions"`` (the LM returns all attention matrices).
        generate_tokens: if > 0, also decode this many tokens greedily into ``extra["generated"]``.
        batch_size: frames per vision-tower batch in :meth:`encode_frames`.
        store_dtype: dtype of the features handed to the memory (kept on the CPU).
        press: a :class:`~streammem.models.vlm_press.CachePress` compressing the cache of the
            memory prefix before the question is decoded, or None (one pass, no cache).
        max_new_tokens: longest free-form answer, in tokens (greedy decoding).
        free_form_instruction: the line after a question asked without options.
    """

    _MODEL_CLASSES = {
        "llava": "LlavaForConditionalGeneration",
        "llava_onevision": "LlavaOnevisionForConditionalGeneration",
        "llava_next": "LlavaNextForConditionalGeneration",
        "llava_next_video": "LlavaNextVideoForConditionalGeneration",
    }
    _PROMPT_FORMATS = PROMPT_FORMATS

    #: answers questions without options with generated text (the QA pipeline then asks it so)
    free_form = True

    model: Any
    tokenizer: Any
    grid: int = 16
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    prompt_format: str | None = None
    frame_label: str = "Frame {k} at {t:.1f}s:"
    instruction: str = DEFAULT_INSTRUCTION
    letters: str = "ABCDEFGHIJ"
    evidence_top_k: int = 5
    evidence_mode: str = "hooks"
    generate_tokens: int = 0
    batch_size: int = 8
    store_dtype: torch.dtype = torch.float32
    press: CachePress | None = None
    max_new_tokens: int = 48
    free_form_instruction: str = "Answer the question briefly."
    _letter_ids: dict = field(default_factory=dict, init=False, repr=False)

    # ------------------------------------------------------------------ set-up
    def __post_init__(self) -> None:
        require_transformers()
        if self.grid < 1:
            raise ValueError(f"grid must be >= 1, got {self.grid}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise ValueError(f"image_mean/image_std must be 3 values (std > 0), got {self.image_mean}, {self.image_std}")
        if self.evidence_top_k < 0:
            raise ValueError(f"evidence_top_k must be >= 0, got {self.evidence_top_k}")
        if self.evidence_mode not in ("hooks", "output_attentions"):
            raise ValueError(f"evidence_mode must be 'hooks' or 'output_attentions', got {self.evidence_mode!r}")
        if self.generate_tokens < 0:
            raise ValueError(f"generate_tokens must be >= 0, got {self.generate_tokens}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if len(set(self.letters)) != len(self.letters) or len(self.letters) < 2:
            raise ValueError(f"letters must be >= 2 distinct characters, got {self.letters!r}")
        if self.prompt_format is not None and self.prompt_format.count("{video}") != 1:
            raise ValueError("prompt_format must contain '{video}' exactly once (and '{text}')")

        self._init_parts()
        self.model.eval()

        # Does the tokenizer put a BOS in front of a prompt? (Llama yes, Qwen2 no.)
        plain = self.tokenizer("A", add_special_tokens=False)["input_ids"]
        full = self.tokenizer("A", add_special_tokens=True)["input_ids"]
        bos = self.tokenizer.bos_token_id
        self._add_bos = bos is not None and len(full) > len(plain) and full[0] == bos and (not plain or plain[0] != bos)

    def _init_parts(self) -> None:
        """Find the vision tower, projector and LM, and read the vision geometry off the config."""
        self.vision_tower = _part(self.model, "vision_tower")
        self.projector = _part(self.model, "multi_modal_projector")
        self.language_model = _part(self.model, "language_model")
        cfg = self.model.config
        vcfg = cfg.vision_config
        self.feature_layers: list[int] = (
            [int(cfg.vision_feature_layer)] if isinstance(cfg.vision_feature_layer, int)
            else [int(i) for i in cfg.vision_feature_layer]
        )
        self.select_strategy: str = str(cfg.vision_feature_select_strategy)
        if self.select_strategy not in ("default", "full"):
            raise ValueError(f"unsupported vision_feature_select_strategy {self.select_strategy!r}")
        self.image_size = int(vcfg.image_size)
        self.patch_side = self.image_size // int(vcfg.patch_size)
        if self.grid > self.patch_side:
            raise ValueError(
                f"grid={self.grid} exceeds the vision tower's {self.patch_side}x{self.patch_side} patch grid"
            )
        self.vision_hidden = int(vcfg.hidden_size)

    @property
    def dim(self) -> int:
        """Token width D stored in the memory: vision hidden size x number of feature layers."""
        return self.vision_hidden * len(self.feature_layers)

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @classmethod
    def from_pretrained(
        cls,
        model_id_or_path: str,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        attn_implementation: str | None = None,
        **kwargs: Any,
    ) -> "LlavaAnswerer":
        """Load a LLaVA-family checkpoint (hub id or local folder) with transformers.

        Args:
            model_id_or_path: e.g. ``"llava-hf/llava-onevision-qwen2-0.5b-ov-hf"`` or
                ``"llava-hf/llava-1.5-7b-hf"``, or a folder holding such a checkpoint.
            device: ``"cuda"``, ``"cpu"``, ``"auto"`` (accelerate's ``device_map="auto"``,
                spreading a large model over the GPUs and the CPU); default: accelerate's
                choice (CUDA, MPS, else CPU; :func:`~streammem.models.hf.pick_device`).
            dtype: default bfloat16 on a GPU that supports it (float16 otherwise), float32 on CPU.
            attn_implementation: passed to transformers (``"sdpa"`` by default there); the
                evidence pass switches the LM to eager by itself.
            **kwargs: :class:`LlavaAnswerer` fields (``grid``, ``prompt_format``, ...).

        Example::

            qa = LlavaAnswerer.from_pretrained("llava-hf/llava-1.5-7b-hf", device="auto")
            qa.dim, qa.grid   # (1024, 16): CLIP ViT-L/14-336 features of layer -2 on a 16x16 grid
        """
        transformers = require_transformers()
        name = model_id_or_path
        config = load_hf(name, transformers.AutoConfig.from_pretrained)
        class_name = cls._MODEL_CLASSES.get(config.model_type)
        if class_name is None or not hasattr(transformers, class_name):
            raise ValueError(
                f"{name} is a {config.model_type!r} model; {cls.__name__} supports "
                f"{sorted(cls._MODEL_CLASSES)} (available in transformers {transformers.__version__})"
            )
        device = pick_device(device)
        dtype = pick_dtype(device, dtype)
        load: dict[str, Any] = {"dtype": dtype} if _version_at_least(transformers.__version__, "4.56") else {"torch_dtype": dtype}
        if attn_implementation is not None:
            load["attn_implementation"] = attn_implementation
        if str(device) == "auto":
            load["device_map"] = "auto"
        model = load_hf(name, getattr(transformers, class_name).from_pretrained, **load)
        if str(device) != "auto":
            model = model.to(device)
        tokenizer = load_hf(name, transformers.AutoTokenizer.from_pretrained)
        mean, std = _image_stats(transformers, name, config)
        kwargs.setdefault("prompt_format", cls._PROMPT_FORMATS.get(config.model_type))
        kwargs.setdefault("image_mean", mean)
        kwargs.setdefault("image_std", std)
        return cls(model=model, tokenizer=tokenizer, **kwargs)

    # ------------------------------------------------------------------ write time
    def pixel_values(self, frames: Sequence[Frame]) -> torch.Tensor:
        """``(B, 3, image_size, image_size)`` normalised pixels of RGB uint8 frames (whole frame, resized)."""
        s = self.image_size
        out = np.empty((len(frames), s, s, 3), np.float32)
        for i, fr in enumerate(frames):
            shrink = fr.height >= s and fr.width >= s
            img = cv2.resize(fr.image, (s, s), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)
            out[i] = img
        x = torch.from_numpy(out).div_(255.0)
        x = (x - torch.tensor(self.image_mean)) / torch.tensor(self.image_std)
        return x.permute(0, 3, 1, 2).contiguous()

    @torch.no_grad()
    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, patch_side, patch_side, D)`` pre-projector features of ``(B, 3, H, W)`` pixels."""
        p = next(self.vision_tower.parameters())
        out = self.vision_tower(pixel_values.to(p.device, p.dtype), output_hidden_states=True, return_dict=True)
        hs = out.hidden_states
        parts = []
        n_patch = self.patch_side * self.patch_side
        for layer in self.feature_layers:
            h = hs[layer]
            if self.select_strategy == "default" or h.shape[1] == n_patch + 1:
                h = h[:, 1:]  # the CLS token (see the module docstring for "full" on CLIP)
            if h.shape[1] != n_patch:
                raise ValueError(
                    f"vision layer {layer} gives {h.shape[1]} tokens, expected a {self.patch_side}x{self.patch_side} grid"
                )
            parts.append(h)
        feats = torch.cat(parts, dim=-1)
        return feats.reshape(feats.shape[0], self.patch_side, self.patch_side, -1)

    def encode_frames(self, frames: Sequence[Frame]) -> list[Tokens]:
        """One ``grid*grid``-token :class:`Tokens` per frame: pre-projector vision features.

        Shapes: each result has ``features (grid*grid, dim)`` in ``store_dtype`` on the CPU,
        row-major over the pooled grid, with the frame's index, timestamp and pose.
        """
        result: list[Tokens] = []
        for start in range(0, len(frames), self.batch_size):
            batch = list(frames[start:start + self.batch_size])
            feats = self.vision_features(self.pixel_values(batch))  # B, s, s, D
            if feats.shape[1] != self.grid:
                feats = F.adaptive_avg_pool2d(feats.permute(0, 3, 1, 2).float(), self.grid).permute(0, 2, 3, 1)
            feats = feats.to(device="cpu", dtype=self.store_dtype)
            for fr, x in zip(batch, feats):
                result.append(Tokens.from_grid(x.contiguous(), frame_index=fr.index, timestamp=fr.timestamp, pose=fr.pose))
        return result

    # ------------------------------------------------------------------ read time
    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def _wrap(self, body: str) -> tuple[str, str]:
        """Prompt text before and after the video, around ``body`` (question, options, instruction)."""
        if self.prompt_format is not None:
            text = self.prompt_format.replace("{video}", _SENTINEL).replace("{text}", body)
        elif getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": _SENTINEL + "\n" + body}], tokenize=False, add_generation_prompt=True
            )
        else:
            text = DEFAULT_PROMPT_FORMAT.replace("{video}", _SENTINEL).replace("{text}", body)
        prefix, suffix = text.split(_SENTINEL)
        return prefix, suffix

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """``(N, dim)`` memory tokens -> ``(N, H)`` LM input embeddings (the multimodal projector)."""
        p = next(self.projector.parameters())
        return self.projector(features.to(p.device, p.dtype))

    def question_text(self, question: str, candidates: Sequence[str]) -> str:
        """``"{question}\\nA. ...\\nB. ...\\n{instruction}"``; without candidates (a free-form
        question) ``"{question}\\n{free_form_instruction}"``."""
        if not candidates:
            return f"{question}\n{self.free_form_instruction}" if self.free_form_instruction else question
        self._check_candidates(candidates)
        options = "\n".join(f"{self.letters[i]}. {c}" for i, c in enumerate(candidates))
        return f"{question}\n{options}\n{self.instruction}"

    def _check_candidates(self, candidates: Sequence[str]) -> None:
        if not 2 <= len(candidates) <= len(self.letters):
            raise ValueError(f"need 2..{len(self.letters)} candidates, got {len(candidates)}")

    @torch.no_grad()
    def build_inputs(
        self, memory: Tokens, question: str, candidates: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor, PromptLayout]:
        """Assemble the prompt: ``(inputs_embeds (1, S, H), attention_mask (1, S), layout)``.

        The memory's ``N`` tokens become ``N`` consecutive positions per frame group (the
        projector maps one token to one position); see the module docstring for the order.
        """
        if memory.dim != self.dim:
            raise ValueError(f"memory tokens are {memory.dim}-d, this answerer stores {self.dim}-d vision features")
        embed = self.model.get_input_embeddings()
        dev, dt = embed.weight.device, embed.weight.dtype
        mem = memory.sort_by_time()
        prefix_text, suffix_text = self._wrap(self.question_text(question, candidates))
        if suffix_text and not suffix_text.startswith("\n"):
            suffix_text = "\n" + suffix_text

        pieces: list[torch.Tensor] = []
        shown: list[str] = []
        pos = 0

        def add_text(text: str, bos: bool = False) -> tuple[int, int]:
            nonlocal pos
            ids = self._ids(text)
            if bos:
                ids = [self.tokenizer.bos_token_id] + ids
            start = pos
            if ids:
                pieces.append(embed(torch.tensor(ids, device=dev)))
                pos += len(ids)
            shown.append(text)
            return start, pos

        bos = self._add_bos and not prefix_text.startswith(self.tokenizer.bos_token or "\x01")
        prefix = add_text(prefix_text, bos=bos)
        spans: list[FrameSpan] = []
        if len(mem):
            projected = self.project(mem.features).to(dev, dt)  # N, H
            _, counts = torch.unique_consecutive(mem.frame_index, return_counts=True)
            start_tok = 0
            for k, n in enumerate(counts.tolist(), start=1):
                fi, ts = int(mem.frame_index[start_tok]), float(mem.timestamp[start_tok])
                label = self.frame_label.format(k=k, t=ts)
                marker = add_text(label)
                pieces.append(projected[start_tok:start_tok + n])
                tok_span = (pos, pos + n)
                pos += n
                shown.append(f"<{k}: {n} tokens>")
                spans.append(FrameSpan(k, fi, ts, int(mem.level[start_tok]), marker, tok_span, label))
                start_tok += n
        suffix = add_text(suffix_text)
        embeds = torch.cat(pieces, 0).unsqueeze(0)
        mask = torch.ones(1, pos, dtype=torch.long, device=dev)
        return embeds, mask, PromptLayout(pos, prefix, spans, suffix, "".join(shown))

    def letter_ids(self, letter: str) -> list[int]:
        """Vocabulary ids that spell ``letter`` as one token (``"A"``, ``" A"``, the raw vocab entry)."""
        if letter not in self._letter_ids:
            ids: set[int] = set()
            for text in (letter, " " + letter):
                enc = self._ids(text)
                if len(enc) == 1:
                    ids.add(int(enc[0]))
            raw = self.tokenizer.convert_tokens_to_ids(letter)
            if isinstance(raw, int) and raw != self.tokenizer.unk_token_id:
                ids.add(raw)
            if not ids:
                raise ValueError(f"the tokenizer has no single token for option letter {letter!r}")
            self._letter_ids[letter] = sorted(ids)
        return self._letter_ids[letter]

    @contextmanager
    def _eager_lm(self) -> Iterator[str | None]:
        """Run the LM with eager attention inside the block; yields None, or why it can't."""
        text_cfg = self.model.config.get_text_config()
        prev = getattr(text_cfg, "_attn_implementation", None)
        if prev == "eager":
            yield None
            return
        if not hasattr(self.model, "set_attn_implementation"):
            yield f"the LM uses {prev!r} attention; load the model with attn_implementation='eager' for evidence"
            return
        self.model.set_attn_implementation({"text_config": "eager"})
        try:
            yield None
        finally:
            self.model.set_attn_implementation({"text_config": prev})

    @contextmanager
    def _attention_hooks(self, take: Callable[[torch.Tensor], None]) -> Iterator[int]:
        """``take(weights (B, heads, S, S))`` for each LM layer's attention during a pass (forward
        hooks on the ``self_attn`` modules, removed afterwards); yields the number of layers."""

        def hook(_module: torch.nn.Module, _args: Any, output: Any) -> None:
            w = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if isinstance(w, torch.Tensor) and w.dim() == 4:
                take(w)

        mods = [m for n, m in self.language_model.named_modules() if n.rsplit(".", 1)[-1] == "self_attn"]
        handles = [m.register_forward_hook(hook) for m in mods]
        try:
            yield len(mods)
        finally:
            for h in handles:
                h.remove()

    def _attention_rows(self, rows: list[torch.Tensor]):
        """Collect, per LM layer, the last query row of the attention, averaged over heads."""
        return self._attention_hooks(lambda w: rows.append(w[0, :, -1, :].float().mean(0).cpu()))

    def _attention_columns(self, cols: list[torch.Tensor]):
        """Collect, per LM layer, the attention each position received (summed over heads and queries)."""
        return self._attention_hooks(lambda w: cols.append(w[0].float().sum((0, 1))))

    @torch.no_grad()
    def answer(self, memory: Tokens, question: str, candidates: Sequence[str] | None = None,
               query_time: float | None = None) -> Answer:
        """Choose among ``candidates`` given the memory tokens (``(N, dim)`` pre-projector features),
        or, with no candidates, generate a free-form answer (see :meth:`_answer_cached`)."""
        candidates = list(candidates or [])
        embeds, mask, layout = self.build_inputs(memory, question, candidates)
        if not candidates or self.press is not None:
            return self._answer_cached(memory, embeds, mask, layout, candidates, query_time)
        rows: list[torch.Tensor] = []
        note = None
        want = self.evidence_top_k > 0 and bool(layout.frames)
        with self._eager_lm() if want else _null() as why:
            note = why
            if want and why is None and self.evidence_mode == "hooks":
                with self._attention_rows(rows):
                    out = self.model(inputs_embeds=embeds, attention_mask=mask, use_cache=False)
            elif want and why is None:
                out = self.model(inputs_embeds=embeds, attention_mask=mask, use_cache=False, output_attentions=True)
                rows = [a[0, :, -1, :].float().mean(0).cpu() for a in (out.attentions or ()) if a is not None]
            else:
                out = self.model(inputs_embeds=embeds, attention_mask=mask, use_cache=False)
        logits = out.logits[0, -1].float().cpu()
        scores, probs, idx = self._letter_probs(logits, len(candidates))

        extra: dict[str, Any] = {"letter_logits": scores.tolist(), "prompt_tokens": layout.length,
                                 "memory_tokens": len(memory), "memory_frames": len(layout.frames)}
        evidence = self._evidence(torch.stack(rows).mean(0) if rows else None, layout, want, note, extra)
        if self.generate_tokens > 0:
            gen = self.model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=self.generate_tokens,
                                      do_sample=False)
            extra["generated"] = self.tokenizer.decode(gen[0], skip_special_tokens=True)
        return Answer(index=idx, letter=self.letters[idx], text=str(candidates[idx]), confidence=float(probs[idx]),
                      probs=probs.tolist(), evidence=evidence, query_time=query_time, extra=extra)

    def _letter_probs(self, logits: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Option scores (logsumexp over each letter's spellings), their softmax and the argmax."""
        scores = torch.stack([torch.logsumexp(logits[self.letter_ids(self.letters[i])], 0) for i in range(n)])
        probs = torch.softmax(scores, 0)
        return scores, probs, int(torch.argmax(probs))

    def _evidence(self, att: torch.Tensor | None, layout: PromptLayout, want: bool, note: str | None,
                  extra: dict) -> list[dict]:
        """The heaviest stored frames by the last position's attention ``att`` (``(S,)``, prompt positions)."""
        evidence: list[dict] = []
        if want and att is not None:
            per_frame = torch.stack([att[f.tokens[0]:f.tokens[1]].sum() for f in layout.frames])
            total = float(per_frame.sum())
            extra["memory_attention"] = total
            weights = per_frame / total if total > 0 else torch.full_like(per_frame, 1.0 / len(per_frame))
            order = torch.argsort(weights, descending=True, stable=True)[: self.evidence_top_k]
            for j in order.tolist():
                f = layout.frames[j]
                evidence.append({"frame_index": f.frame_index, "timestamp": f.timestamp,
                                 "weight": float(weights[j]), "level": f.level})
        elif want:
            extra["evidence_note"] = note or "the LM's attention modules returned no weights"
        return evidence

    def _answer_cached(self, memory: Tokens, embeds: torch.Tensor, mask: torch.Tensor, layout: PromptLayout,
                       candidates: list[str], query_time: float | None) -> Answer:
        """Answer over a key-value cache: with ``press``, prefill the memory prefix, compress the
        cache and run the question over it (:mod:`streammem.models.vlm_press`); without, one
        cached pass. With candidates the option letters are scored as in :meth:`answer`; without,
        the answer is decoded greedily (at most ``max_new_tokens``, up to an end-of-sequence
        token): ``text`` is the generated text, ``confidence`` the geometric mean of the chosen
        tokens' probabilities, ``index`` -1, ``letter`` and ``probs`` empty."""
        want = self.evidence_top_k > 0 and bool(layout.frames)
        scored = self.press is not None and self.press.needs_scores and bool(layout.frames)
        extra: dict[str, Any] = {"prompt_tokens": layout.length, "memory_tokens": len(memory),
                                 "memory_frames": len(layout.frames)}
        with self._eager_lm() if (want or scored) else _null() as why:
            if scored and why is not None:
                raise RuntimeError(f"the {self.press.name} press needs the LM's attention weights: {why}")
            logits, att, cache, info = self._cached_pass(embeds, mask, layout, want and why is None, scored)
        extra.update(info)
        evidence = self._evidence(att, layout, want, why, extra)
        if candidates:
            scores, probs, idx = self._letter_probs(logits, len(candidates))
            extra["letter_logits"] = scores.tolist()
            return Answer(index=idx, letter=self.letters[idx], text=str(candidates[idx]),
                          confidence=float(probs[idx]), probs=probs.tolist(), evidence=evidence,
                          query_time=query_time, extra=extra)
        ids, logps = self._greedy(logits, cache, layout.length)
        text = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
        conf = float(torch.tensor(logps).mean().exp()) if logps else 0.0
        extra.update(free_form=True, generated_tokens=len(ids), token_probs=[float(torch.tensor(lp).exp()) for lp in logps])
        return Answer(index=-1, letter="", text=text, confidence=conf, probs=[], evidence=evidence,
                      query_time=query_time, extra=extra)

    def _cached_pass(self, embeds: torch.Tensor, mask: torch.Tensor, layout: PromptLayout, rows_wanted: bool,
                     scored: bool) -> tuple[torch.Tensor, torch.Tensor | None, Any, dict]:
        """``(next-token logits (V,), last-position attention over prompt positions (S,) or None,
        the cache, info)``; the cache holds the (compressed) prompt, ready for decoding."""
        rows: list[torch.Tensor] = []
        if self.press is None or not layout.frames:
            with self._attention_rows(rows) if rows_wanted else _null():
                out = self.model(inputs_embeds=embeds, attention_mask=mask, use_cache=True)
            att = torch.stack(rows).mean(0) if rows else None
            return out.logits[0, -1].float().cpu(), att, _out_cache(out), {}
        # 1. prefill the memory prefix (everything before the question)
        s, p = layout.length, layout.suffix[0]
        cols: list[torch.Tensor] = []
        with self._attention_columns(cols) if scored else _null():
            pre = self.model(inputs_embeds=embeds[:, :p], attention_mask=mask[:, :p], use_cache=True)
        cache = _out_cache(pre)
        # 2. compress each layer's cache over the memory positions
        mem_pos = layout.memory_positions
        kept: list[torch.Tensor] = []
        for i, layer in enumerate(cache.layers):
            layer.keys, layer.values, pos = self.press.compress_layer(layer.keys, layer.values, mem_pos,
                                                                      cols[i].cpu() if cols else None)
            kept.append(pos)
        # 3. the question over the compressed cache, at its uncompressed positions
        c = cache.get_seq_length()
        dev = embeds.device
        with self._attention_rows(rows) if rows_wanted else _null():
            out = self.model(inputs_embeds=embeds[:, p:], attention_mask=torch.ones(1, c + s - p, dtype=torch.long, device=dev),
                             position_ids=torch.arange(p, s, device=dev)[None], use_cache=True, **self._cache_arg(cache))
        att = None
        if rows:  # each layer's row is over its own kept entries: back to prompt positions
            att = torch.zeros(s)
            for r, pos in zip(rows, kept):
                att.index_add_(0, pos, r[:len(pos)])
                att[p:] += r[len(pos):]
            att /= len(rows)
        info = {"press": self.press.name, "press_ratio": self.press.ratio,
                "memory_tokens_kept": self.press.kept(len(mem_pos)), "cache_tokens": c}
        return out.logits[0, -1].float().cpu(), att, cache, info

    def _cache_arg(self, cache: Any) -> dict:
        """``{"cache": cache}`` (transformers >= 5.25) or ``{"past_key_values": cache}``."""
        if not hasattr(self, "_cache_kw"):
            params = inspect.signature(self.model.forward).parameters
            self._cache_kw = "cache" if "cache" in params else "past_key_values"
        return {self._cache_kw: cache}

    def _stop_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        gen = getattr(self.model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None)
        ids |= set(eos) if isinstance(eos, (list, tuple)) else {eos}
        return {int(i) for i in ids if i is not None}

    def _greedy(self, logits: torch.Tensor, cache: Any, position: int) -> tuple[list[int], list[float]]:
        """Greedy decoding from ``logits`` over ``cache``; the first new token sits at ``position``.
        Returns the token ids (without the stop token) and their log-probabilities."""
        stop, embed = self._stop_ids(), self.model.get_input_embeddings()
        dev = embed.weight.device
        ids: list[int] = []
        logps: list[float] = []
        for step in range(self.max_new_tokens):
            lp = torch.log_softmax(logits.float(), -1)
            tok = int(torch.argmax(lp))
            if tok in stop:
                break
            ids.append(tok)
            logps.append(float(lp[tok]))
            if step + 1 == self.max_new_tokens:
                break
            out = self.model(inputs_embeds=embed(torch.tensor([[tok]], device=dev)),
                             attention_mask=torch.ones(1, cache.get_seq_length() + 1, dtype=torch.long, device=dev),
                             position_ids=torch.tensor([[position + step]], device=dev), use_cache=True,
                             **self._cache_arg(cache))
            logits = out.logits[0, -1].cpu()
        return ids, logps


@dataclass(eq=False)
class VLMFrameEncoder:
    """A VLM answerer's frame encoder as the QA pipeline's ``encoder``: ``Frame -> Tokens``
    (``grid*grid`` vision features, :meth:`LlavaAnswerer.encode_frames`), with ``dim`` and ``grid``."""

    answerer: LlavaAnswerer

    @property
    def dim(self) -> int:
        return self.answerer.dim

    @property
    def grid(self) -> int:
        return self.answerer.grid

    def __call__(self, frame: Frame) -> Tokens:
        return self.answerer.encode_frames([frame])[0]


def load_answerer(spec: str, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None,
                  **kwargs: Any) -> LlavaAnswerer:
    """The VLM answerer for ``hf:<model id or folder>``, chosen by the checkpoint's ``config.model_type``:
    LLaVA, LLaVA-NeXT(-Video), LLaVA-OneVision -> :class:`LlavaAnswerer`; SmolVLM / SmolVLM2,
    Idefics3 -> :class:`~streammem.models.smolvlm.SmolVLMAnswerer`. ``kwargs`` are the answerer's
    fields (``grid``, ``press``, ``max_new_tokens`` ...).

    Raises :class:`~streammem.models.hf.HubUnavailable` (one line) when a hub id cannot be
    fetched, ValueError for a spec that is not ``hf:...`` or a model of another family.

    Example (downloads ~0.5 GB)::

        qa = load_answerer("hf:HuggingFaceTB/SmolVLM2-256M-Video-Instruct")
    """
    from streammem.models.smolvlm import SmolVLMAnswerer

    name = parse_spec(spec)
    if name is None:
        raise ValueError(f"a VLM answerer is named hf:<model id or folder>, got {spec!r}")
    transformers = require_transformers()
    config = load_hf(name, transformers.AutoConfig.from_pretrained)
    for cls in (LlavaAnswerer, SmolVLMAnswerer):
        if config.model_type in cls._MODEL_CLASSES:
            return cls.from_pretrained(name, device=device, dtype=dtype, **kwargs)
    known = sorted({*LlavaAnswerer._MODEL_CLASSES, *SmolVLMAnswerer._MODEL_CLASSES})
    raise ValueError(f"{name} is a {config.model_type!r} model; hf: answerers support {', '.join(known)}")


def _out_cache(out: Any) -> Any:
    """The key-value cache of a model output (``cache`` from transformers 5.25, else ``past_key_values``)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


@contextmanager
def _null() -> Iterator[None]:
    yield None


def _version_at_least(version: str, minimum: str) -> bool:
    def parts(v: str) -> tuple[int, ...]:
        out = []
        for p in v.split(".")[:3]:
            digits = "".join(ch for ch in p if ch.isdigit())
            out.append(int(digits) if digits else 0)
        return tuple(out)

    return parts(version) >= parts(minimum)


def _image_stats(transformers: Any, path: str, config: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The checkpoint's image processor mean/std; CLIP's (or 0.5 for SigLIP) if it can't be read."""
    try:
        proc = transformers.AutoImageProcessor.from_pretrained(path)
        mean, std = tuple(float(v) for v in proc.image_mean), tuple(float(v) for v in proc.image_std)
        if len(mean) == 3 and len(std) == 3:
            return mean, std
    except Exception:  # noqa: BLE001 - a missing or unloadable processor config falls back below
        pass
    if getattr(config.vision_config, "model_type", "") in ("siglip_vision_model", "smolvlm_vision", "idefics3_vision"):
        return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    return CLIP_MEAN, CLIP_STD

