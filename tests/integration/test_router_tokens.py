"""Reservation estimates count prompt tokens exactly as the worker will (an estimate must be an upper bound)."""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerFast

from services.infer.models import ensure_local_models
from services.router.classifier.types import Message, Tier
from services.router.tokens import TierTokenizers, estimate_tokens

MODELS = Path(__file__).resolve().parents[2] / "var" / "models"


def test_router_counts_the_rendered_chat_prompt_like_the_worker() -> None:
    ensure_local_models(MODELS)
    counter = TierTokenizers({Tier.CHEAP: MODELS / "cheap", Tier.FULL: None})
    convo = [Message("system", "You are terse."), Message("user", "Prove that there are infinitely many primes.")]
    tok = PreTrainedTokenizerFast.from_pretrained(str(MODELS / "cheap"))
    text = tok.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in convo], add_generation_prompt=True, tokenize=False
    )
    worker_count = len(tok(text, add_special_tokens=False)["input_ids"])
    assert counter.count_prompt(Tier.CHEAP, convo) == worker_count > 10
    # a tier without a tokenizer falls back to the conservative estimate
    assert counter.count_prompt(Tier.FULL, convo) == estimate_tokens(convo)
