"""Prompt normalization: the text of a conversation reduced to what decides the model's answer.

Two prompts that differ only in Unicode form, spacing, typographic punctuation or volatile fields (a request
timestamp, a trace id) are the same question and should share a cache entry; two prompts that differ in a number,
a negation or a name are different questions and must not. The steps, in order:

1. Unicode NFKC (full-width letters, ligatures, non-breaking spaces … become their plain forms).
2. Typographic quotes, primes, dashes and minus signs fold to ASCII ``'`` ``"`` ``-``.
3. The namespace's own named patterns (``patterns``), each replaced by ``<name>``.
4. Built-in volatile-field scrubbers, each replaced by a placeholder: ISO-8601 / RFC 2822 timestamps ``<ts>``,
   UUIDs ``<uuid>``, bare dates ``<date>`` (off by default: a date is often the question itself), Unix epoch
   seconds or milliseconds ``<epoch>``, long hex ids ``<hex>``.
5. Whitespace: runs collapse to one space and the ends are trimmed (``"collapse"``), or line breaks and
   indentation are kept and only spaces inside lines collapse (``"lines"``, for prompts that carry code), or
   ``"off"``.
6. Optional case folding (off by default: case can carry meaning, e.g. ``US`` vs ``us``).

A scrubbed field that the answer would *echo* (``"what time is it? now=…"``) makes a cached answer wrong, so a
namespace whose prompts ask about such fields turns the scrubber off. The normalizer's :attr:`Normalizer.fingerprint`
(its version plus its whole rule configuration) is part of every cache key, so changing a rule can never serve an
entry stored under the old rules.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: Bump when the behaviour of a rule changes (not when a configuration changes: that is in the fingerprint).
NORMALIZER_VERSION = 1

_PATTERN_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")

# Typographic characters that NFKC leaves alone, folded to their ASCII twins.
_TYPOGRAPHY = str.maketrans(
    {
        **dict.fromkeys("\u2018\u2019\u201a\u201b\u2032\u2035\u00b4\u02bc", "'"),
        **dict.fromkeys("\u201c\u201d\u201e\u201f\u2033\u2036\u00ab\u00bb", '"'),
        **dict.fromkeys("\u2010\u2011\u2012\u2013\u2014\u2015\u2212\u2043\ufe58\ufe63\uff0d", "-"),
    }
)

_MONTH = (
    r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|"
    r"sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)"
)
_WEEKDAY = r"(?:mon|tue|wed|thu|fri|sat|sun)[a-z]*"
_TIME = r"\d{1,2}:\d{2}(?::\d{2}(?:[.,]\d{1,9})?)?"
_ZONE = r"(?:\s?(?:z|utc|gmt|[+-]\d{2}(?::?\d{2})?))"

# Built-in scrubbers in priority order: at one position the first alternative that matches wins, so a full
# timestamp is taken before the date inside it.
_BUILTINS: dict[str, str] = {
    # 2024-05-01T12:03:11.123Z, 2024-05-01 12:03:11+02:00, 20240501T120311Z, 05/01/2024 12:03:11 PM,
    # Wed, 01 May 2024 12:03:11 GMT, 1 May 2024 12:03
    "ts": (
        r"\d{4}-\d{2}-\d{2}[t ]" + _TIME + r"(?:" + _ZONE + r")?"
        r"|\d{8}t\d{6}(?:\.\d+)?z?"
        r"|\d{1,2}/\d{1,2}/\d{2,4},?\s" + _TIME + r"(?:\s?[ap]\.?m\.?)?" + r"(?:" + _ZONE + r")?"
        r"|(?:" + _WEEKDAY + r",?\s)?\d{1,2}\s" + _MONTH + r"\.?\s\d{4},?\s" + _TIME + r"(?:" + _ZONE + r")?"
        r"|(?:"
        + _WEEKDAY
        + r",?\s)?"
        + _MONTH
        + r"\.?\s\d{1,2},?\s\d{4},?\s(?:at\s)?"
        + _TIME
        + r"(?:\s?[ap]\.?m\.?)?"
        + r"(?:"
        + _ZONE
        + r")?"
    ),
    "uuid": r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
    # 2024-05-01, 05/01/2024, 1 May 2024, May 1, 2024
    "date": (
        r"\d{4}-\d{2}-\d{2}"
        r"|\d{1,2}/\d{1,2}/\d{4}"
        r"|\d{1,2}\s" + _MONTH + r"\.?\s\d{4}"
        r"|" + _MONTH + r"\.?\s\d{1,2},?\s\d{4}"
    ),
    # Seconds 1000000000-1999999999 (2001-2033) or milliseconds, as a whole token.
    "epoch": r"1\d{9}(?:\d{3})?(?:\.\d+)?",
    # 16+ hex digits mixing digits and letters (trace ids, request ids, digests), optionally 0x-prefixed.
    "hex": r"(?:0x)?(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{16,}",
}
_BUILTIN_PLACEHOLDER = {"ts": "<ts>", "uuid": "<uuid>", "date": "<date>", "epoch": "<epoch>", "hex": "<hex>"}
# A scrubbed field must be a whole token: not glued to letters, digits or the inside of a decimal number.
_LEFT = r"(?<![0-9A-Za-z_.])"
_RIGHT = r"(?![0-9A-Za-z_]|\.\d)"

_DIGIT = re.compile(r"\d")
_SPACES = re.compile(r"\s+")
_INDENT = re.compile(r"[ \t]*")
_INLINE_SPACES = re.compile(r"[^\S\n]+")
_BLANK_LINES = re.compile(r"\n{3,}")


class NormalizerConfig(BaseModel):
    """The normalization rules of one namespace. Every field is part of the cache key's fingerprint."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    nfkc: bool = Field(default=True, description="Unicode NFKC normalization.")
    fold_typography: bool = Field(default=True, description="Fold typographic quotes, primes and dashes to ASCII.")
    whitespace: Literal["collapse", "lines", "off"] = Field(
        default="collapse", description="'collapse' every run to one space; 'lines' keeps line breaks (code); 'off'."
    )
    casefold: bool = Field(default=False, description="Case-insensitive keys (str.casefold).")
    scrub_timestamps: bool = Field(default=True, description="ISO-8601 / RFC 2822 date-times → <ts>.")
    scrub_uuids: bool = Field(default=True, description="UUIDs → <uuid>.")
    scrub_dates: bool = Field(default=False, description="Bare dates → <date> (off: a date is often the question).")
    scrub_epochs: bool = Field(default=True, description="Unix epoch seconds / ms (2001-2033) → <epoch>.")
    scrub_hex_ids: bool = Field(default=True, description="Hex ids of 16+ digits mixing digits and letters → <hex>.")
    patterns: dict[str, str] = Field(
        default_factory=dict,
        description="Named regular expressions (name → regex), each match replaced by <name>; applied first.",
    )

    @field_validator("patterns")
    @classmethod
    def _check_patterns(cls, value: dict[str, str]) -> dict[str, str]:
        for name, pattern in value.items():
            if not _PATTERN_NAME.match(name):
                raise ValueError(f"pattern name {name!r} must match {_PATTERN_NAME.pattern}")
            try:
                compiled = re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"pattern {name!r} is not a valid regular expression: {exc}") from exc
            if compiled.match(""):
                raise ValueError(f"pattern {name!r} matches the empty string")
        return value


class Normalizer:
    """Compiled rules of one :class:`NormalizerConfig`; :meth:`normalize` is pure and thread-safe."""

    __slots__ = ("_custom", "_scrub", "_steps", "config", "fingerprint")

    def __init__(self, config: NormalizerConfig | None = None) -> None:
        self.config = config = config or NormalizerConfig()
        self.fingerprint = json.dumps(
            {"version": NORMALIZER_VERSION, "rules": config.model_dump(mode="json")},
            sort_keys=True,
            separators=(",", ":"),
        )
        self._custom = [(re.compile(p), f"<{name}>") for name, p in sorted(config.patterns.items())]
        enabled = [
            name
            for name, on in (
                ("ts", config.scrub_timestamps),
                ("uuid", config.scrub_uuids),
                ("date", config.scrub_dates),
                ("epoch", config.scrub_epochs),
                ("hex", config.scrub_hex_ids),
            )
            if on
        ]
        self._scrub: re.Pattern[str] | None = None
        if enabled:
            alternation = "|".join(f"(?P<{name}>{_BUILTINS[name]})" for name in enabled)
            self._scrub = re.compile(f"{_LEFT}(?:{alternation}){_RIGHT}", re.IGNORECASE)
        steps: list[Callable[[str], str]] = []
        if config.nfkc:
            steps.append(lambda s: unicodedata.normalize("NFKC", s))
        if config.fold_typography:
            steps.append(lambda s: s.translate(_TYPOGRAPHY))
        if self._custom:
            steps.append(self._apply_custom)
        if self._scrub is not None:
            steps.append(self._apply_builtin)
        if config.whitespace == "collapse":
            steps.append(lambda s: _SPACES.sub(" ", s).strip())
        elif config.whitespace == "lines":
            steps.append(_collapse_lines)
        if config.casefold:
            steps.append(str.casefold)
        self._steps = tuple(steps)

    def normalize(self, text: str) -> str:
        for step in self._steps:
            text = step(text)
        return text

    def _apply_custom(self, text: str) -> str:
        for pattern, placeholder in self._custom:
            text = pattern.sub(placeholder, text)
        return text

    def _apply_builtin(self, text: str) -> str:
        assert self._scrub is not None
        # Cheap pre-check: every built-in field contains a digit.
        if _DIGIT.search(text) is None:
            return text
        return self._scrub.sub(_placeholder, text)


def _placeholder(match: re.Match[str]) -> str:
    return _BUILTIN_PLACEHOLDER[match.lastgroup or "hex"]


def _collapse_lines(text: str) -> str:
    """Keep line breaks and each line's indentation; collapse spaces inside lines, trailing spaces, blank runs."""
    lines = []
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        indent = _INDENT.match(line)
        start = indent.end() if indent else 0
        lines.append(line[:start] + _INLINE_SPACES.sub(" ", line[start:]).rstrip())
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip("\n")
