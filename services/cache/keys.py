"""Cache keys: a BLAKE3-256 hash of one canonical serialization of everything that decides the answer.

The material, in a fixed order, serialized as compact JSON (every string escaped, so no two materials can
serialize alike):

* the key scheme version,
* the namespace (the tenant, unless the configuration explicitly shares a namespace between tenants),
* the model or tier name,
* the effective sampling parameters (unset temperature / top_p take their documented default of 1.0; stop
  sequences are a set; under greedy decoding, temperature 0, the seed and top_p cannot change the output and are
  left out so that greedy requests differing only in them share an entry),
* the normalizer's digest (a hash of its version and whole rule configuration),
* the whole conversation: every message's role, author name and normalized content, in order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum

from blake3 import blake3

from services.cache.normalizer import Normalizer

KEY_SCHEME = "costmesh.cache.key/v1"
KEY_HEX_LEN = 64


class Role(StrEnum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"


@dataclass(frozen=True, slots=True)
class Message:
    """One turn of a conversation (the domain twin of ``costmesh.common.v1.ChatMessage``)."""

    role: Role
    content: str
    name: str = ""


@dataclass(frozen=True, slots=True)
class Sampling:
    """Sampling parameters as requested; ``None`` = unset (the serving default)."""

    max_tokens: int = 0
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def effective_temperature(self) -> float:
        return 1.0 if self.temperature is None else self.temperature

    @property
    def greedy(self) -> bool:
        return self.effective_temperature == 0.0

    def canonical(self) -> list[object]:
        stop = sorted(set(self.stop))
        if self.greedy:
            return [self.max_tokens, 0.0, None, stop, None]
        top_p = 1.0 if self.top_p is None else self.top_p
        return [self.max_tokens, self.effective_temperature, top_p, stop, self.seed]


def build_key(
    *,
    namespace: str,
    model: str,
    sampling: Sampling,
    messages: tuple[Message, ...] | list[Message],
    normalizer: Normalizer,
) -> str:
    """The hex cache key of one request (64 lowercase hex digits)."""
    material = [
        KEY_SCHEME,
        namespace,
        model,
        sampling.canonical(),
        normalizer.digest,
        [[m.role.value, m.name.strip(), normalizer.normalize(m.content)] for m in messages],
    ]
    encoded = json.dumps(material, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
    return blake3(encoded).hexdigest()


def is_key(value: str) -> bool:
    """True for a well-formed hex cache key."""
    return len(value) == KEY_HEX_LEN and all(c in "0123456789abcdef" for c in value)
