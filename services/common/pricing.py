"""Prices in integer micro-USD per one million tokens, and the cost of a usage record.

Defaults mirror public list prices: cheap tier 0.15 / 0.60 USD per 1M input / output tokens (cached input 0.075),
full tier 2.50 / 10.00 (cached input 1.25). Costs round up to the next micro-USD so a request never costs 0 by
rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

MICROS_PER_USD = 1_000_000
TOKENS_PER_PRICE_UNIT = 1_000_000


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """Tokens of one inference; ``cached_input_tokens`` is the part of ``input_tokens`` served from prefix cache."""

    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class Price(BaseModel):
    """Micro-USD per 1M tokens."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input_micros_per_mtok: int = Field(ge=0)
    output_micros_per_mtok: int = Field(ge=0)
    cached_input_micros_per_mtok: int = Field(ge=0)

    def cost_micros(self, usage: TokenUsage) -> int:
        """Cost of ``usage`` in micro-USD, rounded up; cached prompt tokens at the cached-input price."""
        cached = min(usage.cached_input_tokens, usage.input_tokens)
        numer = (
            (usage.input_tokens - cached) * self.input_micros_per_mtok
            + cached * self.cached_input_micros_per_mtok
            + usage.output_tokens * self.output_micros_per_mtok
        )
        return _ceil_div(numer, TOKENS_PER_PRICE_UNIT)

    def estimate_micros(self, prompt_tokens: int, max_tokens: int) -> int:
        """Upper-bound estimate for a reservation: every prompt token uncached, every allowed output token."""
        return self.cost_micros(TokenUsage(input_tokens=prompt_tokens, output_tokens=max_tokens))


CHEAP_DEFAULT = Price(
    input_micros_per_mtok=150_000, output_micros_per_mtok=600_000, cached_input_micros_per_mtok=75_000
)
FULL_DEFAULT = Price(
    input_micros_per_mtok=2_500_000, output_micros_per_mtok=10_000_000, cached_input_micros_per_mtok=1_250_000
)


class PriceTable(BaseModel):
    """Prices per tier name ('cheap', 'full') and optionally per model name (a model entry wins)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tiers: dict[str, Price] = Field(default_factory=lambda: {"cheap": CHEAP_DEFAULT, "full": FULL_DEFAULT})
    models: dict[str, Price] = Field(default_factory=dict)

    def price_for(self, *, tier: str, model: str = "") -> Price:
        if model and model in self.models:
            return self.models[model]
        try:
            return self.tiers[tier]
        except KeyError:
            raise KeyError(f"no price for tier {tier!r} (known: {sorted(self.tiers)})") from None
