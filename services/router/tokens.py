"""Prompt token counts for reservation estimates, with each tier's own tokenizer and chat template.

A tier whose tokenizer directory is configured counts exactly what its worker will see (the chat template rendered
with the generation prompt, then tokenized). Without one, an upper bound is used — one token per UTF-8 byte plus 16
per message (a byte-level BPE token is never shorter than one byte) — which over-reserves rather than
under-reserves, so a hard limit still holds; the commit settles the real count. Configure ``tokenizer_dirs`` for
exact estimates.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog

from services.router.classifier.types import Message, Tier

log = structlog.get_logger("costmesh.router.tokens")


def estimate_tokens(messages: Sequence[Message]) -> int:
    return sum(len(m.content.encode("utf-8")) + 16 for m in messages)


class TierTokenizers:
    def __init__(self, dirs: dict[Tier, Path | None]) -> None:
        self._tokenizers: dict[Tier, Any] = {}
        for tier, path in dirs.items():
            if path is None or not (path / "tokenizer.json").exists():
                log.warning("tokenizer_missing_using_estimate", tier=tier.label, path=str(path))
                continue
            from transformers import PreTrainedTokenizerFast

            self._tokenizers[tier] = PreTrainedTokenizerFast.from_pretrained(str(path))

    def count_prompt(self, tier: Tier, messages: Sequence[Message]) -> int:
        tok = self._tokenizers.get(tier)
        if tok is None:
            return estimate_tokens(messages)
        convo = [{"role": m.role, "content": m.content} for m in messages]
        if tok.chat_template:
            # Exactly what the worker feeds the engine: the rendered template, tokenized without extra specials.
            text = tok.apply_chat_template(convo, add_generation_prompt=True, tokenize=False)
            return len(tok(text, add_special_tokens=False)["input_ids"])
        return len(tok("\n".join(m.content for m in messages))["input_ids"])
