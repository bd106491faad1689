"""SmolVLMAnswerer: SmolVLM / SmolVLM2 and Idefics3 from ``transformers`` reading the Pyramid Memory Bank.

The same contract as :class:`~streammem.models.vlm.LlavaAnswerer` (write time: frames ->
pooled vision features stored in the memory; read time: one LM position per memory token,
``"Frame k at t s:"`` markers, multiple-choice letter scoring or a free-form generated answer,
evidence from the last position's attention, optional KV-cache press), for the models made of
a SigLIP-style ``vision_model``, a pixel-shuffle ``connector`` and a Llama ``text_model``
(``SmolVLMForConditionalGeneration``, ``Idefics3ForConditionalGeneration``; e.g.
``HuggingFaceTB/SmolVLM2-256M-Video-Instruct``, ``HuggingFaceTB/SmolVLM2-2.2B-Instruct``).

1. **Write time**: each whole frame is resized to the vision model's ``image_size`` square,
   normalised with the processor's mean/std (0.5 for SmolVLM), run through the vision model
   (its last hidden state after ``post_layernorm``: a ``patch_side x patch_side`` grid of
   ``vision_hidden``-d features; 32x32 for SmolVLM2-256M at 512 px) and pooled to
   ``grid x grid`` (adaptive average). ``dim`` = the vision hidden size.
2. **Read time**: the connector pixel-shuffles ``s x s`` neighbouring patches (``s`` =
   ``config.scale_factor``) into one ``s^2 * vision_hidden`` vector and projects it linearly
   (no bias) to the LM. A memory token stands for a pooled region of the frame, so it is
   projected as a uniform ``s x s`` block: its feature repeated ``s^2`` times through the
   connector's ``modality_projection`` -> one LM position per memory token.

Departures (named, not hidden): SmolVLM natively gives one LM position per ``s x s`` patches of
a 512 px image (64 per frame for SmolVLM2-256M, plus image splitting and ``<fake_token_around_image>``
/ ``<global-img>`` wrappers); here a level-0 frame of the pyramid gives ``grid^2`` (256)
positions of pooled regions, without the wrappers, and the video prompt's
``"You are provided the following series of N frames..."`` preamble is not used.

Example (downloads ~0.5 GB; nothing is downloaded in this project's tests)::

    from streammem.models.vlm import load_answerer
    qa = load_answerer("hf:HuggingFaceTB/SmolVLM2-256M-Video-Instruct")
    qa.dim, qa.grid     # (768, 16)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from streammem.models.vlm import LlavaAnswerer, _part

__all__ = ["SmolVLMAnswerer"]


@dataclass(eq=False)
class SmolVLMAnswerer(LlavaAnswerer):
    """A SmolVLM / SmolVLM2 / Idefics3 model behind the streammem answerer contract (see the
    module docstring); fields as :class:`~streammem.models.vlm.LlavaAnswerer` (mean/std default
    to 0.5, SigLIP's)."""

    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    _MODEL_CLASSES = {"smolvlm": "SmolVLMForConditionalGeneration", "idefics3": "Idefics3ForConditionalGeneration"}
    # one user turn as the checkpoints' chat templates render it, the video where the image goes
    _PROMPT_FORMATS = {
        "smolvlm": "<|im_start|>User: {video}\n{text}<end_of_utterance>\nAssistant:",
        "idefics3": "<|begin_of_text|>User:{video}\n{text}<end_of_utterance>\nAssistant:",
    }

    def _init_parts(self) -> None:
        self.vision_tower = _part(self.model, "vision_model")
        self.connector = _part(self.model, "connector")
        self.projector = self.connector.modality_projection
        self.language_model = _part(self.model, "text_model")
        cfg = self.model.config
        vcfg = cfg.vision_config
        self.scale_factor = int(cfg.scale_factor)
        self.feature_layers = [-1]
        self.image_size = int(vcfg.image_size)
        self.patch_side = self.image_size // int(vcfg.patch_size)
        if self.grid > self.patch_side:
            raise ValueError(
                f"grid={self.grid} exceeds the vision model's {self.patch_side}x{self.patch_side} patch grid"
            )
        self.vision_hidden = int(vcfg.hidden_size)

    @torch.no_grad()
    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, patch_side, patch_side, vision_hidden)`` last hidden states of ``(B, 3, H, W)`` pixels."""
        p = next(self.vision_tower.parameters())
        h = self.vision_tower(pixel_values=pixel_values.to(p.device, p.dtype)).last_hidden_state
        return h.reshape(h.shape[0], self.patch_side, self.patch_side, -1)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """``(N, dim)`` -> ``(N, H)``: each token through the connector as a uniform ``s x s`` block."""
        p = next(self.projector.parameters())
        return self.projector(features.to(p.device, p.dtype).repeat(1, self.scale_factor ** 2))
