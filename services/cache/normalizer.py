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

import functools
import json
import re
import unicodedata
from collections.abc import Callable, Iterator
from typing import Literal

from blake3 import blake3
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

_DIGIT_RUN = re.compile(r"\d+")
# Where a scrubbed field can start: a letter or digit not glued to the previous token (see _LEFT).
_TOKEN_START = re.compile(r"(?<![0-9A-Za-z_.])[0-9A-Za-z]")
# Every built-in field contains a digit and starts at most _LEAD characters before its first digit (a weekday and a
# month name: "Wednesday, September 1, …"). A hex id that opens with more letters than that is left alone (random
# hex has a digit in its first 24 characters with probability 1 - (6/16)**24).
_LEAD = 24
_ASCII_DIGITS = frozenset("0123456789")
_ASCII_ALNUM = frozenset("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_GLUED = _ASCII_ALNUM | {"_", "."}
#: Normalized texts remembered per normalizer (only texts up to MEMO_MAX_CHARS).
MEMO_ENTRIES = 4096
MEMO_MAX_CHARS = 8192
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

    __slots__ = ("_custom", "_memo", "_scrub", "_steps", "config", "digest", "fingerprint")

    def __init__(self, config: NormalizerConfig | None = None) -> None:
        self.config = config = config or NormalizerConfig()
        self.fingerprint = json.dumps(
            {"version": NORMALIZER_VERSION, "rules": config.model_dump(mode="json")},
            sort_keys=True,
            separators=(",", ":"),
        )
        #: BLAKE3 of the fingerprint: what cache keys include.
        self.digest = blake3(self.fingerprint.encode()).hexdigest()
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
        # ASCII text is NFKC-normal and has no typographic characters: both steps are skipped for it.
        if config.nfkc:
            steps.append(lambda s: s if s.isascii() else unicodedata.normalize("NFKC", s))
        if config.fold_typography:
            steps.append(lambda s: s if s.isascii() else s.translate(_TYPOGRAPHY))
        if self._custom:
            steps.append(self._apply_custom)
        if self._scrub is not None:
            steps.append(self._apply_builtin)
        if config.whitespace == "collapse":
            steps.append(lambda s: " ".join(s.split()))
        elif config.whitespace == "lines":
            steps.append(_collapse_lines)
        if config.casefold:
            steps.append(str.casefold)
        self._steps = tuple(steps)
        # Prompts repeat verbatim (fixed system prompts, retried questions): remember recent results.
        self._memo = functools.lru_cache(maxsize=MEMO_ENTRIES)(self._normalize)

    def normalize(self, text: str) -> str:
        if len(text) <= MEMO_MAX_CHARS:
            return self._memo(text)
        return self._normalize(text)

    def _normalize(self, text: str) -> str:
        for step in self._steps:
            text = step(text)
        return text

    def _apply_custom(self, text: str) -> str:
        for pattern, placeholder in self._custom:
            text = pattern.sub(placeholder, text)
        return text

    def _apply_builtin(self, text: str) -> str:
        """``self._scrub.sub(_placeholder, text)``, but trying the pattern only where a field can start.

        A regex ``sub`` tries every alternative at every position; fields are rare and all hold a digit, so this
        visits each run of digits and tries the pattern at the few token starts that could begin a field holding
        it, in ascending order, as ``sub`` would (the equivalence is a property test; the one difference is a hex
        id that opens with more than _LEAD letters).
        """
        scrub = self._scrub
        assert scrub is not None
        out: list[str] = []
        done = 0  # text[:done] is emitted
        pos = 0  # the next digit run starts at or after pos
        while (digit := _next_digit(text, pos)) >= 0:
            pos = _run_end(text, digit)
            for start in _token_starts(text, max(done, digit - _LEAD), digit):
                match = scrub.match(text, start)
                if match is not None:
                    out.append(text[done:start])
                    out.append(_placeholder(match))
                    done = pos = match.end()
                    break
        if not out:
            return text
        out.append(text[done:])
        return "".join(out)

    def _apply_builtin_reference(self, text: str) -> str:
        """The plain definition of :meth:`_apply_builtin` (tests compare the two)."""
        assert self._scrub is not None
        return self._scrub.sub(_placeholder, text)


def _next_digit(text: str, pos: int) -> int:
    """Index of the first digit at or after ``pos``, or -1 (ASCII text: str.find, much faster than a regex)."""
    if not text.isascii():
        found = _DIGIT_RUN.search(text, pos)
        return found.start() if found is not None else -1
    first = end = len(text)
    for d in "0123456789":
        index = text.find(d, pos, first)
        if index != -1:
            first = index
    return first if first < end else -1


def _run_end(text: str, digit: int) -> int:
    end = len(text)
    while digit < end and text[digit].isdigit():
        digit += 1
    return digit


def _token_starts(text: str, lo: int, hi: int) -> Iterator[int]:
    """Positions in [lo, hi] where a letter or digit follows neither a letter, a digit, '_' nor '.'."""
    if not text.isascii():
        for m in _TOKEN_START.finditer(text, lo, hi + 1):
            yield m.start()
        return
    for i in range(lo, hi + 1):
        if text[i] in _ASCII_ALNUM and (i == 0 or text[i - 1] not in _GLUED):
            yield i


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
