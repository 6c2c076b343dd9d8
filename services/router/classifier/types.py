"""Plain domain types of the router classifier (no gRPC)."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Tier(enum.IntEnum):
    """Model tier. Ordered: ``CHEAP < FULL``, so "at least" / "at most" are comparisons."""

    CHEAP = 1
    FULL = 2

    @classmethod
    def parse(cls, value: str) -> Tier:
        try:
            return cls[value.strip().upper()]
        except KeyError:
            raise ValueError(f"unknown tier {value!r} (expected 'cheap' or 'full')") from None

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True, slots=True)
class Message:
    """One turn of a conversation; ``role`` is ``system`` | ``user`` | ``assistant`` | ``tool``."""

    role: str
    content: str


def user_messages(text: str) -> tuple[Message, ...]:
    """A single-turn conversation holding ``text`` as the user's message."""
    return (Message(role="user", content=text),)
